"""The `tlsgate server` process under stress of its own: no file descriptors left, a log it cannot write, and the
signals that stop it.

These run the real command in a subprocess (its own RLIMIT_NOFILE, its own stderr, its own signal handlers); the
backend and the clients run in the test's event loop. The test's loop is plain asyncio: the loop under test is
the server's, chosen with --loop where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import random
import signal
import ssl
import struct
import termios
from pathlib import Path
from typing import Any

import pytest
import trustme

from helpers import (
    activated_command,
    backend,
    client_context,
    garbage,
    listen_args,
    listening_tcp,
    round_trip,
    tlsgate_server,
    wait_for_listener,
    wait_until,
)

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])


# --- no file descriptors left --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_fd_exhaustion_pauses_accepting_logs_once_and_recovers(
    loop: str, pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    """With RLIMIT_NOFILE at 96, silent clients use up the server's descriptors: accept() fails with EMFILE.
    The server pauses accepting (the kernel's backlog holds newcomers), says so once, never exits, and serves
    again as soon as descriptors are free: a client that arrived meanwhile gets through."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    silent: list[asyncio.StreamWriter] = []
    async with (
        backend() as be,
        tlsgate_server(
            listen_args(pki_files, be.address, "--handshake-timeout", "60s", "--loop", loop), nofile=96
        ) as server,
    ):
        try:
            while not server.count("accept paused"):
                assert len(silent) < 400, "the server never ran out of descriptors"
                for _ in range(10):
                    silent.append((await asyncio.open_connection("127.0.0.1", server.port))[1])
                with contextlib.suppress(TimeoutError):
                    await server.wait_for_line("accept paused", within=0.2)
            waiting = asyncio.ensure_future(round_trip(server.port, client_context(ca), within=60))
            # Let the server retry accept() a few times while still out of descriptors (it pauses 0.5 s each).
            done, _ = await asyncio.wait({waiting}, timeout=1.5)
            assert not done, "a client was served while the server had no descriptor for it"
            assert server.proc.returncode is None
        finally:
            for writer in silent:
                writer.close()
        await waiting
        await round_trip(server.port, client_context(ca))
        server.signal(signal.SIGTERM)
        assert await server.exit_code() == 0
        assert server.count("accept paused") == 1, server.log
        assert server.count("accept resumed") == 1, server.log
        assert "Traceback" not in server.log and "Exception" not in server.log, server.log


# --- a log that cannot be written ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_full_stderr_pipe_does_not_stop_relaying(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    """stderr goes to a pipe nobody reads. Refused connections log until the pipe is full (about 64 KiB); after
    that a real client must still be served, and SIGTERM must still end the process."""
    listener = listening_tcp()  # handed over: the log that would name a port-0 listener cannot be read
    port = listener.getsockname()[1]
    unread, stderr = os.pipe()
    capacity = fcntl.fcntl(stderr, F_GETPIPE_SZ)
    try:
        async with (
            backend() as be,
            tlsgate_server(
                listen_args(pki_files, be.address, listen="systemd:tunnel"), stderr=stderr, listener=listener
            ) as server,
        ):
            listener.close()
            os.close(stderr)
            stderr = -1
            await wait_for_listener(port)
            async with asyncio.timeout(30):
                while queued(unread) < capacity * 3 // 4:
                    await asyncio.to_thread(garbage, port, 50)
            # Another ~80 KiB of lines: the pipe is full now (it holds 16 pages, partly filled ones included).
            await asyncio.to_thread(garbage, port, 400)
            await round_trip(port, client_context(ca), within=10)
            server.signal(signal.SIGTERM)
            assert await server.exit_code(within=10) == 0
    finally:
        os.close(unread)
        if stderr >= 0:
            os.close(stderr)


F_GETPIPE_SZ = 1032  # Linux fcntl command: a pipe's capacity


def queued(read_end: int) -> int:
    """Bytes waiting in a pipe, without reading them."""
    return struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.timeout(90)
async def test_stderr_on_a_full_disk_does_not_stop_relaying(
    pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    """stderr is /dev/full: every write fails with ENOSPC. The lines are dropped, the relaying goes on."""
    listener = listening_tcp()  # handed over: the log that would name a port-0 listener is lost
    port = listener.getsockname()[1]
    with open("/dev/full", "wb") as full:
        async with (
            backend() as be,
            tlsgate_server(
                listen_args(pki_files, be.address, listen="systemd:tunnel"), stderr=full, listener=listener
            ) as server,
        ):
            listener.close()
            await wait_for_listener(port)
            await asyncio.to_thread(garbage, port, 200)
            for i in range(20):
                await round_trip(port, client_context(ca), payload=b"%d" % i)
            assert server.proc.returncode is None
            server.signal(signal.SIGTERM)
            assert await server.exit_code() == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "loop",
    ["asyncio", "uvloop"],
)
async def test_a_closed_stderr_does_not_stop_relaying_nor_leak_into_streams(
    loop: str, pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    """Started as `tlsgate server ... 2>&-`: descriptor 2 is closed, so the next descriptor the server opens (its
    event loop's, a socket) gets number 2. Log lines must go nowhere, not into a stream: every stream carries
    exactly its own bytes, and SIGTERM still ends the process cleanly."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    listener = listening_tcp()  # handed over: there is no log to name a port-0 listener
    port = listener.getsockname()[1]
    args = listen_args(pki_files, "", "--loop", loop, listen="systemd:tunnel")
    activate, pass_fds = activated_command([listener])
    received: list[bytes] = []

    async def echo_and_keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = b""
        while data := await reader.read(65536):
            got += data
            writer.write(data)
        received.append(got)

    async with backend(echo_and_keep) as be:
        args[args.index("--target") + 1] = be.address
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", 'exec "$@" 2>&-', "sh", *activate, "server", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, pass_fds=pass_fds,
            env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "tunnel"},
        )  # fmt: skip
        listener.close()
        payloads = [random.Random(i).randbytes(1000) for i in range(20)]
        try:
            await wait_for_listener(port)
            await asyncio.to_thread(garbage, port, 100)
            for payload in payloads:
                await round_trip(port, client_context(ca), payload)
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await wait_until(lambda: be.connections == len(received))
    assert sorted(received) == sorted(payloads)


# --- shutdown ------------------------------------------------------------------------------------------------


async def streaming_client(port: int, ctx: ssl.SSLContext, seed: int, rounds: int, progress: list[int]) -> str:
    """Send ``rounds`` random chunks, each echoed back before the next; returns the SHA-256 of all of it."""
    rng = random.Random(seed)
    sent, echoed = hashlib.sha256(), hashlib.sha256()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    try:
        for _ in range(rounds):
            chunk = rng.randbytes(rng.randint(1000, 20000))
            sent.update(chunk)
            writer.write(chunk)
            echoed.update(await reader.readexactly(len(chunk)))
            progress[seed] += 1
            await asyncio.sleep(0.01)  # a stream that takes its time: still open when the signal comes
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    assert echoed.digest() == sent.digest()
    return sent.hexdigest()


async def test_sigterm_drains_streaming_connections_then_exits_0(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    clients, rounds = 5, 60
    progress = [0] * clients
    async with backend() as be, tlsgate_server(listen_args(pki_files, be.address)) as server:
        tasks = [
            asyncio.ensure_future(streaming_client(server.port, client_context(ca), i, rounds, progress))
            for i in range(clients)
        ]
        async with asyncio.timeout(30):
            while min(progress) < 5:
                await asyncio.sleep(0.01)
        server.signal(signal.SIGTERM)
        await server.wait_for_line("shutting down")
        with pytest.raises(OSError):  # no longer listening
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.close()
        assert min(progress) < rounds, "the streams finished before the signal; nothing was drained"
        digests = await asyncio.gather(*tasks)  # every stream completes, checksums equal
        assert len(set(digests)) == clients
        assert await server.exit_code() == 0
        assert "stopped cut=0" in server.log, server.log


async def open_idle_clients(port: int, ctx: ssl.SSLContext, count: int) -> list[Any]:
    clients = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        clients.append((reader, writer))
    return clients


async def cut(reader: asyncio.StreamReader, within: float = 20) -> None:
    try:
        assert await asyncio.wait_for(reader.read(), within) == b""
    except (ConnectionError, ssl.SSLError):
        pass


async def test_a_second_sigterm_cuts_open_connections_at_once(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with backend() as be, tlsgate_server(listen_args(pki_files, be.address)) as server:
        clients = await open_idle_clients(server.port, client_context(ca), 3)
        try:
            server.signal(signal.SIGTERM)
            await server.wait_for_line("shutting down")
            for reader, writer in clients:  # still served: draining, default --shutdown-timeout is 5 minutes
                writer.write(b"again")
                assert await asyncio.wait_for(reader.readexactly(5), 20) == b"again"
            server.signal(signal.SIGTERM)
            await asyncio.gather(*(cut(reader) for reader, _ in clients))
            assert await server.exit_code() == 1  # connections were cut: not a clean stop (as ghostunnel)
        finally:
            for _, writer in clients:
                writer.close()
        assert server.count("second stop signal") == 1
        assert server.count("end=shutdown") == 3, server.log


async def test_shutdown_timeout_cuts_what_is_still_open(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with (
        backend() as be,
        tlsgate_server(listen_args(pki_files, be.address, "--shutdown-timeout", "1s")) as server,
    ):
        clients = await open_idle_clients(server.port, client_context(ca), 3)
        try:
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            server.signal(signal.SIGTERM)
            await asyncio.gather(*(cut(reader) for reader, _ in clients))
            assert loop.time() - signalled >= 0.9  # not before the timeout
            assert await server.exit_code() == 1  # ghostunnel's exit code when its shutdown timeout fires
        finally:
            for _, writer in clients:
                writer.close()
        assert "stopped cut=3" in server.log, server.log
