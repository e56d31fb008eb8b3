"""The ports of a ``--workers`` pool: the parent reserves each TCP listen address before any worker starts.

The parent binds each address with SO_REUSEPORT and never listens on it (a socket that does not listen gets no
connections): port 0 becomes one real port that every worker then binds, a port in use is a one-line error
before anything starts, and the port stays ours while a worker restarts. `apply_listen_map` writes the real
ports into the tunnels' configs, at start and in every config a reload reads.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Sequence

from tlsgate.engine.sockets import bind_tcp
from tlsgate.errors import StartupError, shown
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import TunnelConfig


def reserve(address: Address) -> tuple[list[socket.socket], Address]:
    """Bind (never listen) every local address of ``address`` with SO_REUSEPORT; for port 0, the port we got."""
    try:
        infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise StartupError(f"--listen {address}: cannot resolve {shown(address.host)}: {err.strerror}") from None
    reserved: list[socket.socket] = []
    errors: list[str] = []
    seen: set[tuple[int, object]] = set()
    concrete = address
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr[0]) in seen:
            continue
        seen.add((family, sockaddr[0]))
        try:
            sock = bind_tcp(family, sockaddr, reuse_port=True)
        except OSError as err:
            errors.append(f"{Address(host=str(sockaddr[0]), port=int(sockaddr[1]))}: {err.strerror or err}")
            continue
        reserved.append(sock)
        if address.port == 0:
            # Workers bind exactly this address and port, as a single process listens on one address for port 0.
            host, port = sock.getsockname()[:2]
            concrete = Address(host=host, port=port)
            break
    if not reserved:
        raise StartupError(f"--listen {address}: cannot listen ({'; '.join(errors)})")
    return reserved, concrete


def apply_listen_map(configs: Sequence[TunnelConfig], listen_map: dict[Address, Address]) -> list[TunnelConfig]:
    """``configs`` with every port-0 listen address the parent reserved replaced by the real one."""
    return [
        dataclasses.replace(cfg, listen=listen_map[cfg.listen]) if cfg.listen in listen_map else cfg for cfg in configs
    ]
