"""Binding listening sockets: the one place tlsgate binds a port or a unix path.

Tunnels, the ``--workers`` parent (which binds once with SO_REUSEPORT and hands the sockets to its children),
the status port and the dev front all bind through here, so IPv6-only v6 sockets, SO_REUSEADDR, stale unix
socket files and systemd socket activation are handled the same way everywhere.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from tlsgate.engine.activation import activated_listener
from tlsgate.errors import StartupError, shown
from tlsgate.settings.addresses import Address


def host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listeners(address: Address, reuse_port: bool = False, *, flag: str = "--listen") -> list[socket.socket]:
    """Listening sockets for ``address``: every local address a host name resolves to, a unix socket, or the one
    socket systemd passed under ``systemd:NAME`` (bound by systemd, so ``reuse_port`` does not apply). ``flag``
    names the setting in errors (``--listen``, ``--status``)."""
    if address.is_activated:
        return [activated_listener(address.systemd, flag)]
    if address.is_unix:
        return [bind_unix(address.path, flag)]
    host = address.host or None
    try:
        infos = socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise StartupError(f"{flag} {address}: cannot resolve {shown(address.host)}: {err.strerror}") from None
    seen: set[Any] = set()
    sockets: list[socket.socket] = []
    errors: list[str] = []
    for family, _, _, _, sockaddr in infos:
        key = (family, sockaddr[0])
        if key in seen:
            continue
        seen.add(key)
        try:
            sock = listen_tcp(family, sockaddr, reuse_port=reuse_port)
        except OSError as err:
            errors.append(f"{host_port(str(sockaddr[0]), int(sockaddr[1]))}: {err.strerror or err}")
            continue
        sockets.append(sock)
        if address.port == 0:
            break  # port 0 on several addresses would give several different ports
    if not sockets:
        raise StartupError(f"{flag} {address}: cannot listen ({'; '.join(errors)})")
    return sockets


def listen_tcp(family: int, sockaddr: Any, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking TCP socket listening on ``sockaddr``; closed again if binding or listening fails."""
    sock = bind_tcp(family, sockaddr, reuse_port=reuse_port)
    try:
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_tcp(family: int, sockaddr: Any, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``sockaddr`` (not yet listening); closed again if binding fails."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # A v6 socket must not also claim the v4 port: both families are bound separately when wanted.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


def remove_stale_socket(path: str, flag: str = "--listen") -> None:
    """A socket file left by a process that died is removed; a live one, or any other file, is an error.

    Only a refused connection proves the file stale: any other failure to probe it (no permission, a full
    backlog) may hide a live listener, and the file is then left alone and the error named. A path that cannot
    even be looked at (a parent that is a file, a symlink loop, no permission) is a one-line start-up error too.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise StartupError(f"{flag} unix:{path}: {err.strerror or err}") from None
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{flag} unix:{path}: exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        # Non-blocking: a blocking connect to a live listener whose backlog is full waits for as long as it stays
        # full, and start-up with it. EAGAIN is that listener.
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: nobody listens (or it just went away)
        except BlockingIOError:
            raise StartupError(f"{flag} unix:{path}: another process is listening there") from None
        except OSError as err:
            raise StartupError(f"{flag} unix:{path}: cannot tell whether it is in use: {err.strerror or err}") from None
        else:
            raise StartupError(f"{flag} unix:{path}: another process is listening there")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StartupError(f"{flag} unix:{path}: cannot remove the stale socket file: {err.strerror or err}") from None


def bind_unix(path: str, flag: str = "--listen") -> socket.socket:
    """A listening unix socket at ``path``; a stale socket file of a dead process is replaced, a live one refused."""
    remove_stale_socket(path, flag)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        sock.close()
        raise StartupError(f"{flag} unix:{path}: {err.strerror or err}") from None
    sock.setblocking(False)
    return sock
