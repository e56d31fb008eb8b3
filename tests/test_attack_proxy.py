"""What the PROXY protocol tells a target, who may send one, and what reload bookkeeping shows (issues #13, #15).

Each test pins a finding: the CN, SNI and source a target receives come from the connection itself (never from a
log label, never from a socket asked again after the client left); a unix listener never ignores an address rule;
an incoming header's TLVs are checked to their last byte; and a tunnel removed by a reload keeps counting the
connections it still relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import tlsgate.cli
import tlsgate.cli.run
from tlsgate.cli import cli
from tlsgate.engine.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    SslInfo,
    encode_v1,
    encode_v2,
    parse,
    parse_tlv_ssl,
    tls_tlvs,
)
from tlsgate.errors import StartupError
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import ConfigErrors, TunnelConfig, tunnel_config

from helpers import backend, client_context, echo, echoed, port_of, server_opts, tls_connect, tunnel, wait_until

bounded = settings(max_examples=200, deadline=None)
# proxy-protocol.txt 2.2: each AF_UNIX address is 108 bytes (sun_path), NUL-padded.
UNIX_PATH_BYTES = 108


# --- a target that reads the header ----------------------------------------------------------------------------


@dataclass
class Received:
    """What a header-reading target got: the raw header bytes and their parse, one entry per connection."""

    raw: list[bytes] = field(default_factory=list)
    headers: list[ProxyHeader] = field(default_factory=list)

    @property
    def ssl(self) -> SslInfo:
        value = self.headers[-1].tlv(PP2_TYPE_SSL)
        assert value is not None
        return parse_tlv_ssl(value)


def reading_headers(received: Received) -> Any:
    """A backend handler that reads exactly one PROXY header (v1 or v2), records it, then echoes the stream."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(1)
        if first == V2_SIGNATURE[:1]:
            fixed = first + await reader.readexactly(15)
            raw = fixed + await reader.readexactly(int.from_bytes(fixed[14:16], "big"))
        else:
            raw = first + await reader.readuntil(b"\r\n")
        header = parse(raw)
        assert header is not None and header.length == len(raw)
        received.raw.append(raw)
        received.headers.append(header)
        await echo(reader, writer)

    return handle


def unix_addresses(raw: bytes) -> tuple[bytes, bytes]:
    """The two AF_UNIX addresses of a v2 header, NUL padding removed (the codec leaves them to the receiver)."""
    block = raw[16 : 16 + 2 * UNIX_PATH_BYTES]
    return block[:UNIX_PATH_BYTES].rstrip(b"\x00"), block[UNIX_PATH_BYTES:].rstrip(b"\x00")


# --- client certificates the test PKI cannot make ---------------------------------------------------------------


def client_with_subject(
    ca: trustme.CA, directory: Path, common_names: list[str], uris: tuple[str, ...] = ()
) -> ssl.SSLContext:
    """A client context whose certificate has exactly ``common_names`` as CN attributes, in order (none at all,
    several, or longer than X.509's 64-character bound), signed by ``ca``."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CN over 64 characters is what this helper is for
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False) for cn in common_names])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if uris:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not common_names)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / "client.pem", directory / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = client_context(ca)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose unix socket paths fit in sun_path (pytest's tmp_path can be too long)."""
    with tempfile.TemporaryDirectory(prefix="tg", dir="/tmp") as name:
        yield Path(name)


@contextlib.asynccontextmanager
async def proxied(pki_files: dict[str, Path], **extra: object) -> AsyncIterator[tuple[Any, Received]]:
    """A server tunnel sending PROXY v2 with every TLV (tls-full, unless ``extra`` says otherwise) to a target
    that records every header."""
    received = Received()
    options = {"proxy_protocol_mode": "tls-full", **extra}
    async with (
        backend(reading_headers(received)) as be,
        tunnel(**server_opts(pki_files, be.address, allow_all=True, **options)) as tun,
    ):
        yield tun, received


# --- item 6: the CN, the SNI and the source the target receives --------------------------------------------------

LONG_CN = ("Ünïcode, comma + plus = ok; " * 10)[:200]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("common_names", "uris", "expected_cn"),
    [
        pytest.param(["Doe, John"], (), "Doe, John", id="comma-in-cn"),
        pytest.param([], ("spiffe://example.org/ns/web",), None, id="no-cn-only-uri"),
        # cryptography warns (once per certificate: the policy caches the parse) about a CN over 64 characters.
        pytest.param([LONG_CN], (), LONG_CN, id="200-char-cn", marks=pytest.mark.filterwarnings("ignore::UserWarning")),
        pytest.param(["first", "second"], (), "second", id="several-cns-last-wins"),
    ],
)
async def test_the_target_receives_the_certificates_cn_whole_or_none(
    pki_files: dict[str, Path],
    ca: trustme.CA,
    tmp_path: Path,
    common_names: list[str],
    uris: tuple[str, ...],
    expected_cn: str | None,
) -> None:
    ctx = client_with_subject(ca, tmp_path, common_names, uris)
    async with proxied(pki_files) as (tun, received):
        await echoed(*await tls_connect(tun, ctx))
    info = received.ssl
    assert info.cn == expected_cn
    # Presented and verified, whatever the subject looks like.
    assert info.cert_conn and info.cert_sess and info.verified
    assert info.version in ("TLSv1.2", "TLSv1.3")
    assert info.cipher


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("server_hostname", "authority"),
    [("localhost", b"localhost"), ("127.0.0.1", None)],  # no SNI is sent for an IP address
)
async def test_the_sni_reaches_the_target_as_authority_only_when_the_client_sent_one(
    pki_files: dict[str, Path], ca: trustme.CA, server_hostname: str, authority: bytes | None
) -> None:
    async with proxied(pki_files) as (tun, received):
        alice = ca.issue_cert("alice.test", common_name="alice")
        await echoed(*await tls_connect(tun, client_context(ca, alice), server_hostname=server_hostname))
    assert received.headers[-1].tlv(PP2_TYPE_AUTHORITY) == authority
    assert received.ssl.cn == "alice"


@pytest.mark.asyncio
async def test_sni_is_sent_and_still_picks_the_certificate_when_several_are_configured(
    pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    other = ca.issue_cert("other.test")
    other.cert_chain_pems[0].write_to_path(str(tmp_path / "other.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    certs = [str(pki_files["cert"]), str(tmp_path / "other.pem")]
    keys = [str(pki_files["key"]), str(tmp_path / "other.key")]
    async with proxied(pki_files, cert=certs, key=keys) as (tun, received):
        alice = ca.issue_cert("alice.test", common_name="alice")
        reader, writer = await tls_connect(tun, client_context(ca, alice), server_hostname="other.test")
        presented = x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        await echoed(reader, writer)
    san = presented.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["other.test"]
    assert received.headers[-1].tlv(PP2_TYPE_AUTHORITY) == b"other.test"


@pytest.mark.asyncio
async def test_a_client_reset_right_after_sending_still_gets_its_real_source_in_the_header(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    """The header is built after the reset reached tlsgate: getpeername() fails then, accept()'s address does not."""
    async with proxied(pki_files) as (tun, received):
        port = port_of(tun)
        held: list[Any] = []
        original_resolve = tun.resolve
        tun.resolve = held.append  # hold the connect step until the client is gone

        alice = ca.issue_cert("alice.test", common_name="alice")
        _, writer = await tls_connect(tun, client_context(ca, alice))
        source = writer.get_extra_info("sockname")[:2]
        writer.write(b"last words")
        await writer.drain()
        await wait_until(lambda: bool(held))
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        setup = next(iter(tun.setups))

        def reset_seen() -> bool:
            try:
                setup.client.getpeername()
            except OSError:
                return True
            return False

        await wait_until(reset_seen)
        tun.resolve = original_resolve
        original_resolve(held[0])
        await wait_until(lambda: bool(received.headers))
    header = received.headers[0]
    assert header.command == "PROXY"
    assert header.source == source
    assert header.destination == ("127.0.0.1", port)


@pytest.mark.asyncio
async def test_a_unix_listener_sends_proxy_over_af_unix_with_both_paths(
    pki_files: dict[str, Path], ca: trustme.CA, short_dir: Path
) -> None:
    listen, client_path = short_dir / "in.sock", short_dir / "client.sock"
    async with proxied(pki_files, listen=f"unix:{listen}") as (_, received):
        alice = ca.issue_cert("alice.test", common_name="alice")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(client_path))  # a named client, so the source path is not empty
        sock.connect(str(listen))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_context(ca, alice), server_hostname="localhost"
        )
        await echoed(reader, writer)
    raw = received.raw[0]
    assert raw[12:14] == b"\x21\x31"  # version 2 PROXY; AF_UNIX, STREAM
    assert unix_addresses(raw) == (str(client_path).encode(), str(listen).encode())
    assert received.ssl.cn == "alice"


@pytest.mark.asyncio
async def test_a_unix_listener_with_proxy_v1_sends_unknown(
    pki_files: dict[str, Path], ca: trustme.CA, short_dir: Path
) -> None:
    listen = short_dir / "in.sock"
    async with proxied(pki_files, listen=f"unix:{listen}", proxy_protocol_mode="conn", proxy_protocol_version=1) as (
        _,
        received,
    ):
        alice = ca.issue_cert("alice.test", common_name="alice")
        reader, writer = await asyncio.open_unix_connection(
            str(listen), ssl=client_context(ca, alice), server_hostname="localhost"
        )
        await echoed(reader, writer)
    assert received.raw == [b"PROXY UNKNOWN\r\n"]


texts = st.text(max_size=300)
endpoints = st.tuples(st.ip_addresses().map(str), st.integers(0, 65535)) | st.binary(max_size=UNIX_PATH_BYTES)


@bounded
@given(
    cn=texts, sni=texts, alpn=st.text(max_size=20), cipher=st.text(max_size=40), version=st.text(max_size=10),
    has_cert=st.booleans(), src=endpoints, dst=endpoints,
)  # fmt: skip
def test_tls_tlvs_round_trip_exactly_through_encode_and_parse(
    cn: str,
    sni: str,
    alpn: str,
    cipher: str,
    version: str,
    has_cert: bool,
    src: tuple[str, int] | bytes,
    dst: tuple[str, int] | bytes,
) -> None:
    tlvs = tls_tlvs(
        version=version, sni=sni, client_cn=cn, cipher=cipher, verified=True, has_client_cert=has_cert, alpn=alpn
    )
    data = encode_v2(src, dst, tlvs=tlvs)
    header = parse(data + b"\x16\x03\x01")
    assert header is not None and header.length == len(data)
    assert header.tlvs == tuple(tlvs)
    assert header.tlv(PP2_TYPE_AUTHORITY) == (sni.encode() if sni else None)
    assert header.tlv(PP2_TYPE_ALPN) == (alpn.encode() if alpn else None)
    ssl_value = header.tlv(PP2_TYPE_SSL)
    assert ssl_value is not None
    info = parse_tlv_ssl(ssl_value)
    assert (info.cn, info.cipher, info.version) == (cn or None, cipher or None, version or None)
    assert info.verified == has_cert
    if isinstance(src, bytes) and isinstance(dst, bytes):
        assert data[12:14] == b"\x21\x31"
        assert unix_addresses(data) == (src.rstrip(b"\x00"), dst.rstrip(b"\x00"))
    elif isinstance(src, tuple) and isinstance(dst, tuple):
        assert header.command == "PROXY" and header.source is not None
    else:
        assert header.command == "LOCAL"  # one IP end and one unix end: no family can say both


def test_a_cn_too_long_for_its_tlv_is_a_value_error_not_a_truncation() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        tls_tlvs(version="TLSv1.3", sni=None, client_cn="x" * 70000, cipher=None, verified=True, has_client_cert=True)


def test_v1_has_no_unix_form() -> None:
    assert encode_v1("/run/a.sock", "/run/b.sock") == b"PROXY UNKNOWN\r\n"


# --- item 5: address rules on a unix listener --------------------------------------------------------------------


@pytest.fixture
def not_started(monkeypatch: pytest.MonkeyPatch) -> list[TunnelConfig]:
    """Stop the CLI before it would serve: a config that (wrongly) validates must not block the test."""
    started: list[TunnelConfig] = []

    def fake_start(cfg: TunnelConfig, _: ProcessOptions) -> int:
        started.append(cfg)
        return 0

    monkeypatch.setattr(tlsgate.cli, "_start", fake_start)
    return started


def server_args(pki_files: dict[str, Path], listen: str, *extra: str) -> list[str]:
    return [
        "server", "--listen", listen, "--target", "127.0.0.1:1", "--cert", str(pki_files["cert"]),
        "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"]), "--allow-all", *extra,
    ]  # fmt: skip


def assert_one_line_error(result: Any, needle: str) -> None:
    output = result.output  # click's CliRunner mixes stderr in
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.strip()]
    assert len(errors) == 1, output
    assert needle in errors[0], output


@pytest.mark.parametrize(
    "rules",
    [
        ["--deny-from", "0.0.0.0/0", "--deny-from", "::/0"],
        ["--allow-from", "10.0.0.0/8"],
    ],
)
def test_address_rules_on_a_unix_listener_are_refused_at_start(
    pki_files: dict[str, Path], short_dir: Path, not_started: list[TunnelConfig], rules: list[str]
) -> None:
    result = CliRunner().invoke(cli, server_args(pki_files, f"unix:{short_dir / 'in.sock'}", *rules))
    assert_one_line_error(result, "--allow-from/--deny-from cannot apply to --listen unix:")
    assert not not_started


def test_address_rules_on_a_unix_client_listener_are_refused_too(
    pki_files: dict[str, Path], short_dir: Path, not_started: list[TunnelConfig]
) -> None:
    args = ["client", "--listen", f"unix:{short_dir / 'in.sock'}", "--target", "localhost:8443"]
    tls = ["--cacert", str(pki_files["ca"]), "--disable-authentication"]
    result = CliRunner().invoke(cli, [*args, *tls, "--deny-from", "0.0.0.0/0"])
    assert_one_line_error(result, "cannot apply to --listen unix:")
    assert "accept-proxy-from" not in result.output  # not offered in client mode, where it does not exist
    assert not not_started


@pytest.mark.parametrize(
    ("listen", "extra", "needle"),
    [
        ("unix:{dir}/in.sock", ["--accept-proxy-from", "10.0.0.0/8"], "peers of a unix: listener have no IP"),
        ("127.0.0.1:0", ["--accept-proxy-from", "unix"], "--accept-proxy-from unix is for a unix: --listen"),
    ],
)
def test_accept_proxy_from_must_suit_the_listener(
    pki_files: dict[str, Path],
    short_dir: Path,
    not_started: list[TunnelConfig],
    listen: str,
    extra: list[str],
    needle: str,
) -> None:
    result = CliRunner().invoke(cli, server_args(pki_files, listen.format(dir=short_dir), *extra))
    assert_one_line_error(result, needle)


def test_address_rules_on_a_unix_listener_are_accepted_with_accept_proxy_from_unix(
    pki_files: dict[str, Path], short_dir: Path, not_started: list[TunnelConfig]
) -> None:
    listen = f"unix:{short_dir / 'in.sock'}"
    result = CliRunner().invoke(
        cli, server_args(pki_files, listen, "--accept-proxy-from", "unix", "--deny-from", "192.0.2.0/24")
    )
    assert result.exit_code == 0, result.output
    (cfg,) = not_started
    assert cfg.proxy_from_unix and cfg.proxy_source_networks == ()


def toml_tunnel(pki_files: dict[str, Path], listen: str, **keys: object) -> str:
    table = {
        "name": "web", "mode": "server", "listen": listen, "target": "127.0.0.1:1",
        "cert": str(pki_files["cert"]), "key": str(pki_files["key"]), "cacert": str(pki_files["ca"]),
        "allow-all": True, **keys,
    }  # fmt: skip
    return "[[tunnel]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_address_rules_on_a_unix_listener_are_refused_in_a_config_file(
    pki_files: dict[str, Path], short_dir: Path, tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsgate.cli.run, "run_server", lambda *_, **__: 0)  # never serve, whatever validates
    path = tmp_path / "tlsgate.toml"
    path.write_text(toml_tunnel(pki_files, f"unix:{short_dir / 'in.sock'}", **{"deny-from": ["0.0.0.0/0", "::/0"]}))
    result = CliRunner().invoke(cli, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "tunnel 'web': allow-from/deny-from cannot apply to listen unix:" in result.output


def test_a_config_file_accepts_unix_proxy_sources_with_address_rules(
    pki_files: dict[str, Path], short_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "tlsgate.toml"
    keys = {"deny-from": "192.0.2.0/24", "accept-proxy-from": "unix"}
    path.write_text(toml_tunnel(pki_files, f"unix:{short_dir / 'in.sock'}", **keys))
    result = CliRunner().invoke(cli, ["check-config", str(path)])
    assert result.exit_code == 0, result.output


def test_the_rule_is_in_the_config_model_not_only_the_cli(pki_files: dict[str, Path], short_dir: Path) -> None:
    options = server_opts(
        pki_files, "127.0.0.1:1", listen=f"unix:{short_dir}/in.sock", allow_all=True, deny_from=["0.0.0.0/0"]
    )
    with pytest.raises(ConfigErrors) as info:
        tunnel_config("server", options)
    assert info.value.problems == [
        f"--allow-from/--deny-from cannot apply to --listen unix:{short_dir}/in.sock: its peers have no IP address "
        "(remove them; add --accept-proxy-from unix to apply them to the client address in a PROXY header)"
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("family", "extra", "needle"),
    [
        ("unix", {"deny_from": ["0.0.0.0/0"]}, "is a unix socket and its peers have no IP address"),
        ("unix", {"accept_proxy_from": ["10.0.0.0/8"]}, "is a unix socket: its peers have no IP address"),
        ("tcp", {"accept_proxy_from": ["unix"]}, "is not a unix socket: --accept-proxy-from unix"),
    ],
)
async def test_a_systemd_socket_is_held_to_the_rules_of_its_real_family(
    pki_files: dict[str, Path], short_dir: Path, family: str, extra: dict[str, object], needle: str
) -> None:
    """systemd:NAME does not say whether systemd passed a unix or a TCP socket: start-up checks the socket."""
    if family == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(short_dir / "activated.sock"))
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    cfg = tunnel_config("server", server_opts(pki_files, "127.0.0.1:1", listen="systemd:web", allow_all=True, **extra))
    server = Server([cfg], ProcessOptions())
    with pytest.raises(StartupError, match=needle):
        server.start({"systemd:web": [sock]})
    assert sock.fileno() == -1  # closed, not left listening
    assert not server.tunnels


async def refused_after(path: Path, first_bytes: bytes) -> bool:
    """Whether tlsgate closes a unix connection that starts with ``first_bytes``, before any TLS."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(first_bytes)
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionError:
        return True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def echo_after_proxy_header(path: Path, header: bytes, ctx: ssl.SSLContext) -> bytes:
    """Over a unix socket: a PROXY header, then TLS, then one echo of b"ping"."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(header)
    await writer.drain()
    await writer.start_tls(ctx, server_hostname="localhost")
    writer.write(b"ping")
    try:
        return await asyncio.wait_for(reader.readexactly(4), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_address_rules_apply_to_the_proxy_source_on_a_unix_listener(
    pki_files: dict[str, Path], ca: trustme.CA, short_dir: Path
) -> None:
    listen = short_dir / "in.sock"
    alice = client_context(ca, ca.issue_cert("alice.test", common_name="alice"))
    async with proxied(pki_files, listen=f"unix:{listen}", accept_proxy_from=["unix"], deny_from=["192.0.2.0/24"]) as (
        tun,
        received,
    ):
        assert await refused_after(listen, b"PROXY TCP4 192.0.2.7 198.51.100.2 5000 443\r\n")
        assert tun.stats.refused == {"deny-from": 1}
        allowed = b"PROXY TCP4 198.51.100.1 198.51.100.2 5001 443\r\n"
        assert await echo_after_proxy_header(listen, allowed, alice) == b"ping"
        # A header with no client address leaves the rules nothing to match: refused, not waved through.
        assert await refused_after(listen, encode_v2(None, None, local=True))
        assert tun.stats.refused == {"deny-from": 1, "address": 1}
        # Every peer of the socket must send a header: a ClientHello is not one.
        assert await refused_after(listen, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert tun.stats.proxy_header_errors == 1
    # The one client let through: the target hears the address the balancer vouched for, both ends as a pair.
    (header,) = received.headers
    assert (header.source, header.destination) == (("198.51.100.1", 5001), ("198.51.100.2", 443))


# --- item 15b: every TLV length checked against its container ---------------------------------------------------


def v2_header_with(tlv_block: bytes) -> bytes:
    addresses = bytes([192, 0, 2, 1, 192, 0, 2, 2]) + struct.pack("!HH", 1, 2)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(addresses) + len(tlv_block)) + addresses + tlv_block


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        # CN sub-TLV claims 16 bytes, has 2: it would run into the NOOP TLV behind it.
        (
            tlv(PP2_TYPE_SSL, b"\x07\x00\x00\x00\x00" + b"\x22\x00\x10ab") + tlv(0x04, b"padding-bytes..."),
            "SSL sub-TLV 0x22 of 16 bytes runs past the end of its block",
        ),
        (tlv(PP2_TYPE_SSL, b"\x07\x00\x00\x00"), "SSL TLV must be at least 5 bytes, got 4"),
        (tlv(PP2_TYPE_SSL, b"\x07\x00\x00\x00\x00\x21\x00"), "SSL sub-TLV truncated: 2 bytes left"),
        (tlv(PP2_TYPE_SSL, b"\x07\x00\x00\x00\x00\x22\x00\x01\xff"), "SSL sub-TLV 0x22 is not valid UTF-8"),
        (tlv(PP2_TYPE_UNIQUE_ID, b"u" * 129), "v2 UNIQUE_ID TLV of 129 bytes exceeds the 128 the spec allows"),
    ],
)
def test_a_malformed_tlv_inside_a_header_is_refused_with_its_reason(block: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse(v2_header_with(block))
    assert str(info.value).startswith(reason)


def test_well_formed_ssl_and_unique_id_tlvs_are_accepted() -> None:
    block = tlv(PP2_TYPE_SSL, b"\x07\x00\x00\x00\x00" + tlv(0x22, b"ok")) + tlv(PP2_TYPE_UNIQUE_ID, b"u" * 128)
    header = parse(v2_header_with(block))
    assert header is not None and header.tlv(PP2_TYPE_UNIQUE_ID) == b"u" * 128


@st.composite
def tlv_blocks(draw: st.DrawFn) -> bytes:
    """TLV blocks that are mostly well-formed at the top level, with SSL values of random bytes inside."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from([PP2_TYPE_SSL, PP2_TYPE_SSL, PP2_TYPE_UNIQUE_ID, 0x02, 0x04, 0xE0]))
        if kind == PP2_TYPE_SSL and draw(st.booleans()):
            subs = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=4))
            value = draw(st.binary(min_size=5, max_size=5)) + b"".join(tlv(k, v) for k, v in subs)
            value = value[: draw(st.integers(0, len(value)))] if draw(st.booleans()) else value
        else:
            value = draw(st.binary(max_size=140))
        part = tlv(kind, value)
        if draw(st.integers(0, 5)) == 0:
            part = part[:3] + draw(st.binary(max_size=8))  # a length that lies about its value
        parts.append(part)
    return b"".join(parts)


@bounded
@given(block=tlv_blocks() | st.binary(max_size=200), tail=st.binary(max_size=16))
def test_random_tlvs_give_a_header_or_a_proxy_protocol_error_never_an_over_read(block: bytes, tail: bytes) -> None:
    data = v2_header_with(block)
    try:
        header = parse(data + tail)
    except ProxyProtocolError as err:
        assert str(err)
        return
    assert header is not None and header.length == len(data)
    # The TLVs account for the block exactly: nothing from the tail, nothing from a neighbour.
    assert b"".join(tlv(kind, value) for kind, value in header.tlvs) == block
    for kind, value in header.tlvs:
        if kind == PP2_TYPE_SSL:
            info = parse_tlv_ssl(value)
            assert b"".join(tlv(k, v) for k, v in info.sub_tlvs) == value[5:]


@pytest.mark.asyncio
async def test_a_balancer_header_with_an_overrunning_ssl_tlv_is_refused_on_a_real_connection(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    bad = v2_header_with(tlv(PP2_TYPE_SSL, b"\x07\x00\x00\x00\x00\x22\x00\x10ab") + tlv(0x04, b"x" * 16))
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_all=True,
                                                     accept_proxy_from=["127.0.0.1"])) as tun:  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(bad)
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionError:
            pass
        writer.close()
        await wait_until(lambda: tun.stats.proxy_header_errors == 1)
        assert be.connections == 0


# --- item 16: connections of a retired tunnel are still counted -------------------------------------------------


async def http_get(address: str, path: str) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: status\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return data.partition(b"\r\n\r\n")[2]


@dataclass
class Observed:
    status: dict[str, Any]
    metrics: list[dict[str, Any]]
    prometheus: str

    def open_in_status(self, name: str, state: str) -> int | None:
        for entry in self.status.get("tunnels", []):
            if entry["name"] == name and entry["state"] == state:
                return int(entry["open"])
        return None

    def open_in_metrics(self, name: str, retiring: bool) -> float | None:
        for entry in self.metrics:
            is_retiring = entry.get("state") == "retiring"
            if entry["metric"] == "tlsgate.conn.open" and entry.get("tunnel") == name and is_retiring == retiring:
                return float(entry["value"])
        return None


async def observe(server: Server) -> Observed:
    address = server.status_server.addresses[0]
    return Observed(
        json.loads(await http_get(address, "/_status")),
        json.loads(await http_get(address, "/_metrics")),
        (await http_get(address, "/metrics")).decode(),
    )


@pytest.mark.asyncio
async def test_connections_of_a_tunnel_removed_or_replaced_by_reload_are_counted_as_retiring_until_they_end(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    alice = client_context(ca, ca.issue_cert("alice.test", common_name="alice"))
    async with backend() as be:
        base = server_opts(pki_files, be.address, allow_all=True, listen="127.0.0.1:0")
        gone = tunnel_config("server", base, name="gone")
        changed = tunnel_config("server", base, name="changed")
        wanted = [changed]
        server = Server([gone, changed], ProcessOptions(status="http://127.0.0.1:0"), load_configs=lambda: list(wanted))
        ready = asyncio.Event()
        task = asyncio.create_task(server.serve(ready=lambda _: ready.set()))
        await ready.wait()
        connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            gone_tunnel, changed_tunnel = server.tunnels["gone"], server.tunnels["changed"]
            connections += [await tls_connect(t, alice) for t in (gone_tunnel, changed_tunnel)]
            for reader, writer in connections:
                writer.write(b"up")
                assert await reader.readexactly(2) == b"up"

            wanted[0] = tunnel_config("server", {**base, "idle_timeout": "1h"}, name="changed")
            assert server.reload()
            assert "gone" not in server.tunnels and server.tunnels["changed"] is not changed_tunnel

            seen = await observe(server)
            assert seen.open_in_status("gone", "retiring") == 1
            assert seen.open_in_status("changed", "retiring") == 1
            assert seen.open_in_status("changed", "active") == 0
            assert seen.status["ok"] is True  # a retiring tunnel does not make the process unhealthy
            assert seen.open_in_metrics("gone", retiring=True) == 1
            assert seen.open_in_metrics("changed", retiring=True) == 1
            assert seen.open_in_metrics("changed", retiring=False) == 0
            assert 'tlsgate_connections_open{tunnel="gone",state="retiring"} 1' in seen.prometheus
            assert 'tlsgate_connections_open{tunnel="changed",state="retiring"} 1' in seen.prometheus
            assert 'tlsgate_connections_open{tunnel="changed"} 0' in seen.prometheus

            # They still relay, and once they end the retired tunnels leave the numbers.
            for reader, writer in connections:
                await echoed(reader, writer, b"still relaying")
            await wait_until(lambda: not server.retired)
            seen = await observe(server)
            assert seen.open_in_status("gone", "retiring") is None
            assert seen.open_in_metrics("gone", retiring=True) is None
            assert seen.open_in_metrics("changed", retiring=True) is None
            assert 'state="retiring"' not in seen.prometheus
        finally:
            for _, writer in connections:
                writer.transport.abort()  # after a failed assertion, so the drain does not wait for them
            server.stop()
            await task


def test_views_of_a_retiring_tunnel_merge_apart_from_its_successor() -> None:
    from tlsgate.status import TunnelView, merge_views

    def view(retiring: bool, opened: int) -> TunnelView:
        return TunnelView(key="a", label="a", mode="server", listen=[], target="t", open=opened, retiring=retiring)

    merged = merge_views([[view(False, 1), view(True, 2)], [view(False, 3), view(True, 4)]])
    assert [(v.retiring, v.open) for v in merged] == [(False, 4), (True, 6)]
