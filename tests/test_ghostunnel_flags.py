"""ghostunnel flags of issue #15, each one entry of the settings table plus the place where it takes effect.

Names, values and refusals follow ghostunnel's main.go: hidden aliases for the renamed SAN flags,
``--max-tls-version TLS1.2|TLS1.3``, ``--allow-ip``/``--verify-ip`` (IP SANs, aliases ``--*-ip-san``), and
``--cipher-suites AES,CHACHA`` with ``--allow-unsafe-cipher-suites`` for ghostunnel's UNSAFE-AZURE.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from pathlib import Path

import click
import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tlsgate.cli import cli
from tlsgate.engine.runtime import build_runtime
from tlsgate.settings.config import ConfigErrors, tunnel_config
from tlsgate.settings.file import read_config_file

from helpers import assert_cut, backend, client_context, port_of, server_opts, tls_connect, tunnel, wait_until

ALIASES = [
    ("server", "--allow-dns-san", "allow_dns"),
    ("server", "--allow-ip-san", "allow_ip"),
    ("client", "--verify-ip-san", "verify_ip"),
    ("server", "--allow-uri-san", "allow_uri"),
    ("client", "--verify-dns-san", "verify_dns"),
    ("client", "--verify-uri-san", "verify_uri"),
]


def command(name: str) -> click.Command:
    found = cli.commands[name]
    assert isinstance(found, click.Command)
    return found


# -- hidden aliases ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "alias", "name"), ALIASES)
def test_ghostunnels_old_san_flag_names_set_the_same_setting(mode: str, alias: str, name: str) -> None:
    ctx = command(mode).make_context(mode, ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", alias, "a"])
    assert ctx.params[name] == ("a",)
    # Both spellings add to one list, as kingpin's StringsVar on one variable does.
    main = "--" + name.replace("_", "-")
    ctx = command(mode).make_context(mode, ["--listen", ":0", "--target", ":1", alias, "a", main, "b"])
    assert ctx.params[name] == ("a", "b")


@pytest.mark.parametrize(("mode", "alias", "name"), ALIASES)
def test_hidden_aliases_stay_out_of_the_help(mode: str, alias: str, name: str) -> None:
    output = CliRunner().invoke(cli, [mode, "--help"]).output
    assert "--" + name.replace("_", "-") in output
    assert alias not in output


# -- --max-tls-version ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("cap", "negotiated"), [(None, "TLSv1.3"), ("TLS1.3", "TLSv1.3"), ("TLS1.2", "TLSv1.2")])
async def test_max_tls_version_caps_what_the_server_accepts(
    pki_files: dict[str, Path], ca: trustme.CA, cap: str | None, negotiated: str
) -> None:
    client_cert = ca.issue_cert("alice@example.test", common_name="alice")
    extra = {"max_tls_version": cap} if cap else {}
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_cn=["alice"], **extra)) as tun:
        reader, writer = await tls_connect(tun, client_context(ca, client_cert))
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert writer.get_extra_info("ssl_object").version() == negotiated
        writer.close()
        await writer.wait_closed()


def test_max_tls_version_caps_the_client_modes_hop_too(pki_files: dict[str, Path]) -> None:
    cfg = tunnel_config(
        "client",
        {"listen": "127.0.0.1:0", "target": "localhost:1", "cacert": str(pki_files["ca"]), "max_tls_version": "TLS1.2"},
    )
    target_ctx = build_runtime(cfg).target_ctx
    assert target_ctx is not None and target_ctx.maximum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("value", ["TLS1.1", "1.2", "tls1.2", "SSLv3", ""])
def test_max_tls_version_takes_ghostunnels_two_names_only(value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["server", "--listen", ":0", "--target", ":1", "--max-tls-version", value])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlsgate: error: ") and "--max-tls-version" in lines[0]
    if value:
        with pytest.raises(ConfigErrors, match=r"--max-tls-version: .* \(TLS1\.2 or TLS1\.3\)"):
            tunnel_config("client", {"listen": ":0", "target": "localhost:1", "max_tls_version": value})
        path = tmp_path / "t.toml"
        path.write_text(f'[[tunnel]]\nname = "t"\nmode = "client"\nmax-tls-version = "{value}"\n')
        assert any("max-tls-version: " in p for p in read_config_file(str(path)).problems)


# -- --allow-ip / --verify-ip (IP SANs) -------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("rule", "san", "allowed"),
    [
        ("10.1.2.3", "10.1.2.3", True),
        ("10.1.2.3", "10.1.2.4", False),
        ("0:0:0:0:0:0:0:1", "::1", True),  # the same address spelled long: compared as addresses
        ("2001:db8::1", "2001:db8::2", False),
    ],
)
async def test_allow_ip_admits_exactly_the_clients_with_that_ip_san(
    pki_files: dict[str, Path], ca: trustme.CA, rule: str, san: str, allowed: bool
) -> None:
    client_cert = ca.issue_cert(san, common_name="robot")
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_ip=[rule])) as tun:
        reader, writer = await tls_connect(tun, client_context(ca, client_cert))
        writer.write(b"ping")
        if allowed:
            assert await reader.readexactly(4) == b"ping"
        else:
            await assert_cut(reader)
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    assert be.connections == (1 if allowed else 0)


@pytest.mark.parametrize("alias", ["--allow-ip", "--allow-ip-san"])
def test_allow_ip_and_its_alias_are_one_server_flag(alias: str) -> None:
    ctx = command("server").make_context("server", ["--listen", ":0", "--target", ":1", alias, "10.0.0.1"])
    assert ctx.params["allow_ip"] == ("10.0.0.1",)


@pytest.mark.parametrize("value", ["10.0.0.0/8", "host.example", "", "1.2.3.4.5"])
def test_allow_ip_refuses_what_is_not_one_address(value: str) -> None:
    with pytest.raises(ConfigErrors, match=r"--allow-ip: .* is not an IP address"):
        tunnel_config("server", {"listen": ":0", "target": "127.0.0.1:1", "allow_ip": [value]})


def test_allow_ip_alone_is_an_access_rule(pki_files: dict[str, Path]) -> None:
    cfg = tunnel_config(
        "server", {"listen": "127.0.0.1:0", **server_opts(pki_files, "127.0.0.1:1"), "allow_ip": ["::1"]}
    )
    assert cfg.allow_ip == (ipaddress.ip_address("::1"),)
    with pytest.raises(ConfigErrors, match="--disable-authentication contradicts --allow-ip"):
        tunnel_config(
            "server",
            {
                "listen": "127.0.0.1:0",
                "target": "127.0.0.1:1",
                "cert": [str(pki_files["cert"])],
                "key": [str(pki_files["key"])],
                "allow_ip": ["::1"],
                "disable_authentication": True,
            },
        )


@pytest.mark.parametrize(("rule", "allowed"), [("127.0.0.1", True), ("127.0.0.2", False)])
def test_verify_ip_checks_the_servers_ip_san(
    pki_files: dict[str, Path], server_cert: trustme.LeafCert, rule: str, allowed: bool
) -> None:
    cfg = tunnel_config(
        "client",
        {"listen": "127.0.0.1:0", "target": "127.0.0.1:1", "cacert": str(pki_files["ca"]), "verify_ip": [rule]},
    )
    identity = build_runtime(cfg).target_identity
    assert identity is not None
    der = x509.load_pem_x509_certificate(server_cert.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    decision = identity.check_certificate(der)
    assert decision.allowed is allowed
    assert ("verify-ip" in decision.rule) if allowed else ("IP SAN 127.0.0.1" in decision.reason)


def test_verify_ip_san_is_the_hidden_alias_of_verify_ip() -> None:
    ctx = command("client").make_context("client", ["--listen", ":0", "--target", ":1", "--verify-ip-san", "::1"])
    assert ctx.params["verify_ip"] == ("::1",)
    assert "--verify-ip-san" not in CliRunner().invoke(cli, ["client", "--help"]).output


# -- --cipher-suites / --allow-unsafe-cipher-suites -------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("suites", "family"), [("CHACHA", "CHACHA20"), ("AES", "AES"), ("chacha, aes", "CHACHA20")])
async def test_cipher_suites_choose_what_a_tls12_handshake_uses(
    pki_files: dict[str, Path], ca: trustme.CA, suites: str, family: str
) -> None:
    client_cert = ca.issue_cert("alice@example.test", common_name="alice")
    ctx = client_context(ca, client_cert)
    # A client that prefers the other family: the server's order (our --cipher-suites) decides.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20" if family == "CHACHA20" else "ECDHE+CHACHA20:ECDHE+AESGCM")
    opts = server_opts(pki_files, "127.0.0.1:1", allow_cn=["alice"], max_tls_version="TLS1.2", cipher_suites=suites)
    async with backend() as be, tunnel(**{**opts, "target": be.address}) as tun:
        reader, writer = await tls_connect(tun, ctx)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        name = writer.get_extra_info("ssl_object").cipher()[0]
        assert family in name and name.startswith("ECDHE"), name
        writer.close()
        await writer.wait_closed()


def test_cipher_suites_set_every_context_of_a_client_tunnel(pki_files: dict[str, Path]) -> None:
    options = {"listen": "127.0.0.1:0", "target": "localhost:1", "cacert": str(pki_files["ca"])}
    ctx = build_runtime(tunnel_config("client", {**options, "cipher_suites": ["CHACHA"]})).target_ctx
    assert ctx is not None
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all("CHACHA20" in name for name in tls12)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("RC4", "'RC4' is not a cipher suite option (AES, CHACHA)"),
        ("AES,,", "'' is not a cipher suite option"),
        ("AES,AES", "names a suite twice"),
        ("UNSAFE-AZURE", "add --allow-unsafe-cipher-suites"),
    ],
)
def test_cipher_suites_refuse_what_ghostunnel_refuses(value: str, needle: str) -> None:
    result = CliRunner().invoke(
        cli, ["client", "--listen", "127.0.0.1:0", "--target", "localhost:1", "--disable-authentication",
              "--cipher-suites", value],
    )  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlsgate: error: --cipher-suites") and needle in lines[0], lines


def test_unsafe_cipher_suite_with_its_flag_is_accepted(pki_files: dict[str, Path]) -> None:
    options = {"listen": "127.0.0.1:0", "target": "localhost:1", "cacert": str(pki_files["ca"])}
    cfg = tunnel_config("client", {**options, "cipher_suites": "AES,UNSAFE-AZURE", "allow_unsafe_cipher_suites": True})
    assert cfg.cipher_suites == ("AES", "UNSAFE-AZURE")
    ctx = build_runtime(cfg).target_ctx
    assert ctx is not None
    assert "ECDHE-RSA-AES128-SHA256" in [c["name"] for c in ctx.get_ciphers()]


# -- --connect-timeout covers the target's TLS handshake --------------------------------------------------------


@pytest.mark.asyncio
async def test_connect_timeout_cuts_a_target_that_accepts_but_never_answers_tls(
    pki_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """ghostunnel's dial includes the handshake, under --connect-timeout. Before, the target's handshake had the
    (client-side) --handshake-timeout; with that at 0 a silent target held the connection forever."""
    silent: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)
        await reader.read()

    async with (
        backend(accept_and_say_nothing) as be,
        tunnel(
            "client",
            target=be.address,
            cacert=str(pki_files["ca"]),
            disable_authentication=True,
            override_server_name="localhost",
            connect_timeout="300ms",
            handshake_timeout="0",
            shutdown_timeout="1s",  # so that a regression fails at the guard below instead of draining for 5m
        ) as tun,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(b"hello")
        # The guard only keeps a regression from hanging the suite; the cut comes after ~300 ms.
        await assert_cut(reader, timeout=20)
        writer.close()
        await wait_until(lambda: tun.active == 0)
    assert be.connections == 1
    failed = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "setup failed"]
    assert [fields.get("reason") for fields in failed] == ["target handshake timeout"], failed


def test_connect_timeout_zero_is_refused_as_ghostunnel_does() -> None:
    result = CliRunner().invoke(
        cli, ["client", "--listen", "127.0.0.1:0", "--target", "localhost:1", "--disable-authentication",
              "--connect-timeout", "0"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "tlsgate: error: --connect-timeout must not be 0 (a target that never answers would be waited for forever)"
    ]
