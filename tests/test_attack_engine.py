"""The engine under attack and under its own bugs (security issue #13, items 3, 9 and 10).

* No callback the engine hands to the event loop may let an exception escape: each one is made to raise once,
  during a real connection, and that connection must end at once, be counted and logged once, and the tunnel
  must go on serving. The original case, ``SSL_shutdown`` failing with ``SSL_ERROR_SYSCALL``, is here too.
* A PROXY header does not restart the handshake deadline, and a partial one does not make the loop poll.
* On uvloop a client's reset reaches the target within one loop iteration, not at the next sweeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import select
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.engine import setup as engine_setup
from tlsgate.engine import tunnel as tunnel_module
from tlsgate.engine.relay import Direction, Relay, _describe
from tlsgate.engine.setup import Setup as _Setup
from tlsgate.engine.tunnel import Tunnel
from tlsgate.status import view_of
from tlsgate.tls import closenotify

from helpers import (
    backend,
    client_context,
    port_of,
    read_until_end,
    round_trip,
    server_opts,
    tls_connect,
    tunnel,
    wait_until,
)

# Every timeout of the tunnels here is far longer than the bound a test waits for a cut: a connection that
# ends within the bound ended because of the guard, not because a timer gave up on it.
_LONG = "60s"
_PROMPT = 10.0


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of every tlsgate log event called ``name``."""
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.name == "tlsgate" and r.getMessage() == name]


async def echo_until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo; after echoing b"close", close our side (the relay then passes an end of stream to the client)."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
        if data.endswith(b"close"):
            return


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Everything that reaches the event loop's exception handler: a guard that works leaves this empty."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


def raise_on_call(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, nth: int = 1, error: BaseException | None = None
) -> None:
    """Make ``owner.name`` raise ``error`` (RuntimeError) on its ``nth`` call, and behave as before otherwise."""
    original = getattr(owner, name)
    calls = 0

    def faulty(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth:
            raise error if error is not None else RuntimeError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, faulty)


def on_relay_start(monkeypatch: pytest.MonkeyPatch, install: Callable[[Relay], None]) -> None:
    """Run ``install(relay)`` on the first relay, just before it starts (to swap a direction's I/O)."""
    original = Relay.start
    done = False

    def start(self: Relay) -> None:
        nonlocal done
        if not done:
            done = True
            install(self)
        original(self)

    monkeypatch.setattr(Relay, "start", start)


# -- how to make each callback raise once ---------------------------------------------------------------------
# Each injection returns extra tunnel options and, when the relay must be reached, what the client sends. The
# names are the ``where`` of the log line: the callback the loop called (or the step of the set-up).


def inject_accept(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    raise_on_call(mp, Tunnel, "_on_accepted")
    return {}


def inject_begin(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    raise_on_call(mp, _Setup, "_after_proxy_header")
    return {}


def inject_client_handshake(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    # The first step runs from accept (and usually waits for the ClientHello); the second from the loop.
    raise_on_call(mp, _Setup, "_advance_handshake", nth=2)
    return {}


def inject_connect_ready(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    # Pretend the loopback connect is still under way, so the set-up waits for writability as for a remote one.
    mp.setattr(engine_setup, "_established", lambda sock: False)
    raise_on_call(mp, _Setup, "_connected")
    return {}


def inject_resolved(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    raise_on_call(mp, _Setup, "_connect_next")
    return {"target_by_name": True}


class _BrokenOnce(float):
    """A number whose first addition fails: the name lookup's own callback adds it to the clock."""

    broken = True

    def __radd__(self, other: object) -> float:
        if _BrokenOnce.broken:
            _BrokenOnce.broken = False
            raise TypeError("injected")
        return float(self) + float(other)  # type: ignore[arg-type]


def inject_resolve_done(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    mp.setattr(_BrokenOnce, "broken", True)
    mp.setattr(tunnel_module, "_RESOLVE_TTL", _BrokenOnce(30.0))
    return {"target_by_name": True}


def inject_handshake_timer(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    raise_on_call(mp, _Setup, "_end")
    return {"handshake_timeout": "200ms", "silent_client": True}


def inject_relay_start(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    raise_on_call(mp, ssl.SSLSocket, "pending")
    return {"send": b"ping"}


def inject_relay_started(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    # Between the end of the set-up and the relay's own first callback: the sockets must not be orphaned.
    raise_on_call(mp, Tunnel, "relay_started")
    return {"send": b"ping"}


def inject_relay_constructor(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    raise_on_call(mp, Relay, "__init__")
    return {}


def inject_read(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    raise_on_call(mp, Direction, "_send")
    return {"send": b"ping"}


def inject_flush(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    def install(r: Relay) -> None:
        first = True

        def write(data: memoryview) -> int:
            nonlocal first
            if first:  # the target "cannot take it now": the rest is kept and a writer waits for the target
                first = False
                raise BlockingIOError
            raise RuntimeError("injected")

        r.outbound._write = write

    on_relay_start(mp, install)
    return {"send": b"ping"}


def inject_resume_read_after_write(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    def install(r: Relay) -> None:
        real = r.outbound._tls_read
        assert real is not None
        first = True

        def tls_read(size: int, view: memoryview) -> int:
            nonlocal first
            if first:  # TLS must write before it can read (a KeyUpdate): the relay waits for writability
                first = False
                raise_on_call(mp, Direction, "read")
                raise ssl.SSLWantWriteError
            return real(size, view)

        r.outbound._tls_read = tls_read

    on_relay_start(mp, install)
    return {"send": b"ping"}


def inject_close_notify(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    want_write = ssl.SSLWantWriteError(3, "close_notify not yet written")
    want_write.reason, want_write.library = "WANT_WRITE", "SSL"
    raise_on_call(mp, closenotify, "send_close_notify", nth=1, error=want_write)
    raise_on_call(mp, closenotify, "send_close_notify", nth=2)  # the retry, once the client is writable
    return {"send": b"close"}


def inject_sweep(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    raise_on_call(mp, Tunnel, "_sweep_one")
    # The sweep runs every idle/4 seconds, at most once a second.
    return {"idle_timeout": "200ms", "send": b"ping", "keep_sending": True}


INJECTIONS: dict[str, Callable[[pytest.MonkeyPatch], dict[str, Any]]] = {
    "accept": inject_accept,
    "begin": inject_begin,
    "client_handshake": inject_client_handshake,
    "connect_ready": inject_connect_ready,
    "resolved": inject_resolved,
    "resolve_done": inject_resolve_done,
    "abort": inject_handshake_timer,
    "relay": inject_relay_constructor,
    "relay_started": inject_relay_started,
    "start": inject_relay_start,
    "read": inject_read,
    "flush": inject_flush,
    "resume_read_after_write": inject_resume_read_after_write,
    "close_notify": inject_close_notify,
    "sweep": inject_sweep,
}
# Where the log line says the failure was, when that is not the injection's name.
WHERE = {"resolve_done": "resolved", "relay": "resolved", "relay_started": "start"}


async def drive(tun: Tunnel, ctx: ssl.SSLContext, plan: dict[str, Any]) -> None:
    """One client connection that meets the injected fault; returns once the server has cut it."""
    if plan.get("silent_client"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        try:
            await read_until_end(reader, _PROMPT)
        finally:
            writer.close()
        return
    try:
        reader, writer = await asyncio.wait_for(tls_connect(tun, ctx), _PROMPT)
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        return  # cut during the handshake
    try:
        send: bytes = plan.get("send", b"")
        writer.write(send)
        if plan.get("keep_sending"):
            # Traffic keeps the idle timeout from ending the connection: only the guard may.
            cut = asyncio.ensure_future(read_until_end(reader, _PROMPT))
            while not cut.done():
                writer.write(b"x")
                await asyncio.wait({cut}, timeout=0.05)
            await cut
        else:
            await read_until_end(reader, _PROMPT)
    finally:
        writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("callback", list(INJECTIONS))
async def test_an_exception_in_any_engine_callback_cuts_only_that_connection(
    callback: str,
    monkeypatch: pytest.MonkeyPatch,
    pki_files: dict[str, Path],
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = INJECTIONS[callback](monkeypatch)
    async with backend(echo_until_close) as be:
        target = f"localhost:{be.port}" if plan.get("target_by_name") else be.address
        opts = server_opts(
            pki_files, target, disable_authentication=True, connect_timeout=_LONG, shutdown_timeout="1s",
            handshake_timeout=plan.get("handshake_timeout", _LONG), idle_timeout=plan.get("idle_timeout", _LONG),
        )  # fmt: skip
        async with tunnel(**opts) as tun:
            with loop_errors() as escaped:
                await drive(tun, client_context(ca), plan)
                await wait_until(lambda: tun.active == 0)
                assert tun.stats.internal_errors == 1
                await round_trip(tun, client_context(ca))  # the tunnel still serves
            assert escaped == []
            assert tun.stats.internal_errors == 1
    lines = events(caplog, "internal error")
    assert len(lines) == 1, lines
    where = WHERE.get(callback, callback)
    assert lines[0]["where"] == where or (callback == "client_handshake" and lines[0]["where"] == "begin"), lines
    assert lines[0]["error"] in ("RuntimeError", "TypeError")
    closed = events(caplog, "closed")
    if plan.get("send"):  # the relay was reached: its end names the bug
        assert closed[0]["end"].startswith("internal error: "), closed


@pytest.mark.asyncio
async def test_the_sweep_goes_on_after_a_failure(
    monkeypatch: pytest.MonkeyPatch, pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    """One relay's failure in the sweep cuts that relay; the sweep still runs, so idle timeouts still work."""
    raise_on_call(monkeypatch, Tunnel, "_sweep_one")
    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True, idle_timeout="200ms")) as tun,
    ):
        first = await tls_connect(tun, client_context(ca))
        await read_until_end(first[0], _PROMPT)
        first[1].close()
        reader, writer = await tls_connect(tun, client_context(ca))
        await read_until_end(reader, _PROMPT)  # ended by the idle timeout, which needs later sweeps
        writer.close()
        await wait_until(lambda: tun.active == 0)
        assert tun.stats.internal_errors == 1
        assert view_of("t", tun).counters["internal_errors"] == 1  # what /metrics and /_status report


# -- the original: SSL_shutdown fails while the relay passes an end of stream on ---------------------------------


class _FailingShutdown:
    """closenotify's OpenSSL binding with ``SSL_shutdown`` failing as on a broken unix socket: -1 and
    ``SSL_ERROR_SYSCALL`` with ``errno`` (EPIPE) or without one."""

    def __init__(self, real: Any, errno_value: int) -> None:
        self._real = real
        self._errno = errno_value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def shutdown(self, pointer: int) -> int:
        ctypes.set_errno(self._errno)
        return -1

    def get_error(self, pointer: int, result: int) -> int:
        return 5  # SSL_ERROR_SYSCALL


@pytest.mark.asyncio
@pytest.mark.parametrize("errno_value", [errno.EPIPE, 0], ids=["epipe", "no-errno"])
async def test_ssl_shutdown_syscall_error_on_a_unix_listener_ends_the_relay_at_once(
    errno_value: int,
    monkeypatch: pytest.MonkeyPatch,
    pki_files: dict[str, Path],
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not closenotify.available():
        pytest.skip("the ctypes close_notify path is not in use here")
    monkeypatch.setattr(closenotify, "_LIB", _FailingShutdown(closenotify._LIB, errno_value))
    path = tmp_path / "tlsgate.sock"
    async with backend(echo_until_close) as be:
        opts = server_opts(
            pki_files, be.address, listen=f"unix:{path}", disable_authentication=True, shutdown_timeout=_LONG,
            idle_timeout=_LONG, close_timeout=_LONG,
        )  # fmt: skip
        async with tunnel(**opts) as tun:
            with loop_errors() as escaped:
                reader, writer = await asyncio.open_unix_connection(
                    str(path), ssl=client_context(ca), server_hostname="localhost"
                )
                writer.write(b"close")  # the backend echoes and closes: close_notify must go to the client
                assert (await read_until_end(reader, _PROMPT)).startswith(b"close")
                writer.close()
                await wait_until(lambda: tun.active == 0)
            assert escaped == []
            assert tun.stats.internal_errors == 0  # a broken socket is not a bug
    [closed] = events(caplog, "closed")
    expected = "broken pipe" if errno_value else "UNEXPECTED_EOF"
    assert closed["end"] == f"target close_notify: {expected}", closed


# -- _describe, for any exception it may meet -------------------------------------------------------------------


def _odd_exceptions() -> st.SearchStrategy[BaseException]:
    class BrokenStr(Exception):
        def __str__(self) -> str:
            raise ValueError("no text")

    def ssl_error(args: tuple[Any, ...], reason: str | None) -> BaseException:
        err = ssl.SSLError(*args)
        if reason is not None:
            err.reason = reason
        return err

    texts = st.text(max_size=20)
    return st.one_of(
        st.builds(ssl_error, st.tuples() | st.tuples(st.integers(0, 10), texts), st.none() | texts),
        st.builds(OSError, st.integers(0, 200), texts),
        st.builds(OSError),
        st.builds(lambda: BrokenStr()),
        st.builds(RuntimeError, texts),
        st.builds(ValueError),
    )


@given(_odd_exceptions())
def test_describe_never_raises_and_never_returns_nothing(err: BaseException) -> None:
    text = _describe(err)
    assert isinstance(text, str) and text


def test_close_notify_errors_look_like_the_ones_ssl_raises() -> None:
    err = closenotify._ssl_error(ssl.SSLEOFError, 5, "UNEXPECTED_EOF", "gone")
    assert (err.reason, err.library, err.errno) == ("UNEXPECTED_EOF", "SSL", 5)
    assert _describe(err) == "UNEXPECTED_EOF"


# -- item 9: the PROXY header and the handshake deadline --------------------------------------------------------

V1_HEADER = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
V2_HEADER = (
    b"\r\n\r\n\x00\r\nQUIT\n"  # signature
    + b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 address bytes
    + bytes([192, 0, 2, 1, 198, 51, 100, 7])
    + (56324).to_bytes(2, "big")
    + (443).to_bytes(2, "big")
)


def proxied_opts(pki_files: dict[str, Path], target: str, **extra: object) -> dict[str, object]:
    return server_opts(pki_files, target, disable_authentication=True, accept_proxy_from=["127.0.0.0/8"], **extra)


def time_to_abort(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """(reason, seconds since accept) of every set-up that gives up, measured by the server's own clock."""
    seen: list[tuple[str, float]] = []
    original = _Setup.abort

    def abort(self: _Setup, reason: str) -> None:
        if not self.done:
            seen.append((reason, time.monotonic() - self.started))
        original(self, reason)

    monkeypatch.setattr(_Setup, "abort", abort)
    return seen


@pytest.mark.asyncio
async def test_a_proxy_header_does_not_restart_the_handshake_deadline(
    monkeypatch: pytest.MonkeyPatch, pki_files: dict[str, Path]
) -> None:
    """--handshake-timeout 1s, a header sent at 0.9 s, then silence: cut 1 s after accept, not 1.9 s."""
    timeout, header_at = 1.0, 0.9
    aborted = time_to_abort(monkeypatch)
    async with backend() as be, tunnel(**proxied_opts(pki_files, be.address, handshake_timeout="1s")) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        cut = asyncio.ensure_future(read_until_end(reader, within=30))
        await asyncio.wait({cut}, timeout=header_at)  # the scenario: a slow header, not a readiness wait
        writer.write(V1_HEADER)
        await cut
        writer.close()
        await wait_until(lambda: tun.active == 0)
    [(reason, elapsed)] = aborted
    assert reason == "handshake timeout"
    # Not before the deadline (libuv's timers have millisecond granularity and may fire a hair early); well
    # before accept + header_at + timeout, which a restarted clock would give.
    assert timeout - 0.01 <= elapsed < timeout + header_at * 0.8, elapsed


@pytest.mark.asyncio
@pytest.mark.parametrize("pieces", [2, 5])
async def test_a_partial_proxy_header_held_open_does_not_wake_the_loop(
    pieces: int, monkeypatch: pytest.MonkeyPatch, pki_files: dict[str, Path]
) -> None:
    """A header sent in pieces, then held incomplete until the deadline: one read step per piece (O(1) in the
    time held), where a 10 ms poll took about 50 of them in half a second."""
    steps = 0
    original = _Setup._read_proxy_header

    def counted(self: _Setup) -> None:
        nonlocal steps
        steps += 1
        original(self)

    monkeypatch.setattr(_Setup, "_read_proxy_header", counted)
    aborted = time_to_abort(monkeypatch)
    partial = V1_HEADER[:-2]
    async with backend() as be, tunnel(**proxied_opts(pki_files, be.address, handshake_timeout="500ms")) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        cut = asyncio.ensure_future(read_until_end(reader, within=30))
        size = -(-len(partial) // pieces)
        for start in range(0, len(partial), size):
            before = steps
            writer.write(partial[start : start + size])
            await wait_until(lambda before=before: steps > before or cut.done())  # type: ignore[misc]
        await cut
        writer.close()
        await wait_until(lambda: tun.active == 0)
        assert tun.stats.proxy_header_errors == 0
    assert [reason for reason, _ in aborted] == ["handshake timeout"]
    # The first step runs at accept (nothing there yet), then one per piece, each waking on readability.
    assert steps <= 1 + pieces + 1, steps


def _bio_client(ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(incoming, outgoing, server_hostname="localhost"), incoming, outgoing


async def _bio_handshake(
    obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:  # fmt: skip
    while True:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            writer.write(outgoing.read())
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data, "the server closed during the handshake"
            incoming.write(data)
            continue
        writer.write(outgoing.read())
        return


@pytest.mark.asyncio
@pytest.mark.parametrize("header", [V1_HEADER, V2_HEADER], ids=["v1", "v2"])
@pytest.mark.parametrize("split", [1, 6, 13, 16, -1])
async def test_a_proxy_header_in_pieces_with_the_client_hello_behind_it_is_read_exactly(
    header: bytes, split: int, pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """The header's last piece and the ClientHello arrive in one segment: tlsgate takes the header only, and
    OpenSSL gets every byte of the hello."""
    async with backend() as be, tunnel(**proxied_opts(pki_files, be.address, handshake_timeout=_LONG)) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        obj, incoming, outgoing = _bio_client(client_context(ca))
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        writer.write(header[:split])
        await writer.drain()
        await wait_until(lambda: bool(tun.setups) and next(iter(tun.setups)).proxy_seen == header[:split])
        writer.write(header[split:] + hello)
        await _bio_handshake(obj, incoming, outgoing, reader, writer)
        obj.write(b"ping")
        writer.write(outgoing.read())
        reply = b""
        while b"ping" not in reply:
            data = await asyncio.wait_for(reader.read(65536), 30)
            assert data
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                reply += obj.read(65536)
        writer.close()
        await wait_until(lambda: tun.active == 0)
    [closed] = events(caplog, "closed")
    assert closed["peer"].startswith("192.0.2.1:56324 via 127.0.0.1:"), closed


# -- item 10: a client's reset reaches the target at once, on uvloop too -----------------------------------------

# The sweep's period when no timeout asks for a shorter one.
SWEEP_INTERVAL = 1.0


@contextlib.asynccontextmanager
async def reset_watching_backend() -> AsyncIterator[tuple[Any, asyncio.Future[float]]]:
    """A backend that reads until its connection ends; the future gets the loop time it ended at."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[float] = loop.create_future()

    async def until_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        finally:
            if not ended.done():
                ended.set_result(loop.time())

    async with backend(until_reset) as be:
        yield be, ended


async def reset_latency(tun: Tunnel, ended: asyncio.Future[float], ca: trustme.CA, before: Any = None) -> float:
    """Seconds from a client's reset, with a TLS record queued just before it, to the target's end.

    ``before`` (awaited first, if given) picks the moment of the reset."""
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", port_of(tun))) as raw:
        raw.setblocking(False)
        obj, incoming, outgoing = _bio_client(client_context(ca))
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await loop.sock_sendall(raw, outgoing.read())
                incoming.write(await asyncio.wait_for(loop.sock_recv(raw, 65536), 30))
        await loop.sock_sendall(raw, outgoing.read())
        await wait_until(lambda: len(tun.relays) == 1)
        if before is not None:
            await before
        # No await from here to the reset: tlsgate cannot read the record before the reset arrives behind it.
        obj.write(b"last words")
        raw.send(outgoing.read())
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset_at = loop.time()
    latency = await asyncio.wait_for(ended, 10) - reset_at
    await wait_until(lambda: tun.active == 0)
    return latency


@pytest.mark.asyncio
async def test_a_client_reset_with_data_queued_reaches_the_target_within_one_loop_turn(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    """The client sends a record and resets at once, so tlsgate finds the bytes and the reset together. uvloop
    runs the reader once (it reads the bytes) and stops polling the socket: the reset used to reach the target
    only at the second sweep after it (1-2 s). Now it is one turn of the loop, well under one sweep interval."""
    opts = server_opts(pki_files, "", disable_authentication=True)
    async with reset_watching_backend() as (be, ended), tunnel(**{**opts, "target": be.address}) as tun:
        latency = await reset_latency(tun, ended, ca)
    assert latency < SWEEP_INTERVAL, latency


@pytest.mark.asyncio
async def test_without_the_epoll_watch_a_reset_waits_one_sweep_not_two(
    monkeypatch: pytest.MonkeyPatch, pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    """Where the error watch cannot be had (no epoll, out of watches), the sweep checks every relay, moving or
    not. The reset comes right after a sweep pass: the next pass (1 s) must find it, not the one after (2 s)."""

    def no_epoll() -> Any:
        raise OSError(errno.ENOSPC, "no epoll watches left")

    monkeypatch.setattr(select, "epoll", no_epoll)
    swept = asyncio.Event()
    original = Tunnel._sweep

    def sweep(self: Tunnel, interval: float) -> None:
        original(self, interval)
        swept.set()

    monkeypatch.setattr(Tunnel, "_sweep", sweep)

    async def right_after_a_sweep() -> None:
        swept.clear()
        await swept.wait()

    opts = server_opts(pki_files, "", disable_authentication=True)
    async with reset_watching_backend() as (be, ended), tunnel(**{**opts, "target": be.address}) as tun:
        latency = await reset_latency(tun, ended, ca, right_after_a_sweep())
        if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
            assert tun._error_watch is None and tun._error_watch_failed
    # Under one and a half intervals: the next pass, with room for a late timer; the pass after is at two.
    assert latency < 1.5 * SWEEP_INTERVAL, latency


@pytest.mark.asyncio
async def test_bytes_a_target_sent_before_its_reset_reach_the_client_first(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    """The target answers and resets at once: the answer and the reset arrive together. The error watch must
    not cut ahead of the answer (it reads what the socket holds first), and must not wait for a sweep."""
    loop = asyncio.get_running_loop()

    async def answer_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        sock = writer.get_extra_info("socket")
        writer.write(b"bye")
        await writer.drain()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    opts = server_opts(pki_files, "", disable_authentication=True)
    async with backend(answer_then_reset) as be, tunnel(**{**opts, "target": be.address}) as tun:
        reader, writer = await tls_connect(tun, client_context(ca))
        writer.write(b"ping")
        started = loop.time()
        got = await read_until_end(reader, within=_PROMPT)
        latency = loop.time() - started
        writer.close()
        await wait_until(lambda: tun.active == 0)
    assert got == b"bye"
    assert latency < SWEEP_INTERVAL, latency
