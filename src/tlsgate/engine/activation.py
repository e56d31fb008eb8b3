"""systemd socket activation: the listening sockets a ``.socket`` unit passed us, by name.

``--listen systemd:NAME`` and ``--status systemd:NAME`` take their socket from here. systemd binds the sockets
and starts us with them open as descriptors 3, 4, ... and three variables: ``LISTEN_PID`` (the pid they are
meant for: a variable inherited by some other process must not make it grab our descriptors), ``LISTEN_FDS``
(how many) and ``LISTEN_FDNAMES`` (their ``FileDescriptorName=``, colon-separated). A descriptor without a name
is called ``LISTEN_FD_<n>``, as go-systemd (and so ghostunnel) calls it. Each name stands for exactly one
socket, and that socket must be a listening stream socket (TCP or unix); anything else is refused at start-up
with a line that names the problem. Readiness and the watchdog are ``tlsgate.process.systemd``'s.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

from tlsgate.errors import StartupError, shown

# The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
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


def consume_environment(environ: MutableMapping[str, str], pid: int) -> None:
    """Read (once per process) and remove systemd's ``LISTEN_*`` variables, so that no child misreads them."""
    if _REGISTRY.activation is None:
        activation = Activation.from_environment(environ, pid)
        for fds in activation.fds.values():
            for fd in fds:
                # Not inherited by workers or any other child: a listening socket only the parent hands on.
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
        _REGISTRY.activation = activation
    for name in LISTEN_VARS:
        environ.pop(name, None)


def activated_listener(name: str, flag: str = "--listen") -> socket.socket:
    """The listening socket systemd passed as ``name`` (non-blocking); StartupError says why there is none."""
    consume_environment(os.environ, os.getpid())
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
