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
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

from tlsgate import logs
from tlsgate.errors import StartupError, shown

# The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# More would be a corrupt variable, not a unit: systemd itself caps a service's stored descriptors far lower.
_MAX_FDS = 4096


# -- socket activation -----------------------------------------------------------------------------------------


@dataclass
class Activation:
    """The sockets systemd passed, by name, as read from the environment (no descriptor is touched here)."""

    # FileDescriptorName -> the descriptors under that name, in order.
    fds: dict[str, list[int]] = field(default_factory=dict)
    # Why the passed sockets cannot be used (LISTEN_PID is another process, a malformed variable); "" if none.
    problem: str = ""
    passed: bool = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str], pid: int) -> Activation:
        """Parse ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` as ``sd_listen_fds_with_names`` does."""
        count_text = env.get("LISTEN_FDS", "")
        if not count_text:
            return cls()
        pid_text = env.get("LISTEN_PID", "")
        if not (pid_text.isascii() and pid_text.isdigit()):
            return cls(passed=True, problem=f"LISTEN_PID is {pid_text!r}, not a process id")
        if int(pid_text) != pid:
            return cls(
                passed=True,
                problem=f"the sockets were passed to process {pid_text} (LISTEN_PID), not to this one ({pid})",
            )
        if not (count_text.isascii() and count_text.isdigit()) or int(count_text) > _MAX_FDS:
            return cls(passed=True, problem=f"LISTEN_FDS is {count_text!r}, not a number of sockets")
        count = int(count_text)
        names_text = env.get("LISTEN_FDNAMES")
        names = names_text.split(":") if names_text is not None else []
        if names_text is not None and len(names) != count:
            return cls(passed=True, problem=f"LISTEN_FDNAMES has {len(names)} names for {count} sockets (LISTEN_FDS)")
        fds: dict[str, list[int]] = {}
        for index in range(count):
            fd = LISTEN_FDS_START + index
            name = names[index] if names else f"LISTEN_FD_{fd}"
            fds.setdefault(name, []).append(fd)
        return cls(fds=fds, passed=True)

    def describe_names(self) -> str:
        return ", ".join(sorted(self.fds)) or "none"


@dataclass
class _Registry:
    activation: Activation | None = None
    # The sockets handed out so far, by name: each is one listener's, and a second taker is refused.
    taken: dict[str, socket.socket] = field(default_factory=dict)


_REGISTRY = _Registry()


def consume_environment(env: MutableMapping[str, str] | None = None, pid: int | None = None) -> None:
    """Read (once per process) and remove systemd's variables, so that no child process misreads them.

    The CLI entry points call this before anything else starts; a later call changes nothing.
    """
    environ = os.environ if env is None else env
    me = os.getpid() if pid is None else pid
    if _REGISTRY.activation is None:
        activation = Activation.from_environment(environ, me)
        for fds in activation.fds.values():
            for fd in fds:
                # Not inherited by workers or any other child: a listening socket only the parent hands on.
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
        _REGISTRY.activation = activation
    if not _NOTIFIER.consumed:
        _NOTIFIER.configure(environ, me)
    for name in (*_LISTEN_VARS, *_NOTIFY_VARS):
        environ.pop(name, None)


def activated_listener(name: str, flag: str = "--listen") -> socket.socket:
    """The listening socket systemd passed as ``name`` (non-blocking); StartupError says why there is none."""
    consume_environment()
    activation = _REGISTRY.activation or Activation()
    where = f"{flag} systemd:{name}"
    if activation.problem:
        raise StartupError(f"{where}: {activation.problem}")
    if not activation.passed:
        raise StartupError(
            f"{where}: systemd passed no sockets (LISTEN_FDS is not set); start tlsgate from a .socket unit "
            f"with FileDescriptorName={name}"
        )
    fds = activation.fds.get(name)
    if not fds:
        raise StartupError(
            f"{where}: systemd passed no socket named {name!r} (names passed: {activation.describe_names()}); "
            f"set FileDescriptorName={name} in the .socket unit"
        )
    if len(fds) != 1:
        # As ghostunnel: one name, one socket; several ListenStream= need a FileDescriptorName= (and a tunnel) each.
        raise StartupError(f"{where}: systemd passed {len(fds)} sockets named {shown(name)}; expected exactly one")
    held = _REGISTRY.taken.get(name)
    if held is not None:
        if held.fileno() >= 0:
            raise StartupError(f"{where}: the socket is already used by another listener")
        raise StartupError(f"{where}: the socket was closed when its tunnel stopped; restart tlsgate to use it again")
    sock = _listening_socket(fds[0], where)
    _REGISTRY.taken[name] = sock
    return sock


def _listening_socket(fd: int, where: str) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise StartupError(f"{where}: descriptor {fd} is not open") from None
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{where}: descriptor {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            raise StartupError(f"{where}: descriptor {fd} is a {sock.family.name} socket, not TCP or unix")
        if sock.type != socket.SOCK_STREAM:
            raise StartupError(
                f"{where}: descriptor {fd} is a {sock.type.name} socket, not a stream socket (use ListenStream=)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise StartupError(f"{where}: descriptor {fd} is a socket that is not listening (Accept=no expected)")
        sock.setblocking(False)
    except BaseException:
        sock.detach()  # the descriptor stays as it came: refusing it is not ours to close it
        raise
    return sock


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
