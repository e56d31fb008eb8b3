"""Whether two listen addresses of one config file collide, told from the addresses alone (no name lookup).

`check_listen` is what ``settings.file`` calls for each tunnel's ``listen``: two tunnels on one port of one
interface would pass every other check and then fail to bind at start, so the file is refused up front with
both tunnels named. The same port on a wildcard (``:8443``, ``0.0.0.0``, ``[::]``) and on a specific address of
that family overlaps; port 0 never does (each tunnel gets a fresh port); unix sockets and systemd-activated
listeners collide only on the same path or name.
"""

from __future__ import annotations

import ipaddress

from tlsgate.errors import ConfigError
from tlsgate.settings.addresses import Address, parse_address

__all__ = ["check_listen"]


def check_listen(label: str, value: object, problems: list[str], listens: list[tuple[str, Address]]) -> None:
    """Add a problem when ``value`` overlaps a listen address in ``listens``, then add it there as ``label``'s.

    Two tunnels cannot listen on one address: the second would fail to bind only when the process starts.
    """
    if not isinstance(value, str):
        return
    try:
        address = parse_address(value, name="listen", activated=True)
    except ConfigError:
        return  # tunnel_config reports it
    for other_label, other in listens:
        if not _overlap(address, other):
            continue
        if address == other:
            problems.append(f"{label}: listen: {address} is already the listen address of {other_label}")
        else:
            problems.append(f"{label}: listen: {address} overlaps {other} of {other_label} (same port, same interface)")
        break
    listens.append((label, address))


def _overlap(a: Address, b: Address) -> bool:
    if a.is_unix or b.is_unix:
        return a.path == b.path
    if a.is_activated or b.is_activated:
        return a.systemd == b.systemd
    if a.port == 0 or a.port != b.port:
        return False  # port 0 is a fresh port for each tunnel
    return any(_same_interface(x, y) for x in _bound_hosts(a.host) for y in _bound_hosts(b.host))


def _bound_hosts(host: str) -> set[str]:
    """The local addresses a listen host binds, as far as can be told without resolving names."""
    if not host:
        return {"0.0.0.0", "::"}  # ":PORT" listens on every interface, both families
    lowered = host.lower().rstrip(".")
    if lowered == "localhost":
        return {"127.0.0.1", "::1"}
    try:
        return {str(ipaddress.ip_address(lowered))}
    except ValueError:
        return {lowered}


def _same_interface(x: str, y: str) -> bool:
    if x == y:
        return True
    try:
        ip_x, ip_y = ipaddress.ip_address(x), ipaddress.ip_address(y)
    except ValueError:
        return False
    # A wildcard address holds the port on every address of its family.
    return ip_x.version == ip_y.version and (ip_x.is_unspecified or ip_y.is_unspecified)
