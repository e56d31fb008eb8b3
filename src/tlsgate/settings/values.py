"""The parsed forms of the access-rule values, and their parsers: networks, IP addresses, key pins.

Each parser takes the flag's name (for the message) and the text as typed, and returns the value in the form
the policy package compares with, or raises ConfigError with one line naming the flag and the value. The
converters of ``settings.convert`` call them for the command line and a file alike, so a value is parsed (and
refused) once, in one wording; ``tlsgate.policy`` takes these types and never parses a setting again.

- `Network` (``--allow-from``, ``--deny-from``, ``--accept-proxy-from``): an ``ipaddress`` network, host bits
  refused, an IPv4-mapped IPv6 network folded to IPv4 (the accept path folds sources the same way).
- `IPAddress` (``--allow-ip``, ``--verify-ip``): one ``ipaddress`` address; an IP SAN holds one, not a network.
- `SpkiPin` (``--allow-spki-sha256``, ``--verify-spki-sha256``): plain ``bytes``, the 32-byte SHA-256 digest of
  the DER SubjectPublicKeyInfo, whatever spelling was typed (hex, colon hex, base64, ``sha256//``...).
- URI patterns are `tlsgate.settings.patterns.UriPattern`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Literal

from tlsgate.errors import ConfigError, shown

__all__ = [
    "UNIX_SOURCE",
    "IPAddress",
    "Network",
    "ProxySource",
    "SpkiPin",
    "parse_ip",
    "parse_network",
    "parse_spki_sha256",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SpkiPin = bytes
"""A key pin: the 32-byte SHA-256 digest of a certificate's DER SubjectPublicKeyInfo (``bytes``, no wrapper)."""

UNIX_SOURCE: Literal["unix"] = "unix"
"""The word ``--accept-proxy-from unix`` stands for: every peer of a unix-socket listener."""

ProxySource = Network | Literal["unix"]
"""One ``--accept-proxy-from`` entry: a network of TCP peers, or `UNIX_SOURCE`."""


_V4_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")
_NOT_A_NETWORK = "is not a network (use CIDR like 10.0.0.0/8)"


def parse_network(flag: str, text: str) -> Network:
    """A CIDR (a bare address is a single host); host bits set are refused with the network meant."""
    value = text.strip()
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(f"{flag}: {shown(text)} {_NOT_A_NETWORK}") from None
        if "host bits" in str(err):
            # 10.0.0.7/8 is most likely a typo for one of two rules; guessing either would widen or narrow it.
            raise ConfigError(f"{flag}: {shown(text)} has host bits set (did you mean {loose}?)") from None
        raise ConfigError(f"{flag}: {shown(text)} {_NOT_A_NETWORK}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_V4_MAPPED_NET):
        # Sources arrive folded to IPv4 (policy.networks), so a rule written in mapped form must fold too.
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def parse_ip(flag: str, text: str) -> IPAddress:
    """One IPv4 or IPv6 address, compared as an address (``::1`` and ``0:0::1`` are one value)."""
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(f"{flag}: {shown(text)} is not an IP address (an IP SAN is one address)") from None


_HEX = re.compile(r"[0-9a-fA-F]{64}")


def parse_spki_sha256(flag: str, text: str) -> SpkiPin:
    """A SHA-256 key pin as its 32 bytes: hex with or without colons, or (URL-safe, unpadded) base64, with or
    without curl's ``sha256//`` or a ``sha256:`` prefix."""
    value = text.strip()
    for prefix in ("sha256//", "sha256:"):
        if value.lower().startswith(prefix):
            value = value[len(prefix) :]
    hex_digits = value.replace(":", "")
    if _HEX.fullmatch(hex_digits):
        return bytes.fromhex(hex_digits)
    try:
        raw = base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return raw
    raise ConfigError(
        f"{flag}: {text!r} is not a SHA-256 hash (use 64 hex digits or 44 base64 characters, "
        "as `tlsgate certs show` prints)"
    )
