"""``--allow-from`` and ``--deny-from``: `AddressRules`, checked at accept, before any TLS byte is read.

Rules arrive parsed (``tlsgate.settings.values.Network``: the settings converters refuse a bad CIDR, in one
wording for flags and files) and are laid out once into per-family tables keyed by prefix length, so a check is
a few dict probes on an integer (inet_pton, no `ipaddress` objects on the accept path) and allocates nothing for
an allowed source. IPv4-mapped IPv6 sources fold to IPv4, as the settings parser folds rules. A source that is
not an IP (a unix socket peer) fails closed when any rule is set.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tlsgate.policy.decision import Decision, listing
from tlsgate.settings.values import Network

_ANY_ADDRESS = Decision(True, "any-address", "no --allow-from or --deny-from rules")
_NOT_DENIED = Decision(True, "deny-from", "source not in deny-from")


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _parse_source(text: str) -> tuple[bool, int] | None:
    """(is IPv4, address as int) for an address string, IPv4-mapped IPv6 folded to IPv4; None if not an IP.

    inet_pton is a pure string-to-bytes conversion (no I/O) and ten times faster than ipaddress, which matters
    on the accept path.
    """
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text.partition("%")[0])
            if packed[:12] == _V4_MAPPED:
                return True, int.from_bytes(packed[12:])
            return False, int.from_bytes(packed)
        return True, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _NetworkTable:
    """Networks of one address family, grouped by prefix length: a lookup costs one dict probe per length.

    An address is in a network of prefix length p when its top p bits equal the network's, so shifting the
    address right by (bits - p) gives the key to look up; most rule sets have one to three distinct lengths.
    """

    by_shift: tuple[tuple[int, dict[int, str]], ...] = ()

    @classmethod
    def build(cls, networks: Iterable[Network]) -> _NetworkTable:
        groups: dict[int, dict[int, str]] = {}
        for net in networks:
            shift = net.max_prefixlen - net.prefixlen
            groups.setdefault(shift, {})[int(net.network_address) >> shift] = str(net)
        return cls(tuple(sorted(groups.items())))

    def find(self, value: int) -> str | None:
        """The most specific network holding value, as written in CIDR form, or None."""
        for shift, nets in self.by_shift:
            hit = nets.get(value >> shift)
            if hit is not None:
                return hit
        return None


class AddressRules:
    """``--allow-from`` and ``--deny-from``: which source networks may open a connection. Deny wins.

    Checked at accept, before the TLS handshake, so a refused source costs no crypto. With only deny rules,
    every other source is allowed; with allow rules, only sources in them (and not denied) are.
    """

    __slots__ = ("_allow", "_allow_decisions", "_allow_hint", "_deny", "active", "allow_from", "deny_from")

    def __init__(
        self,
        allow_from: Sequence[Network] = (),
        deny_from: Sequence[Network] = (),
    ) -> None:
        """Networks as ``settings.values.parse_network`` makes them (host bits clear, IPv4-mapped folded)."""
        self.allow_from: tuple[str, ...] = tuple(str(net) for net in allow_from)
        self.deny_from: tuple[str, ...] = tuple(str(net) for net in deny_from)
        self.active: bool = bool(allow_from or deny_from)
        self._deny = (
            _NetworkTable.build(n for n in deny_from if n.version == 4),
            _NetworkTable.build(n for n in deny_from if n.version == 6),
        )
        self._allow = (
            _NetworkTable.build(n for n in allow_from if n.version == 4),
            _NetworkTable.build(n for n in allow_from if n.version == 6),
        )
        # One shared Decision per allow network: an accepted connection allocates nothing here.
        self._allow_decisions = {
            cidr: Decision(True, "allow-from", f"source in allow-from {cidr}") for cidr in self.allow_from
        }
        self._allow_hint = listing(self.allow_from)

    def check(self, ip: str) -> Decision:
        if not self.active:
            return _ANY_ADDRESS
        source = _parse_source(ip)
        if source is None:
            # Fail closed: with address rules set, a source we cannot read (a unix socket peer) is not in them.
            return Decision(False, "address", f"source {ip!r} is not an IP address")
        family = 0 if source[0] else 1
        denied = self._deny[family].find(source[1])
        if denied is not None:
            return Decision(False, "deny-from", f"source {ip} in deny-from {denied}")
        if not self.allow_from:
            return _NOT_DENIED
        allowed = self._allow[family].find(source[1])
        if allowed is None:
            return Decision(False, "allow-from", f"source {ip} not in allow-from ({self._allow_hint})")
        return self._allow_decisions[allowed]

    def summary(self) -> str:
        parts = []
        if self.allow_from:
            parts.append("allow-from " + listing(self.allow_from))
        if self.deny_from:
            parts.append("deny-from " + listing(self.deny_from))
        return "; ".join(parts) or "any source address"

    def __repr__(self) -> str:
        return f"AddressRules(allow_from={self.allow_from!r}, deny_from={self.deny_from!r})"
