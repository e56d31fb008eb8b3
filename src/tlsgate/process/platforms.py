"""What tlsgate takes from the operating system beyond portable sockets, and what it does where that is missing.

Linux is the reference platform: everything works and is tested there. Elsewhere (docs/install.md says per
platform) the few OS-specific features either refuse at start-up with one line, or degrade as written here:

| feature | needs | where it is missing |
| --- | --- | --- |
| ``--workers N`` (N > 1) | SO_REUSEPORT | refused at start-up (``--workers 1`` works); a warning off Linux |
| ``unix:PATH`` addresses, ``--syslog`` | AF_UNIX | refused at start-up, naming the flag |
| reload on SIGHUP/SIGUSR1 | those signals | a warning at start-up; ``--timed-reload`` still reloads |
| graceful stop on SIGTERM/SIGINT | ``loop.add_signal_handler`` | ``signal.signal`` instead (Windows' loops lack it) |
| the relay engine | ``loop.add_reader``/``add_writer`` | Windows: the selector loop, not the default proactor |
| key never on disk (memfd) | ``os.memfd_create`` and /proc | a 0600 file in a private temp dir, removed at once |
| close_notify and ticket tricks | /proc/self/maps to find libssl | plain OpenSSL behaviour (see closenotify.py) |

The last two are guarded where they are used (contexts._pem_file, closenotify.loaded_library); this module holds
the start-up checks and the signal lists, so a missing attribute is a sentence, never an AttributeError.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from tlsgate import logs
from tlsgate.errors import StartupError
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import TunnelConfig

_T = TypeVar("_T")

STOP_SIGNALS = ("SIGTERM", "SIGINT")
RELOAD_SIGNALS = ("SIGHUP", "SIGUSR1")


def signals(names: Iterable[str]) -> tuple[signal.Signals, ...]:
    """The signals of ``names`` that this platform has (Windows has no SIGHUP or SIGUSR1)."""
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


def has_unix_sockets() -> bool:
    return hasattr(socket, "AF_UNIX")


def check_startup(
    configs: Sequence[TunnelConfig], workers: int, status: str | None = None, syslog: bool = False
) -> None:
    """Raise StartupError (one line, exit 2) for a feature asked for that this platform lacks.

    Called before logging is set up, since ``--syslog`` itself needs a unix socket.
    """
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise StartupError(
            f"--workers {workers}: needs SO_REUSEPORT, which this platform ({sys.platform}) lacks; use --workers 1"
        )
    if has_unix_sockets():
        return
    for cfg in configs:
        for flag, address in (("--listen", cfg.listen), ("--target", cfg.target)):
            if isinstance(address, Address) and address.is_unix:
                where = f"tunnel {cfg.name!r}: " if cfg.name else ""
                raise StartupError(f"{where}{flag} {address}: unix sockets are not available on {sys.platform}")
    if status and status.startswith("unix:"):
        raise StartupError(f"--status {status}: unix sockets are not available on {sys.platform}")
    if syslog:
        raise StartupError(f"--syslog: needs a unix socket to the syslog daemon, not available on {sys.platform}")


def warn_about_workers(workers: int) -> None:
    """Once logging is up: a warning where ``--workers`` starts but does not work as well as on Linux."""
    if workers > 1 and not sys.platform.startswith("linux"):
        # BSD and macOS accept SO_REUSEPORT but do not spread new connections over the sockets as Linux does.
        logs.event(
            "--workers: this platform's SO_REUSEPORT does not balance connections as Linux does; load may be uneven",
            logging.WARNING,
            platform=sys.platform,
        )


def run_on_selector_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` on a SelectorEventLoop: on Windows the default (proactor) loop has no ``add_reader``,
    which the relay engine is built on. Select() there caps a process at 512 sockets."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main)
