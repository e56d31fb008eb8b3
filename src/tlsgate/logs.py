"""Log lines for people (``event key=value ...``) or collectors (one JSON object per line).

Events are built as plain dicts and formatted only when the line is emitted, so a filtered-out event (``--quiet``)
costs a dict and a level check, nothing more. A broken log destination (full disk, closed pipe) must never stop
relaying: ``_SafeHandler`` drops the line and counts it instead of raising into the event loop. Nor may a stuck
one (a pipe whose reader stopped reading, a paused terminal): lines written to a real file descriptor go through
``_Writer``, whose thread is the only one that can block on it.

``--syslog`` sends the same lines to the local syslog daemon instead (ghostunnel's flag): one datagram per line,
``<PRI>Mmm dd hh:mm:ss tlsgate[PID]: LINE`` as the C library's ``syslog()`` writes it locally, facility daemon,
severity from the line's level. The socket is the first of ``/dev/log``, ``/var/run/syslog`` (macOS) and
``/var/run/log`` (FreeBSD) that accepts us; the environment variable ``TLSGATE_SYSLOG_SOCKET`` names another
(tests, chroots). The text lines drop their own time stamp there: syslog stamps each line itself.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

LOGGER = logging.getLogger("tlsgate")

# ghostunnel's --quiet values, and what each silences.
QUIET_CHOICES = ("conns", "conn-errs", "handshake-errs", "all")


class _State:
    def __init__(self) -> None:
        self.quiet: frozenset[str] = frozenset()
        self.dropped_lines = 0
        # Fields added to every line of this process (a worker's "worker=N").
        self.tags: dict[str, Any] = {}
        # The handler setup_logging() installed, while it is the logger's only one: event() then formats
        # straight into it. The per-connection line was a quarter of the interpreter's instructions for a short
        # connection (callgrind), the LogRecord machinery alone about 7%; anything else attached to the logger
        # (caplog, an embedding application's handler) still gets records.
        self.direct: _SafeHandler | None = None


STATE = _State()
FLUSH_INTERVAL = 0.2


_NEEDS_QUOTES = re.compile(r'[ "=]|^$').search


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON has no \U: a character beyond the BMP is written as its UTF-16 surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def escape_unprintable(text: str) -> str:
    """``text`` with every character Python does not call printable written as ``\\uXXXX``.

    That is controls (Cc: CR, ESC, DEL, C1), format characters (Cf: the bidi override U+202E and its kin,
    zero-width characters), line and paragraph separators (U+2028, U+2029), surrogates, private-use and
    unassigned code points, and every space but the ASCII one. A certificate's CN is chosen by whoever made the
    certificate: raw, U+202E would reverse what a person reads, CR or ESC would rewrite the terminal, U+2028
    would split the line for some viewers. ``\\uXXXX`` is JSON's own escape, so a JSON line stays valid JSON
    and a quoted text field reads back with ``json.loads``. ``str.isprintable`` keeps the common case one scan
    in C.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _quote(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if _NEEDS_QUOTES(text) or not text.isprintable():
        # json.dumps escapes quotes, backslashes and C0 controls; whatever else is unprintable, it leaves raw.
        return escape_unprintable(json.dumps(text, ensure_ascii=False))
    return text


class _FieldsFormatter(logging.Formatter):
    """Formats an event from its parts; ``format(record)`` is the same line for records from elsewhere."""

    def format(self, record: logging.LogRecord) -> str:
        return self.format_event(record.created, record.levelno, record.getMessage(), getattr(record, "fields", None))

    def format_event(self, created: float, level: int, name: str, fields: dict[str, Any] | None) -> str:
        raise NotImplementedError


class TextFormatter(_FieldsFormatter):
    _second = -1
    _stamp = ""

    def format_event(self, created: float, level: int, name: str, fields: dict[str, Any] | None) -> str:
        second = int(created)
        if second != self._second:  # strftime per line is a measurable share of a short connection's cost
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        line = f"{self._stamp} {_level_name(level):<5} {name}"
        if fields:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None and v != "")
        return line


class SyslogTextFormatter(_FieldsFormatter):
    """The text line without its time stamp: the syslog header carries the time."""

    def format_event(self, created: float, level: int, name: str, fields: dict[str, Any] | None) -> str:
        line = f"{_level_name(level):<5} {name}"
        if fields:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None and v != "")
        return line


class JsonFormatter(_FieldsFormatter):
    def format_event(self, created: float, level: int, name: str, fields: dict[str, Any] | None) -> str:
        millis = int((created - int(created)) * 1000)
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z",
            "level": _level_name(level),
            "event": name,
        }
        doc.update({k: v for k, v in (fields or {}).items() if v is not None})
        # json.dumps leaves DEL, C1 controls, bidi and format characters and U+2028 raw (ensure_ascii=False);
        # outside strings a JSON line is printable ASCII, so these occur only inside strings, where \uXXXX is
        # the same character.
        return escape_unprintable(json.dumps(doc, ensure_ascii=False, default=str))


_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}


def _level_name(level: int) -> str:
    return _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower()


class _SafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Buffers lines and writes them at most every ``FLUSH_INTERVAL`` seconds (warnings at once).

    A write and flush per connection line was a tenth of the CPU of a short connection; batching makes it a
    fraction of a microsecond. ``flush_logs()`` (a server timer, and exit) bounds how late a line can be.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.pending: list[str] = []
        self.last_flush = time.monotonic()
        self.writer = _Writer(stream) if _has_fileno(stream) else None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def emit_event(self, level: int, name: str, fields: dict[str, Any]) -> None:
        """``emit`` without a LogRecord: the same line, for ``event()`` when this is the only destination."""
        formatter: _FieldsFormatter = self.formatter  # type: ignore[assignment]
        try:
            line = formatter.format_event(time.time(), level, name, fields)
        except Exception:
            STATE.dropped_lines += 1
            return
        self._add(line, level)

    def _add(self, line: str, level: int) -> None:
        self.pending.append(line + "\n")
        if level >= logging.WARNING or time.monotonic() - self.last_flush >= FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        lines, self.pending = self.pending, []
        if self.writer is not None:
            self.writer.put("".join(lines), len(lines))
            return
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except Exception:
            STATE.dropped_lines += len(lines)

    def handleError(self, record: logging.LogRecord) -> None:
        STATE.dropped_lines += 1


class _Writer:
    """Writes batches of log lines to ``stream`` on its own thread.

    A destination that stops taking data blocks this thread only; the event loop goes on relaying. While it is
    blocked, batches queue up to ``_MAX_QUEUED``; past that they are dropped and counted, like failed writes.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.queue: queue.Queue[tuple[str, int]] = queue.Queue(maxsize=_MAX_QUEUED)
        threading.Thread(target=self._run, name="tlsgate-log-writer", daemon=True).start()

    def put(self, text: str, lines: int) -> None:
        try:
            self.queue.put_nowait((text, lines))
        except queue.Full:
            STATE.dropped_lines += lines

    def _run(self) -> None:
        while True:
            text, lines = self.queue.get()
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                STATE.dropped_lines += lines
            finally:
                self.queue.task_done()

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for what is queued to be written (at exit: never hang on a stuck pipe)."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)


_MAX_QUEUED = 1000  # batches, each at most FLUSH_INTERVAL's worth of lines


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


# -- syslog ----------------------------------------------------------------------------------------------------

SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog", "/var/run/log")
SYSLOG_SOCKET_ENV = "TLSGATE_SYSLOG_SOCKET"
_FACILITY_DAEMON = 3
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _severity(level: int) -> int:
    """syslog severities: 3 err, 4 warning, 6 info, 7 debug."""
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    return 6 if level >= logging.INFO else 7


def syslog_header(level: int, created: float, pid: int, tag: str = "tlsgate") -> str:
    """``<30>Nov  9 08:33:19 tlsgate[4242]: ``: the local (RFC 3164) form glibc and Go's log/syslog write."""
    t = time.localtime(created)
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return f"<{_FACILITY_DAEMON * 8 + _severity(level)}>{stamp} {tag}[{pid}]: "


class SyslogSocket:
    """A stream-like object over the local syslog socket: each line written becomes one message.

    A datagram socket takes one line per datagram; a stream socket (some daemons listen that way) takes lines
    ended by a newline. A send that fails (the daemon restarted) reconnects once; a second failure raises, and
    the handler counts the lines as dropped.
    """

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.paths = paths
        self.sock: socket.socket | None = None
        self.kind = socket.SOCK_DGRAM
        self.connect()

    @classmethod
    def open(cls) -> SyslogSocket:
        override = os.environ.get(SYSLOG_SOCKET_ENV, "")
        return cls((override,) if override else SYSLOG_SOCKETS)

    def connect(self) -> None:
        from tlsgate.errors import StartupError

        errors: list[str] = []
        for path in self.paths:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                sock = socket.socket(socket.AF_UNIX, kind)
                try:
                    sock.connect(path)
                except OSError as err:
                    sock.close()
                    if kind == socket.SOCK_STREAM or err.errno != errno.EPROTOTYPE:  # a stream socket: try that
                        errors.append(f"{path}: {err.strerror or err}")
                        break
                    continue
                self.sock, self.kind = sock, kind
                return
        raise StartupError(f"--syslog: no syslog socket accepts us ({'; '.join(errors)}); is a syslog daemon running?")

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line:
                self._send(line.encode("utf-8", "replace"))

    def _send(self, message: bytes) -> None:
        for attempt in (1, 2):
            try:
                if self.sock is None:
                    self.connect()
                assert self.sock is not None
                if self.kind == socket.SOCK_DGRAM:
                    self.sock.send(message)
                else:
                    self.sock.sendall(message + b"\n")
                return
            except Exception:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                if attempt == 2:
                    raise

    def flush(self) -> None:
        pass


class _SyslogHandler(_SafeHandler):
    """A _SafeHandler whose lines carry a syslog header, the priority taken from each line's own level."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.pid = os.getpid()  # once: a worker is a fresh interpreter and sets up its own handler

    def _add(self, line: str, level: int) -> None:
        # A line from outside event() could hold a newline; in syslog that would be a second, headerless message.
        super()._add(syslog_header(level, time.time(), self.pid) + line.replace("\n", " "), level)


def flush_logs(wait: float = 0.0) -> None:
    """Hand buffered lines to their destination; with ``wait``, give them that long to be written."""
    for handler in LOGGER.handlers:
        handler.flush()
        writer = getattr(handler, "writer", None)
        if wait and writer is not None:
            writer.drain(wait)


def setup_logging(fmt: str = "text", quiet: Iterable[str] = (), stream: Any = None, *, syslog: bool = False) -> None:
    """Log to ``stream`` (stderr), or with ``syslog`` to the local syslog socket (StartupError if there is none)."""
    flush_logs()
    handler: _SafeHandler
    if syslog:
        handler = _SyslogHandler(SyslogSocket.open())
        handler.setFormatter(JsonFormatter() if fmt == "json" else SyslogTextFormatter())
    else:
        handler = _SafeHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.propagate = False
    STATE.direct = handler
    STATE.quiet = frozenset(quiet)
    LOGGER.setLevel(logging.WARNING if "all" in STATE.quiet else logging.INFO)
    # No line prints a thread or process name; LogRecord would look them up (and call getpid) for every line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def event(name: str, level: int = logging.INFO, category: str = "", **fields: Any) -> None:
    """Log ``name`` with ``fields``; ``category`` ties it to a --quiet value (conns, conn-errs, handshake-errs)."""
    if category and category in STATE.quiet:
        return
    if LOGGER.isEnabledFor(level):
        if STATE.tags:
            fields.update({k: v for k, v in STATE.tags.items() if k not in fields})
        direct, handlers = STATE.direct, LOGGER.handlers
        if direct is not None and len(handlers) == 1 and handlers[0] is direct and not direct.filters:
            direct.emit_event(level, name, fields)
            return
        # makeRecord + handle skips Logger.log's findCaller stack walk, which nothing here prints.
        record = LOGGER.makeRecord(LOGGER.name, level, "", 0, name, (), None, extra={"fields": fields})
        LOGGER.handle(record)


atexit.register(flush_logs, 1.0)
