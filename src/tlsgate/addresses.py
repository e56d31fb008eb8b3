"""Listen and target addresses: ``HOST:PORT``, ``[v6]:PORT`` and ``unix:PATH``, parsed once, validated once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tlsgate.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint (``host``, ``port``) or a unix socket (``path``); exactly one form is set."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def is_loopback(self) -> bool:
        """True for unix sockets and for hosts that cannot be reached from another machine."""
        if self.is_unix:
            return True
        if self.host.lower() in ("localhost", "localhost.", "ip6-localhost"):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str, *, name: str = "address", default_host: str = "") -> Address:
    """Parse ``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` (all interfaces or ``default_host``) or ``unix:PATH``."""
    value = text.strip()
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path:
            raise ConfigError(f"{name}: {text!r} has an empty unix socket path (use unix:/path/to/socket)")
        return Address(path=path)
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{name}: {text!r} is not an address (use [IPv6]:PORT)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{name}: {host!r} in {text!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ConfigError(f"{name}: {text!r} is not an address (use HOST:PORT or unix:PATH)")
        if ":" in host:
            raise ConfigError(f"{name}: {text!r} looks like IPv6; write it in brackets: [{host}]:{port_text}")
        host = host or default_host
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(f"{name}: port {port_text!r} in {text!r} is not a number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: port {port} out of range (0-65535)")
    if host and not _valid_host(host):
        raise ConfigError(f"{name}: {host!r} in {text!r} is not a valid host name or IP address")
    return Address(host=host, port=port)


def _valid_host(host: str) -> bool:
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
