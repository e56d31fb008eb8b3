"""systemd integration, without python-systemd: socket activation, readiness notification and the watchdog.

Both protocols are a few environment variables and one socket; this module speaks them directly.

Socket activation (``--listen systemd:NAME``, ``--status systemd:NAME``). systemd binds the sockets of a
``.socket`` unit and starts us with them open as descriptors 3, 4, ... and three variables: ``LISTEN_PID`` (the
pid they are meant for: a variable inherited by some other process must not make it grab our descriptors),
``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES`` (their ``FileDescriptorName=``, colon-separated). A descriptor
without a name is called ``LISTEN_FD_<n>``, as go-systemd (and so ghostunnel) calls it. Each name must stand for
exactly one socket, and that socket must be a listening stream socket (TCP or unix): anything else is refused
at start-up with a line that names the problem. tlsgate never unlinks an activated unix socket's path: the
path, its owner and mode belong to the ``.socket`` unit.

Readiness (``Type=notify``). systemd passes ``NOTIFY_SOCKET``, a unix datagram socket (a path, or ``@name`` in
the abstract namespace); each notification is one datagram of ``KEY=VALUE`` lines: ``READY=1`` once every
listener (and the status port, and with ``--workers`` every worker) is up, ``RELOADING=1`` with
``MONOTONIC_USEC=`` when a reload starts and ``READY=1`` when it is done, ``STOPPING=1`` when a graceful stop
begins, and ``STATUS=`` lines that ``systemctl status`` shows. Without ``NOTIFY_SOCKET`` nothing is sent.

The watchdog. With ``WatchdogSec=`` systemd passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must be us)
and kills the service when ``WATCHDOG=1`` stops arriving for that long. We send it every half interval from a
timer of the event loop itself, so a loop that is stuck (a blocking call, a spinning callback) stops the pings
and systemd restarts us; a thread would go on pinging for a process that no longer serves anyone.

Every variable is removed from the environment as it is read, so a child (a ``--workers`` worker) can neither
take the sockets nor speak for the service: the parent owns both, as ``sd_listen_fds(1)`` and
``sd_notify(1, ...)`` arrange for C programs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence

from tlsgate import logs
from tlsgate.engine import activation
from tlsgate.engine.activation import Activation as Activation

_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def consume_environment(env: MutableMapping[str, str] | None = None, pid: int | None = None) -> None:
    """Read (once per process) and remove systemd's variables, so that no child process misreads them.

    The CLI entry points call this before anything else starts; a later call changes nothing.
    """
    environ = os.environ if env is None else env
    me = os.getpid() if pid is None else pid
    activation.consume_environment(environ, me)
    if not _NOTIFIER.consumed:
        _NOTIFIER.configure(environ, me)
    for name in _NOTIFY_VARS:
        environ.pop(name, None)


# -- notifications and the watchdog ----------------------------------------------------------------------------


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when the watchdog is not ours."""
    usec_text = env.get("WATCHDOG_USEC", "")
    if not (usec_text.isascii() and usec_text.isdigit()) or int(usec_text) == 0:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text and pid_text != str(pid):
        return None
    return int(usec_text) / 2 / 1_000_000


def notify_address(value: str) -> str | bytes | None:
    """The socket address of a ``NOTIFY_SOCKET`` value: a path, or ``@name`` in the abstract namespace."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:CID:PORT and relative paths: not for us


def one_line(text: str) -> str:
    """A notification field is one line: a newline would start a new (forged) assignment."""
    return " ".join(text.split())


class Notifier:
    """Sends notifications to systemd; with no ``NOTIFY_SOCKET`` every method does nothing."""

    def __init__(self) -> None:
        self.address: str | bytes | None = None
        self.consumed = False
        self.watchdog: float | None = None
        self.sent = 0
        self._sock: socket.socket | None = None
        self._failed = False
        self._stopping = False
        self._timer: asyncio.TimerHandle | None = None

    def configure(self, env: Mapping[str, str], pid: int) -> None:
        self.consumed = True
        value = env.get("NOTIFY_SOCKET", "")
        if value:
            self.address = notify_address(value)
            if self.address is None:
                logs.event("NOTIFY_SOCKET is not a unix socket path; not notifying systemd", logging.WARNING)
        self.watchdog = watchdog_interval(env, pid) if self.address is not None else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        """One datagram of ``KEY=VALUE`` lines. Never raises: a supervisor that went away must not stop us."""
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as err:
            if not self._failed:  # said once: a ping every few seconds must not fill the log
                self._failed = True
                logs.event("cannot notify systemd", logging.WARNING, error=err.strerror or str(err))
            return
        self.sent += 1

    def ready(self, status: str) -> None:
        if not self._stopping:  # a reload finishing during a stop must not tell systemd we are back
            self.send("READY=1", "STATUS=" + one_line(status))

    def reloading(self, status: str) -> None:
        if not self._stopping:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=" + one_line(status))

    def stopping(self, status: str) -> None:
        if not self._stopping:
            self._stopping = True
            self.send("STOPPING=1", "STATUS=" + one_line(status))

    def status(self, status: str) -> None:
        self.send("STATUS=" + one_line(status))

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping every half interval from ``loop`` until ``stop_watchdog``; pinging goes on through a drain."""
        if self.watchdog is None or self._timer is not None:
            return
        self.send("WATCHDOG=1")
        self._timer = loop.call_later(self.watchdog, self._ping, loop)

    def _ping(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.watchdog is not None
        self.send("WATCHDOG=1")
        self._timer = loop.call_later(self.watchdog, self._ping, loop)

    def stop_watchdog(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_NOTIFIER = Notifier()


def notifier() -> Notifier:
    """The process's notifier (configured by ``consume_environment``; silent until then)."""
    return _NOTIFIER


def describe(tunnels: Sequence[tuple[str, str, str]], workers: int = 1) -> str:
    """What ``systemctl status`` shows: ``server proxying systemd:web => 127.0.0.1:8080``, ghostunnel's words.

    ``tunnels`` holds (mode, listen, target) triples; several are listed after their count.
    """
    prefix = f"{workers} workers | " if workers > 1 else ""
    if len(tunnels) == 1:
        mode, listen, target = tunnels[0]
        return f"{prefix}{mode} proxying {listen} => {target}"
    return f"{prefix}{len(tunnels)} tunnels: " + ", ".join(f"{listen} => {target}" for _, listen, target in tunnels)
