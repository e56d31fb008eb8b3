"""Rewrite the heads of HTTP/1.x requests so the target learns who the client is, and nobody else can say so.

Sans-IO, like h11 underneath it: bytes from the client go in, bytes for the target come out, and the target's
bytes are only watched. `HttpIdentity` is one connection; the relay (`engine.httprelay`) drives it.

Requests (`RequestRewriter`). Each request head is parsed by h11 (a fresh ``h11.Connection`` per request, so
pipelined and keep-alive requests are all the same case) and written out again: the request line and the
client's headers as they came (names in their own case; obs-folded values unfolded, as h11 reads them), less
every ``X-Forwarded-Client-Cert``, ``X-Forwarded-For``, ``X-Forwarded-Proto`` and ``Forwarded`` in any case
and with ``_`` for ``-`` (CGI-style servers map both to one variable), less those names in ``Connection`` (a
client could otherwise ask a proxy behind us to drop ours), then ours. A body sized by ``Content-Length``
passes through as raw bytes, counted, never parsed; a chunked body goes through h11 and is written out again
chunk by chunk (the data unchanged; chunk extensions dropped, trailers kept except the names above), so the
target frames every request exactly where h11 did and a client cannot smuggle a head past us.

Responses (`engine.httpwatch.ResponseWatcher`) are read only as far as framing needs, to learn two things: how
many requests are still unanswered (an error response may go to the client only when none is), and whether a
request that asked to switch protocols (``Upgrade``, ``CONNECT``) was answered by a switch (101, or 2xx to
CONNECT). Until that answer, the client's following bytes are held (the relay stops reading the client, so the
hold is bounded); after a switch every byte passes raw both ways, and otherwise parsing goes on. A target that
speaks something the watcher cannot follow leaves its responses unknown: then a later switch request is refused.

Refused (`HttpRefused`, with a status and a reason): anything that is not HTTP/1.0 or 1.1 (garbage, HTTP/0.9,
the HTTP/2 preface), a head over ``max_head`` bytes (431), and what h11 finds malformed (400, 501 for an
unknown transfer coding).
"""

from __future__ import annotations

import h11

from tlsgate.engine.httpwatch import ResponseWatcher

# A request head (request line and headers) may be this long; longer is refused with 431. nginx allows 4 x 8 KiB
# by default, Node 16 KiB; h11's own default is 16 KiB.
MAX_HEAD = 32 * 1024
# Output one pull() produces at most before handing back: many tiny pipelined requests each grow by the identity
# headers (and by a whole PEM with --target-http-cert), so one read could otherwise turn into megabytes.
OUTPUT_BUDGET = 64 * 1024

_STRIPPED = frozenset((b"x-forwarded-client-cert", b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"))

# Modes of the request side.
_HEAD, _BODY, _CHUNKED, _WAIT, _RAW = range(5)


class HttpRefused(Exception):
    """The client's bytes are not an HTTP/1.x request we can pass on: ``status`` and ``reason`` say why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> bytes:
        """The error response for the client: the reason as plain text, and the connection closes."""
        body = (self.reason + "\n").encode("ascii", "backslashreplace")
        phrase = _PHRASES.get(self.status, "Bad Request")
        return (
            f"HTTP/1.1 {self.status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii") + body


_PHRASES = {
    400: "Bad Request",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


def _ours(name: bytes) -> bool:
    """Is this header name (lower case) one only we may set, in any spelling a server may fold to it?"""
    return name.replace(b"_", b"-") in _STRIPPED


def _shown(data: bytes | bytearray) -> str:
    """A few bytes the client sent, safe for a log line and a response body."""
    return repr(bytes(data[:40]))


class RequestRewriter:
    """Client bytes in, target bytes out: every request head rewritten with ``added`` (see the module)."""

    __slots__ = (
        "_added",
        "_conn",
        "_fed",
        "_left",
        "_max_head",
        "_mode",
        "_more",
        "_spill",
        "_switch",
        "requests",
        "watcher",
    )

    def __init__(self, added: bytes, watcher: ResponseWatcher, *, max_head: int = MAX_HEAD) -> None:
        self._added = added
        self._max_head = max_head
        self.watcher = watcher
        self._fed = False  # h11 has bytes it has not been asked about (an empty one answers NEED_DATA: skip it)
        self._conn: h11.Connection | None = self._new_conn(b"")
        self._mode = _HEAD
        self._left = 0  # body bytes still to pass (_BODY)
        self._spill = b""  # input taken out of h11 and not passed on yet (_BODY, _WAIT)
        self._switch = False  # the request under way asked to switch protocols
        self._more = False  # pull() stopped at the output budget: more output without more input
        self.requests = 0

    @property
    def waiting(self) -> bool:
        """Held until the target answers a request that asked to switch protocols: read nothing from the client."""
        return self._mode == _WAIT

    @property
    def backlog(self) -> bool:
        """pull() has more output for the bytes already received."""
        return self._more

    @property
    def raw(self) -> bool:
        return self._mode == _RAW

    def receive(self, data: bytes | memoryview) -> bytes | memoryview:
        """Take bytes the client sent; return bytes for the target (then call pull() while `backlog`).

        A body sized by Content-Length that arrives in pieces goes straight back out, without a copy: the
        relay's common case for uploads. Raises `HttpRefused`.
        """
        mode = self._mode
        if mode == _RAW:
            return data
        if mode == _BODY and not self._spill and len(data) <= self._left:
            self._left -= len(data)
            if not self._left:
                self._end_message(b"")
            return data
        if mode in (_HEAD, _CHUNKED):
            assert self._conn is not None
            self._conn.receive_data(bytes(data))
            self._fed = True
        else:
            self._spill += data
        return self.pull()

    def pull(self) -> bytes:
        """Bytes for the target from what was received, at most about `OUTPUT_BUDGET`. Raises `HttpRefused`."""
        out: list[bytes] = []
        size = 0
        try:
            while size < OUTPUT_BUDGET:
                piece = self._step()
                if piece is None:
                    break
                out.append(piece)
                size += len(piece)
        except h11.RemoteProtocolError as err:
            status = err.error_status_hint
            if status == 431:
                raise HttpRefused(431, f"request head longer than {self._max_head} bytes") from None
            # h11 quotes the offending line: enough of it to recognise, never a whole head in a log line.
            detail = str(err)
            detail = detail if len(detail) <= 160 else detail[:157] + "..."
            raise HttpRefused(status, f"bad HTTP/1.x request: {detail}") from None
        self._more = size >= OUTPUT_BUDGET
        return out[0] if len(out) == 1 else b"".join(out)

    def resume(self) -> bool:
        """After the target answered a switch request (`watcher.switched` set): go raw or read the next head.

        Returns False when the answer cannot be known (the target's responses were lost track of), and the
        connection must end.
        """
        if self._mode != _WAIT:
            return True
        switched = self.watcher.switched
        if switched is None:
            return self.watcher.known
        rest, self._spill = self._spill, b""
        if switched:
            self._mode = _RAW
            self._spill = rest
            self._more = bool(rest)
        else:
            self._conn, self._mode = self._new_conn(rest), _HEAD
            self._more = bool(rest)
        return True

    # -- steps ----------------------------------------------------------------------------------------------

    def _new_conn(self, rest: bytes) -> h11.Connection:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        if rest:
            conn.receive_data(rest)
        self._fed = bool(rest)
        return conn

    def _step(self) -> bytes | None:
        """One piece of output, or None when more input (or the target's answer) is needed."""
        mode = self._mode
        if mode == _BODY:
            spill = self._spill
            if not spill:
                return None
            take = spill[: self._left]
            self._left -= len(take)
            self._spill = spill[len(take) :]
            if not self._left:
                rest, self._spill = self._spill, b""
                self._end_message(rest)
            return take
        if mode == _RAW:
            rest, self._spill = self._spill, b""
            return rest or None
        if mode == _WAIT:
            return None
        conn = self._conn
        assert conn is not None
        if not self._fed:
            return None
        event = conn.next_event()
        if event is h11.NEED_DATA:
            self._fed = False
            if mode == _HEAD:
                _check_request_line(conn)
            return None
        if isinstance(event, h11.Request):
            return self._head(event, conn)
        if isinstance(event, h11.Data):
            return b"%x\r\n%b\r\n" % (len(event.data), event.data)
        if isinstance(event, h11.EndOfMessage):
            trailers = b"".join(
                name + b": " + value + b"\r\n" for name, value in event.headers.raw_items() if not _ours(name.lower())
            )
            self._end_message(conn.trailing_data[0])
            return b"0\r\n" + trailers + b"\r\n"
        # PAUSED or ConnectionClosed cannot come (each request gets a fresh h11 connection, and no EOF is fed).
        raise h11.RemoteProtocolError(f"unexpected {event!r}")

    def _head(self, event: h11.Request, conn: h11.Connection) -> bytes:
        version = event.http_version
        if version not in (b"1.1", b"1.0"):
            raise HttpRefused(505, f"not HTTP/1.x: HTTP/{version.decode('ascii', 'replace')} request line")
        method = event.method
        lines = [method, b" ", event.target, b" HTTP/", version, b"\r\n"]
        chunked = False
        length = 0
        may_switch = method == b"CONNECT"
        for raw_name, value in event.headers.raw_items():
            name = raw_name.lower()
            if _ours(name):
                continue
            if name == b"transfer-encoding":
                chunked = True  # h11 allows one, and only "chunked"
            elif name == b"content-length":
                length = int(value)
                continue  # written below, and only when the body is not chunked (h11 reads chunked then)
            elif name == b"upgrade":
                may_switch = True
            elif name == b"connection":
                value = b", ".join(t for t in (t.strip() for t in value.split(b",")) if t and not _ours(t.lower()))
                if not value:
                    continue
            lines += (raw_name, b": ", value, b"\r\n")
        if length and not chunked:
            lines.append(b"Content-Length: %d\r\n" % length)
        head = b"".join(lines)
        if len(head) > self._max_head:
            # h11 limits only a head still incomplete; one that arrived whole in a single read is held to it here.
            raise HttpRefused(431, f"request head longer than {self._max_head} bytes")
        self.requests += 1
        self._switch = may_switch
        self.watcher.expect(method, may_switch)
        if chunked:
            self._mode = _CHUNKED
        else:
            self._conn, self._left, self._mode = None, length, _BODY
            rest = conn.trailing_data[0]
            if not length:
                self._end_message(rest)
            else:
                self._spill = rest
        return head + self._added + b"\r\n"

    def _end_message(self, rest: bytes) -> None:
        if self._switch:
            self._conn, self._mode, self._spill = None, _WAIT, rest
            self.resume()
        else:
            self._conn, self._mode = self._new_conn(rest), _HEAD


class HttpIdentity:
    """One client connection's HTTP/1.x identity rewriting: the requests one way, the responses watched."""

    __slots__ = ("requests", "responses")

    def __init__(self, added: bytes, *, max_head: int = MAX_HEAD) -> None:
        self.responses = ResponseWatcher()
        self.requests = RequestRewriter(added, self.responses, max_head=max_head)

    def may_answer(self) -> bool:
        """May an error response go to the client now? Only when it cannot land inside another response."""
        return self.responses.known and not self.responses.raw and self.responses.outstanding == 0


def _check_request_line(conn: h11.Connection) -> None:
    """Refuse a head whose first line is complete and is not an HTTP/1.x request line, without waiting for the
    blank line: an HTTP/0.9 client (``GET /``) sends none and would wait for its answer until a timeout.

    Only reached while a head is incomplete (a head usually arrives whole), so the copy h11 makes is rare.
    """
    buffered = conn.trailing_data[0]
    end = buffered.find(b"\n", 0, 8192)
    if end < 0:
        return
    line = buffered[:end].rstrip(b"\r")
    if not line:
        return  # h11 decides about empty lines
    version = line.rpartition(b" ")[2]
    if line.count(b" ") < 2 or not version.startswith(b"HTTP/"):
        raise HttpRefused(400, f"not HTTP/1.x: request line {_shown(line)} (HTTP/0.9 or another protocol)")


def refuse_alpn(protocol: str | None) -> HttpRefused | None:
    """A refusal for a TLS client that negotiated something other than HTTP/1.x with ALPN (h2, say)."""
    if protocol is None or protocol in ("http/1.1", "http/1.0"):
        return None
    return HttpRefused(505, f"not HTTP/1.x: the client negotiated ALPN {protocol!r}")


__all__ = ["MAX_HEAD", "OUTPUT_BUDGET", "HttpIdentity", "HttpRefused", "RequestRewriter", "ResponseWatcher"]
