"""The byte pump between two connected non-blocking sockets, either of which may be a ``ssl.SSLSocket``.

Shape (measured, see docs/design.md): no asyncio transports or coroutines on the data path. Each direction
reads into one buffer shared by every connection of a tunnel and sends straight from it; only when the
destination cannot take everything is the rest copied out, reading from the source paused and a writer
registered on the destination. That gives back-pressure for free (a slow reader stops us reading from its
peer, so at most one buffer's worth is held per direction) and costs no allocation in the common case.

Half-close is relayed both ways: end-of-stream from one side becomes a FIN (plain socket) or a close_notify
(TLS socket) towards the other, and the opposite direction keeps flowing until it ends too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable

from tlsgate.tls import closenotify, internals

# TLS records carry at most 16 KiB of plaintext; a read that returns less means the socket is (probably)
# drained, so we go back to the loop instead of paying for a read that fails with EAGAIN.
_TLS_RECORD = 16384
# Reads per readiness callback before yielding to the loop, so one fast connection cannot starve others.
_MAX_READS = 16
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_LINGER_RESET = struct.pack("ii", 1, 0)

# Results of Direction.read(), used by the close_notify drain.
_BLOCKED, _PAUSED, _ENDED, _MORE = range(4)

# How a relay reports a bug its guard caught: (where, exception, peer); see Relay.internal_error.
OnError = Callable[[str, Exception, str], None]


class Direction:
    """Bytes flowing one way: read from ``src``, written to ``dst``."""

    __slots__ = (
        "_big",
        "_recv_into",
        "_tls_read",
        "_write",
        "dst",
        "dst_fd",
        "dst_tls",
        "eof",
        "loop",
        "name",
        "nbytes",
        "owes_shutdown",
        "peer",
        "pending",
        "read_wants_write",
        "relay",
        "shut",
        "src",
        "src_fd",
        "view",
    )

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, name: str) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.view = relay.view
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.dst_tls = isinstance(dst, ssl.SSLSocket)
        self._big = _TLS_RECORD if isinstance(src, ssl.SSLSocket) else len(self.view)
        # SSLSocket.recv_into/send are two Python frames over the C methods of its _sslobj; calling those
        # directly saves ~1.3 µs per request (measured), about a tenth of what relaying one costs.
        # (the path "sslobj" of tlsgate.tls.internals).
        self._tls_read: Callable[[int, memoryview], int] | None = internals.tls_reader(src)
        self._recv_into: Callable[[memoryview], int] = src.recv_into
        self._write: Callable[[memoryview], int] = internals.tls_writer(dst)
        self.name = name
        self.nbytes = 0
        self.pending: memoryview | None = None
        self.eof = False  # src has ended its stream
        self.shut = False  # dst's write side has been shut (FIN or close_notify sent)
        self.owes_shutdown = False  # dst must be shut once the peer direction is drained
        self.read_wants_write = False
        self.peer: Direction = self

    def read(self) -> int:
        # The outer try is the relay's guard (see Relay.internal_error): free until something raises.
        try:
            view, tls_read, size = self.view, self._tls_read, len(self.view)
            for _ in range(_MAX_READS):
                try:
                    n = tls_read(size, view) if tls_read is not None else self._recv_into(view)
                except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                    return _BLOCKED
                except ssl.SSLWantWriteError:
                    # TLS sometimes has to write to read (a KeyUpdate reply); wait until the socket can take it.
                    self._wait_writable_to_read()
                    return _PAUSED
                except ssl.SSLZeroReturnError:
                    n = 0  # close_notify after we sent ours: Python raises instead of returning b""
                except ssl.SSLEOFError:
                    n = 0  # TCP FIN without close_notify: treat as end of stream, as ghostunnel and haproxy do
                except OSError as err:
                    self.relay.abort(f"{self.name} read: {_describe(err)}")
                    return _ENDED
                if n == 0:
                    self._on_eof()
                    return _ENDED
                self.nbytes += n
                if not self._send(view[:n]):
                    return _PAUSED
                if n < self._big:
                    return _BLOCKED
            return _MORE
        except Exception as err:
            self.relay.internal_error("read", err)
            return _ENDED

    def _send(self, data: memoryview) -> bool:
        try:
            sent = self._write(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as err:
            self.relay.abort(f"{self.name} write: {_describe(err)}")
            return False
        if sent == len(data):
            return True
        # The shared buffer is overwritten by the next read anywhere, so the rest must be copied. A TLS write
        # that could not complete must be retried with the same bytes; SSLSocket.send is all-or-nothing.
        self.pending = memoryview(bytes(data[sent:]))
        self.loop.remove_reader(self.src_fd)
        self.loop.add_writer(self.dst_fd, self.flush)
        return False

    def flush(self) -> None:
        try:
            data = self.pending
            assert data is not None
            try:
                sent = self._write(data)
            except _WOULD_BLOCK:
                return
            except OSError as err:
                self.relay.abort(f"{self.name} write: {_describe(err)}")
                return
            if sent < len(data):
                self.pending = data[sent:]
                return
            self.pending = None
            self.loop.remove_writer(self.dst_fd)
            if self.eof:
                self.shutdown_dst()
            else:
                self.loop.add_reader(self.src_fd, self.read)
            peer = self.peer
            if peer.read_wants_write and not self.relay.closed:
                peer.resume_read_after_write()
            if peer.owes_shutdown and not self.relay.closed:
                peer.owes_shutdown = False
                peer.shutdown_dst()
        except Exception as err:
            self.relay.internal_error("flush", err)

    def _wait_writable_to_read(self) -> None:
        self.read_wants_write = True
        self.loop.remove_reader(self.src_fd)
        if self.peer.pending is None:  # else the peer's flush() owns the writer and will resume us
            self.loop.add_writer(self.src_fd, self.resume_read_after_write)

    def resume_read_after_write(self) -> None:
        try:
            self.read_wants_write = False
            if self.peer.pending is None:
                self.loop.remove_writer(self.src_fd)
            if self.eof:  # ended meanwhile (the close_notify fallback reads directly); its reader stays gone
                return
            self.loop.add_reader(self.src_fd, self.read)
            self.read()
        except Exception as err:
            self.relay.internal_error("resume_read_after_write", err)

    def _on_eof(self) -> None:
        self.eof = True
        self.loop.remove_reader(self.src_fd)
        self.relay.on_half_close(self)
        if self.pending is None:
            self.shutdown_dst()

    def shutdown_dst(self) -> None:
        """Pass the end of stream on: FIN to a plain socket, close_notify to a TLS one."""
        if self.shut:
            return
        if not self.dst_tls:
            # A peer that is already gone shows up in the other direction; nothing to do here.
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            self._shut_done()
            return
        peer = self.peer
        if not peer.eof and not closenotify.available():
            # Fallback path: unwrap() reads after sending close_notify and drops application data it finds
            # (see closenotify.py). Relay everything the TLS peer already sent first; if that data cannot move
            # yet, send close_notify once it has.
            status = _MORE
            while status == _MORE and peer.pending is None:
                status = peer.read()
            if status == _PAUSED or peer.pending is not None:
                self.owes_shutdown = True
                return
            if self.relay.closed or self.shut:
                return
        try:
            closenotify.send_close_notify(self.dst)  # type: ignore[arg-type]
        except ssl.SSLWantWriteError:
            self.loop.add_writer(self.dst_fd, self._retry_close_notify)
            return
        except OSError as err:  # ssl.SSLError included
            if not peer.eof:
                # The end of stream did not get through (a broken socket, or, on the unwrap() fallback, data that
                # arrived meanwhile): the TLS peer would wait for it forever and its own bytes may be lost, so
                # cut the connection rather than call it clean.
                self.relay.abort(f"{self.name} close_notify: {_describe(err)}")
                return
            # Both streams have ended and the TLS peer left without close_notify (ragged EOF) or is gone: OpenSSL
            # will not shut down after that, and nobody is waiting for it.
        except ValueError:
            pass  # the TLS object is already gone: both close_notifys were exchanged
        self._shut_done()

    def _retry_close_notify(self) -> None:
        try:
            self.loop.remove_writer(self.dst_fd)
            self.shutdown_dst()
        except Exception as err:
            self.relay.internal_error("close_notify", err)

    def _shut_done(self) -> None:
        self.shut = True
        if self.peer.shut:
            self.relay.finish()


class Relay:
    """One proxied connection: two sockets, two directions, and how it ended."""

    __slots__ = (
        "client",
        "closed",
        "end",
        "half_closed_at",
        "inbound",
        "last_change",
        "last_total",
        "loop",
        "on_close",
        "on_error",
        "outbound",
        "peer",
        "started",
        "target",
        "view",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        target: socket.socket,
        view: memoryview,
        on_close: Callable[[Relay], None],
        started: float | None = None,
        *,
        peer: str = "",
        on_error: OnError | None = None,
    ) -> None:
        self.loop = loop
        self.view = view
        self.client, self.target = client, target
        self.on_close = on_close
        self.peer = peer
        self.on_error = on_error
        self.started = time.monotonic() if started is None else started
        self.last_change = self.started
        self.last_total = 0
        self.half_closed_at = 0.0
        self.closed = False
        self.end = ""
        self.outbound = Direction(self, client, target, "client")
        self.inbound = Direction(self, target, client, "target")
        self.outbound.peer, self.inbound.peer = self.inbound, self.outbound

    @property
    def bytes_in(self) -> int:
        """Bytes from the client to the target."""
        return self.outbound.nbytes

    @property
    def bytes_out(self) -> int:
        """Bytes from the target to the client."""
        return self.inbound.nbytes

    def start(self) -> None:
        try:
            self.loop.add_reader(self.outbound.src_fd, self.outbound.read)
            self.loop.add_reader(self.inbound.src_fd, self.inbound.read)
            # Bytes that arrived with the last handshake flight sit decrypted inside OpenSSL, invisible to epoll.
            for direction in (self.outbound, self.inbound):
                src = direction.src
                if isinstance(src, ssl.SSLSocket) and src.pending() and not self.closed:
                    direction.read()
        except Exception as err:
            self.internal_error("start", err)

    def internal_error(self, where: str, err: Exception) -> None:
        """The guard every callback of this relay ends in when it raises: a bug here, not a network event.

        The connection is cut at once with the reason "internal error: <type>", and ``on_error`` (the tunnel)
        counts and logs it. Without this the event loop would only print the exception, leaving both sockets
        registered and the peers waiting until a timeout. The callbacks catch with a plain try/except around
        their body rather than through a wrapper: in CPython 3.11+ an unused ``try`` costs nothing, an extra
        frame on every read would cost about 1% per request.
        """
        if self.on_error is not None:
            with contextlib.suppress(Exception):
                self.on_error(where, err, self.peer)
        self._cut(f"internal error: {type(err).__name__}")

    def _cut(self, reason: str) -> None:
        try:
            self.abort(reason)
        except Exception:
            # abort() itself failed half-way: make sure at least no callback of ours stays registered.
            release_sockets(self.loop, (self.client, self.target))

    def socket_error(self, fd: int) -> None:
        """EPOLLERR or EPOLLHUP on one of our sockets, seen by the tunnel's error watch (uvloop only: libuv stops
        polling a descriptor at POLLERR, see ``Tunnel._watch_errors``).

        Do what a level-triggered loop would have done: read what the socket still holds (bytes, then its end
        or its error, in that order, so nothing sent before a reset or a FIN is lost or reordered), retry a
        write waiting on it; an error still pending after that is the peer's reset, and cuts the relay.
        """
        try:
            for direction in (self.outbound, self.inbound):
                if direction.src_fd == fd and not direction.read_wants_write:
                    # Bounded: each read drains up to _MAX_READS records; a reset or FIN socket ends in EOF or an
                    # error, never in "would block", but a bug must not make this spin.
                    for _ in range(64):
                        if self.closed or direction.eof or direction.pending is not None:
                            break
                        if direction.read() in (_ENDED, _PAUSED):
                            break
                if direction.dst_fd == fd and direction.pending is not None and not self.closed:
                    direction.flush()
            if not self.closed:
                sock, side = (self.client, "client") if fd == self.outbound.src_fd else (self.target, "target")
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.abort(f"{side} read: {os.strerror(err).lower()}")
        except Exception as err:
            self.internal_error("socket error", err)

    def on_half_close(self, direction: Direction) -> None:
        if not self.half_closed_at:
            self.half_closed_at = time.monotonic()
            self.end = f"{direction.name} closed first"

    def finish(self) -> None:
        """Both ends of stream were passed on: a clean close."""
        self._close(self.end or "closed", reset=False)

    def abort(self, reason: str) -> None:
        """Cut both sides now (timeout, error, shutdown). The plain side gets a RST so it sees an error."""
        self._close(reason, reset=True)

    def _close(self, reason: str, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.end = reason
        loop = self.loop
        for sock, direction in ((self.client, self.outbound), (self.target, self.inbound)):
            fd = sock.fileno()
            if fd >= 0:
                if not direction.eof:  # an ended direction already dropped its reader (_on_eof)
                    loop.remove_reader(fd)
                loop.remove_writer(fd)
                if reset and not isinstance(sock, ssl.SSLSocket):
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        self.outbound.pending = self.inbound.pending = None
        self.on_close(self)


def _describe(err: BaseException) -> str:
    """A short reason for a log line; never raises, whatever built ``err``.

    ``ssl.SSLError`` has ``reason`` only when ``_ssl`` raised it: one constructed in Python (as closenotify did)
    lacks the attribute, and reading it raised AttributeError in the middle of a close.
    """
    try:
        reason = getattr(err, "reason", None) if isinstance(err, ssl.SSLError) else None
        if reason:
            return str(reason)
        strerror = err.strerror if isinstance(err, OSError) else None
        if strerror:
            return str(strerror).lower()
        return str(err) or type(err).__name__
    except Exception:  # a broken __str__: the type still says what happened
        return type(err).__name__


def release_sockets(loop: asyncio.AbstractEventLoop, socks: Iterable[socket.socket | None]) -> None:
    """Unregister and close ``socks`` whatever state they are in: the last resort when an abort itself failed."""
    for sock in socks:
        if sock is None:
            continue
        with contextlib.suppress(Exception):
            fd = sock.fileno()
            if fd >= 0:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
            sock.close()
