"""Log lines for people (``event key=value ...``) or collectors (one JSON object per line).

Events are built as plain dicts and formatted only when the line is emitted, so a filtered-out event (``--quiet``)
costs a dict and a level check, nothing more. A broken log destination (full disk, closed pipe) must never stop
relaying: ``_SafeHandler`` drops the line and counts it instead of raising into the event loop. Nor may a stuck
one (a pipe whose reader stopped reading, a paused terminal): lines written to a real file descriptor go through
``_Writer``, whose thread is the only one that can block on it.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

LOGGER = logging.getLogger("tlsgate")

# ghostunnel's --quiet values, and what each silences.
QUIET_CHOICES = ("conns", "conn-errs", "handshake-errs", "all")


class _State:
    quiet: frozenset[str] = frozenset()
    dropped_lines = 0


STATE = _State()
FLUSH_INTERVAL = 0.2


_NEEDS_QUOTES = re.compile(r'[ "=\n]|^$').search


def _quote(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if _NEEDS_QUOTES(text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        second = int(record.created)
        if second != self._second:  # strftime per line is a measurable share of a short connection's cost
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        stamp = self._stamp
        line = f"{stamp} {record.levelname.lower():<5} {record.getMessage()}"
        if fields:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None and v != "")
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update({k: v for k, v in (getattr(record, "fields", None) or {}).items() if v is not None})
        return json.dumps(doc, ensure_ascii=False, default=str)


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
            self.pending.append(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or time.monotonic() - self.last_flush >= FLUSH_INTERVAL:
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


def flush_logs(wait: float = 0.0) -> None:
    """Hand buffered lines to their destination; with ``wait``, give them that long to be written."""
    for handler in LOGGER.handlers:
        handler.flush()
        writer = getattr(handler, "writer", None)
        if wait and writer is not None:
            writer.drain(wait)


def setup_logging(fmt: str = "text", quiet: Iterable[str] = (), stream: Any = None) -> None:
    flush_logs()
    handler = _SafeHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.propagate = False
    STATE.quiet = frozenset(quiet)
    LOGGER.setLevel(logging.WARNING if "all" in STATE.quiet else logging.INFO)
    # No line prints a thread or process name; LogRecord would look them up (and call getpid) for every line.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def event(name: str, level: int = logging.INFO, category: str = "", **fields: Any) -> None:
    """Log ``name`` with ``fields``; ``category`` ties it to a --quiet value (conns, conn-errs, handshake-errs)."""
    if category and category in STATE.quiet:
        return
    if LOGGER.isEnabledFor(level):
        # makeRecord + handle skips Logger.log's findCaller stack walk, which nothing here prints.
        record = LOGGER.makeRecord(LOGGER.name, level, "", 0, name, (), None, extra={"fields": fields})
        LOGGER.handle(record)


atexit.register(flush_logs, 1.0)
