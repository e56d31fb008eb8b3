"""Client mode ``--proxy URL`` (alias ``--connect-proxy``): the target reached through HTTP CONNECT or SOCKS5.

Three layers: the URL parser (settings.proxyurl) and the two handshakes (engine.viaproxy) with plain values and
hypothesis; then a client tunnel through small real proxies on loopback (written here: an HTTP CONNECT proxy and
a SOCKS5 proxy that splice to the target they are asked for), with TLS and mTLS to the target and --verify-*
rules; then the command line (the ghostunnel alias, refusals with exit 2). The target's name ends in ``.invalid``
(RFC 2606), which never resolves: a connection that works proves the name went to the proxy, as in ghostunnel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.cli import cli
from tlsgate.engine.viaproxy import MAX_HTTP_REPLY, HttpConnect, Socks5Connect, ViaProxyError
from tlsgate.errors import ConfigError
from tlsgate.process.supervisor import Server
from tlsgate.settings.config import tunnel_config
from tlsgate.settings.file import load_config_file
from tlsgate.settings.process_options import ProcessOptions
from tlsgate.settings.proxyurl import parse_proxy_url

from helpers import (
    assert_cut,
    backend,
    echo,
    invoke,
    port_of,
    refused,
    request,
    reserved_port,
    running_server,
    status_address,
    tunnel,
    wait_for_listener,
    wait_until,
)

TARGET_NAME = "backend.proxied.invalid"
SECRET = "s3cr3t-Pa55"


# -- the URL -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "host", "port"),
    [
        ("http://proxy.example", "http", "proxy.example", 8080),
        ("http://proxy.example:3128/", "http", "proxy.example", 3128),
        ("HTTP://127.0.0.1:1", "http", "127.0.0.1", 1),
        ("socks5://proxy.example", "socks5", "proxy.example", 1080),
        ("socks5h://[::1]:9050", "socks5", "::1", 9050),
        ("socks5://[fe80::1]", "socks5", "fe80::1", 1080),
    ],
)
def test_proxy_url_forms_and_ghostunnels_default_ports(text: str, kind: str, host: str, port: int) -> None:
    url = parse_proxy_url(text)
    assert (url.kind, url.host, url.port, url.has_credentials) == (kind, host, port, False)


def test_proxy_url_credentials_are_percent_decoded_and_never_shown() -> None:
    url = parse_proxy_url(f"socks5://us%40er:{SECRET}%3A%2F@proxy.example:1")
    assert (url.username, url.password) == (b"us@er", SECRET.encode() + b":/")
    assert url.shown == "socks5://proxy.example:1"
    assert SECRET not in repr(url) and SECRET not in str(url)
    assert parse_proxy_url("http://user@p").password == b""  # a user without password: an empty one, as in Go


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "give a proxy URL"),
        ("proxy.example:8080", "unknown scheme"),
        ("https://proxy.example", "TLS to the proxy .* is not implemented yet"),
        ("socks4://proxy.example", "SOCKS4 is not supported"),
        ("http://proxy.example/path", "no path"),
        ("http://proxy.example?x=1", "no query"),
        ("http://proxy.example:0", "port 0"),
        ("http://proxy.example:99999", "not a URL"),
        ("http://proxy.example:http", "not a URL"),
        ("http://[::1", "not a URL"),
        ("http://", "no valid proxy host"),
        ("http://bad_host!", "no valid proxy host"),
        ("http://a b", "no spaces"),
        ("socks5://:pw@proxy.example", "user name in the URL is empty"),
        ("http://a%3Ab:pw@proxy.example", "Basic authentication cannot carry"),
        ("socks5://" + "u" * 256 + ":pw@proxy.example", "at most 255 bytes"),
    ],
)
def test_proxy_url_refusals_say_why(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as err:
        parse_proxy_url(text)
    assert "\n" not in str(err.value)


@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=6, max_size=40))
def test_a_password_is_never_quoted_back_whatever_the_url(password: str) -> None:
    """Whether the URL is accepted or refused (a password may break it), the password never appears."""
    for text in (f"http://user:{password}@proxy.example", f"ftp://user:{password}@p", f"http://u:{password}@h/x"):
        try:
            url = parse_proxy_url(text)
        except ConfigError as err:
            assert password not in str(err)
        else:
            assert password not in f"{url!r} {url}"


# -- the handshakes, sans-IO -------------------------------------------------------------------------------------


def drive(handshake: HttpConnect | Socks5Connect, replies: bytes, cuts: list[int]) -> tuple[bytes, int, bool]:
    """Feed ``replies`` split at ``cuts`` the way the engine does (peek, take ``used``); what was sent, how many
    bytes were taken, and whether the tunnel opened."""
    sent = handshake.first_flight()
    pos, opened = 0, False
    bounds = sorted({c for c in cuts if 0 < c < len(replies)} | {len(replies)})
    for bound in bounds:
        while pos < bound and not opened:
            step = handshake.take(replies[pos:bound])
            assert step.used > 0, "an offered byte must always be used: otherwise the engine would spin"
            pos += step.used
            sent += step.send
            opened = step.open
    return sent, pos, opened


def basic(user: str, password: str) -> bytes:
    return base64.b64encode(f"{user}:{password}".encode())


@given(st.lists(st.integers(0, 200), max_size=8), st.binary(max_size=40))
def test_http_connect_opens_on_2xx_however_split_and_leaves_the_targets_bytes(cuts: list[int], after: bytes) -> None:
    reply = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: test\r\n\r\n"
    handshake = HttpConnect("db.internal", 5432, b"user", SECRET.encode())
    sent, used, opened = drive(handshake, reply + after, cuts)
    assert opened and used == len(reply)  # the bytes after the reply are the target's: never taken
    assert sent == (
        b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n"
        b"Proxy-Authorization: Basic " + basic("user", SECRET) + b"\r\n\r\n"
    )


def test_http_connect_brackets_an_ipv6_target_and_sends_no_credentials_without_them() -> None:
    assert (
        HttpConnect("::1", 443, None, None).first_flight() == b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("reply", "credentials", "why"),
    [
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", False, "refused the CONNECT: 403 Forbidden"),
        (b"HTTP/1.0 502 Bad Gateway\r\nX: y\r\n\r\n", False, "502 Bad Gateway"),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", False, "wants credentials"),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", True, "refused the credentials"),
        (b"HTTP/1.0 401 Unauthorized\r\n\r\n", True, "refused the credentials"),  # tinyproxy's answer
        (b"SSH-2.0-OpenSSH\r\n\r\n", False, "not an HTTP proxy reply"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", False, "not an HTTP proxy reply"),
        (b"\x16\x03\x01\x00\x05hello\r\n\r\n", False, "not an HTTP proxy reply"),
    ],
)
def test_http_connect_refusals_say_why(reply: bytes, credentials: bool, why: str) -> None:
    handshake = HttpConnect("t", 1, b"u" if credentials else None, SECRET.encode() if credentials else None)
    with pytest.raises(ViaProxyError, match=why) as err:
        handshake.take(reply)
    assert SECRET not in str(err.value) and "\n" not in str(err.value)


def test_http_connect_bounds_a_reply_that_never_ends() -> None:
    handshake = HttpConnect("t", 1, None, None)
    with pytest.raises(ViaProxyError, match="longer than"):
        for _ in range(MAX_HTTP_REPLY):
            assert handshake.take(b"X-Filler: " + b"a" * 100 + b"\r\n").used > 0


SOCKS_OK_V4 = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"


@given(st.lists(st.integers(0, 40), max_size=6), st.binary(max_size=20), st.sampled_from(["v4", "v6", "name"]))
def test_socks5_with_credentials_however_split(cuts: list[int], after: bytes, bound: str) -> None:
    bound_address = {
        "v4": b"\x01\x7f\x00\x00\x01",
        "v6": b"\x04" + bytes(15) + b"\x01",
        "name": b"\x03\x05proxy",
    }[bound]
    replies = b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00" + bound_address + b"\x04\x38"
    sent, used, opened = drive(Socks5Connect(TARGET_NAME, 443, b"user", SECRET.encode()), replies + after, cuts)
    assert opened and used == len(replies)
    name = TARGET_NAME.encode()
    assert sent == (
        b"\x05\x02\x00\x02"
        + b"\x01\x04user"
        + bytes([len(SECRET)])
        + SECRET.encode()
        + b"\x05\x01\x00\x03"
        + bytes([len(name)])
        + name
        + b"\x01\xbb"
    )


def test_a_unicode_target_name_goes_to_the_proxy_as_idna() -> None:
    assert (
        HttpConnect("bücher.example", 443, None, None)
        .first_flight()
        .startswith(b"CONNECT xn--bcher-kva.example:443 HTTP/1.1\r\n")
    )
    sent, _, _ = drive(Socks5Connect("bücher.example", 443, None, None), b"\x05\x00", [])
    assert sent.endswith(b"\x05\x01\x00\x03\x15xn--bcher-kva.example\x01\xbb")


@pytest.mark.parametrize(
    ("host", "address"),
    [("10.1.2.3", b"\x01\x0a\x01\x02\x03"), ("::1", b"\x04" + ipaddress.IPv6Address("::1").packed)],
)
def test_socks5_sends_an_ip_literal_as_an_address(host: str, address: bytes) -> None:
    sent, _, opened = drive(Socks5Connect(host, 80, None, None), b"\x05\x00" + SOCKS_OK_V4, [])
    assert opened and sent == b"\x05\x01\x00" + b"\x05\x01\x00" + address + b"\x00\x50"


@pytest.mark.parametrize(
    ("replies", "credentials", "why"),
    [
        (b"\x05\xff", False, "wants credentials"),
        (b"\x05\xff", True, "accepts none of our authentication methods"),
        (b"\x05\x02", False, "chose authentication method 2"),
        (b"\x04\x00", False, "not a SOCKS5 proxy"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", False, "not a SOCKS5 proxy"),
        (b"\x05\x02\x01\x01", True, "refused the credentials"),
        (b"\x05\x00\x05\x05\x00\x01" + bytes(6), False, "connection refused by the target"),
        (b"\x05\x00\x05\x02\x00\x01" + bytes(6), False, "not allowed by ruleset"),
        (b"\x05\x00\x05\x63\x00\x01" + bytes(6), False, "reply code 99"),
        (b"\x05\x00\x05\x00\x00\x07\x00", False, "address type 7"),
        (b"\x05\x00\x04\x00\x00\x01" + bytes(6), False, "bad version"),
    ],
)
def test_socks5_refusals_say_why(replies: bytes, credentials: bool, why: str) -> None:
    user, password = (b"u", SECRET.encode()) if credentials else (None, None)
    with pytest.raises(ViaProxyError, match=why) as err:
        drive(Socks5Connect("t", 1, user, password), replies, [])
    assert SECRET not in str(err.value)


@given(st.binary(min_size=1, max_size=300))
def test_any_bytes_from_a_proxy_end_in_a_verdict_or_a_wait_never_a_spin(garbage: bytes) -> None:
    for handshake in (HttpConnect("t", 1, b"u", b"p"), Socks5Connect("t", 1, b"u", b"p")):
        try:
            _, used, _ = drive(handshake, garbage, [])
        except ViaProxyError:
            continue
        assert used <= len(garbage)


# -- real proxies on loopback ------------------------------------------------------------------------------------


@dataclass
class Proxy:
    """A small proxy on loopback: ``behaviour`` is ok, refuse, stall or reset; ``asked`` is every target asked."""

    kind: str
    behaviour: str = "ok"
    credentials: tuple[str, str] | None = None
    asked: list[tuple[str, int]] = field(default_factory=list)
    authorizations: list[bytes | None] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0

    def url(self, userinfo: str = "") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{userinfo}{host}:{self.port}"


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # RuntimeError: uvloop's write_eof on a transport the other side's reset already closed.
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def dial_and_splice(proxy: Proxy, host: str, port: int, reply: bytes, r: Any, w: Any) -> None:
    # Every name the test asks for lives on this machine: the proxy, not tlsgate, decides where a name goes.
    loopback = "::1" if ":" in host else "127.0.0.1"
    up_r, up_w = await asyncio.open_connection(loopback, port)
    try:
        w.write(reply)
        await w.drain()
        await asyncio.gather(splice(r, up_w), splice(up_r, w))
    finally:
        up_w.close()
        with contextlib.suppress(ConnectionError, OSError):
            await up_w.wait_closed()


def reset_now(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def serve_http(proxy: Proxy, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    head = (await r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    method, target, _ = head[0].split(" ")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    auth = headers.get("Proxy-Authorization")
    proxy.authorizations.append(auth.encode() if auth else None)
    host, port = target.rsplit(":", 1)
    proxy.asked.append((host.strip("[]"), int(port)))
    assert method == "CONNECT" and headers["Host"] == target
    if proxy.behaviour == "stall":
        await r.read()
        return
    if proxy.behaviour == "reset":
        reset_now(w)
        return
    if proxy.credentials and auth != "Basic " + basic(*proxy.credentials).decode():
        w.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="t"\r\n\r\n')
        return
    if proxy.behaviour == "refuse":
        w.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        return
    await dial_and_splice(proxy, host.strip("[]"), int(port), b"HTTP/1.1 200 Connection established\r\n\r\n", r, w)


async def serve_socks5(proxy: Proxy, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    version, count = await r.readexactly(2)
    methods = await r.readexactly(count)
    assert version == 5
    if proxy.behaviour == "stall":
        await r.read()
        return
    if proxy.behaviour == "reset":
        reset_now(w)
        return
    if proxy.credentials:
        if 2 not in methods:
            w.write(b"\x05\xff")
            return
        w.write(b"\x05\x02")
        _, ulen = await r.readexactly(2)
        user = await r.readexactly(ulen)
        password = await r.readexactly((await r.readexactly(1))[0])
        proxy.authorizations.append(user + b":" + password)
        if (user.decode(), password.decode()) != proxy.credentials:
            w.write(b"\x01\x01")
            return
        w.write(b"\x01\x00")
    else:
        w.write(b"\x05\x00")
    _, command, _, atyp = await r.readexactly(4)
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, await r.readexactly(4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, await r.readexactly(16))
    else:
        host = (await r.readexactly((await r.readexactly(1))[0])).decode()
    (port,) = struct.unpack("!H", await r.readexactly(2))
    proxy.asked.append((host, port))
    assert command == 1
    if proxy.behaviour == "refuse":
        w.write(b"\x05\x02\x00\x01" + bytes(6))
        return
    await dial_and_splice(proxy, host, port, b"\x05\x00\x00\x01" + bytes(6), r, w)


@contextlib.asynccontextmanager
async def running_proxy(kind: str, **options: Any) -> AsyncIterator[Proxy]:
    proxy = Proxy(kind, **options)
    serve = serve_http if kind == "http" else serve_socks5

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await serve(proxy, r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()

    server = await asyncio.start_server(handle, proxy.host, 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def target_files(tmp_path: Path, ca: trustme.CA) -> dict[str, str]:
    """The target's certificate (for TARGET_NAME and ::1), and alice's client certificate for mTLS."""
    files = {name: str(tmp_path / name) for name in ("ca.pem", "target.pem", "target.key", "alice.pem", "alice.key")}
    ca.cert_pem.write_to_path(files["ca.pem"])
    target = ca.issue_cert(TARGET_NAME, "::1", common_name="backend")
    target.cert_chain_pems[0].write_to_path(files["target.pem"])
    target.private_key_pem.write_to_path(files["target.key"])
    alice = ca.issue_cert("alice.example.test", common_name="alice")
    alice.cert_chain_pems[0].write_to_path(files["alice.pem"])
    alice.private_key_pem.write_to_path(files["alice.key"])
    return files


@contextlib.asynccontextmanager
async def mtls_target(files: dict[str, str], host: str = "127.0.0.1") -> AsyncIterator[Any]:
    """A TLS echo server that requires a client certificate from the test CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files["ca.pem"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(files["target.pem"], files["target.key"])
    async with backend(echo, host, ssl_ctx=ctx) as be:
        yield be


@contextlib.contextmanager
def refusing_target(files: dict[str, str]) -> Iterator[int]:
    """A TLS server in a thread, for the tests where tlsgate refuses the target: it answers handshakes until
    the test ends, and is indifferent to how they fail (asyncio's TLS server warns when a peer resets mid-way)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files["ca.pem"])
    ctx.load_cert_chain(files["target.pem"], files["target.key"])
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the test closed the listener
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()


def client_options(files: dict[str, str], target: str, proxy: str, **extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "target": target,
        "proxy": proxy,
        "cert": [files["alice.pem"]],
        "key": [files["alice.key"]],
        "cacert": files["ca.pem"],
        "verify_cn": ["backend"],
    }
    options.update(extra)
    return options


async def ping(port: int, payload: bytes = b"ping through the proxy") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(payload))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def cut_at_once(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await assert_cut(reader, timeout=30)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == name]


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)


pytestmark_async = pytest.mark.asyncio


@pytestmark_async
@pytest.mark.parametrize("kind", ["http", "socks5"])
@pytest.mark.parametrize("with_credentials", [False, True])
async def test_mtls_through_a_proxy_sends_the_name_to_the_proxy(
    kind: str, with_credentials: bool, target_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    credentials = ("user", SECRET) if with_credentials else None
    userinfo = f"user:{SECRET}@" if with_credentials else ""
    async with (
        mtls_target(target_files) as be,
        running_proxy(kind, credentials=credentials) as proxy,
        tunnel("client", **client_options(target_files, f"{TARGET_NAME}:{be.port}", proxy.url(userinfo))) as cli,
    ):
        port = be.port
        assert await ping(port_of(cli)) == b"ping through the proxy"
        assert await ping(port_of(cli), b"again") == b"again"
        await wait_until(lambda: cli.stats.closed == 2)
    assert proxy.asked == [(TARGET_NAME, port)] * 2
    (listening,) = events(caplog, "listening")
    assert listening["proxy"] == proxy.url()
    if with_credentials:
        expected = ("Basic " + basic("user", SECRET).decode()).encode() if kind == "http" else f"user:{SECRET}".encode()
        assert proxy.authorizations == [expected] * 2
    assert cli.stats.target_errors == 0
    assert SECRET not in everything_logged(caplog)


@pytestmark_async
@pytest.mark.parametrize("kind", ["http", "socks5"])
async def test_ipv6_proxy_and_ipv6_target(kind: str, target_files: dict[str, str]) -> None:
    async with (
        mtls_target(target_files, host="::1") as be,
        running_proxy(kind, host="::1") as proxy,
        tunnel("client", **client_options(target_files, f"[::1]:{be.port}", proxy.url())) as cli,
    ):
        port = be.port
        assert await ping(port_of(cli)) == b"ping through the proxy"
    assert proxy.asked == [("::1", port)]


@pytestmark_async
@pytest.mark.parametrize("kind", ["http", "socks5"])
@pytest.mark.parametrize("given", ["none", "wrong"])
async def test_credentials_missing_or_wrong_are_refused_with_a_reason(
    kind: str, given: str, target_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    userinfo = {"none": "", "wrong": f"user:{SECRET}@"}[given]
    async with (
        mtls_target(target_files) as be,
        running_proxy(kind, credentials=("user", "the-right-one")) as proxy,
        tunnel("client", **client_options(target_files, f"{TARGET_NAME}:{be.port}", proxy.url(userinfo))) as cli,
    ):
        await cut_at_once(port_of(cli))
        await wait_until(lambda: cli.stats.target_errors == 1)
    assert be.connections == 0
    (event,) = events(caplog, "target unreachable")
    assert ("wants credentials" if given == "none" else "refused the credentials") in event["reason"]
    assert event["proxy"] == proxy.url()
    assert SECRET not in everything_logged(caplog)


@pytestmark_async
@pytest.mark.parametrize(("kind", "why"), [("http", "403 Forbidden"), ("socks5", "not allowed by ruleset")])
async def test_a_proxy_refusing_the_target(
    kind: str, why: str, target_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        running_proxy(kind, behaviour="refuse") as proxy,
        tunnel("client", **client_options(target_files, f"{TARGET_NAME}:443", proxy.url())) as cli,
    ):
        await cut_at_once(port_of(cli))
        await wait_until(lambda: cli.stats.target_errors == 1)
    assert why in events(caplog, "target unreachable")[0]["reason"]


@pytestmark_async
@pytest.mark.parametrize("kind", ["http", "socks5"])
async def test_a_proxy_that_stalls_is_cut_by_the_connect_timeout(kind: str, target_files: dict[str, str]) -> None:
    async with (
        running_proxy(kind, behaviour="stall") as proxy,
        tunnel(
            "client", **client_options(target_files, f"{TARGET_NAME}:443", proxy.url(), connect_timeout="200ms")
        ) as cli,
    ):
        await cut_at_once(port_of(cli))
        await wait_until(lambda: cli.stats.connect_timeouts == 1)
    assert proxy.asked or kind == "socks5"  # the SOCKS5 proxy stalls before the target is even asked


@pytestmark_async
@pytest.mark.parametrize("kind", ["http", "socks5"])
async def test_a_proxy_that_resets(kind: str, target_files: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    async with (
        running_proxy(kind, behaviour="reset") as proxy,
        tunnel("client", **client_options(target_files, f"{TARGET_NAME}:443", proxy.url())) as cli,
    ):
        await cut_at_once(port_of(cli))
        await wait_until(lambda: cli.stats.target_errors == 1)
    reason = events(caplog, "target unreachable")[0]["reason"]
    assert "reset" in reason or "closed the connection" in reason


@pytestmark_async
async def test_a_proxy_that_is_not_there(target_files: dict[str, str], dead_port: int) -> None:
    async with tunnel(
        "client", **client_options(target_files, f"{TARGET_NAME}:443", f"socks5://127.0.0.1:{dead_port}")
    ) as cli:
        await cut_at_once(port_of(cli))
        await wait_until(lambda: cli.stats.target_errors == 1)


@pytestmark_async
async def test_verify_rules_still_apply_to_the_target_behind_the_proxy(
    target_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with refusing_target(target_files) as port:
        async with (
            running_proxy("http") as proxy,
            tunnel(
                "client",
                **client_options(target_files, f"{TARGET_NAME}:{port}", proxy.url(), verify_cn=["someone-else"]),
            ) as cli,
        ):
            await cut_at_once(port_of(cli))
            await wait_until(lambda: cli.stats.target_errors == 1)
    assert proxy.asked == [(TARGET_NAME, port)]
    assert events(caplog, "target refused") or events(caplog, "handshake failed")


@pytestmark_async
async def test_the_target_name_not_the_proxys_is_what_tls_verifies(
    target_files: dict[str, str], tmp_path: Path, ca: trustme.CA
) -> None:
    """A target whose certificate does not name the --target host is refused, even though the proxy answered."""
    wrong = ca.issue_cert("someone-else.invalid", common_name="backend")
    wrong.cert_chain_pems[0].write_to_path(target_files["target.pem"])
    wrong.private_key_pem.write_to_path(target_files["target.key"])
    with refusing_target(target_files) as port:
        async with (
            running_proxy("socks5") as proxy,
            tunnel("client", **client_options(target_files, f"{TARGET_NAME}:{port}", proxy.url())) as cli,
        ):
            await cut_at_once(port_of(cli))
            await wait_until(lambda: cli.stats.target_errors == 1)
    assert proxy.asked == [(TARGET_NAME, port)]


# -- the command line --------------------------------------------------------------------------------------------


def client_args(files: dict[str, str], *extra: str, target: str = f"{TARGET_NAME}:443") -> list[str]:
    return [
        "client", "--listen", "127.0.0.1:0", "--target", target, "--cert", files["alice.pem"], "--key",
        files["alice.key"], "--cacert", files["ca.pem"], "--verify-cn", "backend", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (f"https://user:{SECRET}@proxy.example", "is not implemented yet"),
        (f"socks5://user:{SECRET}@proxy.example:abc", "not a URL"),
        (f"ftp://user:{SECRET}@proxy.example", "unknown scheme"),
    ],
)
@pytest.mark.parametrize("spelling", ["--proxy", "--connect-proxy"])
def test_a_bad_proxy_url_is_one_line_exit_2_without_the_password(
    spelling: str, url: str, why: str, target_files: dict[str, str]
) -> None:
    result = invoke(cli, *client_args(target_files, spelling, url))
    line = refused(result, why)
    assert SECRET not in result.output and "***@" in line


@pytest.mark.parametrize("spelling", ["--proxy", "--connect-proxy"])
def test_a_unix_target_cannot_go_through_a_proxy(spelling: str, target_files: dict[str, str]) -> None:
    extra = (spelling, f"socks5://u:{SECRET}@127.0.0.1", "--override-server-name", "backend")
    result = invoke(cli, *client_args(target_files, *extra, target="unix:/tmp/x.sock"))
    refused(result, "is a unix socket")
    assert SECRET not in result.output


def test_server_mode_has_no_proxy_flag(pki_files: dict[str, Path]) -> None:
    result = invoke(
        cli, "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--cert", pki_files["cert"], "--key",
        pki_files["key"], "--cacert", pki_files["ca"], "--allow-all", "--proxy", "http://127.0.0.1:3128",
    )  # fmt: skip
    assert result.exit_code == 2 and "--proxy" in result.output


def test_the_proxy_key_in_a_file_and_check_config(tmp_path: Path, target_files: dict[str, str]) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        "[[tunnel]]\nname = 'db'\nmode = 'client'\nlisten = '127.0.0.1:0'\n"
        f"target = '{TARGET_NAME}:443'\nproxy = 'socks5h://u:{SECRET}@[::1]:9050'\n"
        f"cert = ['{target_files['alice.pem']}']\nkey = ['{target_files['alice.key']}']\n"
        f"cacert = '{target_files['ca.pem']}'\nverify_cn = ['backend']\n"
    )
    (cfg,), _ = load_config_file(str(path))
    assert cfg.proxy is not None and (cfg.proxy.shown, cfg.proxy.password) == ("socks5h://[::1]:9050", SECRET.encode())
    result = invoke(cli, "check-config", path)
    assert result.exit_code == 0, result.output
    assert "via socks5h://[::1]:9050" in result.output and SECRET not in result.output


# -- /_status behind a proxy ---------------------------------------------------------------------------------------


@pytestmark_async
async def test_status_checks_the_proxy_not_the_unresolvable_target(
    target_files: dict[str, str], dead_port: int
) -> None:
    """Without the proxy in the picture, /_status would look up ``backend.proxied.invalid`` and call it down."""
    async with running_proxy("socks5", credentials=("user", SECRET)) as proxy:
        for url, expected in (
            (proxy.url(f"user:{SECRET}@"), 200),
            (f"socks5://user:{SECRET}@127.0.0.1:{dead_port}", 503),
        ):
            options = client_options(target_files, f"{TARGET_NAME}:443", url, listen="127.0.0.1:0")
            server = Server([tunnel_config("client", options)], ProcessOptions(status="http://127.0.0.1:0"))
            async with running_server(server):
                code, _, body = await request(status_address(server), "/_status")
            assert code == expected, body
            assert SECRET.encode() not in body
            if expected == 503:
                assert f"via socks5://127.0.0.1:{dead_port}".encode() in body


# -- real proxies: microsocks (SOCKS5) and tinyproxy (HTTP CONNECT), as users run them ------------------------------


def binary(name: str) -> str:
    """A Debian package .ci/run installs: missing is a failure, never a skip (CI must run these tests)."""
    path = shutil.which(name)
    assert path, f"{name} is not installed (.ci/run installs it; locally: apt-get install {name})"
    return path


@contextlib.asynccontextmanager
async def real_proxy(argv: list[str], port: int) -> AsyncIterator[None]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_for_listener(port)
        yield
    finally:
        process.terminate()
        await process.wait()


@pytestmark_async
@pytest.mark.parametrize("proxy", ["microsocks", "tinyproxy"])
async def test_real_proxies_with_credentials_right_and_wrong(
    proxy: str, target_files: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with reserved_port() as port:
        await through_real_proxy(proxy, port, target_files, tmp_path)
    (event,) = events(caplog, "target unreachable")
    assert "credentials" in event["reason"], event
    assert SECRET not in everything_logged(caplog)


async def through_real_proxy(proxy: str, port: int, target_files: dict[str, str], tmp_path: Path) -> None:
    """One connection with the right credentials (relayed), one with wrong ones (refused with the reason)."""
    if proxy == "microsocks":
        argv = [binary("microsocks"), "-i", "127.0.0.1", "-p", str(port), "-u", "user", "-P", SECRET]
        scheme = "socks5"
    else:
        config = tmp_path / "tinyproxy.conf"
        # No ConnectPort line: CONNECT to any port (the default list is 443 and 563).
        config.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 30\nBasicAuth user {SECRET}\nLogLevel Error\n")
        argv = [binary("tinyproxy"), "-d", "-c", str(config)]
        scheme = "http"
    async with mtls_target(target_files) as be, real_proxy(argv, port):
        for userinfo, works in ((f"user:{SECRET}@", True), ("user:wrong@", False)):
            url = f"{scheme}://{userinfo}127.0.0.1:{port}"
            options = client_options(target_files, f"127.0.0.1:{be.port}", url, override_server_name=TARGET_NAME)
            async with tunnel("client", **options) as cli:
                if works:
                    assert await ping(port_of(cli)) == b"ping through the proxy"
                else:
                    await cut_at_once(port_of(cli))
                    await wait_until(lambda: cli.stats.target_errors == 1)
