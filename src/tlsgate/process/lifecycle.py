"""The life of a tlsgate process, written once for a single process (`Server`) and a ``--workers`` parent (`Pool`).

Both go through the same steps, and this module holds each step so the two cannot drift apart:

1. ``prepare_process``: before any event loop runs, take systemd's variables, refuse what this platform lacks,
   set up logging and read the ``TLSGATE_INTERNALS`` kill switch; bad input here is a one-line exit 2. Then,
   in the loop, ``watchdog`` feeds systemd's watchdog for as long as the process serves.
2. ``Lifecycle.install_signals``: SIGTERM/SIGINT call the owner's ``stop``, SIGHUP/SIGUSR1 its ``reload``. Where
   the loop cannot take signal handlers (Windows), a plain ``signal.signal`` handler hands over to the loop.
3. ``Lifecycle.flush_logs_periodically`` and ``Lifecycle.schedule_timed_reload``: the two timers of a running
   process (``--timed-reload`` takes the shortest interval of the tunnels, re-read after each reload).
4. ``Lifecycle.begin_stop``: the first stop signal drains, a second one cuts; the owner says what each means.
5. ``Lifecycle.close``: cancel the timers and give the signals back to whoever had them.

What differs stays with the owner: a single process drains its tunnels, a parent passes signals on to its
workers. The exit code a cut drain gives, `EXIT_CONNECTIONS_CUT`, and the choice of event loop live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tlsgate import logs
from tlsgate.errors import TlsgateError
from tlsgate.process import platforms, systemd
from tlsgate.settings.config import TunnelConfig
from tlsgate.tls import internals

if TYPE_CHECKING:
    from tlsgate.process.supervisor import ProcessOptions

# The process exit code when shutting down had to cut connections (--shutdown-timeout expired, or a second stop
# signal): ghostunnel's code for the same event. Bad input is 2 (cli_support.UserError), a clean stop 0.
EXIT_CONNECTIONS_CUT = 1

SignalHandler = Callable[[signal.Signals], object]


def prepare_process(configs: Sequence[TunnelConfig], options: ProcessOptions) -> None:
    """Everything a process does before its event loop starts; raises `TlsgateError` for bad input (exit 2)."""
    systemd.consume_environment()  # before any worker starts: they must not see LISTEN_* or NOTIFY_SOCKET
    platforms.check_startup(configs, options.workers, options.status, options.syslog)
    logs.setup_logging(options.log_format, options.quiet, syslog=options.syslog)
    platforms.warn_about_workers(options.workers)  # says nothing for a single process
    internals.report()  # a bad TLSGATE_INTERNALS stops here (exit 2), before anything listens


@contextlib.contextmanager
def watchdog(loop: asyncio.AbstractEventLoop) -> Iterator[systemd.Notifier]:
    """systemd's notifier, feeding ``WatchdogSec=`` from ``loop`` while the block runs (silent without systemd)."""
    notifier = systemd.notifier()
    notifier.start_watchdog(loop)
    try:
        yield notifier
    finally:
        notifier.stop_watchdog()


def tunnel_key(cfg: TunnelConfig) -> str:
    """The name a tunnel is filed under, in a process and across its workers: its name, or its listen address."""
    return cfg.name or str(cfg.listen)


class Lifecycle:
    """The signals, timers and stop state of one running process; its owner supplies what stop and reload do."""

    def __init__(self) -> None:
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # One pending timer per purpose (log flush, timed reload, ...); rescheduling replaces it.
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Signals handled with signal.signal because the loop cannot (see install_signals), and the handler each
        # had before, put back by close(): SIGINT's was Python's KeyboardInterrupt, not the default.
        self._plain_signals: dict[signal.Signals, Any] = {}

    def begin_stop(self) -> bool:
        """True on the first stop (drain gracefully); False on every later one (cut what is still open)."""
        if self.stopping:
            return False
        self.stopping = True
        return True

    # -- signals -------------------------------------------------------------------------------------------------

    def install_signals(self, loop: asyncio.AbstractEventLoop, stop: SignalHandler, reload: SignalHandler) -> None:
        """Route stop and reload signals to ``stop(sig)`` and ``reload(sig)`` in ``loop``.

        Outside the main thread (tests run servers in-process) this does nothing: signals are the caller's business.
        """
        self._loop = loop
        handlers = [
            *((sig, stop) for sig in platforms.signals(platforms.STOP_SIGNALS)),
            *((sig, reload) for sig in platforms.signals(platforms.RELOAD_SIGNALS)),
        ]
        try:
            for sig, handler in handlers:
                try:
                    loop.add_signal_handler(sig, handler, sig)
                except NotImplementedError:
                    # Windows' event loops have no add_signal_handler; a plain handler hands over to the loop.
                    previous = signal.signal(sig, functools.partial(_call_in_loop, loop, handler))
                    self._plain_signals[sig] = previous
        except (RuntimeError, ValueError):
            return
        if not platforms.signals(platforms.RELOAD_SIGNALS):
            logs.event(
                "no SIGHUP or SIGUSR1 on this platform: reload with --timed-reload (or a restart)", logging.WARNING
            )

    def remove_signals(self) -> None:
        if self._loop is None:
            return
        for sig in platforms.signals((*platforms.STOP_SIGNALS, *platforms.RELOAD_SIGNALS)):
            if sig in self._plain_signals:
                signal.signal(sig, self._plain_signals[sig])
                continue
            with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
                self._loop.remove_signal_handler(sig)
        self._plain_signals.clear()

    # -- timers --------------------------------------------------------------------------------------------------

    def flush_logs_periodically(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush the log now and every ``logs.FLUSH_INTERVAL`` until `close`."""
        logs.flush_logs()
        self.call_later("flush", loop, logs.FLUSH_INTERVAL, lambda: self.flush_logs_periodically(loop))

    def schedule_timed_reload(
        self,
        loop: asyncio.AbstractEventLoop,
        configs: Callable[[], Sequence[TunnelConfig]],
        reload: Callable[[], object],
    ) -> None:
        """``--timed-reload``: call ``reload`` after the shortest interval of ``configs()``, and again after each.

        ``configs`` is asked anew each time, since a reload may have changed the tunnels and their intervals.
        """
        intervals = [cfg.timed_reload for cfg in configs() if cfg.timed_reload > 0]
        if not intervals:
            return

        def fire() -> None:
            reload()
            self.schedule_timed_reload(loop, configs, reload)

        self.call_later("reload", loop, min(intervals), fire)

    def call_later(
        self, name: str, loop: asyncio.AbstractEventLoop, delay: float, callback: Callable[[], object]
    ) -> None:
        """A named one-shot timer that `close` cancels (rescheduling a name replaces its timer)."""

        def fire() -> None:
            self._timers.pop(name, None)
            callback()

        self.cancel(name)
        self._timers[name] = loop.call_later(delay, fire)

    def timers(self) -> list[str]:
        """The names of the timers still to fire (``flush``, ``reload``, ...)."""
        return sorted(self._timers)

    def cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """Cancel every timer and give the signals back: the process is about to return its exit code."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.remove_signals()


def choose_loop(kind: str = "auto") -> Callable[[Any], Any]:
    """``asyncio.run``, or uvloop's when it is installed and not turned off (``--loop``, ``TLSGATE_LOOP``)."""
    kind = os.environ.get("TLSGATE_LOOP", kind) if kind == "auto" else kind
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise TlsgateError("--loop uvloop: uvloop is not installed (pip install 'tlsgate[speed]')") from None
        else:
            return uvloop.run
    if sys.platform == "win32":
        return platforms.run_on_selector_loop
    return asyncio.run


def _call_in_loop(loop: asyncio.AbstractEventLoop, handler: SignalHandler, sig: int, _frame: object) -> None:
    """A ``signal.signal`` handler (it gets the signal and the frame) that runs ``handler(sig)`` in ``loop``."""
    loop.call_soon_threadsafe(handler, signal.Signals(sig))
