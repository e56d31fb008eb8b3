"""The relay for ``--target-http-headers``: the plain relay, with each request head rewritten on its way.

A tunnel without the flag never builds one of these, so the plain relay's data path stays as it was. Here the
client-to-target direction (`_Requests`) hands what it reads to `httpid.RequestRewriter` and sends what comes
out; the target-to-client direction (`_Responses`) sends the target's bytes unchanged and shows them to
`httpid.ResponseWatcher` until there is nothing left to watch.

Back-pressure is the plain relay's: when the target cannot take everything, the rest is copied, reading from
the client stops and a writer waits on the target. What the rewriter may hold on top is bounded: at most one
read (64 KiB) of client bytes not yet rewritten, at most `httpid.OUTPUT_BUDGET` of output per step (the rest is
produced only once the target took the previous step's), and a head of at most `httpid.MAX_HEAD` bytes. While a
request that asked to switch protocols waits for its answer, the client is not read at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable

from tlsgate.engine.httpid import HttpIdentity, HttpRefused, refuse_alpn
from tlsgate.engine.relay import _BLOCKED, _ENDED, _MAX_READS, _MORE, _PAUSED, Direction, OnError, Relay, _describe
from tlsgate.engine.stats import Stats
from tlsgate.tls import closenotify

_LOST = "http: the target's responses could not be followed, so a protocol switch cannot be"


class _HttpDirection(Direction):
    """The plain relay's read loop, with what each HTTP direction does to the bytes read left to `take`."""

    __slots__ = ()

    def read(self) -> int:
        try:
            view, tls_read, size = self.view, self._tls_read, len(self.view)
            for _ in range(_MAX_READS):
                try:
                    n = tls_read(size, view) if tls_read is not None else self._recv_into(view)
                except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                    return _BLOCKED
                except ssl.SSLWantWriteError:
                    self._wait_writable_to_read()
                    return _PAUSED
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    n = 0
                except OSError as err:
                    self.relay.abort(f"{self.name} read: {_describe(err)}")
                    return _ENDED
                if n == 0:
                    self._on_eof()
                    return _ENDED
                self.nbytes += n
                status = self.take(view[:n])
                if status is not None:
                    return status
                if n < self._big:
                    return _BLOCKED
            return _MORE
        except Exception as err:
            self.relay.internal_error("read", err)
            return _ENDED

    def take(self, data: memoryview) -> int | None:
        """Pass on ``data``, just read; a read status (`_ENDED`, `_PAUSED`) when reading must stop, else None."""
        raise NotImplementedError


class _Requests(_HttpDirection):
    """Client to target: every request head rewritten (see `httpid.RequestRewriter`)."""

    __slots__ = ("http",)

    def __init__(self, relay: HttpRelay, src: socket.socket, dst: socket.socket, http: HttpIdentity) -> None:
        super().__init__(relay, src, dst, "client")
        self.http = http

    def take(self, data: memoryview) -> int | None:
        try:
            out = self.http.requests.receive(data)
        except HttpRefused as refusal:
            self.refuse(refusal)
            return _ENDED
        if out and not self._send(memoryview(out)):
            return _PAUSED
        return None if self._catch_up() else _PAUSED

    def _catch_up(self) -> bool:
        """Send the rewriter's backlog; False when reading the client must wait (target full, or held)."""
        requests = self.http.requests
        while requests.backlog:
            try:
                out = requests.pull()
            except HttpRefused as refusal:
                self.refuse(refusal)
                return False
            if out and not self._send(memoryview(out)):
                return False
        if requests.waiting:
            if not self.http.responses.known:
                self.relay.abort(_LOST)
            else:
                self.loop.remove_reader(self.src_fd)
            return False
        return True

    def flush(self) -> None:
        try:
            data = self.pending
            assert data is not None
            try:
                sent = self._write(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
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
            elif self._catch_up():
                self.loop.add_reader(self.src_fd, self.read)
            peer = self.peer
            if peer.read_wants_write and not self.relay.closed:
                peer.resume_read_after_write()
            if peer.owes_shutdown and not self.relay.closed:
                peer.owes_shutdown = False
                peer.shutdown_dst()
        except Exception as err:
            self.relay.internal_error("flush", err)

    def resume(self) -> None:
        """The target answered the request that asked to switch protocols: go on, raw or parsing."""
        requests = self.http.requests
        if not requests.waiting or self.relay.closed:
            return
        if not requests.resume():
            self.relay.abort(_LOST)
            return
        if requests.waiting or self.pending is not None or self.eof:
            return
        if self._catch_up():
            self.loop.add_reader(self.src_fd, self.read)

    def refuse(self, refusal: HttpRefused) -> None:
        """End the connection for a request we cannot pass on, answering the client when that is safe."""
        client = self.src
        if self.http.may_answer():
            # Best effort: a few hundred bytes into an idle connection's empty send buffer.
            with contextlib.suppress(OSError, ValueError):
                client.send(refusal.response())
                if isinstance(client, ssl.SSLSocket) and closenotify.available():
                    closenotify.send_close_notify(client)
        relay: HttpRelay = self.relay  # type: ignore[assignment]
        if relay.stats is not None:
            relay.stats.http_refused += 1
        relay.abort(f"http {refusal.status}: {refusal.reason}")


class _Responses(_HttpDirection):
    """Target to client: bytes unchanged, watched by `httpid.ResponseWatcher` while that matters."""

    __slots__ = ("http", "requests_direction")

    def __init__(self, relay: HttpRelay, src: socket.socket, dst: socket.socket, http: HttpIdentity) -> None:
        super().__init__(relay, src, dst, "target")
        self.http = http
        self.requests_direction: _Requests | None = None

    def take(self, data: memoryview) -> int | None:
        watcher = self.http.responses
        if not watcher.raw:
            watcher.receive(data)
        sent = self._send(data)
        requests = self.requests_direction
        if requests is not None and self.http.requests.waiting and not self.relay.closed:
            requests.resume()
            if self.relay.closed:  # the answer could not be told: resume() cut the connection
                return _ENDED
        return None if sent else _PAUSED


class HttpRelay(Relay):
    """A `Relay` whose client speaks HTTP/1.x: ``added`` (header lines, CRLF-ended) goes into every request."""

    __slots__ = ("http", "stats")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        target: socket.socket,
        view: memoryview,
        on_close: Callable[[Relay], None],
        started: float | None = None,
        *,
        added: bytes,
        peer: str = "",
        on_error: OnError | None = None,
        stats: Stats | None = None,
    ) -> None:
        super().__init__(loop, client, target, view, on_close, started, peer=peer, on_error=on_error)
        self.http = HttpIdentity(added)
        self.stats = stats  # the tunnel's, for http_refused
        requests = _Requests(self, client, target, self.http)
        responses = _Responses(self, target, client, self.http)
        responses.requests_direction = requests
        requests.peer, responses.peer = responses, requests
        self.outbound, self.inbound = requests, responses

    def start(self) -> None:
        client = self.client
        if isinstance(client, ssl.SSLSocket):
            try:
                refusal = refuse_alpn(client.selected_alpn_protocol())
            except Exception as err:
                self.internal_error("start", err)
                return
            if refusal is not None:
                if self.stats is not None:
                    self.stats.http_refused += 1
                self.abort(f"http {refusal.status}: {refusal.reason}")
                return
        super().start()
