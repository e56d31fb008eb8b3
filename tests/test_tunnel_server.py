"""End to end: tlsgate server between a TLS client and a plaintext backend, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
import ssl
import sys
from pathlib import Path

import pytest
import trustme

from tlsgate.tls.closenotify import send_close_notify

from helpers import (
    backend,
    client_context,
    echo,
    port_of,
    recording,
    reply_after_eof,
    server_opts,
    tls_connect,
    tunnel,
    wait_until,
)

pytestmark = pytest.mark.asyncio


def half_close_exchange(port: int, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    """Send ``payload``, then close_notify (our write side only), then read the whole reply (blocking)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(payload)
        # Not tls.unwrap(): its second SSL_shutdown reads, and a reply that lands in between is dropped by OpenSSL
        # (APPLICATION_DATA_AFTER_CLOSE_NOTIFY). This thread shares tlsgate's GIL, which widens that window; send
        # close_notify alone, as tlsgate itself does (see closenotify.py).
        while True:
            try:
                send_close_notify(tls)
                break
            except ssl.SSLWantWriteError:  # the send buffer is still full of payload
                select.select([], [tls], [], 30)
        return read_to_close_notify(tls)


def read_to_close_notify(tls: ssl.SSLSocket) -> bytes:
    chunks = []
    while True:
        try:
            data = tls.recv(65536)
        except ssl.SSLZeroReturnError:  # close_notify after we sent ours
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


async def test_round_trip_without_client_auth(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun:
        reader, writer = await tls_connect(tun, client_context(ca))
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: tun.stats.closed == 1)
        assert tun.stats.bytes_in == 4 and tun.stats.bytes_out == 4


async def test_mtls_client_with_allowed_cn_gets_through(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    alice = ca.issue_cert("alice@example.test", common_name="alice")
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
        reader, writer = await tls_connect(tun, client_context(ca, alice))
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("who", ["no certificate", "wrong CA", "wrong CN", "expired"])
async def test_refused_client_never_reaches_the_backend(
    pki_files: dict[str, Path], ca: trustme.CA, other_ca: trustme.CA, who: str, caplog: pytest.LogCaptureFixture
) -> None:
    import datetime

    cert = {
        "no certificate": None,
        "wrong CA": other_ca.issue_cert("alice@example.test", common_name="alice"),
        "wrong CN": ca.issue_cert("bob@example.test", common_name="bob"),
        "expired": ca.issue_cert(
            "alice@example.test",
            common_name="alice",
            not_before=datetime.datetime(2020, 1, 1),
            not_after=datetime.datetime(2021, 1, 1),
        ),
    }[who]
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            reader, writer = await tls_connect(tun, client_context(ca, cert))
            # TLS 1.3 clients learn about a rejected certificate only when they read.
            writer.write(b"secret")
            await reader.readexactly(1)
        await wait_until(lambda: sum(tun.stats.refused.values()) == 1)
        assert be.connections == 0
    expected = {
        "no certificate": "no client certificate",
        "wrong CA": "not signed by a CA in --cacert",
        "wrong CN": "CN=bob",
        "expired": "expired",
    }[who]
    assert any(expected in record.getMessage() + str(getattr(record, "fields", "")) for record in caplog.records)


async def test_client_half_close_still_gets_the_reply(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    payload = os.urandom(300_000)
    async with (
        backend(reply_after_eof) as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
    ):
        reply = await asyncio.to_thread(half_close_exchange, port_of(tun), client_context(ca), payload)
    assert reply == b"got 300000 bytes, sha256 " + hashlib.sha256(payload).hexdigest().encode()


async def test_target_half_close_sends_close_notify_and_client_may_still_send(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    heard: list[bytes] = []

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()
        heard.append(await reader.read())

    # The client is a separate process, as real clients are: a thread here would share our GIL, which
    # widens the instant in which tlsgate sends close_notify (see docs/design.md, "close_notify").
    script = """
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30),
                     server_hostname="localhost") as tls:
    got = b""
    while data := tls.recv(100):  # b"" here means close_notify arrived
        got += data
    tls.sendall(b"still talking")
    tls.setblocking(False)
    try:
        tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    sys.stdout.buffer.write(got)
"""

    async def client(port: int) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(port), str(pki_files["ca"]), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        return out

    async with (
        backend(greet_then_listen) as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
    ):
        assert await client(port_of(tun)) == b"greeting"
        await be.done.wait()
    assert heard == [b"still talking"]


@pytest.mark.slow
async def test_100_megabytes_each_way_arrive_intact(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    size = 100 * 1024 * 1024
    block = os.urandom(1 << 20)

    async def source_and_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()
            writer.write_eof()

        async def count() -> str:
            digest = hashlib.sha256()
            while data := await reader.read(1 << 20):
                digest.update(data)
            return digest.hexdigest()

        _, upstream_digest = await asyncio.gather(send(), count())
        received.append(upstream_digest)

    received: list[str] = []
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()

    def client(port: int) -> str:
        """Upload and download at once from one thread: an SSL object must never be used by two threads."""
        upload = memoryview(block * (size // len(block)))
        digest = hashlib.sha256()
        sent, eof = 0, False
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        with client_context(ca).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.setblocking(False)
            while not (eof and sent == size):
                readable, writable, _ = select.select([tls], [tls] if sent < size else [], [], 60)
                assert readable or writable, "stalled"
                if writable:
                    try:
                        sent += tls.send(upload[sent : sent + 65536])
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        pass
                while not eof:
                    try:
                        data = tls.recv(1 << 20)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        break
                    if not data:
                        eof = True
                    digest.update(data)
        return digest.hexdigest()

    async with (
        backend(source_and_sink) as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
    ):
        # The target ends first (close_notify reaches the client, which keeps uploading), then the client
        # closes; both directions carry the full 100 MiB.
        got = await asyncio.to_thread(client, port_of(tun))
        await be.done.wait()
        await wait_until(lambda: tun.stats.closed == 1)
    assert got == expected
    assert tun.stats.bytes_in == size and tun.stats.bytes_out == size
    assert received == [expected]


async def test_200_concurrent_connections(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    ctx = client_context(ca)

    async def one(i: int, tun_port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", tun_port, ssl=ctx, server_hostname="localhost")
        payload = i.to_bytes(4, "big") * 2500
        writer.write(payload)
        got = await reader.readexactly(len(payload))
        writer.close()
        await writer.wait_closed()
        return (got == payload and b"ok") or b"bad"

    async with backend(echo) as be, tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun:
        results = await asyncio.gather(*(one(i, port_of(tun)) for i in range(200)))
        assert results == [b"ok"] * 200
        await wait_until(lambda: tun.stats.closed == 200)
        assert be.connections == 200


async def test_slow_reader_pauses_the_target_and_loses_nothing(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    total = 64 * 1024 * 1024
    chunk = os.urandom(1 << 16)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    async with (
        backend(flood) as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
    ):
        reader, writer = await tls_connect(tun, client_context(ca))
        writer.write(b"go")
        await wait_until(lambda: len(tun.relays) == 1)
        relay = next(iter(tun.relays))
        # The client reads nothing: the relay must stop reading from the backend once the client's socket
        # buffers are full, holding at most one buffer of its own.
        last, stable = -1, 0
        while stable < 20:
            await asyncio.sleep(0.01)
            stable = stable + 1 if relay.bytes_out == last else 0
            last = relay.bytes_out
        assert relay.bytes_out < total // 2
        assert relay.inbound.pending is None or len(relay.inbound.pending) <= 64 * 1024
        digest = hashlib.sha256()
        received = 0
        while received < total:
            data = await reader.read(1 << 20)
            assert data
            received += len(data)
            digest.update(data)
        assert digest.hexdigest() == hashlib.sha256(chunk * (total // len(chunk))).hexdigest()
        writer.close()
        await writer.wait_closed()


async def test_silent_client_is_cut_at_handshake_timeout(pki_files: dict[str, Path]) -> None:
    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True, handshake_timeout="200ms")) as tun,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server, not by us
        writer.close()
        assert tun.stats.handshake_errors == 1
        assert be.connections == 0


async def test_garbage_instead_of_client_hello_is_refused(pki_files: dict[str, Path]) -> None:
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionError):
            data = await asyncio.wait_for(reader.read(), 10)
            assert not data.startswith(b"HTTP/1.1 200")
            raise ConnectionResetError("closed")
        writer.close()
        await wait_until(lambda: tun.stats.handshake_errors == 1)
        assert be.connections == 0


async def test_idle_connection_is_cut(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True, idle_timeout="200ms")) as tun,
    ):
        reader, writer = await tls_connect(tun, client_context(ca))
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        with pytest.raises((ConnectionError, ssl.SSLError)):
            assert await asyncio.wait_for(reader.read(), 10) == b""
            raise ConnectionResetError
        writer.close()
        await wait_until(lambda: tun.stats.closed == 1)


async def test_unreachable_target_closes_the_client(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: connections are refused
        async with tunnel(**server_opts(pki_files, dead, disable_authentication=True)) as tun:
            reader, writer = await tls_connect(tun, client_context(ca))
            with pytest.raises((ConnectionError, ssl.SSLError)):
                assert await asyncio.wait_for(reader.read(), 10) == b""
                raise ConnectionResetError
            writer.close()
            assert tun.stats.target_errors == 1


async def test_connect_timeout_against_a_target_that_never_accepts(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        fillers = []
        # Fill the accept queue so the kernel drops further SYNs: connect() then hangs, as to a dead host.
        for _ in range(8):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(stuck.getsockname())
            fillers.append(f)
        target = f"127.0.0.1:{stuck.getsockname()[1]}"
        try:
            async with tunnel(
                **server_opts(pki_files, target, disable_authentication=True, connect_timeout="300ms")
            ) as tun:
                reader, writer = await tls_connect(tun, client_context(ca))
                with pytest.raises((ConnectionError, ssl.SSLError)):
                    assert await asyncio.wait_for(reader.read(), 10) == b""
                    raise ConnectionResetError
                writer.close()
                await wait_until(lambda: tun.active == 0)
        finally:
            for f in fillers:
                f.close()


async def test_max_concurrent_conns_queues_instead_of_refusing(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True, max_concurrent_conns=1)) as tun,
    ):
        r1, w1 = await tls_connect(tun, client_context(ca))
        w1.write(b"1")
        assert await r1.readexactly(1) == b"1"
        second = asyncio.create_task(tls_connect(tun, client_context(ca)))
        await wait_until(lambda: not tun.accepting)
        assert not second.done()
        w1.close()
        await w1.wait_closed()
        r2, w2 = await asyncio.wait_for(second, 10)
        w2.write(b"2")
        assert await r2.readexactly(1) == b"2"
        w2.close()
        await w2.wait_closed()


async def test_drain_lets_open_connections_finish(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with backend() as be:
        cfg_opts = server_opts(pki_files, be.address, disable_authentication=True)
        async with tunnel(**cfg_opts) as tun:
            reader, writer = await tls_connect(tun, client_context(ca))
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            port = port_of(tun)
            server = tun.server  # type: ignore[attr-defined]
            server.stop()
            await wait_until(lambda: not tun.listeners)
            # Still relaying after the stop signal: nothing is cut while the client is busy.
            writer.write(b"b")
            assert await reader.readexactly(1) == b"b"
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
        assert tun.stats.closed == 1


async def test_address_rules_refuse_before_the_handshake(
    pki_files: dict[str, Path], ca: trustme.CA, loopback2: str
) -> None:
    store: list[bytes] = []
    async with (
        backend(recording(store)) as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True, allow_from=["127.0.0.1/32"])) as tun,
    ):
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await tls_connect(tun, client_context(ca), local_addr=(loopback2, 0))
        _reader, writer = await tls_connect(tun, client_context(ca), local_addr=("127.0.0.1", 0))
        writer.write(b"ok")
        writer.close()
        await writer.wait_closed()
        await be.done.wait()
        assert tun.stats.refused == {"allow-from": 1}
        assert tun.stats.handshakes == 1
    assert store == [b"ok"]


async def test_close_notify_never_drops_data_racing_it(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    """A client thread in this process answers close_notify at once, holding the GIL: the worst case for the
    race that unwrap() has (closenotify.py). 30 rounds; every byte must reach the backend every time."""
    from tlsgate.tls import closenotify

    assert closenotify.available(), "the race-free close_notify path is expected on CPython + shared OpenSSL"
    heard: list[bytes] = []

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")
        writer.write_eof()
        heard.append(await reader.read())

    def client(port: int) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        with client_context(ca).wrap_socket(raw, server_hostname="localhost") as tls:
            while tls.recv(100):
                pass
            tls.sendall(b"late words")
            tls.setblocking(False)
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.unwrap()

    async with (
        backend(greet_then_listen) as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
    ):
        for round_ in range(30):
            await asyncio.to_thread(client, port_of(tun))
            await wait_until(lambda r=round_: len(heard) == r + 1)
    assert heard == [b"late words"] * 30


async def test_tls_session_resumption_with_tickets(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    """A returning client resumes its session (no certificate signature, no full key exchange)."""

    def connect_twice(port: int) -> tuple[bool, bool]:
        ctx = client_context(ca)
        reused = []
        session = None
        for _ in range(2):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(b"x")
                assert tls.recv(1) == b"x"  # the ticket arrives after the handshake; reading collects it
                reused.append(tls.session_reused)
                session = tls.session
        return reused[0], reused[1]

    async with backend() as be, tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun:
        first, second = await asyncio.to_thread(connect_twice, port_of(tun))
    assert (first, second) == (False, True)
