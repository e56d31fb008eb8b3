"""Who the peer must be: `IdentityRules`, the ``--allow-*`` (server mode) and ``--verify-*`` (client mode) flags.

`IdentityRules` takes the flags' values as the settings package parsed them (IP addresses, 32-byte key pins,
compiled `tlsgate.settings.patterns.UriPattern` s: ``settings.convert`` refuses a bad value, in one wording for
flags and files); `IdentityRules.check` takes a `PeerIdentity` and returns a `Decision`. The rules are OR'd:
CN, OU, DNS SAN, IP SAN, URI SAN (exact values are a set lookup, patterns a regex), key pin, and last the Rego policy
(`tlsgate.policy.rego`), the only rule that costs more than a set lookup. A refusal names the peer's values
for the kinds of rule that are set, so the log compares like with like.

``--allow-spki-pin``/``--verify-spki-pin`` (`tlsgate.settings.pins`) is the exception: a rule set with such pins
holds nothing else, and the pin alone decides (`IdentityRules.pinned`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tlsgate.errors import CertificateError
from tlsgate.policy.decision import Decision, listing, shorten
from tlsgate.policy.peer import PeerIdentity
from tlsgate.settings.patterns import UriPattern
from tlsgate.settings.pins import KeyPin, PinSet
from tlsgate.settings.values import IPAddress, SpkiPin

if TYPE_CHECKING:
    from tlsgate.policy.rego import RegoPolicy


class IdentityRules:
    """Who the peer must be: any of CN, OU, DNS SAN, URI SAN (with wildcards), key pin or Rego policy (OR).

    Server mode uses the ``--allow-*`` flags; client mode checks the server with the same rules under
    ``--verify-*`` (pass ``flag_prefix="verify"``), and the prefix shows up in rule ids and reasons. Like
    ghostunnel, an empty rule set refuses every client in server mode and leaves a server to the hostname check
    in client mode. Only the leaf certificate is looked at.

    The Rego policy (``--allow-policy``/``--verify-policy``, see `tlsgate.policy.rego`) is asked last, only when
    no other rule matched, because it is the only rule that costs more than a set lookup.
    """

    __slots__ = (
        "_cn",
        "_dns",
        "_ip",
        "_ou",
        "_pins",
        "_spki",
        "_uri_exact",
        "_uri_patterns",
        "active",
        "allow_all",
        "cn",
        "dns",
        "flag_prefix",
        "ip",
        "ou",
        "rego",
        "spki_sha256",
        "uri",
    )

    def __init__(
        self,
        *,
        allow_all: bool = False,
        cn: Sequence[str] = (),
        ou: Sequence[str] = (),
        dns: Sequence[str] = (),
        uri: Sequence[UriPattern] = (),
        spki_sha256: Sequence[SpkiPin] = (),
        flag_prefix: str = "allow",
        rego: RegoPolicy | None = None,
        ip: Sequence[IPAddress] = (),
        spki_pins: Sequence[KeyPin] = (),
    ) -> None:
        """The values as ``tlsgate.settings`` parses them (``TunnelConfig`` fields or ``server_access``); CN, OU
        and DNS rules are plain non-empty strings. For display, ``uri`` keeps the patterns' text, ``ip`` the
        addresses' canonical form and ``spki_sha256`` the pins in lowercase hex (as `PeerIdentity` has them)."""
        self.flag_prefix = flag_prefix
        self.allow_all = allow_all
        self.cn, self.ou, self.dns = tuple(cn), tuple(ou), tuple(dns)
        self.uri = tuple(pattern.text for pattern in uri)
        self.spki_sha256 = tuple(pin.hex() for pin in spki_sha256)
        self.rego = rego
        self.ip = tuple(str(address) for address in ip)
        self._pins = PinSet(tuple(spki_pins))
        self.active = bool(allow_all or cn or ou or dns or uri or spki_sha256 or rego or ip or spki_pins)
        self._cn, self._ou = frozenset(cn), frozenset(ou)
        self._dns = frozenset(name.lower().rstrip(".") for name in dns)
        # Compared as addresses, so ::1 and 0:0:0:0:0:0:0:1 (or an IPv4 SAN in either spelling) are one value.
        self._ip = frozenset(ip)
        self._spki = frozenset(self.spki_sha256)
        patterns = tuple(uri)
        self._uri_patterns = tuple(p for p in patterns if "*" in p.text)
        # Most URI rules name one SPIFFE ID: a set lookup (with and without the trailing slash) spares the regex.
        exact = [p.text for p in patterns if "*" not in p.text]
        self._uri_exact = frozenset(exact) | frozenset(t[:-1] if t.endswith("/") else t + "/" for t in exact)

    @property
    def pinned(self) -> bool:
        """``--allow-spki-pin``/``--verify-spki-pin``: the key pin alone authenticates the peer (no chain, no dates,
        no hostname, no CRL), and no other identity rule is set beside it (ghostunnel's rule)."""
        return bool(self._pins)

    @property
    def pins(self) -> PinSet:
        return self._pins

    def check(self, peer: PeerIdentity, der: bytes | None = None) -> Decision:
        """Does ``peer`` match a rule? ``der`` is its certificate, which only the Rego policy needs."""
        prefix = self.flag_prefix
        if self._pins:
            return self._check_pin(peer)
        if self.allow_all:
            return Decision(True, f"{prefix}-all", f"{peer.describe()} allowed by {prefix}-all")
        if not self.active:
            if prefix == "allow":
                return Decision(False, "identity", f"{peer.describe()} not allowed (no --allow-* rule is set)")
            return Decision(True, f"no-{prefix}-rules", f"no --{prefix}-* rule: the hostname check decides")
        if peer.common_name in self._cn:
            return Decision(True, f"{prefix}-cn", f"CN={peer.common_name} matched {prefix}-cn")
        for unit in peer.organizational_units:
            if unit in self._ou:
                return Decision(True, f"{prefix}-ou", f"OU={unit} matched {prefix}-ou")
        if self._dns:
            for dns_name in peer.dns_names:
                if dns_name.lower().rstrip(".") in self._dns:
                    return Decision(True, f"{prefix}-dns", f"DNS SAN {dns_name} matched {prefix}-dns")
        if self._ip:
            for address in peer.ip_addresses:
                if ipaddress.ip_address(address) in self._ip:
                    return Decision(True, f"{prefix}-ip", f"IP SAN {address} matched {prefix}-ip")
        for uri in peer.uris:
            if uri in self._uri_exact:
                return Decision(True, f"{prefix}-uri", f"URI SAN {uri} matched {prefix}-uri")
            for pattern in self._uri_patterns:
                if pattern.matches(uri):
                    return Decision(True, f"{prefix}-uri", f"URI SAN {uri} matched {prefix}-uri {pattern.text}")
        if peer.spki_sha256 in self._spki:
            return Decision(
                True, f"{prefix}-spki-sha256", f"SPKI sha256 {peer.spki_sha256[:16]}… matched {prefix}-spki-sha256"
            )
        if self.rego is not None:
            allowed, why = self.rego.check(der) if der else (False, "no certificate to give the policy")
            if allowed:
                return Decision(True, f"{prefix}-policy", f"{peer.describe()} allowed: {why}")
            if not self._has_value_rules():
                return Decision(False, f"{prefix}-policy", f"{peer.describe()} not allowed: {why}")
            return Decision(False, "identity", f"{self._refusal(peer)}; {prefix}-policy: {why}")
        return Decision(False, "identity", self._refusal(peer))

    def _check_pin(self, peer: PeerIdentity) -> Decision:
        prefix = self.flag_prefix
        pin = self._pins.match(peer.spki_der)
        if pin is not None:
            return Decision(
                True, f"{prefix}-spki-pin", f"{peer.describe()}: key {pin.short()} matched {prefix}-spki-pin"
            )
        key = KeyPin.of(peer.spki_der).short() if peer.spki_der else "unknown"
        return Decision(
            False,
            "spki-pin",
            f"{peer.describe()}: key {key} matches no --{prefix}-spki-pin (pinned: {self._pins.describe()})",
        )

    def _has_value_rules(self) -> bool:
        return bool(self.cn or self.ou or self.dns or self.uri or self.spki_sha256 or self.ip)

    def check_certificate(self, der: bytes | None) -> Decision:
        """Client mode, after the handshake with the target: its DER certificate against the ``--verify-*`` rules.

        Never raises, for the same reason as `Policy.check_peer`: a certificate we cannot read is a refusal.
        """
        if not der:
            return Decision(False, "no-server-cert", "target sent no certificate")
        try:
            return self.check(PeerIdentity.from_der(der), der)
        except CertificateError as err:
            return Decision(False, "bad-cert", f"server {err}")
        except Exception as err:
            return Decision(False, "policy-error", f"internal error checking the certificate: {err!r}"[:200])

    def _refusal(self, peer: PeerIdentity) -> str:
        """Name the peer's values for the kinds of rule that are set, so the reason compares like with like."""
        present, missing = [], []
        for rules, label, values in (
            (self.cn, "CN=", () if peer.common_name is None else (peer.common_name,)),
            (self.ou, "OU=", peer.organizational_units),
            (self.dns, "DNS SAN ", peer.dns_names),
            (self.ip, "IP SAN ", peer.ip_addresses),
            (self.uri, "URI SAN ", peer.uris),
        ):
            if rules:
                if values:
                    present.append(label + shorten(",".join(values), 80))
                else:
                    missing.append(label.rstrip("= "))
        if self.spki_sha256:
            present.append(f"SPKI sha256 {peer.spki_sha256[:16]}…")
        if present:
            who = ", ".join(present)
            note = f"no {' or '.join(missing)}; " if missing else ""
        else:
            who, note = f"certificate with no {' or '.join(missing)}", ""
        return f"{who} not allowed ({note}allowed: {self.summary()})"

    def summary(self) -> str:
        """The rules in one line, for reasons and start-up logs: ``CN alice, carol; OU eng``."""
        if self.allow_all:
            return f"{self.flag_prefix}-all"
        if self._pins:
            return f"SPKI pin {self._pins.describe()} (the pin alone)"
        parts = []
        for label, values in (("CN", self.cn), ("OU", self.ou), ("DNS", self.dns), ("IP", self.ip), ("URI", self.uri)):
            if values:
                parts.append(f"{label} {listing(values)}")
        if self.spki_sha256:
            parts.append("SPKI sha256 " + listing([h[:16] + "…" for h in self.spki_sha256]))
        if self.rego is not None:
            parts.append(f"policy {self.rego.query}")
        return "; ".join(parts) or "nothing"

    def __repr__(self) -> str:
        return f"IdentityRules({self.flag_prefix}: {self.summary()})"
