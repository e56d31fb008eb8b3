"""The target's side of ``--target-http-headers``: its responses, watched (never changed) by `ResponseWatcher`.

Sans-IO. `engine.httpid` tells the watcher about each request it forwarded (`ResponseWatcher.expect`), the relay
shows it each read from the target (`ResponseWatcher.receive`), and it keeps two answers: how many requests are
still unanswered (`outstanding`), and whether the last request that asked to switch protocols was answered by a
switch (`switched`: a 101, or a 2xx to CONNECT).
"""

from __future__ import annotations

import re
from collections import deque

# Modes: _IDLE (nothing asked), _HEAD, _BODY, the _CHUNK ones, _TRAILERS, then those >= _RAW, where nothing is
# watched any more (switched, a body that runs to the end of the connection, or a target we lost track of).
_IDLE, _HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS = range(7)
_RAW, _UNTIL_CLOSE, _UNKNOWN = 10, 11, 12
# The longest response head or chunk line the watcher waits for before it stops following the target.
_MAX_WATCHED = 64 * 1024
_HEX = b"0123456789abcdefABCDEF"
# After the status line: header lines, each a token, a colon and a value without CR or LF.
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*)*")
# The framing headers of a lower-cased head, and their values without the surrounding white space.
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding):[ \t]*([^\r\n]*?)[ \t]*(?=\r\n|$)")


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
