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

Responses (`ResponseWatcher`) are parsed only as far as framing needs, to learn two things: how many requests
are still unanswered (an error response may go to the client only when none is), and whether a request that
asked to switch protocols (``Upgrade``, ``CONNECT``) was answered by a switch (101, or 2xx to CONNECT). Until
that answer, the client's following bytes are held (the relay stops reading the client, so the hold is
bounded); after a switch every byte passes raw both ways, and otherwise parsing goes on. A target that speaks
something h11 cannot follow leaves its responses unknown: then a later switch request is refused.

Refused (`HttpRefused`, with a status and a reason): anything that is not HTTP/1.0 or 1.1 (garbage, HTTP/0.9,
the HTTP/2 preface), a head over ``max_head`` bytes (431), and what h11 finds malformed (400, 501 for an
unknown transfer coding).
"""

from __future__ import annotations

import re
from collections import deque

import h11

# A request head (request line and headers) may be this long; longer is refused with 431. nginx allows 4 x 8 KiB
# by default, Node 16 KiB; h11's own default is 16 KiB.
MAX_HEAD = 32 * 1024
# Output one pull() produces at most before handing back: many tiny pipelined requests each grow by the identity
# headers (and by a whole PEM with --target-http-cert), so one read could otherwise turn into megabytes.
OUTPUT_BUDGET = 64 * 1024

_STRIPPED = frozenset((b"x-forwarded-client-cert", b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"))

# Modes, of the request side (_HEAD, _BODY, _CHUNKED, _WAIT, _RAW) and of the response side (_IDLE, _HEAD, _BODY,
# the _CHUNK ones, _TRAILERS, then those >= _RAW, where nothing is watched any more).
_HEAD, _BODY, _CHUNKED, _WAIT, _IDLE, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS = range(9)
_RAW, _UNTIL_CLOSE, _UNKNOWN = 10, 11, 12
# The longest response head or chunk line the watcher waits for before it stops following the target.
_MAX_WATCHED = 64 * 1024
_HEX = b"0123456789abcdefABCDEF"
# After the status line: header lines, each a token, a colon and a value without CR or LF.
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*)*")
# The framing headers of a lower-cased head, and their values without the surrounding white space.
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding):[ \t]*([^\r\n]*?)[ \t]*(?=\r\n|$)")


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


class ResponseWatcher:
    """Follows the target's responses just far enough to count them and to see protocol switches.

    A small reader of its own rather than h11: it only needs each response's status and framing, and h11 would
    need every request re-stated to it first, which cost more than the whole request rewrite (measured: 50 µs
    against 15 µs per response). It is strict: anything it does not expect from a server (a bare-LF head, a
    folded header, two different lengths, a response nobody asked for) makes it stop following, and then no
    switch is believed and no error response is written (the connection is cut instead). Being wrong the other
    way would be worse: a body read as a head could look like a 101 and let raw bytes through.
    """

    __slots__ = ("_buf", "_left", "_mode", "_queue", "current", "switched")

    def __init__(self) -> None:
        self._queue: deque[tuple[bytes, bool]] = deque()
        self._buf = bytearray()
        self._mode = _IDLE
        self._left = 0
        self.current: tuple[bytes, bool] | None = None
        # The answer to the last request that asked to switch: True (switched), False (not), None (not yet).
        self.switched: bool | None = None

    @property
    def outstanding(self) -> int:
        """Requests forwarded whose response has not ended yet."""
        return len(self._queue) + (self.current is not None)

    @property
    def known(self) -> bool:
        """False once the target said something we could not follow: its later responses are not counted."""
        return self._mode != _UNKNOWN

    @property
    def raw(self) -> bool:
        """Nothing more to watch: the protocol switched, or the rest of the connection is one response."""
        return self._mode >= _RAW

    def expect(self, method: bytes, may_switch: bool) -> None:
        """A request head went to the target: its response comes after those already expected."""
        if may_switch:
            self.switched = None
        self._queue.append((method, may_switch))
        if self._mode == _IDLE:
            self._end()

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes the target sent to the client (they pass unchanged; this only watches them)."""
        mode = self._mode
        if mode >= _RAW:
            return
        if mode in (_BODY, _CHUNK_DATA) and not self._buf and len(data) < self._left:
            self._left -= len(data)  # the common case inside a large body: count, nothing else
            return
        self._buf += data
        self._run()
        if len(self._buf) > _MAX_WATCHED:
            self._give_up()  # a head or a chunk-size line that long is not a server we can follow

    def _run(self) -> None:
        buf, pos = self._buf, 0
        while True:
            mode = self._mode
            if mode == _IDLE:
                if pos < len(buf):
                    self._give_up()  # a response nobody asked for (say a 408 before closing): we lose count
                break
            if mode in (_BODY, _CHUNK_DATA):
                take = min(self._left, len(buf) - pos)
                pos += take
                self._left -= take
                if self._left:
                    break
                if mode == _BODY:
                    self._end()
                else:
                    self._mode = _CHUNK_END
                continue
            if mode == _CHUNK_END:
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    self._give_up()
                    break
                pos += 2
                self._mode = _CHUNK_SIZE
                continue
            if mode >= _RAW:
                break
            end = buf.find(b"\r\n\r\n" if mode == _HEAD else b"\r\n", pos)
            if end < 0:
                if mode == _HEAD and buf.find(b"\n\n", pos) >= 0:
                    self._give_up()  # a head ended by bare LFs: we would wait for a CRLF that never comes
                break
            if mode == _HEAD:
                self._head(bytes(buf[pos:end]))
                pos = end + 4
            elif mode == _CHUNK_SIZE:
                size = buf[pos:end].split(b";", 1)[0].strip(b" \t")
                pos = end + 2
                if not size or len(size) > 16 or size.strip(_HEX):
                    self._give_up()
                    break
                self._left = int(size, 16)
                self._mode = _CHUNK_DATA if self._left else _TRAILERS
            else:  # _TRAILERS: lines up to an empty one
                if end == pos:
                    self._end()
                pos = end + 2
        del buf[:pos]

    def _head(self, head: bytes) -> None:
        assert self.current is not None
        method, may_switch = self.current
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if len(status_line) < 12 or status_line[:7] != b"HTTP/1." or status_line[8:9] != b" ":
            self._give_up()
            return
        code = status_line[9:12]
        if not code.isdigit() or status_line[12:13] not in (b"", b" "):
            self._give_up()
            return
        status = int(code)
        # Every header line must look like one; an obs-fold or a bare LF is a server we will not guess about.
        # One pass of the regular expression instead of a loop over the lines: most heads have ten of them.
        if _HEADER_LINES.fullmatch(head, len(status_line)) is None:
            self._give_up()
            return
        length: int | None = None
        coding: bytes | None = None
        for name, value in _FRAMING.findall(head.lower(), len(status_line)):
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    self._give_up()
                    return
                length = int(value)
            else:
                coding = value.rpartition(b",")[2].strip(b" \t")
        if status < 200:
            if status == 101:
                if may_switch and method != b"CONNECT":
                    self._switch()
                else:
                    self._give_up()  # a switch nobody asked for
            return  # 100, 103: the final response follows
        if method == b"CONNECT" and status < 300:
            if may_switch:
                self._switch()
            return
        if may_switch:
            self.switched = False
        if method == b"HEAD" or status in (204, 304):
            self._end()
        elif coding is not None:
            self._mode = _CHUNK_SIZE if coding == b"chunked" else _UNTIL_CLOSE
        elif length is not None:
            self._left, self._mode = length, _BODY
            if not length:
                self._end()
        else:
            self._mode = _UNTIL_CLOSE  # the body runs to the end of the connection (RFC 9112 6.3)

    def _end(self) -> None:
        """One response ended (or none was under way): start on the next one asked for, if any."""
        if self._queue:
            self.current, self._mode = self._queue.popleft(), _HEAD
        else:
            self.current, self._mode = None, _IDLE

    def _switch(self) -> None:
        self.switched = True
        self.current, self._mode = None, _RAW
        self._queue.clear()
        self._buf.clear()

    def _give_up(self) -> None:
        self.current, self._mode = None, _UNKNOWN
        self._queue.clear()
        self._buf.clear()


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
