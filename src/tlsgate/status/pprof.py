"""``/debug/pprof/`` (``--enable-pprof``): Python's counterparts of Go's pprof pages, as plain text.

``goroutine`` is every thread's and asyncio task's stack (code locations only, never a variable); ``profile``
is a cProfile window over the event loop's thread, one at a time.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import sys
import threading
import traceback

# profile?seconds=N: Go's default window, and a ceiling so one request cannot hold the profiler for long.
_PROFILE_DEFAULT = 30
_PROFILE_MAX = 60
# Lines of the profile report: the functions with the most cumulative time.
_PROFILE_LINES = 60
# A window is running: Python has one profiling hook per thread, and two windows would clobber each other.
_profiling = False

_PPROF_INDEX = b"""tlsgate /debug/pprof/ (--enable-pprof): Python's counterparts of Go's pprof pages, as plain text.

/debug/pprof/goroutine          the stack of every thread of this process, then of every asyncio task
/debug/pprof/profile?seconds=N  cProfile of the event loop's thread for N seconds (default 30, 1 to 60),
                                the functions sorted by cumulative time
"""


async def pprof_page(path: str, query: str) -> tuple[int, str, bytes]:
    """``/debug/pprof/``: the index, ``goroutine`` (stacks) or ``profile`` (a cProfile window)."""
    name = path.removeprefix("/debug/pprof").strip("/")
    if name == "":
        return 200, "text/plain; charset=utf-8", _PPROF_INDEX
    if name == "goroutine":
        return 200, "text/plain; charset=utf-8", stack_dump().encode("utf-8", "replace")
    if name == "profile":
        seconds = _profile_seconds(query)
        if seconds is None:
            return 400, "text/plain", f"seconds: give a whole number from 1 to {_PROFILE_MAX}\n".encode()
        report = await profile_window(seconds)
        if report is None:
            return 409, "text/plain", b"another profile is running; try again when it ends\n"
        return 200, "text/plain; charset=utf-8", report.encode("utf-8", "replace")
    return 404, "text/plain", b"not found; try /debug/pprof/\n"


def _profile_seconds(query: str) -> int | None:
    values = [v for k, _, v in (part.partition("=") for part in query.split("&")) if k == "seconds"]
    if not values:
        return _PROFILE_DEFAULT
    text = values[-1]
    if not text.isascii() or not text.isdigit() or len(text) > 3:
        return None
    seconds = int(text)
    return seconds if 1 <= seconds <= _PROFILE_MAX else None


def stack_dump() -> str:
    """Every thread's stack (innermost call last), then every asyncio task of the running loop with the
    coroutine frames it is suspended in: what Go's ``goroutine?debug=2`` shows, in Python's terms.

    Only code locations: file, line, function and source line; never a local variable, so nothing a
    connection carries (keys, passwords, payload) can appear.
    """
    out = io.StringIO()
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    frames = sys._current_frames()
    out.write(f"threads: {len(frames)}\n\n")
    for ident, frame in frames.items():
        out.write(f"thread {names.get(ident, '?')} ({ident}):\n")
        out.write("".join(traceback.format_stack(frame)))
        out.write("\n")
    tasks = sorted(asyncio.all_tasks(), key=lambda task: task.get_name())
    out.write(f"asyncio tasks: {len(tasks)}\n\n")
    for task in tasks:
        out.write(f"task {task.get_name()} {task.get_coro()!r}:\n")
        for frame in task.get_stack():
            out.write("".join(traceback.format_stack(frame, limit=1)))
        out.write("\n")
    return out.getvalue()


async def profile_window(seconds: float) -> str | None:
    """cProfile the event loop's thread, where every connection is served, for ``seconds``; the report, or
    None when a profiler is already running (one at a time: Python allows one per thread)."""
    global _profiling
    if _profiling:
        return None
    profiler = cProfile.Profile()
    try:
        profiler.enable()
    except ValueError:  # another tool (a debugger, coverage) holds the profiling hook
        return None
    _profiling = True
    try:
        await asyncio.sleep(seconds)
    finally:
        # Also when the status port closes mid-window: the profiler must not outlive the request.
        profiler.disable()
        _profiling = False
    out = io.StringIO()
    out.write(f"cProfile of the event loop thread for {seconds:g}s, by cumulative time\n")
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(_PROFILE_LINES)
    return out.getvalue()
