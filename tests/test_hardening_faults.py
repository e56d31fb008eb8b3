"""Faults on either side of an in-process tunnel: a backend that refuses, hangs or dies, a client that vanishes,
and no file descriptor left for the hop to the backend.

Every case ends the same way: the other side learns promptly (within a generous bound, never a fixed sleep),
the tunnel forgets the connection, and the reason is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import ssl
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from helpers import backend, client_context, port_of, read_until_end, server_opts, tls_connect, tunnel, wait_until

pytestmark = pytest.mark.asyncio

_LINGER_RESET = struct.pack("ii", 1, 0)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of every tlsgate log event called ``name``."""
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.name == "tlsgate" and r.getMessage() == name]


async def test_a_refusing_backend_closes_the_client_and_is_logged_once(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        dead = f"127.0.0.1:{bound.getsockname()[1]}"
        async with tunnel(**server_opts(pki_files, dead, disable_authentication=True, connect_timeout="60s")) as tun:
            reader, writer = await tls_connect(tun, client_context(ca))
            writer.write(b"anyone there?")
            assert await read_until_end(reader) == b""
            writer.close()
            await wait_until(lambda: tun.active == 0)
            assert tun.stats.target_errors == 1 and tun.stats.established == 0
    (unreachable,) = events(caplog, "target unreachable")
    assert unreachable["reason"].lower() == "connection refused"
    assert not events(caplog, "setup failed")  # refused at once, not left to the connect timeout


@contextlib.asynccontextmanager
async def hanging_backend(kind: str) -> AsyncIterator[str]:
    """A backend that takes the connection and then never answers: either it never calls accept() (the kernel
    completes the connection into its backlog) or it accepts and reads but never writes."""
    if kind == "never-accepts":
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            yield f"127.0.0.1:{listener.getsockname()[1]}"
        return

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with backend(swallow) as be:
        yield be.address


@pytest.mark.parametrize("kind", ["never-accepts", "reads-never-answers"])
async def test_a_hanging_backend_is_cut_by_idle_timeout_not_connect_timeout(
    kind: str, pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """--connect-timeout covers the TCP connect only; once connected, a silent backend is cut by --idle-timeout."""
    async with (
        hanging_backend(kind) as target,
        tunnel(
            **server_opts(pki_files, target, disable_authentication=True, connect_timeout="100ms", idle_timeout="600ms")
        ) as tun,
    ):
        loop = asyncio.get_running_loop()
        reader, writer = await tls_connect(tun, client_context(ca))
        writer.write(b"hello?")
        await wait_until(lambda: len(tun.relays) == 1)
        started = loop.time()
        assert await read_until_end(reader) == b""
        assert loop.time() - started >= 0.5  # well past the connect timeout: it did not apply
        writer.close()
        await wait_until(lambda: tun.active == 0)
    (closed,) = events(caplog, "closed")
    assert closed["end"] == "idle timeout"
    assert closed["bytes_in"] == 6 and closed["bytes_out"] == 0
    assert not events(caplog, "setup failed")


_STREAMING_BACKEND = """
import socket, sys, threading
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
block = b"z" * 65536

def stream(conn):
    while True:
        conn.sendall(block)

while True:
    conn, _ = listener.accept()
    threading.Thread(target=stream, args=(conn,), daemon=True).start()
"""
# Several connections at once: how a reset is reported races with the reads (on uvloop, a reset can go unseen by
# the poller), and one connection may win the race where another loses it.
_CONNECTIONS = 8


async def kill_backend_mid_stream(
    unread_data: bool, pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend process killed with SIGKILL while it streams to every client. Its kernel sends FIN, or RST when
    bytes it never read are still queued; either way each client's stream ends promptly and the tunnel lets go."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STREAMING_BACKEND, stdout=asyncio.subprocess.PIPE
    )
    opts = server_opts(pki_files, "", disable_authentication=True, shutdown_timeout="1s")
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        assert proc.stdout is not None
        opts["target"] = f"127.0.0.1:{int(await asyncio.wait_for(proc.stdout.readline(), 30))}"
        async with tunnel(**opts) as tun:
            for _ in range(_CONNECTIONS):
                clients.append(await tls_connect(tun, client_context(ca)))
            if unread_data:
                for _, writer in clients:
                    writer.write(b"the backend never reads this")
                await wait_until(lambda: sum(relay.bytes_in > 0 for relay in tun.relays) == _CONNECTIONS)
            for reader, _ in clients:
                await reader.readexactly(1 << 20)
            proc.kill()
            await proc.wait()
            await asyncio.gather(*(read_until_end(reader, within=10) for reader, _ in clients))
            for _, writer in clients:
                writer.close()
            await wait_until(lambda: tun.active == 0)
            assert len(tun.relays) == 0
    finally:
        for _, writer in clients:
            writer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    endings = [e["end"] for e in events(caplog, "closed")]
    assert len(endings) == _CONNECTIONS
    for end in endings:
        assert end.startswith("target read") if unread_data else end == "target closed first", endings


@pytest.mark.parametrize("unread_data", [False, True], ids=["fin", "rst"])
async def test_a_backend_killed_mid_stream_ends_every_client_promptly(
    unread_data: bool, pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """With a reset (rst), uvloop's poller drops the error without calling the reader; the tunnel's sweep must
    find it anyway (it did not, once)."""
    await kill_backend_mid_stream(unread_data, pki_files, ca, caplog)


async def vanish_mid_stream(how: str, who_streams: str, pki_files: dict[str, Path], ca: trustme.CA) -> None:
    """Clients that disappear without close_notify (a reset, or a bare FIN) while data flows one way or neither:
    each backend connection must be closed promptly."""
    ended = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal ended

        async def stream() -> None:
            while True:
                writer.write(b"y" * 65536)
                await writer.drain()

        streaming = asyncio.ensure_future(stream() if who_streams == "backend" else asyncio.sleep(3600))
        try:
            while await reader.read(65536):  # until EOF (a relayed FIN) or a reset
                pass
            if who_streams == "backend":
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(streaming, 10)  # a half-closed backend may still send, until it cannot
        finally:
            streaming.cancel()
            ended += 1

    async def upload(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not writer.is_closing():
                writer.write(b"u" * 65536)
                await writer.drain()

    opts = server_opts(pki_files, "", disable_authentication=True, shutdown_timeout="1s")
    async with backend(serve) as be, tunnel(**{**opts, "target": be.address}) as tun:
        clients = []
        for _ in range(_CONNECTIONS):
            raw = socket.create_connection(("127.0.0.1", port_of(tun)))
            raw.setblocking(False)
            reader, writer = await asyncio.open_connection(
                sock=raw, ssl=client_context(ca), server_hostname="localhost"
            )
            clients.append((raw, reader, writer))
        uploads = [asyncio.ensure_future(upload(w)) for _, _, w in clients] if who_streams == "client" else []
        await wait_until(lambda: len(tun.relays) == _CONNECTIONS)
        if who_streams == "backend":
            for _, reader, _ in clients:
                await reader.readexactly(1 << 20)
        if who_streams == "client":
            await wait_until(lambda: all(relay.bytes_in >= 1 << 20 for relay in tun.relays), attempts=4000)
        for raw, _, writer in clients:
            if how == "reset":
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            writer.transport.abort()  # no close_notify: the socket just goes
        for task in uploads:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait_until(lambda: ended == _CONNECTIONS, attempts=10**6), 10)
        assert ended == _CONNECTIONS, f"{_CONNECTIONS - ended} backend connection(s) left open"
        assert be.connections == _CONNECTIONS
        await wait_until(lambda: tun.active == 0)


@pytest.mark.parametrize("who_streams", ["client", "backend", "nobody"])
@pytest.mark.parametrize("how", ["reset", "fin-without-close-notify"])
async def test_a_vanished_client_closes_the_backend_side_promptly(
    how: str, who_streams: str, pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    await vanish_mid_stream(how, who_streams, pki_files, ca)


# --- no descriptor left --------------------------------------------------------------------------------------


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[list[int]]:
    """Lower this process's soft RLIMIT_NOFILE and open /dev/null until no descriptor is left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # New descriptors take the lowest free number below the limit: just above the highest one open is enough.
    limit = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 32
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    fillers: list[int] = []
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield fillers
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_no_descriptor_for_the_target_socket_fails_that_connection_cleanly(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's connection is accepted and its handshake done, then socket() for the hop to the backend
    fails with EMFILE. That one connection must be refused and logged like any unreachable target, at once."""

    def crashed() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]

    async with (
        backend() as be,
        tunnel(
            **server_opts(
                pki_files, be.address, disable_authentication=True, connect_timeout="60s", shutdown_timeout="1s"
            )
        ) as tun,
    ):
        raw = socket.create_connection(("127.0.0.1", port_of(tun)))
        tls: ssl.SSLSocket | None = None
        try:
            await wait_until(lambda: tun.stats.accepted == 1)
            with descriptors_exhausted():
                tls = client_context(ca).wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
                tls.settimeout(30)
                await asyncio.to_thread(tls.do_handshake)
                await wait_until(lambda: tun.stats.handshakes == 1)
                # Either outcome shows within moments: the connection failed cleanly, or the loop caught a crash.
                await wait_until(lambda: tun.stats.target_errors == 1 or bool(crashed()))
        finally:
            (tls or raw).close()
        assert not crashed(), crashed()
        assert tun.stats.target_errors == 1
        assert be.connections == 0
        (unreachable,) = events(caplog, "target unreachable")
        assert "too many open files" in unreachable["reason"].lower()
