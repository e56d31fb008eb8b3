"""Policy as code: --allow-policy/--allow-query and --verify-policy/--verify-query (ghostunnel's OPA flags)."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import ssl
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlsgate.cli import cli
from tlsgate.errors import ConfigError
from tlsgate.pki import CertificateAuthority
from tlsgate.policy import Decision, build_policy, rego
from tlsgate.policy.rego import Evaluation, load_policy
from tlsgate.policy.rego_input import certificate_input
from tlsgate.settings.config import server_access, tunnel_config

from helpers import (
    assert_cut,
    backend,
    client_context,
    identity_rules,
    port_of,
    server_opts,
    try_client,
    tunnel,
    wait_until,
)

pytest.importorskip("regopy")


@pytest.fixture(autouse=True)
def _generous_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests of verdicts must not depend on timing: the 0.5 s budget guards production against a runaway policy,
    and on a loaded two-core CI machine a first evaluation after a reload has taken longer. The budget's own
    tests set a tiny one on the policy object."""
    monkeypatch.setattr(rego, "EVALUATION_BUDGET", 60.0)


ALLOW_ALICE = """package tlsgate

default allow := false

allow if input.certificate.Subject.CommonName == "alice"
"""

ALLOW_BOB = ALLOW_ALICE.replace('"alice"', '"bob"')

# Two complete definitions with different values: OPA (and rego-cpp) report a conflict, an evaluation error.
CONFLICT = """package tlsgate

allow := true if input.certificate.Subject.CommonName == "alice"

allow := false if input.certificate.Subject.CommonName == "alice"
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def der(leaf: trustme.LeafCert) -> bytes:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)


def test_input_has_go_x509_field_names_and_exact_big_numbers(tmp_path: Path) -> None:
    issuer = CertificateAuthority.create(tmp_path / "ca")
    cert = issuer.issue(
        "alice", dns=["alice.test"], ips=["10.0.0.1"], uris=["spiffe://example.org/ns/web"], ous=["eng"], client=True
    ).certificate
    doc = certificate_input(cert)
    assert doc["Subject"]["CommonName"] == "alice"
    assert doc["Subject"]["OrganizationalUnit"] == ["eng"]
    assert doc["DNSNames"] == ["alice.test"]
    assert doc["IPAddresses"] == ["10.0.0.1"]
    assert (doc["URIs"][0]["Scheme"], doc["URIs"][0]["Host"], doc["URIs"][0]["Path"]) == (
        "spiffe",
        "example.org",
        "/ns/web",
    )
    assert doc["SerialNumber"] == cert.serial_number
    assert doc["EmailAddresses"] is None  # Go writes an empty slice as null
    assert 2 in doc["ExtKeyUsage"]  # clientAuth, by Go's number
    assert doc["Version"] == 3
    assert doc["NotAfter"].endswith("Z")


def test_policy_sees_the_serial_number_exactly(tmp_path: Path, ca: trustme.CA) -> None:
    """Serial numbers are up to 160 bits; regopy's Python-object input would truncate them to 64."""
    leaf = ca.issue_cert("alice.test", common_name="alice")
    serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
    assert serial >= 2**64
    rego = write(tmp_path / "p.rego", f"package t\n\nallow if input.certificate.SerialNumber == {serial}\n")
    assert load_policy(rego, "data.t.allow").check(der(leaf)) == (True, "data.t.allow is true")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# X.509 caps a CN at 64 characters, and cryptography counts them in UTF-8 bytes: longer is its error, not ours.
@given(
    cn=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30
    ).filter(lambda text: len(text.encode()) <= 64)
)
def test_any_common_name_reaches_the_policy_unchanged(tmp_path: Path, ca: trustme.CA, cn: str) -> None:
    """Non-ASCII, control characters, quotes: the policy compares the very string the certificate holds."""
    leaf = der(ca.issue_cert("x.test", common_name=cn))
    rego = write(tmp_path / "p.rego", "package t\n\ncn := input.certificate.Subject.CommonName\n")
    policy = load_policy(rego, f"data.t.cn == {json.dumps(cn, ensure_ascii=False)}")
    assert policy.evaluate(leaf) == Evaluation(True, "true")
    other = load_policy(rego, f"data.t.cn == {json.dumps(cn + 'x', ensure_ascii=False)}")
    assert not other.evaluate(leaf).allowed


# --- what the query must return -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "allowed", "shown"),
    [
        ("data.t.yes", True, "true"),
        ("data.t.no", False, "undefined"),  # rego-cpp, unlike OPA, gives a false rule as undefined
        ("data.t.missing", False, "undefined"),
        ("data.t.word", False, '"true"'),
        ("data.t.one", False, "1"),
        ("data.t.yes; data.t.yes", False, "[[true, true]]"),  # two expressions: not OPA's Allowed()
    ],
)
def test_only_a_single_boolean_true_allows(
    tmp_path: Path, ca: trustme.CA, query: str, allowed: bool, shown: str
) -> None:
    rego = write(tmp_path / "p.rego", 'package t\n\nyes := true\n\nno := false\n\nword := "true"\n\none := 1\n')
    outcome = load_policy(rego, query).evaluate(der(ca.issue_cert("x.test")))
    assert (outcome.allowed, outcome.result, outcome.error) == (allowed, shown, None)


def test_a_policy_that_errors_refuses_and_is_not_cached(tmp_path: Path, ca: trustme.CA) -> None:
    policy = load_policy(write(tmp_path / "p.rego", CONFLICT), "data.tlsgate.allow")
    leaf = der(ca.issue_cert("x.test", common_name="alice"))
    allowed, reason = policy.check(leaf)
    assert not allowed
    assert reason.startswith("data.tlsgate.allow failed: the policy returned an error")
    assert policy._cache == {}


def test_decisions_are_cached_per_certificate(tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = load_policy(write(tmp_path / "p.rego", ALLOW_ALICE), "data.tlsgate.allow")
    runs: list[bytes] = []
    real = policy.evaluator.run
    monkeypatch.setattr(policy.evaluator, "run", lambda d: runs.append(d) or real(d))
    alice, bob = der(ca.issue_cert("a.test", common_name="alice")), der(ca.issue_cert("b.test", common_name="bob"))
    for _ in range(3):
        assert policy.check(alice)[0]
        assert not policy.check(bob)[0]
    assert runs == [alice, bob]


def test_a_slow_evaluation_refuses_within_the_budget_and_later_peers_are_not_kept_waiting(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = load_policy(write(tmp_path / "p.rego", ALLOW_ALICE), "data.tlsgate.allow")
    release, entered = threading.Event(), threading.Event()
    real = policy.evaluator.run

    def stuck(d: bytes) -> Evaluation:
        entered.set()
        release.wait()
        return real(d)

    monkeypatch.setattr(policy.evaluator, "run", stuck)
    policy.budget = 0.01  # the evaluation blocks until released, so the budget always runs out
    alice = der(ca.issue_cert("a.test", common_name="alice"))
    assert policy.check(alice) == (False, "data.tlsgate.allow failed: evaluation took longer than 0.01s")
    assert entered.is_set()
    # The worker is still busy: the next peer is refused at once, not after another budget.
    assert policy.check(alice) == (
        False,
        "data.tlsgate.allow failed: an earlier evaluation is still running (over the time budget)",
    )
    monkeypatch.setattr(policy.evaluator, "run", real)
    release.set()
    policy._runaway.result()  # type: ignore[union-attr]
    policy.budget = 60
    assert policy.check(alice) == (True, "data.tlsgate.allow is true")


# --- bundles ------------------------------------------------------------------------------------------------

BUNDLE_POLICY = """package tlsgate

default allow := false

allow if input.certificate.Subject.CommonName in data.tlsgate.users
"""


def test_bundle_directory_with_data(tmp_path: Path, ca: trustme.CA) -> None:
    root = tmp_path / "bundle"
    (root / "tlsgate").mkdir(parents=True)
    (root / "policy.rego").write_text(BUNDLE_POLICY)
    (root / "tlsgate" / "data.json").write_text(json.dumps({"users": ["alice"]}))
    (root / ".manifest").write_text("{}")
    policy = load_policy(str(root), "data.tlsgate.allow")
    assert policy.check(der(ca.issue_cert("a.test", common_name="alice")))[0]
    assert not policy.check(der(ca.issue_cert("b.test", common_name="bob")))[0]


def test_bundle_tarball_with_data(tmp_path: Path, ca: trustme.CA) -> None:
    path = tmp_path / "bundle.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("policy.rego", BUNDLE_POLICY), ("tlsgate/data.json", '{"users": ["bob"]}')):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    policy = load_policy(str(path), "data.tlsgate.allow")
    assert policy.check(der(ca.issue_cert("b.test", common_name="bob")))[0]


@pytest.mark.parametrize(
    ("files", "query", "message"),
    [
        ({"p.rego": "package t\n\nallow if {\n"}, "data.t.allow", "--allow-policy: {path}: p.rego:3: this is unclosed"),
        ({"p.rego": "package t\nallow := true\n"}, "data.t.allow[", "--allow-query 'data.t.allow[': this is unclosed"),
        ({"p.rego": "package t\nallow := true\n"}, " ", "--allow-query: empty query"),
        ({"notes.txt": "hello"}, "data.t.allow", "--allow-policy: {path} holds no .rego module"),
        ({"p.rego": "package t\n", "data.json": "[1]"}, "data.t.x", "a data.json document must be a JSON object"),
    ],
)
def test_broken_bundle_is_one_line_naming_the_problem(
    tmp_path: Path, files: dict[str, str], query: str, message: str
) -> None:
    root = tmp_path / "b"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    path = str(root / "p.rego") if list(files) == ["p.rego"] else str(root)
    with pytest.raises(ConfigError) as caught:
        load_policy(path, query)
    assert message.format(path=path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_not_installed_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "regopy", None)  # makes `import regopy` raise ImportError
    with pytest.raises(ConfigError, match=r"^--verify-policy needs the optional regopy package: pip install"):
        load_policy(write(tmp_path / "p.rego", ALLOW_ALICE), "data.tlsgate.allow", flag_prefix="verify")


def test_not_installed_cli_exits_2(tmp_path: Path, pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "regopy", None)
    rego = write(tmp_path / "p.rego", ALLOW_ALICE)
    result = CliRunner().invoke(
        cli,
        ["policy", "check", "--cert", str(pki_files["client_cert"]), "--allow-policy", rego, "--allow-query", "q"],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "tlsgate: error: --allow-policy needs the optional regopy package: pip install 'tlsgate[opa]'"
    ]


# --- flags: ghostunnel's rules on what goes together --------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"allow_policy": "P"}, "--allow-policy and --allow-query go together"),
        ({"allow_query": "data.x"}, "--allow-policy and --allow-query go together"),
        ({"allow_policy": "P", "allow_query": "q", "allow_cn": ["a"]}, "mutually exclusive"),
        ({"allow_policy": "P", "allow_query": "q", "allow_all": True}, "mutually exclusive"),
        ({"allow_policy": "P", "allow_query": "q", "allow_uri": ["spiffe://x/y"]}, "mutually exclusive"),
        ({"allow_policy": "P", "allow_query": "q", "disable_authentication": True}, "--disable-authentication"),
        ({"allow_policy": "P", "allow_query": "q", "verify_policy": "P", "verify_query": "q"}, "client mode"),
    ],
)
def test_server_flag_conflicts_are_refused(
    tmp_path: Path, pki_files: dict[str, Path], extra: dict[str, object], message: str
) -> None:
    rego = write(tmp_path / "p.rego", ALLOW_ALICE)
    options = {k: rego if v == "P" else v for k, v in extra.items()}
    with pytest.raises(ConfigError, match=message):
        tunnel_config("server", {"listen": "127.0.0.1:0", **server_opts(pki_files, "127.0.0.1:1"), **options})
    # build_policy (policy check's path) enforces the same rules.
    if "client mode" in message:
        return
    with pytest.raises(ConfigError, match=message):
        build_policy(server_access(**{k: v for k, v in options.items() if k.startswith(("allow", "disable"))}))  # type: ignore[arg-type]


def test_client_flags_go_together_and_are_for_client_mode(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    rego = write(tmp_path / "p.rego", ALLOW_ALICE)
    base = {"listen": "127.0.0.1:0", "target": "localhost:1", "cacert": str(pki_files["ca"])}
    with pytest.raises(ConfigError, match="--verify-policy and --verify-query go together"):
        tunnel_config("client", {**base, "verify_policy": rego})
    with pytest.raises(ConfigError, match="--allow-\\*/--crl flags are for server mode"):
        tunnel_config("client", {**base, "allow_policy": rego, "allow_query": "q"})
    # As in ghostunnel, the policy may be OR'd with the other --verify-* rules in client mode.
    tunnel_config("client", {**base, "verify_policy": rego, "verify_query": "data.x", "verify_cn": ["a"]})


def test_cli_refuses_a_conflict_with_one_line_and_exit_2(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    rego = write(tmp_path / "p.rego", ALLOW_ALICE)
    args = ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--cert", str(pki_files["cert"])]
    args += ["--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"])]
    args += ["--allow-policy", rego, "--allow-query", "data.tlsgate.allow", "--allow-cn", "alice"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "mutually exclusive" in result.output


def test_cli_refuses_a_broken_bundle_at_start_up(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    rego = write(tmp_path / "p.rego", "package tlsgate\n\nallow if {\n")
    args = ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--cert", str(pki_files["cert"])]
    args += ["--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"])]
    args += ["--allow-policy", rego, "--allow-query", "data.tlsgate.allow"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"tlsgate: error: --allow-policy: {rego}: p.rego:3: this is unclosed"]


# --- policy check -------------------------------------------------------------------------------------------


def test_policy_check_explains_the_query_result(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    rego = write(tmp_path / "p.rego", ALLOW_BOB)
    base = ["policy", "check", "--cert", str(pki_files["client_cert"]), "--cacert", str(pki_files["ca"])]
    result = CliRunner().invoke(cli, [*base, "--allow-policy", rego, "--allow-query", "data.tlsgate.allow"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[:3] == [
        "DENY",
        "rule:   allow-policy",
        "reason: CN=alice not allowed: data.tlsgate.allow is undefined, not true",
    ]
    rego = write(tmp_path / "p.rego", ALLOW_ALICE)
    result = CliRunner().invoke(
        cli, [*base, "--allow-policy", rego, "--allow-query", "data.tlsgate.allow", "--show-input"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:3] == [
        "ALLOW",
        "rule:   allow-policy",
        "reason: CN=alice allowed: data.tlsgate.allow is true",
    ]
    shown = result.output.split("input of the policy (as ghostunnel gives it):\n", 1)[1].split("\n\n", 1)[0]
    assert json.loads(shown)["certificate"]["Subject"]["CommonName"] == "alice"


# --- through real handshakes --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_server_allows_and_refuses_by_policy(tmp_path: Path, pki_files: dict[str, Path], ca: trustme.CA) -> None:
    rego = write(tmp_path / "p.rego", ALLOW_ALICE)
    alice = ca.issue_cert("alice.test", common_name="alice")
    bob = ca.issue_cert("bob.test", common_name="bob")
    opts = server_opts(pki_files, "", allow_policy=rego, allow_query="data.tlsgate.allow")
    async with backend() as be, tunnel(**{**opts, "target": be.address}) as tun:
        assert await try_client(tun, client_context(ca, alice))
        assert not await try_client(tun, client_context(ca, bob))
        await wait_until(lambda: tun.stats.refused.get("allow-policy") == 1)
        assert be.connections == 1


@pytest.mark.asyncio
async def test_server_policy_error_refuses(tmp_path: Path, pki_files: dict[str, Path], ca: trustme.CA) -> None:
    rego = write(tmp_path / "p.rego", CONFLICT)
    alice = ca.issue_cert("alice.test", common_name="alice")
    opts = server_opts(pki_files, "", allow_policy=rego, allow_query="data.tlsgate.allow")
    async with backend() as be, tunnel(**{**opts, "target": be.address}) as tun:
        assert not await try_client(tun, client_context(ca, alice))
        await wait_until(lambda: tun.stats.refused.get("allow-policy") == 1)
        assert be.connections == 0


@pytest.mark.asyncio
async def test_policy_reload_changes_the_verdict_and_a_broken_one_is_not_taken(
    tmp_path: Path, pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    rego = tmp_path / "p.rego"
    write(rego, ALLOW_ALICE)
    alice = ca.issue_cert("alice.test", common_name="alice")
    bob = ca.issue_cert("bob.test", common_name="bob")
    opts = server_opts(pki_files, "", allow_policy=str(rego), allow_query="data.tlsgate.allow")
    async with backend() as be, tunnel(**{**opts, "target": be.address}) as tun:
        server = tun.server  # type: ignore[attr-defined]
        assert await try_client(tun, client_context(ca, alice))
        assert not await try_client(tun, client_context(ca, bob))

        write(rego, ALLOW_BOB)
        assert server.reload()
        # The cached verdicts belonged to the old policy: both flip.
        assert not await try_client(tun, client_context(ca, alice))
        assert await try_client(tun, client_context(ca, bob))

        write(rego, "package tlsgate\n\nallow if {\n")
        assert not server.reload()
        assert tun.stats.reload_errors == 1
        assert await try_client(tun, client_context(ca, bob))  # the running policy stays
    failures = [r for r in caplog.records if r.getMessage().startswith("reload failed")]
    assert len(failures) == 1
    assert "this is unclosed" in failures[0].fields["error"]  # type: ignore[attr-defined]


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "allowed"), [("localhost", True), ("impostor", False)])
async def test_client_verifies_the_server_by_policy(
    tmp_path: Path, pki_files: dict[str, Path], ca: trustme.CA, name: str, allowed: bool
) -> None:
    rego = write(tmp_path / "p.rego", ALLOW_ALICE.replace('"alice"', f'"{name}"'))
    server_cert = ca.issue_cert("localhost", common_name="localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    async with (
        backend(ssl_ctx=ctx) as be,
        tunnel(
            "client",
            target=f"localhost:{be.port}",
            cacert=str(pki_files["ca"]),
            verify_policy=rego,
            verify_query="data.tlsgate.allow",
        ) as cli_tun,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(cli_tun))
        writer.write(b"ping")
        if allowed:
            assert await reader.readexactly(4) == b"ping"
        else:
            await assert_cut(reader)
            assert cli_tun.stats.target_errors == 1
        writer.close()


def test_a_replaced_policy_lets_its_thread_end(tmp_path: Path, ca: trustme.CA) -> None:
    """Each reload builds a new policy: the old one's worker thread must not stay behind."""
    policy = load_policy(write(tmp_path / "p.rego", ALLOW_ALICE), "data.tlsgate.allow")
    assert policy.check(der(ca.issue_cert("a.test", common_name="alice")))[0]
    thread = policy.evaluator.thread
    assert thread is not None and thread.is_alive()
    del policy
    gc.collect()
    thread.join()  # returns only if the thread ended; a leak would hit the per-test timeout


def test_config_file_tunnel_with_a_policy_is_checked_and_described(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    """`tlsgate check-config` compiles the policy (a broken one is a one-line error) and names the query."""
    rego = write(tmp_path / "p.rego", ALLOW_ALICE)
    toml = tmp_path / "tlsgate.toml"
    toml.write_text(
        f"""[[tunnel]]
name = "api"
mode = "server"
listen = "127.0.0.1:0"
target = "127.0.0.1:1"
cert = "{pki_files["cert"]}"
key = "{pki_files["key"]}"
cacert = "{pki_files["ca"]}"
allow-policy = "{rego}"
allow-query = "data.tlsgate.allow"
"""
    )
    result = CliRunner().invoke(cli, ["check-config", str(toml)])
    assert result.exit_code == 0, result.output
    assert "mTLS allow-query data.tlsgate.allow" in result.output
    write(tmp_path / "p.rego", "package tlsgate\n\nallow if {\n")
    result = CliRunner().invoke(cli, ["check-config", str(toml)])
    assert result.exit_code == 2
    assert "p.rego:3: this is unclosed" in result.output


def test_client_mode_policy_is_ored_with_the_verify_rules(tmp_path: Path, ca: trustme.CA) -> None:
    policy = load_policy(write(tmp_path / "p.rego", ALLOW_ALICE), "data.tlsgate.allow", flag_prefix="verify")
    rules = identity_rules(cn=["server.test"], flag_prefix="verify", rego=policy)
    alice = ca.issue_cert("alice.test", common_name="alice")
    server = ca.issue_cert("server.test", common_name="server.test")
    other = ca.issue_cert("other.test", common_name="other")
    assert rules.check_certificate(der(server)) == Decision(True, "verify-cn", "CN=server.test matched verify-cn")
    assert rules.check_certificate(der(alice)) == Decision(
        True, "verify-policy", "CN=alice allowed: data.tlsgate.allow is true"
    )
    refused = rules.check_certificate(der(other))
    assert (refused.allowed, refused.rule) == (False, "identity")
    assert refused.reason.endswith("; verify-policy: data.tlsgate.allow is undefined, not true")


def test_a_rego_v0_policy_file_loads_as_in_ghostunnel(tmp_path: Path, ca: trustme.CA) -> None:
    """ghostunnel loads a lone .rego file as Rego v0 (no `if`, `=` defaults), so old policies must keep working."""
    rego = write(
        tmp_path / "old.rego",
        "package policy\n\nimport input\n\ndefault allow = false\n\n"
        'allow {\n  input.certificate.Subject.CommonName == "alice"\n}\n',
    )
    policy = load_policy(rego, "data.policy.allow")
    assert policy.check(der(ca.issue_cert("a.test", common_name="alice"))) == (True, "data.policy.allow is true")
    assert not policy.check(der(ca.issue_cert("b.test", common_name="bob")))[0]


def test_client_command_refuses_a_lone_verify_policy(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    rego = write(tmp_path / "p.rego", ALLOW_ALICE)
    args = ["client", "--listen", "127.0.0.1:0", "--target", "localhost:1", "--disable-authentication"]
    result = CliRunner().invoke(cli, [*args, "--cacert", str(pki_files["ca"]), "--verify-policy", rego])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "tlsgate: error: --verify-policy and --verify-query go together: give both, or neither"
    ]
