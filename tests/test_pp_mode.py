"""``--proxy-protocol-mode conn|tls|tls-full`` (issue #15): what each mode tells the target, byte for byte.

The reference is ghostunnel's ``proxy/proxy_protocol.go`` and its ``tests/test-server-proxy-protocol-*.py``:

* ``conn``, and a bare ``--proxy-protocol``, send PROXY v2 with the addresses only: no TLV at all;
* ``tls`` adds ``PP2_TYPE_ALPN`` (when one was negotiated), ``PP2_TYPE_AUTHORITY`` (the client's SNI, when it
  sent one) and ``PP2_TYPE_SSL`` with the ``PP2_CLIENT_SSL`` flag and the version sub-TLV, and says nothing
  about the client certificate;
* ``tls-full`` also describes the client certificate: the ``PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS``
  flags, its CN (``PP2_SUBTYPE_SSL_CN``) and the certificate itself, DER, in ghostunnel's
  ``PP2_SUBTYPE_SSL_CLIENT_CERT`` (``0x28``).

The targets here read the header with a parser written in this module from proxy-protocol.txt, not with
``tlsgate.engine.proxyproto``, so a fault in the codec cannot hide itself; the last tests put a real nginx
behind the tunnel (it reads the header's addresses and must skip the TLVs) and a real curl in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.cli import cli
from tlsgate.engine.proxyproto import encode_v2, parse, parse_tlv_ssl, tls_tlvs
from tlsgate.settings.config import ConfigErrors, tunnel_config

from helpers import backend, client_context, echo, echoed, invoke, port_of, refused, server_opts, tls_connect, tunnel

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
ADDRESS_BYTES = {0x11: 12, 0x21: 36, 0x31: 216}  # proxy-protocol.txt 2.2: TCP4, TCP6, UNIX stream
ALPN, AUTHORITY, SSL_TLV = 0x01, 0x02, 0x20
SSL_VERSION, SSL_CN, SSL_CIPHER, SSL_CLIENT_CERT = 0x21, 0x22, 0x23, 0x28
CLIENT_SSL, CERT_CONN, CERT_SESS = 0x01, 0x02, 0x04


# --- a target that reads the header with its own parser ----------------------------------------------------------


def split_tlvs(block: bytes) -> list[tuple[int, bytes]]:
    """Type (1 byte), length (2 bytes, big-endian), value; the block must end exactly after the last one."""
    tlvs, offset = [], 0
    while offset < len(block):
        kind, length = block[offset], int.from_bytes(block[offset + 1 : offset + 3], "big")
        value = block[offset + 3 : offset + 3 + length]
        assert len(value) == length, f"TLV 0x{kind:02x} runs past its block"
        tlvs.append((kind, value))
        offset += 3 + length
    return tlvs


@dataclass(frozen=True)
class Seen:
    """One v2 header as a target sees it."""

    raw: bytes

    @property
    def family(self) -> int:
        return self.raw[13]

    @property
    def addresses(self) -> bytes:
        return self.raw[16 : 16 + ADDRESS_BYTES[self.family]]

    @property
    def tlvs(self) -> list[tuple[int, bytes]]:
        return split_tlvs(self.raw[16 + ADDRESS_BYTES[self.family] :])

    def tlv(self, kind: int) -> bytes | None:
        return dict(self.tlvs).get(kind)

    @property
    def ssl(self) -> tuple[int, int, list[tuple[int, bytes]]]:
        """``PP2_TYPE_SSL``: the client flags, the verify field and the sub-TLVs."""
        value = self.tlv(SSL_TLV)
        assert value is not None, "no PP2_TYPE_SSL"
        return value[0], int.from_bytes(value[1:5], "big"), split_tlvs(value[5:])


@dataclass
class Target:
    """Every header the target read (v2 as Seen, v1 as its line) and the address it listens on."""

    address: str = ""
    headers: list[Any] = field(default_factory=list)

    @property
    def last(self) -> Seen:
        header = self.headers[-1]
        assert isinstance(header, Seen)
        return header


def reading(target: Target) -> Any:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(16)
        if first[:12] == SIGNATURE:
            assert first[12] == 0x21, "version 2, command PROXY"
            target.headers.append(Seen(first + await reader.readexactly(int.from_bytes(first[14:16], "big"))))
        else:
            target.headers.append(first + await reader.readuntil(b"\r\n"))
        await echo(reader, writer)

    return handle


@contextlib.asynccontextmanager
async def sending(
    pki_files: dict[str, Path], *, mode: str | None, cert: bool = True, **extra: Any
) -> AsyncIterator[tuple[Any, Target]]:
    """A server tunnel in ``mode`` (None: bare ``--proxy-protocol``), with or without client certificates."""
    target = Target()
    pp: dict[str, Any] = {"proxy_protocol": True} if mode is None else {"proxy_protocol_mode": mode}
    access: dict[str, Any] = {"allow_all": True} if cert else {"disable_authentication": True}
    async with backend(reading(target)) as be:
        opts = server_opts(pki_files, be.address, **access, **pp, **extra)
        if not cert:
            del opts["cacert"]
        async with tunnel(**opts) as tun:
            target.address = be.address
            yield tun, target


def alice(pki_files: dict[str, Path]) -> tuple[ssl.SSLContext, bytes]:
    """The test PKI's client (CN=alice) and its certificate, DER."""
    ctx = ssl.create_default_context(cafile=str(pki_files["ca"]))
    ctx.load_cert_chain(str(pki_files["client_cert"]), str(pki_files["client_key"]))
    return ctx, ssl.PEM_cert_to_DER_cert(pki_files["client_cert"].read_text())


def anonymous(pki_files: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki_files["ca"]))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose unix socket paths fit in sun_path (pytest's tmp_path can be too long)."""
    with tempfile.TemporaryDirectory(prefix="tgpp", dir="/tmp") as name:
        yield Path(name)


# --- what each mode sends ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [None, "conn"], ids=["bare --proxy-protocol", "conn"])
@pytest.mark.parametrize("cert", [True, False], ids=["client-cert", "no-client-cert"])
async def test_conn_and_bare_proxy_protocol_send_addresses_and_no_tlv(
    pki_files: dict[str, Path], mode: str | None, cert: bool
) -> None:
    async with sending(pki_files, mode=mode, cert=cert) as (tun, target):
        ctx = alice(pki_files)[0] if cert else anonymous(pki_files)
        reader, writer = await tls_connect(tun, ctx)
        source_port, port = writer.get_extra_info("sockname")[1], writer.get_extra_info("peername")[1]
        await echoed(reader, writer)
    seen = target.last
    assert seen.family == 0x11
    assert seen.tlvs == []
    assert len(seen.raw) == 16 + 12  # nothing after the addresses
    assert seen.addresses == (
        socket.inet_aton("127.0.0.1") * 2 + source_port.to_bytes(2, "big") + port.to_bytes(2, "big")
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("cert", [True, False], ids=["client-cert", "no-client-cert"])
async def test_tls_mode_sends_sni_and_version_and_nothing_about_the_certificate(
    pki_files: dict[str, Path], cert: bool
) -> None:
    async with sending(pki_files, mode="tls", cert=cert) as (tun, target):
        ctx = alice(pki_files)[0] if cert else anonymous(pki_files)
        reader, writer = await tls_connect(tun, ctx)
        version, cipher = writer.get_extra_info("ssl_object").version(), writer.get_extra_info("cipher")[0]
        await echoed(reader, writer)
    seen = target.last
    assert [kind for kind, _ in seen.tlvs] == [AUTHORITY, SSL_TLV]  # no ALPN: none was negotiated
    assert seen.tlv(AUTHORITY) == b"localhost"
    flags, verify, subs = seen.ssl
    assert flags == CLIENT_SSL  # no certificate flags, as ghostunnel's tls mode
    # verify is still true to the spec: 0 only for a client that presented a certificate that was verified.
    assert verify == (0 if cert else 1)
    assert subs == [(SSL_VERSION, version.encode()), (SSL_CIPHER, cipher.encode())]


@pytest.mark.asyncio
async def test_tls_full_mode_adds_the_certificate_flags_cn_and_der(pki_files: dict[str, Path]) -> None:
    ctx, der = alice(pki_files)
    async with sending(pki_files, mode="tls-full") as (tun, target):
        reader, writer = await tls_connect(tun, ctx)
        version = writer.get_extra_info("ssl_object").version()
        await echoed(reader, writer)
    seen = target.last
    assert [kind for kind, _ in seen.tlvs] == [AUTHORITY, SSL_TLV]
    flags, verify, subs = seen.ssl
    assert flags == CLIENT_SSL | CERT_CONN | CERT_SESS
    assert verify == 0
    assert [kind for kind, _ in subs] == [SSL_VERSION, SSL_CN, SSL_CIPHER, SSL_CLIENT_CERT]
    assert dict(subs)[SSL_VERSION] == version.encode()
    assert dict(subs)[SSL_CN] == b"alice"
    assert dict(subs)[SSL_CLIENT_CERT] == der  # the leaf as presented, whole
    # tlsgate's own decoder agrees.
    value = seen.tlv(SSL_TLV)
    assert value is not None
    info = parse_tlv_ssl(value)
    assert info.verified and info.cn == "alice" and info.client_cert == der


@pytest.mark.asyncio
async def test_tls_full_mode_without_a_client_certificate_says_so(pki_files: dict[str, Path]) -> None:
    async with sending(pki_files, mode="tls-full", cert=False) as (tun, target):
        await echoed(*await tls_connect(tun, anonymous(pki_files)))
    flags, verify, subs = target.last.ssl
    assert flags == CLIENT_SSL
    assert verify == 1
    assert [kind for kind, _ in subs] == [SSL_VERSION, SSL_CIPHER]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["tls", "tls-full"])
@pytest.mark.parametrize("offered", [["http/1.1"], ["h2", "http/1.1"], None], ids=["http1", "h2", "no-alpn"])
async def test_the_alpn_tlv_carries_the_negotiated_protocol_only_when_there_is_one(
    pki_files: dict[str, Path], mode: str, offered: list[str] | None
) -> None:
    ctx = alice(pki_files)[0]
    if offered:
        ctx.set_alpn_protocols(offered)
    async with sending(pki_files, mode=mode, alpn=["h2", "http/1.1"]) as (tun, target):
        reader, writer = await tls_connect(tun, ctx)
        chosen = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        await echoed(reader, writer)
    assert chosen == (offered[0] if offered else None)
    seen = target.last
    if chosen is None:
        assert seen.tlv(ALPN) is None
    else:
        assert seen.tlvs[0] == (ALPN, chosen.encode())  # first, as ghostunnel orders them


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("server_hostname", "authority"),
    [
        ("bücher.test", b"xn--bcher-kva.test"),  # the client sends the IDNA A-label; it arrives as sent
        ("xn--bcher-kva.test", b"xn--bcher-kva.test"),
        ("a." * 100 + "test", ("a." * 100 + "test").encode()),  # a long name, whole
        ("127.0.0.1", None),  # no SNI is sent for an IP address: no AUTHORITY
    ],
    ids=["unicode", "a-label", "long", "ip-literal"],
)
async def test_the_authority_tlv_is_the_sni_the_client_sent(
    pki_files: dict[str, Path], server_hostname: str, authority: bytes | None
) -> None:
    ctx = alice(pki_files)[0]
    ctx.check_hostname = False  # the names are not the certificate's; the chain is still verified
    async with sending(pki_files, mode="tls") as (tun, target):
        await echoed(*await tls_connect(tun, ctx, server_hostname=server_hostname))
    assert target.last.tlv(AUTHORITY) == authority


@pytest.mark.asyncio
async def test_an_ipv6_listener_sends_tcp6_addresses_and_the_tlvs(pki_files: dict[str, Path]) -> None:
    ctx, der = alice(pki_files)
    async with sending(pki_files, mode="tls-full", listen="[::1]:0") as (tun, target):
        reader, writer = await asyncio.open_connection("::1", port_of(tun), ssl=ctx, server_hostname="localhost")
        source_port, port = writer.get_extra_info("sockname")[1], writer.get_extra_info("peername")[1]
        await echoed(reader, writer)
    seen = target.last
    assert seen.family == 0x21
    loopback = socket.inet_pton(socket.AF_INET6, "::1")
    assert seen.addresses == loopback * 2 + source_port.to_bytes(2, "big") + port.to_bytes(2, "big")
    assert dict(seen.ssl[2])[SSL_CLIENT_CERT] == der


@pytest.mark.asyncio
async def test_a_unix_listener_sends_af_unix_addresses_and_the_tlvs(
    pki_files: dict[str, Path], short_dir: Path
) -> None:
    ctx, der = alice(pki_files)
    listen = short_dir / "in.sock"
    async with sending(pki_files, mode="tls-full", listen=f"unix:{listen}") as (_, target):
        reader, writer = await asyncio.open_unix_connection(str(listen), ssl=ctx, server_hostname="localhost")
        await echoed(reader, writer)
    seen = target.last
    assert seen.family == 0x31
    assert seen.addresses[:108] == b"\x00" * 108  # an unbound client
    assert seen.addresses[108:].rstrip(b"\x00") == str(listen).encode()
    assert seen.tlv(AUTHORITY) == b"localhost"
    assert dict(seen.ssl[2])[SSL_CLIENT_CERT] == der


def big_client(ca: trustme.CA, at_least: int) -> trustme.LeafCert:
    """A client certificate whose DER is ``at_least`` bytes long, made so by many DNS names."""
    count = at_least // 20 + 1
    return ca.issue_cert(*(f"n{i:05}.big.example" for i in range(count)), common_name="big")


@pytest.mark.asyncio
async def test_a_client_certificate_over_8_kib_is_sent_whole(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    """The SSL TLV's 16-bit length holds it; nothing is cut, and the header's own length counts every byte."""
    leaf = big_client(ca, 8 * 1024)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    assert len(der) > 8 * 1024
    async with sending(pki_files, mode="tls-full") as (tun, target):
        await echoed(*await tls_connect(tun, client_context(ca, leaf)))
    seen = target.last
    assert dict(seen.ssl[2])[SSL_CLIENT_CERT] == der
    assert dict(seen.ssl[2])[SSL_CN] == b"big"
    assert int.from_bytes(seen.raw[14:16], "big") == len(seen.raw) - 16
    header = parse(seen.raw, max_tlv_bytes=16 * 1024)  # the codec's default limit (4 KiB) is for what it accepts
    assert header is not None and header.length == len(seen.raw)


@pytest.mark.asyncio
async def test_a_certificate_too_big_for_the_header_fails_that_connection_only(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """A leaf over 64 KiB cannot fit the SSL TLV's 16-bit length: that connection fails with the reason, no
    header is cut short, and the next client is served. (Session tickets off: OpenSSL cannot put such a
    certificate in a ticket either, and would fail the handshake first.)"""
    leaf = big_client(ca, 66 * 1024)
    async with sending(pki_files, mode="tls-full", session_tickets="off") as (tun, target):
        reader, writer = await tls_connect(tun, client_context(ca, leaf))
        writer.write(b"ping")
        with contextlib.suppress(ConnectionError):
            assert await reader.read() == b""
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        await echoed(*await tls_connect(tun, alice(pki_files)[0]))
    assert len(target.headers) == 1  # the big one never reached the target
    reasons = [str(getattr(r, "fields", {}).get("reason")) for r in caplog.records]
    assert any(r.startswith("cannot build the PROXY header: PROXY v2 SSL sub-TLV 0x28 of ") for r in reasons), reasons


# --- version 1 ---------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_conn_mode_with_version_1_sends_the_v1_line(pki_files: dict[str, Path]) -> None:
    async with sending(pki_files, mode="conn", proxy_protocol_version=1) as (tun, target):
        reader, writer = await tls_connect(tun, alice(pki_files)[0])
        source_port, port = writer.get_extra_info("sockname")[1], writer.get_extra_info("peername")[1]
        await echoed(reader, writer)
    assert target.headers == [f"PROXY TCP4 127.0.0.1 127.0.0.1 {source_port} {port}\r\n".encode()]


# --- refusals ----------------------------------------------------------------------------------------------------


def server_args(pki_files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--cert", str(pki_files["cert"]),
        "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"]), "--allow-all", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ("--proxy-protocol", "--proxy-protocol-mode", "tls"),
            "--proxy-protocol and --proxy-protocol-mode are mutually exclusive",
        ),
        (
            ("--proxy-protocol", "--proxy-protocol-mode", "conn"),
            "--proxy-protocol and --proxy-protocol-mode are mutually exclusive",
        ),
        (("--proxy-protocol-mode", "full"), "'full' is not one of 'conn', 'tls', 'tls-full'"),
        (("--proxy-protocol-mode", "TLS"), "'TLS' is not one of 'conn', 'tls', 'tls-full'"),
        (("--proxy-protocol-mode", ""), "is not one of 'conn', 'tls', 'tls-full'"),
        (
            ("--proxy-protocol-mode", "tls", "--proxy-protocol-version", "1"),
            "--proxy-protocol-mode tls needs --proxy-protocol-version 2",
        ),
        (
            ("--proxy-protocol-mode", "tls-full", "--proxy-protocol-version", "1"),
            "--proxy-protocol-mode tls-full needs --proxy-protocol-version 2",
        ),
    ],
    ids=["with-bare-tls", "with-bare-conn", "unknown", "upper-case", "empty", "v1-tls", "v1-tls-full"],
)
def test_bad_flag_combinations_are_one_line_and_exit_2(
    pki_files: dict[str, Path], extra: tuple[str, ...], message: str
) -> None:
    refused(invoke(cli, *server_args(pki_files, *extra)), message)


def test_client_mode_has_no_proxy_protocol_mode(pki_files: dict[str, Path]) -> None:
    result = invoke(
        cli, "client", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--disable-authentication",
        "--proxy-protocol-mode", "tls",
    )  # fmt: skip
    refused(result, "--proxy-protocol-mode")


def test_the_modes_take_the_same_values_as_flag_and_key(pki_files: dict[str, Path]) -> None:
    opts = server_opts(pki_files, "127.0.0.1:1", allow_all=True, listen="127.0.0.1:0")
    assert tunnel_config("server", opts).proxy_protocol_mode is None
    for mode in ("conn", "tls", "tls-full"):
        assert tunnel_config("server", {**opts, "proxy-protocol-mode": mode}).proxy_protocol_mode == mode
        assert tunnel_config("server", {**opts, "proxy_protocol_mode": mode}).proxy_protocol_mode == mode
    bare = tunnel_config("server", {**opts, "proxy_protocol": True})
    assert bare.proxy_protocol and bare.proxy_protocol_mode is None
    with pytest.raises(ConfigErrors, match="--proxy-protocol-mode: expected one of conn, tls, tls-full, got 'on'"):
        tunnel_config("server", {**opts, "proxy_protocol_mode": "on"})
    with pytest.raises(ConfigErrors, match="mutually exclusive"):
        tunnel_config("server", {**opts, "proxy_protocol": True, "proxy_protocol_mode": "tls-full"})
    # proxy_protocol = false with a mode is no conflict (ghostunnel refuses only both set).
    assert tunnel_config("server", {**opts, "proxy_protocol": False, "proxy_protocol_mode": "tls"}).proxy_protocol_mode


def toml_tunnel(pki_files: dict[str, Path], **extra: str) -> str:
    lines = [
        "[[tunnel]]", 'name = "web"', 'mode = "server"', 'listen = "127.0.0.1:8443"', 'target = "127.0.0.1:8080"',
        f'cert = "{pki_files["cert"]}"', f'key = "{pki_files["key"]}"', f'cacert = "{pki_files["ca"]}"',
        "allow-all = true", *(f"{key} = {value}" for key, value in extra.items()),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("extra", "summary"),
    [
        ({"proxy-protocol-mode": '"tls-full"'}, "PROXY v2 tls-full"),
        ({"proxy_protocol_mode": '"tls"'}, "PROXY v2 tls"),
        ({"proxy-protocol": "true"}, "PROXY v2 conn"),
        ({"proxy-protocol-mode": '"conn"', "proxy-protocol-version": "1"}, "PROXY v1 conn"),
    ],
)
def test_check_config_takes_the_key_and_names_the_mode(
    pki_files: dict[str, Path], tmp_path: Path, extra: dict[str, str], summary: str
) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(toml_tunnel(pki_files, **extra))
    result = invoke(cli, "check-config", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith(summary + ")"), result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"proxy-protocol": "true", "proxy-protocol-mode": '"tls"'},
            "proxy-protocol and proxy-protocol-mode are mutually exclusive",
        ),
        ({"proxy-protocol-mode": '"ssl"'}, "proxy-protocol-mode: expected one of conn, tls, tls-full, got 'ssl'"),
        ({"proxy-protocol-mode": "true"}, "proxy-protocol-mode"),
        (
            {"proxy-protocol-mode": '"tls-full"', "proxy-protocol-version": "1"},
            "proxy-protocol-mode tls-full needs proxy-protocol-version 2",
        ),
    ],
    ids=["both", "unknown", "not-a-string", "v1"],
)
def test_a_file_with_a_bad_mode_is_one_line_and_exit_2(
    pki_files: dict[str, Path], tmp_path: Path, extra: dict[str, str], message: str
) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(toml_tunnel(pki_files, **extra))
    line = refused(invoke(cli, "check-config", path), message)
    assert line.startswith("tlsgate: error: tunnel 'web': ")


# --- off and conn cost nothing in the handshake ------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("mode", "captures"), [(None, False), ("conn", False), ("tls", True), ("tls-full", True)])
async def test_only_the_tls_modes_record_the_sni_in_the_handshake(
    pki_files: dict[str, Path], mode: str | None, captures: bool
) -> None:
    """Recording the SNI is a Python callback in every handshake: conn mode does not need it, so it has none."""
    extra = {} if mode is None else {"proxy_protocol_mode": mode}
    async with tunnel(**server_opts(pki_files, "127.0.0.1:1", allow_all=True, **extra)) as tun:
        ctx = tun.runtime.accept_ctx
        assert ctx is not None
        assert (ctx.sni_callback is not None) == captures


# --- properties of the sans-IO builder ---------------------------------------------------------------------------

texts = st.text(max_size=200)


@settings(max_examples=200, deadline=None)
@given(
    cn=texts, sni=texts, alpn=st.text(max_size=20), version=st.text(max_size=10), cipher=st.text(max_size=40),
    der=st.binary(max_size=9000), has_cert=st.booleans(), details=st.booleans(),
)  # fmt: skip
def test_tls_tlvs_describe_the_certificate_only_with_details(
    cn: str, sni: str, alpn: str, version: str, cipher: str, der: bytes, has_cert: bool, details: bool
) -> None:
    """Whatever the values, the header parses back to them, and without details no byte of the CN or the
    certificate, nor a certificate flag, is in it."""
    tlvs = tls_tlvs(
        version=version, sni=sni, client_cn=cn, cipher=cipher, verified=True, has_client_cert=has_cert, alpn=alpn,
        client_cert=der if has_cert else None, certificate_details=details,
    )  # fmt: skip
    seen = Seen(encode_v2(("192.0.2.1", 1), ("198.51.100.7", 443), tlvs=tlvs))
    assert seen.tlv(ALPN) == (alpn.encode() or None)
    assert seen.tlv(AUTHORITY) == (sni.encode() or None)
    flags, verify, subs = seen.ssl
    assert verify == (0 if has_cert else 1)
    expected = [(SSL_VERSION, version.encode())] if version else []
    assert flags == (CLIENT_SSL | CERT_CONN | CERT_SESS if details and has_cert else CLIENT_SSL)
    expected += [(SSL_CN, cn.encode())] if details and cn else []
    expected += [(SSL_CIPHER, cipher.encode())] if cipher else []
    expected += [(SSL_CLIENT_CERT, der)] if details and has_cert and der else []
    assert subs == expected


# --- real peers: curl in front, nginx behind -----------------------------------------------------------------------

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log stderr notice;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_header_buffer_size {buffer};
    server {{
        listen unix:{dir}/nginx.sock proxy_protocol;
        location / {{ return 200 "client $proxy_protocol_addr port $proxy_protocol_port\\n"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(directory: Path, buffer: str = "1k") -> Iterator[Path]:
    """A real nginx reading PROXY headers on a unix socket (no port to race for); yields the socket's path."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx is needed (.ci/run installs it)"
    (directory / "nginx.conf").write_text(NGINX_CONF.format(dir=directory, buffer=buffer))
    sock = directory / "nginx.sock"
    proc = subprocess.Popen(
        [binary, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", "stderr"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        # nginx reports the system's limits (a notice) right after it has opened its listening sockets.
        for line in proc.stderr:
            if "getrlimit" in line:
                break
        assert sock.exists()
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["conn", "tls", "tls-full"])
async def test_curl_through_each_mode_to_nginx_reading_the_header(
    pki_files: dict[str, Path], short_dir: Path, mode: str
) -> None:
    """The receivers users have: nginx takes the client's address from the header (skipping the TLVs, as a
    receiver that does not use them must), and curl is the client."""
    curl = shutil.which("curl")
    assert curl, "curl is needed (.ci/run installs it)"
    with nginx(short_dir) as sock:
        opts = server_opts(pki_files, f"unix:{sock}", allow_all=True, proxy_protocol_mode=mode, alpn=["http/1.1"])
        async with tunnel(**opts) as tun:
            proc = await asyncio.create_subprocess_exec(
                curl, "--silent", "--show-error", "--fail", "--cacert", str(pki_files["ca"]),
                "--cert", str(pki_files["client_cert"]), "--key", str(pki_files["client_key"]),
                "--write-out", "\\n%{local_port}",
                f"https://localhost:{port_of(tun)}/",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    body, _, local_port = out.decode().rpartition("\n")
    assert body == f"client 127.0.0.1 port {local_port}\n"


@pytest.mark.asyncio
async def test_tls_full_with_an_8_kib_certificate_reaches_nginx_given_a_header_buffer_that_holds_it(
    pki_files: dict[str, Path], ca: trustme.CA, short_dir: Path
) -> None:
    """nginx reads the whole header into ``client_header_buffer_size`` (1k by default, too small for most
    tls-full headers): docs/proxy-protocol.md tells users to raise it, and this is that set-up working."""
    leaf = big_client(ca, 8 * 1024)
    with nginx(short_dir, buffer="16k") as sock:
        async with tunnel(
            **server_opts(pki_files, f"unix:{sock}", allow_all=True, proxy_protocol_mode="tls-full")
        ) as tun:
            reader, writer = await tls_connect(tun, client_context(ca, leaf))
            source_port = writer.get_extra_info("sockname")[1]
            writer.write(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            response = await reader.read()
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(f"client 127.0.0.1 port {source_port}\n".encode())
