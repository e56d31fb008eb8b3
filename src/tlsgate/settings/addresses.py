"""Listen and target addresses: ``HOST:PORT``, ``[v6]:PORT``, ``unix:PATH`` and ``systemd:NAME``, parsed once.

``systemd:NAME`` (ghostunnel's form) names a listening socket that systemd bound and passed to us (socket
activation, see ``tlsgate.process.systemd``); it is a listen address only, never a target. ``launchd:NAME`` is
ghostunnel's macOS counterpart; tlsgate refuses it with a line that says so.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass

from tlsgate.errors import ConfigError, shown


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint (``host``, ``port``), a unix socket (``path``) or a systemd socket (``systemd``, its name).

    Exactly one form is set.
    """

    host: str = ""
    port: int = 0
    path: str = ""
    systemd: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def is_activated(self) -> bool:
        """A socket systemd bound for us (``systemd:NAME``): we neither bind nor unlink it."""
        return bool(self.systemd)

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets and for hosts that cannot be reached from another machine.

        A ``systemd:`` socket counts as local, as in ghostunnel (``consideredSafe``): the .socket unit, written
        by the administrator, says where it listens, so a non-loopback ``ListenStream=`` is their explicit choice.
        """
        if self.is_unix or self.is_activated:
            return True
        if self.host.lower() in ("localhost", "localhost.", "ip6-localhost"):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.is_activated:
            return f"systemd:{self.systemd}"
        if self.is_unix:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str, *, name: str = "address", default_host: str = "", activated: bool = False) -> Address:
    """Parse ``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` (all interfaces or ``default_host``) or ``unix:PATH``.

    With ``activated`` (listen and status addresses) ``systemd:NAME`` is accepted too; a target never is, since
    systemd passes listening sockets, not connections to make.
    """
    value = text.strip()
    if value.startswith(("systemd:", "launchd:")):
        return _parse_activated(text, value, name, activated)
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path:
            raise ConfigError(f"{name}: {shown(text)} has an empty unix socket path (use unix:/path/to/socket)")
        return Address(path=path)
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{name}: {shown(text)} is not an address (use [IPv6]:PORT)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{name}: {shown(host)} in {shown(text)} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ConfigError(f"{name}: {shown(text)} is not an address (use HOST:PORT or unix:PATH)")
        if ":" in host:
            raise ConfigError(f"{name}: {shown(text)} looks like IPv6; write it in brackets: [{host}]:{port_text}")
        host = host or default_host
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(f"{name}: port {shown(port_text)} in {shown(text)} is not a number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: port {port} out of range (0-65535)")
    if host and not valid_host(host):
        raise ConfigError(f"{name}: {shown(host)} in {shown(text)} is not a valid host name or IP address")
    return Address(host=host, port=port)


# systemd's rule for FileDescriptorName= (fdname_is_valid): at most 255 printable ASCII characters, no colon.
_MAX_FDNAME = 255


def _parse_activated(text: str, value: str, name: str, activated: bool) -> Address:
    kind, _, socket_name = value.partition(":")
    if kind == "launchd":
        where = "this tlsgate" if sys.platform == "darwin" else "macOS only, and this is " + sys.platform
        raise ConfigError(
            f"{name}: {text!r}: launchd socket activation is not supported ({where}); "
            "use HOST:PORT, unix:PATH or, under systemd, systemd:NAME"
        )
    if not activated:
        raise ConfigError(f"{name}: {shown(text)}: systemd:NAME is a socket to listen on; it cannot be a target")
    if not socket_name:
        raise ConfigError(
            f"{name}: {text!r} has an empty socket name (use systemd:NAME, NAME as in FileDescriptorName=)"
        )
    if len(socket_name) > _MAX_FDNAME or ":" in socket_name or not all(" " <= c <= "~" for c in socket_name):
        raise ConfigError(
            f"{name}: {text!r}: {socket_name!r} cannot be a FileDescriptorName= "
            f"(at most {_MAX_FDNAME} printable ASCII characters, no colon)"
        )
    return Address(systemd=socket_name)


def valid_host(host: str) -> bool:
    """An IP address, or a DNS name of letters, digits, ``-`` and ``_`` in labels of 1-63 characters."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(
        0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum() and not label.startswith("-")
        for label in labels
    )
