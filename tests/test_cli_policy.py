"""``tlsgate policy check``: the verdict on the first line, the deciding rule, every step, and exit 0/1/2."""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tlsgate.cli.policy import policy

from helpers import invoke, write_crl

run = functools.partial(invoke, policy, "check")


def write_leaf(path: Path, leaf: trustme.LeafCert) -> Path:
    """The leaf and any intermediates, as a client's certificate file holds them."""
    path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return path


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    """ca.pem, alice.pem (CN=alice, OU=eng), bob.pem (CN=bob, OU=sales) and an empty crl.pem."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    alice = ca.issue_cert("alice.example", common_name="alice", organization_unit_name="eng")
    bob = ca.issue_cert("bob.example", common_name="bob", organization_unit_name="sales")
    return {
        "ca": tmp_path / "ca.pem",
        "alice": write_leaf(tmp_path / "alice.pem", alice),
        "bob": write_leaf(tmp_path / "bob.pem", bob),
        "crl": write_crl(tmp_path / "crl.pem", ca),
    }


def test_allowed_client_prints_allow_the_rule_and_every_step(files: dict[str, Path]) -> None:
    result = run(
        "--cert", files["alice"], "--cacert", files["ca"], "--from", "10.1.2.3",
        "--allow-ou", "eng", "--allow-from", "10.0.0.0/8", "--crl", files["crl"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "ALLOW"
    assert lines[1] == "rule:   allow-ou"
    assert lines[2] == "reason: OU=eng matched allow-ou"
    for step in ("ok    address     source in allow-from 10.0.0.0/8", "ok    chain ", "ok    validity ",
                 "ok    revocation  not in ", "ok    identity    OU=eng matched allow-ou"):  # fmt: skip
        assert step in result.output
    assert "CN           alice" in result.output
    assert "FAIL" not in result.output


def test_wrong_cn_shows_the_allowed_names_beside_the_certificates(files: dict[str, Path]) -> None:
    result = run("--cert", files["bob"], "--cacert", files["ca"], "--allow-cn", "alice", "--allow-ou", "eng")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[:3] == [
        "DENY",
        "rule:   identity",
        "reason: CN=bob, OU=sales not allowed (allowed: CN alice; OU eng)",
    ]
    assert "identity rules (any one must match) vs this certificate:" in result.output
    assert any(line.split() == ["--allow-cn", "alice", "certificate", "CN:", "bob"] for line in lines)
    assert any(line.split() == ["--allow-ou", "eng", "certificate", "OU:", "sales"] for line in lines)


def test_certificate_from_another_ca_is_untrusted(files: dict[str, Path], other_ca: trustme.CA, tmp_path: Path) -> None:
    stranger = write_leaf(tmp_path / "stranger.pem", other_ca.issue_cert("x.example", common_name="alice"))
    result = run("--cert", stranger, "--cacert", files["ca"], "--allow-cn", "alice")
    assert result.exit_code == 1
    assert result.output.splitlines()[:2] == ["DENY", "rule:   untrusted"]
    assert "is not in --cacert" in result.output
    assert "someone else's CA" in result.output  # the hint names the certificate's real issuer
    assert "ok    identity" in result.output  # later steps still run: the operator sees every problem


def test_intermediates_in_the_cert_file_complete_the_chain(ca: trustme.CA, tmp_path: Path) -> None:
    leaf = ca.create_child_ca().issue_cert("svc.example", common_name="svc")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    result = run("--cert", write_leaf(tmp_path / "svc.pem", leaf), "--cacert", tmp_path / "ca.pem", "--allow-cn", "svc")
    assert result.exit_code == 0, result.output
    assert " via " in result.output


def test_revoked_client_names_serial_and_crl(files: dict[str, Path], ca: trustme.CA, tmp_path: Path) -> None:
    crl = write_crl(tmp_path / "revoked.pem", ca, [serial_of(files["alice"])])
    result = run("--cert", files["alice"], "--cacert", files["ca"], "--allow-cn", "alice", "--crl", crl)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[:2] == ["DENY", "rule:   crl"]
    assert lines[2].startswith(f"reason: revoked (serial {serial_of(files['alice']):#x}, ")
    assert lines[2].endswith(", keyCompromise)")
    assert f"hint: revoked by {crl}" in result.output


def test_expired_client_is_denied(ca: trustme.CA, files: dict[str, Path], tmp_path: Path) -> None:
    old = ca.issue_cert("alice.example", common_name="alice", not_after=datetime(2026, 1, 1))
    result = run("--cert", write_leaf(tmp_path / "old.pem", old), "--cacert", files["ca"], "--allow-cn", "alice")
    assert result.exit_code == 1
    assert result.output.splitlines()[:3] == [
        "DENY",
        "rule:   expired",
        "reason: client certificate expired 2026-01-01 00:00 UTC",
    ]


def test_at_checks_a_future_moment(files: dict[str, Path]) -> None:
    result = run("--cert", files["alice"], "--allow-cn", "alice", "--at", "3001-01-01")
    assert result.exit_code == 1
    assert result.output.splitlines()[1] == "rule:   expired"


@pytest.mark.parametrize(
    ("flags", "rule", "reason"),
    [
        (["--allow-from", "10.0.0.0/8"], "allow-from", "source 192.0.2.7 not in allow-from (10.0.0.0/8)"),
        (["--deny-from", "192.0.2.0/24"], "deny-from", "source 192.0.2.7 in deny-from 192.0.2.0/24"),
    ],
)
def test_denied_address_is_refused_before_the_handshake(
    files: dict[str, Path], flags: list[str], rule: str, reason: str
) -> None:
    result = run("--cert", files["alice"], "--from", "192.0.2.7", "--allow-cn", "alice", *flags)
    assert result.exit_code == 1
    assert result.output.splitlines()[:3] == ["DENY", f"rule:   {rule}", f"reason: {reason}"]
    assert "before the TLS handshake" in result.output


def test_address_rules_without_from_are_reported_as_unchecked(files: dict[str, Path]) -> None:
    result = run("--cert", files["alice"], "--allow-cn", "alice", "--allow-from", "10.0.0.0/8")
    assert result.exit_code == 0
    assert "skip  address     not checked: give --from IP" in result.output
    assert "hint: the chain was not checked (no --cacert)" in result.output


def test_missing_certificate_is_denied_with_a_hint() -> None:
    result = run("--allow-cn", "alice")
    assert result.exit_code == 1
    assert result.output.splitlines()[:3] == ["DENY", "rule:   no-client-cert", "reason: no client certificate"]
    assert "curl --cert" in result.output


def test_disabled_authentication_allows_without_a_certificate() -> None:
    result = run("--disable-authentication", "--from", "10.0.0.1", "--allow-from", "10.0.0.0/8")
    assert result.exit_code == 0
    assert result.output.splitlines()[:2] == ["ALLOW", "rule:   no-authentication"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cert", "{tmp}/missing.pem", "--allow-cn", "a"], "--cert: cannot read {tmp}/missing.pem"),
        (["--cert", "{tmp}/junk.pem", "--allow-cn", "a"], "--cert: {tmp}/junk.pem holds no certificate"),
        (["--cacert", "{tmp}/junk.pem", "--allow-cn", "a"], "--cacert: {tmp}/junk.pem holds no certificate"),
        (["--allow-cn", "a", "--allow-from", "10.0.0.300/8"], "--allow-from: '10.0.0.300/8' is not a network"),
        (["--allow-cn", "a", "--from", "somewhere"], "--from: 'somewhere' is not an IP address"),
        (["--allow-cn", "a", "--at", "soon"], "--at: 'soon' is not a time"),
        (["--allow-spki-sha256", "xyz"], "--allow-spki-sha256: 'xyz' is not a SHA-256 hash"),
        (["--from", "10.0.0.1"], "server mode needs one of --allow-all, --allow-cn"),
        (["--allow-cn", "a", "--crl", "{tmp}/other-crl.pem", "--cacert", "{ca}"], "{tmp}/other-crl.pem: not signed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, files: dict[str, Path], other_ca: trustme.CA, args: list[str], message: str
) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    write_crl(tmp_path / "other-crl.pem", other_ca)
    values = {"tmp": tmp_path, "ca": files["ca"]}
    result = run(*(arg.format(**values) for arg in args))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("tlsgate: error: " + message.format(**values))
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
