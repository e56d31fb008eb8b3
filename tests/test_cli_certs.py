"""`tlsgate certs` driven through click's CliRunner: the happy paths, and every refusal is one line with exit 2."""

from __future__ import annotations

import functools
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from tlsgate.cli.certs import certs
from tlsgate.errors import ConfigError
from tlsgate.pki import CertificateAuthority, load_certificates, load_private_key
from tlsgate.settings.secrets import resolve_secret

from helpers import invoke, refused

run = functools.partial(invoke, certs)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, so the default certs/ output lands in the test's own tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return result.stdout


@pytest.fixture
def ca_dir(workdir: Path) -> Path:
    ok(run("ca"))
    return workdir / "certs" / "ca"


def eku(path: Path) -> list[x509.ObjectIdentifier]:
    cert = load_certificates(path)[0]
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# --------------------------------------------------------------------------------------------------------------
# Happy paths


def test_ca_then_issue_use_the_certs_folder_by_default(workdir: Path) -> None:
    out = ok(run("ca"))
    assert "created CA 'tlsgate local CA' (EC P-256, valid until " in out
    assert "certs/ca/ca.pem" in out and "--cacert" in out
    out = ok(run("issue", "--name", "localhost"))
    assert out.startswith("issued server certificate 'localhost' (serial ")
    certs_dir = workdir / "certs"
    for name in ("localhost.pem", "localhost.key", "localhost-chain.pem"):
        assert (certs_dir / name).is_file()
        assert f"certs/{name}" in out
    assert stat.S_IMODE((certs_dir / "localhost.key").stat().st_mode) == 0o600
    assert eku(certs_dir / "localhost.pem") == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca = CertificateAuthority.load(certs_dir / "ca")
    leaf = load_certificates(certs_dir / "localhost.pem")[0]
    leaf.verify_directly_issued_by(ca.certificate)
    assert ca.issued_serials() == {leaf.serial_number}


def test_ca_options_name_rsa_days_and_folder(workdir: Path) -> None:
    out = ok(run("ca", "--out", "pki/ops", "--name", "Ops CA", "--rsa", "2048", "--days", "365"))
    assert "created CA 'Ops CA' (RSA 2048" in out
    cert = load_certificates(workdir / "pki/ops/ca.pem")[0]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=365, hours=1)


def test_issue_for_client_and_server_with_all_name_kinds(ca_dir: Path, workdir: Path) -> None:
    ok(
        run(
            "issue",
            "--name", "svc",
            "--dns", "svc.example.test",
            "--ip", "10.0.0.7",
            "--uri", "spiffe://example.test/svc",
            "--ou", "platform",
            "--client", "--server",
            "--days", "30",
            "--out", "out",
        )
    )  # fmt: skip
    cert = load_certificates(workdir / "out" / "svc.pem")[0]
    assert eku(workdir / "out" / "svc.pem") == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.rfc4514_string() == "CN=svc,OU=platform"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["svc.example.test"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.test/svc"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30)


def test_client_flag_alone_makes_a_client_only_certificate(ca_dir: Path, workdir: Path) -> None:
    out = ok(run("issue", "--name", "alice", "--client"))
    assert out.startswith("issued client certificate 'alice'")
    assert eku(workdir / "certs" / "alice.pem") == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_p12_with_a_store_password_from_the_environment(ca_dir: Path, workdir: Path) -> None:
    out = ok(
        run("issue", "--name", "alice", "--client", "--p12", "--storepass", "env:P12_PASS", env={"P12_PASS": "pw"})
    )
    p12_path = workdir / "certs" / "alice.p12"
    assert "certs/alice.p12  PKCS#12 keystore: use as --keystore" in out
    store = pkcs12.load_pkcs12(p12_path.read_bytes(), b"pw")
    assert store.cert is not None and store.key is not None
    assert store.cert.certificate == load_certificates(workdir / "certs" / "alice.pem")[0]
    assert [extra.certificate for extra in store.additional_certs] == load_certificates(ca_dir / "ca.pem")


def test_p12_without_a_store_password_is_unencrypted_and_says_so(ca_dir: Path, workdir: Path) -> None:
    out = ok(run("issue", "--name", "bob", "--client", "--p12"))
    assert "(NOT encrypted)" in out
    assert pkcs12.load_pkcs12((workdir / "certs" / "bob.p12").read_bytes(), None).key is not None


def test_key_password_from_a_file(ca_dir: Path, workdir: Path) -> None:
    (workdir / "pw.txt").write_text("from-a-file\n")
    ok(run("issue", "--name", "localhost", "--key-pass", "file:pw.txt"))
    assert load_private_key(workdir / "certs" / "localhost.key", b"from-a-file")


def test_encrypted_ca_is_used_with_its_password(workdir: Path) -> None:
    ok(run("ca", "--key-pass", "env:CA_PASS", env={"CA_PASS": "ca-secret"}))
    ok(run("issue", "--name", "localhost", "--ca-pass", "ca-secret"))
    refused(run("issue", "--name", "other.test", "--ca-pass", "wrong"), "certs/ca/ca.key: wrong password (--ca-pass)")
    refused(run("issue", "--name", "other.test"), "certs/ca/ca.key is encrypted: give its password with --ca-pass")


def test_show_prints_what_a_person_needs(ca_dir: Path, workdir: Path) -> None:
    ok(run("issue", "--name", "localhost", "--ip", "127.0.0.1", "--dns", "localhost"))
    out = ok(run("show", "certs/localhost-chain.pem"))
    assert "certificate 1 of 2 in certs/localhost-chain.pem" in out
    assert "  subject:      CN=localhost" in out
    assert "  SANs:         DNS:localhost, IP:127.0.0.1" in out
    assert "  status:       valid, expires in 825 days" in out
    assert "  EKU:          serverAuth" in out
    assert "  CA:           yes (path length 0)" in out


def test_show_marks_an_expired_certificate(ca_dir: Path, workdir: Path) -> None:
    ca = CertificateAuthority.load(ca_dir)
    old = ca.issue("old.test", not_before=datetime.now(UTC) - timedelta(days=10), days=7)
    old.write(workdir)
    assert "  status:       EXPIRED 3 days ago" in ok(run("show", "old.test.pem"))


def test_show_opens_a_p12_with_storepass(ca_dir: Path, workdir: Path) -> None:
    ok(run("issue", "--name", "alice", "--client", "--storepass", "pw"))
    out = ok(run("show", "certs/alice.p12", "--storepass", "pw"))
    assert "PKCS#12 keystore certs/alice.p12" in out
    assert "  EKU:          clientAuth" in out
    refused(run("show", "certs/alice.p12", "--storepass", "nope"), "certs/alice.p12: cannot open this PKCS#12 file")


def test_revoke_by_file_and_serial_then_publish_a_crl(ca_dir: Path, workdir: Path) -> None:
    ok(run("issue", "--name", "alice", "--client"))
    ok(run("issue", "--name", "bob", "--client"))
    alice = load_certificates(workdir / "certs" / "alice.pem")[0]
    bob = load_certificates(workdir / "certs" / "bob.pem")[0]

    out = ok(run("revoke", "certs/alice.pem", "--reason", "keyCompromise"))
    assert out.startswith(f"revoked serial {alice.serial_number:x} (keyCompromise)")
    ok(run("revoke", f"0x{bob.serial_number:X}"))
    assert "was already revoked on" in ok(run("revoke", f"{bob.serial_number:x}"))

    out = ok(run("crl"))
    assert out.startswith("wrote certs/crl.pem: 2 revoked, next update ")
    crl = x509.load_pem_x509_crl((workdir / "certs" / "crl.pem").read_bytes())
    ca_cert = load_certificates(ca_dir / "ca.pem")[0]
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert {entry.serial_number for entry in crl} == {alice.serial_number, bob.serial_number}

    ok(run("crl", "--der", "--days", "2"))
    der = x509.load_der_x509_crl((workdir / "certs" / "crl.der").read_bytes())
    assert der.next_update_utc is not None and der.next_update_utc - der.last_update_utc == timedelta(days=2)

    ok(run("crl"))  # re-publishing this CA's own CRL just works; test_newcomer covers refusing anything else
    ok(run("crl", "--out", "certs/crl.pem", "--force"))
    out = ok(run("show", "certs/crl.pem"))
    assert "  CRL number:   4" in out  # crl.pem, crl.der, crl.pem again, then --force
    assert f"    {alice.serial_number:x}  revoked " in out


def test_help_lists_every_command() -> None:
    out = ok(run("--help"))
    for command in ("ca", "issue", "revoke", "crl", "show"):
        assert f"  {command} " in out


# --------------------------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, never a traceback


def test_an_existing_ca_is_not_overwritten(ca_dir: Path) -> None:
    refused(run("ca"), "certs/ca/ca.pem already exists; pass --force to replace it")
    ok(run("ca", "--force"))


def test_existing_certificate_files_are_not_overwritten(ca_dir: Path, workdir: Path) -> None:
    ok(run("issue", "--name", "localhost"))
    before = (workdir / "certs" / "localhost.pem").read_bytes()
    serials = CertificateAuthority.load(ca_dir).issued_serials()
    refused(run("issue", "--name", "localhost"), "certs/localhost.pem already exists; pass --force to replace it")
    assert (workdir / "certs" / "localhost.pem").read_bytes() == before
    # The refusal came before signing: no serial was spent on a certificate nobody has.
    assert CertificateAuthority.load(ca_dir).issued_serials() == serials
    ok(run("issue", "--name", "localhost", "--force"))
    assert (workdir / "certs" / "localhost.pem").read_bytes() != before


def test_a_missing_ca_directory_is_named(workdir: Path) -> None:
    refused(run("issue", "--name", "localhost", "--ca", "nowhere"), "nowhere: no such CA directory")


def test_a_directory_without_a_ca_is_named(workdir: Path) -> None:
    (workdir / "empty").mkdir()
    refused(run("issue", "--name", "localhost", "--ca", "empty"), "empty has no CA (ca.pem not found)")


def test_a_leaf_certificate_is_not_accepted_as_ca(ca_dir: Path, workdir: Path) -> None:
    ok(run("issue", "--name", "localhost"))
    fake = workdir / "fake-ca"
    fake.mkdir()
    (fake / "ca.pem").write_bytes((workdir / "certs" / "localhost.pem").read_bytes())
    (fake / "ca.key").write_bytes((workdir / "certs" / "localhost.key").read_bytes())
    refused(run("issue", "--name", "x.test", "--ca", "fake-ca"), "fake-ca/ca.pem is not a CA certificate")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ip", "300.1.1.1"), "--ip '300.1.1.1': not an IP address"),
        (("--dns", "under_score.test"), "--dns 'under_score.test': not a valid DNS name"),
        (("--uri", "no scheme"), "--uri 'no scheme': not an absolute URI"),
        (("--name", "My Laptop"), "--name 'My Laptop' is neither a DNS name nor an IP address"),
        (("--key-pass", "env:NOT_SET_ANYWHERE"), "--key-pass env:NOT_SET_ANYWHERE: environment variable"),
        (("--storepass", "file:missing.txt"), "--storepass file:missing.txt: no such file"),
        (("--ca-pass", ""), "--ca-pass: the password from the command line is empty"),
    ],
)
def test_bad_issue_input_is_refused(ca_dir: Path, args: tuple[str, ...], message: str) -> None:
    full = ("issue", "--name", "svc.test", *args) if "--name" not in args else ("issue", *args)
    refused(run(*full), message)


def test_show_refuses_unreadable_and_garbage_files(workdir: Path) -> None:
    (workdir / "junk.bin").write_bytes(b"\x00garbage")
    refused(run("show", "junk.bin"), "junk.bin: not a certificate, CRL, private key or PKCS#12 file")
    refused(run("show", "missing.pem"), "missing.pem: no such file")


def test_revoke_refuses_what_is_neither_file_nor_serial(ca_dir: Path) -> None:
    refused(run("revoke", "not-a-serial"), "'not-a-serial': neither a certificate file nor a hex serial number")
    refused(run("revoke", "abcdef"), "serial abcdef is not in certs/ca/ca.json: this CA did not issue it")


def test_revoke_refuses_a_certificate_from_another_ca(ca_dir: Path, workdir: Path) -> None:
    ok(run("ca", "--out", "other-ca"))
    ok(run("issue", "--ca", "other-ca", "--name", "stranger.test"))
    refused(run("revoke", "certs/stranger.test.pem"), "was not issued by the CA in certs/ca")


# --------------------------------------------------------------------------------------------------------------
# Password forms (tlsgate.settings.secrets)


def test_a_plain_value_is_the_password() -> None:
    assert resolve_secret("hunter2", flag="--key-pass") == b"hunter2"
    assert resolve_secret("pass:env:literally", flag="--key-pass") == b"env:literally"
    assert resolve_secret("pässword", flag="--key-pass") == "pässword".encode()


def test_env_and_file_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLSGATE_TEST_PASS", "from-env")
    assert resolve_secret("env:TLSGATE_TEST_PASS", flag="--storepass") == b"from-env"
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-file\n")
    assert resolve_secret(f"file:{secret_file}", flag="--storepass") == b"from-file"
    # Only the one final newline is dropped; spaces are part of the password.
    secret_file.write_text(" spaced \n\n")
    assert resolve_secret(f"file:{secret_file}", flag="--storepass") == b" spaced \n"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("env:TLSGATE_SURELY_UNSET", "--ca-pass env:TLSGATE_SURELY_UNSET: environment variable TLSGATE_SURELY_UNSET"),
        ("env:", "--ca-pass env:: name the environment variable"),
        ("file:/nonexistent/pw", "--ca-pass file:/nonexistent/pw: no such file"),
        ("", "--ca-pass: the password from the command line is empty"),
        ("pass:", "--ca-pass: the password from the command line is empty"),
    ],
)
def test_unusable_secrets_are_one_line_errors_naming_the_flag(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_secret(value, flag="--ca-pass")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"the password from file .*empty is empty"):
        resolve_secret(f"file:{tmp_path / 'empty'}", flag="--key-pass")
