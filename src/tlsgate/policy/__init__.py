"""Who may connect, and why not: address rules, identity rules and revocation, as plain values in and out.

This module is sans-IO. It never touches a socket: callers hand it a source address string or the DER bytes
of a peer certificate (and, for tests and ``policy check``, the time), and get back a `Decision` that
says whether the peer may go on, which rule decided (`Decision.rule`, a short id for logs and metrics) and
why (`Decision.reason`, a sentence for a person). Only loading CRL files reads the disk, once, at start-up or
reload.

A server checks in this order, stopping at the first refusal:

1. the source address (`Policy.check_address`), at accept, before any TLS byte is read;
2. the certificate chain, by OpenSSL during the handshake (`verify_client_chain` reproduces it for
   ``policy check``);
3. the peer certificate (`Policy.check_peer`): present and readable, within its validity period, not revoked
   by a CRL (nor any CA of its verified chain), and matching at least one identity rule.

Identity rules are OR'd with each other, like ghostunnel's ``--allow-*`` flags; the address rules and the
identity rules are AND'd: a client must pass both.
"""

from __future__ import annotations

import _ssl
import base64
import binascii
import functools
import hashlib
import ipaddress
import re
import socket
import ssl
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from tlsgate.errors import CertificateError, ConfigError, shown
from tlsgate.tls import internals

if TYPE_CHECKING:
    from tlsgate.policy.rego import RegoPolicy

__all__ = [
    "AddressRules",
    "CrlSource",
    "Decision",
    "IdentityRules",
    "PeerIdentity",
    "Policy",
    "RevocationList",
    "build_policy",
    "check_validity",
    "verified_chain",
    "verify_chain",
    "verify_client_chain",
]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check: may the peer go on, which rule decided, and a sentence saying why.

    ``rule`` is a short stable id ("deny-from", "allow-cn", "crl", "expired", ...) fit for a metric label;
    ``reason`` is for the person reading the log and names the value that matched or failed.
    """

    allowed: bool
    rule: str
    reason: str


# Shared decisions for the hot paths: no allocation when nothing is configured.
_ANY_ADDRESS = Decision(True, "any-address", "no --allow-from or --deny-from rules")
_NOT_DENIED = Decision(True, "deny-from", "source not in deny-from")
_NO_AUTHENTICATION = Decision(True, "no-authentication", "--disable-authentication: no client certificate is asked")


# --- the peer certificate ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What the policy looks at in a peer's leaf certificate, extracted once and kept as plain values."""

    common_name: str | None
    """The subject's LAST CN attribute, the one Go's ``pkix.Name.CommonName`` and so ghostunnel use: the only CN
    that ``--allow-cn`` matches and logs show. A subject may hold several; matching any of them would let
    ``CN=evil,CN=alice`` in as alice while logs name it evil."""
    other_common_names: tuple[str, ...]
    """The earlier CN attributes, ignored by every rule; kept so ``policy check`` can show them."""
    organizational_units: tuple[str, ...]
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    spki_sha256: str
    """SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex: the key pin ``--allow-spki-sha256`` compares."""
    serial: int
    issuer: str
    """The issuer's distinguished name, RFC 4514 (``CN=tlsgate CA,O=example``), as CRL entries are keyed."""
    not_before: datetime
    not_after: datetime

    def describe(self, limit: int = 100) -> str:
        """A short name for logs: the CN, else the first URI SAN, DNS SAN or IP SAN, else the key hash."""
        if self.common_name is not None:
            text = "CN=" + self.common_name
        elif self.uris:
            text = "URI=" + self.uris[0]
        elif self.dns_names:
            text = "DNS=" + self.dns_names[0]
        elif self.ip_addresses:
            text = "IP=" + self.ip_addresses[0]
        else:
            text = "SPKI=" + self.spki_sha256[:16]
        return _shorten(text, limit)

    @classmethod
    def from_der(cls, der: bytes) -> PeerIdentity:
        """Parse a DER certificate, with a cache: clients reconnect with the same certificate again and again."""
        return _identity_from_der(bytes(der))

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PeerIdentity:
        try:
            subject = cert.subject
            common_names = _attribute_values(subject, NameOID.COMMON_NAME)
            try:
                sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                sans = x509.SubjectAlternativeName([])
            return cls(
                common_name=common_names[-1] if common_names else None,
                other_common_names=common_names[:-1],
                organizational_units=_attribute_values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
                dns_names=tuple(sans.get_values_for_type(x509.DNSName)),
                uris=tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)),
                ip_addresses=tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
                spki_sha256=hashlib.sha256(_raw_spki(cert)).hexdigest(),
                serial=cert.serial_number,
                issuer=cert.issuer.rfc4514_string(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
            )
        except _PARSE_ERRORS as err:
            # cryptography parses extensions lazily, so a malformed one only shows up here, long after OpenSSL
            # accepted the certificate: OpenSSL keeps an IP SAN of 5 bytes as an opaque string, we cannot.
            raise CertificateError(f"certificate cannot be parsed: {_parse_problem(err)}") from None


# What cryptography raises for a certificate it cannot read. Not all are ValueErrors.
_PARSE_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _parse_problem(err: Exception) -> str:
    """cryptography's message, shortened: it may quote bytes of the certificate, which the peer chose."""
    return _shorten(str(err) or type(err).__name__, 160)


@functools.lru_cache(maxsize=1024)
def _identity_from_der(der: bytes) -> PeerIdentity:
    try:
        cert = x509.load_der_x509_certificate(der)
    except _PARSE_ERRORS as err:
        raise CertificateError(f"certificate is not a DER X.509 certificate: {_parse_problem(err)}") from None
    return PeerIdentity.from_certificate(cert)


def _attribute_values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    values = []
    for attribute in name.get_attributes_for_oid(oid):
        value = attribute.value
        values.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return tuple(values)


def _raw_spki(cert: x509.Certificate) -> bytes:
    """The SubjectPublicKeyInfo exactly as the certificate encodes it.

    Pins are hashes of these bytes (as Go's ``RawSubjectPublicKeyInfo`` and ``openssl x509 -pubkey``); re-encoding
    the parsed key would do for common keys but fails on key types cryptography cannot load.
    """
    tbs = cert.tbs_certificate_bytes
    _, offset, _ = _der_header(tbs, 0)  # into the TBSCertificate SEQUENCE
    if tbs[offset] == 0xA0:  # [0] EXPLICIT version, absent in v1 certificates
        offset = _der_skip(tbs, offset)
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        offset = _der_skip(tbs, offset)
    return tbs[offset : _der_skip(tbs, offset)]


def _der_header(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of contents, length of contents) of the DER element at offset."""
    tag, first = data[offset], data[offset + 1]
    if first < 0x80:
        return tag, offset + 2, first
    count = first & 0x7F
    return tag, offset + 2 + count, int.from_bytes(data[offset + 2 : offset + 2 + count])


def _der_skip(data: bytes, offset: int) -> int:
    _, start, length = _der_header(data, offset)
    return start + length


def check_validity(peer: PeerIdentity, *, now: datetime | None = None, role: str = "client") -> Decision:
    """Is ``now`` within the certificate's notBefore..notAfter? ``role`` names the peer in the reason."""
    now = _utc(now)
    if now > peer.not_after:
        return Decision(False, "expired", f"{role} certificate expired {_when(peer.not_after)}")
    if now < peer.not_before:
        return Decision(False, "not-yet-valid", f"{role} certificate not valid until {_when(peer.not_before)}")
    return Decision(True, "validity", f"valid until {_when(peer.not_after)}")


# --- source addresses ----------------------------------------------------------------------------------------

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_V4_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")


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
    def build(cls, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> _NetworkTable:
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


def _parse_network(flag: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    value = text.strip()
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(f"{flag}: {shown(text)} is not a network (use CIDR like 10.0.0.0/8)") from None
        if "host bits" in str(err):
            raise ConfigError(f"{flag}: {shown(text)} has host bits set (did you mean {loose}?)") from None
        raise ConfigError(f"{flag}: {shown(text)} is not a network (use CIDR like 10.0.0.0/8)") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_V4_MAPPED_NET):
        # Sources arrive folded to IPv4 (see _parse_source), so a rule written in mapped form must fold too.
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


class AddressRules:
    """``--allow-from`` and ``--deny-from``: which source networks may open a connection. Deny wins.

    Checked at accept, before the TLS handshake, so a refused source costs no crypto. With only deny rules,
    every other source is allowed; with allow rules, only sources in them (and not denied) are.
    """

    __slots__ = ("_allow", "_allow_decisions", "_allow_hint", "_deny", "active", "allow_from", "deny_from")

    def __init__(
        self,
        allow_from: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        deny_from: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    ) -> None:
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
        self._allow_hint = _listing(self.allow_from)

    @classmethod
    def parse(cls, allow_from: Iterable[str] = (), deny_from: Iterable[str] = ()) -> AddressRules:
        """Parse CIDR strings (a bare address means a single host); ConfigError names the flag and the value."""
        return cls(
            [_parse_network("--allow-from", text) for text in allow_from],
            [_parse_network("--deny-from", text) for text in deny_from],
        )

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
            parts.append("allow-from " + _listing(self.allow_from))
        if self.deny_from:
            parts.append("deny-from " + _listing(self.deny_from))
        return "; ".join(parts) or "any source address"

    def __repr__(self) -> str:
        return f"AddressRules(allow_from={self.allow_from!r}, deny_from={self.deny_from!r})"


# --- identity ------------------------------------------------------------------------------------------------

_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True, slots=True)
class _UriPattern:
    """A ghostunnel-style URI pattern: ``*`` is one whole path segment, ``**`` (last only) any rest of it.

    As in ghostunnel, a trailing slash is optional on both sides (``spiffe://x/a`` matches ``spiffe://x/a/``) and
    ``*`` needs at least one character (``spiffe://x//y`` does not match ``spiffe://x/*/y``). Unlike ghostunnel,
    ``a/**`` does not match ``ab``: it means ``a`` and anything below it.
    """

    text: str
    regex: re.Pattern[str]

    spiffe: bool = False
    """A ``spiffe://`` pattern: it matches only URIs that are valid SPIFFE IDs (see `spiffe_id_problem`)."""

    @classmethod
    def parse(cls, flag: str, text: str) -> _UriPattern:
        if not _URI_SCHEME.match(text):
            raise ConfigError(
                f"{flag}: {shown(text)} is not a URI (use a full URI such as spiffe://example.org/service)"
            )
        spiffe = text.lower().startswith(_SPIFFE)
        if spiffe:
            problem = spiffe_id_problem(text, pattern=True)
            if problem is not None:
                raise ConfigError(f"{flag}: {shown(text)} is not a SPIFFE ID pattern: {problem}")
        segments = text.split("/")
        parts: list[str] = []
        for index, segment in enumerate(segments):
            if segment == "**":
                if index != len(segments) - 1:
                    raise ConfigError(f"{flag}: {shown(text)}: '**' may only be the last segment")
                return cls(text, re.compile("/".join(parts) + "(?:/.*)?", re.DOTALL), spiffe)
            if segment == "*":
                parts.append("[^/]+")
            elif "*" in segment:
                raise ConfigError(
                    f"{flag}: {text!r}: '*' must be a whole path segment (like spiffe://example.org/*/api)"
                )
            else:
                parts.append(re.escape(segment))
        return cls(text, re.compile("/".join(parts) + "/?"), spiffe)

    def matches(self, uri: str) -> bool:
        if self.regex.fullmatch(uri) is None:
            return False
        # `*` and `**` would otherwise take ".." or "%2F" as path text: spiffe://x/ns/** must not admit
        # spiffe://x/ns/../admin, which a consumer that normalises the path reads as spiffe://x/admin.
        return not self.spiffe or spiffe_id_problem(uri) is None


_SPIFFE = "spiffe://"
_SPIFFE_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SPIFFE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def spiffe_id_problem(uri: str, *, pattern: bool = False) -> str | None:
    """Why ``uri`` is not a SPIFFE ID, or None if it is one (the SPIFFE-ID specification, section 2).

    A SPIFFE ID is ``spiffe://`` + a lowercase trust domain + path segments of letters, digits, ``.``, ``-``
    and ``_``: no empty segment, no ``.`` or ``..`` segment, no percent-encoding, query or fragment. A single
    trailing ``/`` is tolerated, as ghostunnel's patterns tolerate it. With ``pattern``, ``*`` may stand for
    the trust domain or a segment and ``**`` for the last segment (`_UriPattern` checks where they stand).
    """
    if not uri.startswith(_SPIFFE):
        return "the scheme must be spiffe:// in lowercase"
    domain, slash, path = uri[len(_SPIFFE) :].partition("/")
    # In a pattern, a segment with a `*` is left to `_UriPattern.parse`, whose message says where `*` may stand.
    if not (pattern and "*" in domain) and not _SPIFFE_TRUST_DOMAIN.fullmatch(domain):
        return f"the trust domain {_shorten(domain, 40)!r} must be lowercase letters, digits, '.', '-', '_'"
    segments = path.split("/") if slash else []
    if segments and segments[-1] == "":
        segments.pop()
    for segment in segments:
        if pattern and "*" in segment:
            continue
        if segment in ("", ".", ".."):
            return f"path segment {segment!r} is not allowed (no empty, '.' or '..' segments)"
        if "%" in segment:
            return "percent-encoding is not allowed in a SPIFFE ID"
        if not _SPIFFE_SEGMENT.fullmatch(segment):
            return f"path segment {_shorten(segment, 40)!r} may only hold letters, digits, '.', '-', '_'"
    return None


_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _parse_spki_hash(flag: str, text: str) -> str:
    """Normalise a SHA-256 pin to lowercase hex: hex with or without colons, or (URL-safe) base64."""
    value = text.strip()
    for prefix in ("sha256//", "sha256:"):
        if value.lower().startswith(prefix):
            value = value[len(prefix) :]
    hex_digits = value.replace(":", "")
    if _HEX.fullmatch(hex_digits):
        return hex_digits.lower()
    try:
        raw = base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return raw.hex()
    raise ConfigError(
        f"{flag}: {text!r} is not a SHA-256 hash (use 64 hex digits or 44 base64 characters, "
        "as `tlsgate certs show` prints)"
    )


def _parse_ip(flag: str, text: str) -> str:
    """An ``--allow-ip``/``--verify-ip`` value: one IPv4 or IPv6 address (an IP SAN holds one, never a network)."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ConfigError(f"{flag}: {shown(text[:60])} is not an IP address") from None


def _nonempty(flag: str, values: Iterable[str]) -> tuple[str, ...]:
    result = tuple(values)
    for value in result:
        if not value.strip():
            # ghostunnel would compare "" with the CN of a certificate that has none: allow everyone without a CN.
            raise ConfigError(f"{flag}: empty value")
    return result


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
        uri: Sequence[str] = (),
        spki_sha256: Sequence[str] = (),
        flag_prefix: str = "allow",
        rego: RegoPolicy | None = None,
        ip: Sequence[str] = (),
    ) -> None:
        """Use `parse`; this takes values already checked (URI patterns valid, hashes as lowercase hex)."""
        self.flag_prefix = flag_prefix
        self.allow_all = allow_all
        self.cn, self.ou, self.dns, self.uri = tuple(cn), tuple(ou), tuple(dns), tuple(uri)
        self.spki_sha256 = tuple(spki_sha256)
        self.rego = rego
        self.ip = tuple(ip)
        self.active = bool(allow_all or cn or ou or dns or uri or spki_sha256 or rego or ip)
        self._cn, self._ou = frozenset(cn), frozenset(ou)
        self._dns = frozenset(name.lower().rstrip(".") for name in dns)
        # Compared as addresses, so ::1 and 0:0:0:0:0:0:0:1 (or an IPv4 SAN in either spelling) are one value.
        self._ip = frozenset(ipaddress.ip_address(text) for text in ip)
        self._spki = frozenset(spki_sha256)
        patterns = [_UriPattern.parse(f"--{flag_prefix}-uri", text) for text in uri]
        self._uri_patterns = tuple(p for p in patterns if "*" in p.text)
        # Most URI rules name one SPIFFE ID: a set lookup (with and without the trailing slash) spares the regex.
        exact = [p.text for p in patterns if "*" not in p.text]
        self._uri_exact = frozenset(exact) | frozenset(t[:-1] if t.endswith("/") else t + "/" for t in exact)

    @classmethod
    def parse(
        cls,
        *,
        allow_all: bool = False,
        cn: Iterable[str] = (),
        ou: Iterable[str] = (),
        dns: Iterable[str] = (),
        uri: Iterable[str] = (),
        spki_sha256: Iterable[str] = (),
        flag_prefix: str = "allow",
        rego: RegoPolicy | None = None,
        ip: Iterable[str] = (),
    ) -> IdentityRules:
        """Validate flag values; ConfigError names the flag (``--allow-uri``/``--verify-uri``) and the value."""
        uris = _nonempty(f"--{flag_prefix}-uri", uri)
        for text in uris:
            _UriPattern.parse(f"--{flag_prefix}-uri", text)
        return cls(
            allow_all=allow_all,
            cn=_nonempty(f"--{flag_prefix}-cn", cn),
            ou=_nonempty(f"--{flag_prefix}-ou", ou),
            dns=_nonempty(f"--{flag_prefix}-dns", dns),
            uri=uris,
            spki_sha256=[_parse_spki_hash(f"--{flag_prefix}-spki-sha256", text) for text in spki_sha256],
            flag_prefix=flag_prefix,
            rego=rego,
            ip=[_parse_ip(f"--{flag_prefix}-ip", text) for text in ip],
        )

    def check(self, peer: PeerIdentity, der: bytes | None = None) -> Decision:
        """Does ``peer`` match a rule? ``der`` is its certificate, which only the Rego policy needs."""
        prefix = self.flag_prefix
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
                    present.append(label + _shorten(",".join(values), 80))
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
        parts = []
        for label, values in (("CN", self.cn), ("OU", self.ou), ("DNS", self.dns), ("IP", self.ip), ("URI", self.uri)):
            if values:
                parts.append(f"{label} {_listing(values)}")
        if self.spki_sha256:
            parts.append("SPKI sha256 " + _listing([h[:16] + "…" for h in self.spki_sha256]))
        if self.rego is not None:
            parts.append(f"policy {self.rego.query}")
        return "; ".join(parts) or "nothing"

    def __repr__(self) -> str:
        return f"IdentityRules({self.flag_prefix}: {self.summary()})"


# --- revocation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrlSource:
    """One CRL as loaded, for ``policy check`` and start-up logs."""

    path: str
    issuer: str
    revoked: int
    last_update: datetime
    next_update: datetime | None


@dataclass(frozen=True, slots=True)
class _Revoked:
    date: datetime
    reason: str | None
    source: str

    def describe(self, serial: int) -> str:
        details = [f"serial {serial:#x}", f"{self.date:%Y-%m-%d}"]
        if self.reason:
            details.append(self.reason)
        return ", ".join(details)


@functools.lru_cache(maxsize=256)
def _chain_link(der: bytes) -> tuple[str, int, str]:
    """(issuer RFC 4514, serial, subject for people) of a chain certificate: the few CAs recur on every handshake."""
    cert = x509.load_der_x509_certificate(der)
    return cert.issuer.rfc4514_string(), cert.serial_number, _name(cert.subject)


_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class RevocationList:
    """Revoked certificates from one or more CRLs, keyed by (issuer, serial): a lookup is one dict probe.

    Each CRL must be signed by one of the CA certificates the peer is verified against; otherwise anyone could
    hand us a list, and a list we cannot vouch for is a configuration mistake worth stopping for.
    """

    __slots__ = ("_entries", "sources")

    def __init__(
        self, entries: dict[tuple[str, int], _Revoked] | None = None, sources: Sequence[CrlSource] = ()
    ) -> None:
        self._entries = entries or {}
        self.sources: tuple[CrlSource, ...] = tuple(sources)

    @property
    def active(self) -> bool:
        return bool(self.sources)

    @classmethod
    def load(cls, paths: Iterable[str | Path], ca_certs: Sequence[x509.Certificate]) -> RevocationList:
        entries: dict[tuple[str, int], _Revoked] = {}
        sources = []
        for path in paths:
            for crl in _read_crls(path):
                signer = _crl_signer(crl, ca_certs)
                if signer is None:
                    raise CertificateError(
                        f"{path}: not signed by any CA in --cacert (the CRL's issuer is {_name(crl.issuer)})"
                    )
                issuer = crl.issuer.rfc4514_string()
                count = 0
                for revoked in crl:
                    count += 1
                    entries.setdefault(
                        (issuer, revoked.serial_number),
                        _Revoked(revoked.revocation_date_utc, _revocation_reason(revoked), str(path)),
                    )
                sources.append(CrlSource(str(path), issuer, count, crl.last_update_utc, crl.next_update_utc))
        return cls(entries, sources)

    def check(self, peer: PeerIdentity) -> Decision | None:
        """A refusal if the peer's certificate is revoked, else None."""
        if not self._entries:
            return None
        entry = self._entries.get((peer.issuer, peer.serial))
        if entry is None:
            return None
        return Decision(False, "crl", f"revoked ({entry.describe(peer.serial)})")

    def check_chain(self, chain: Sequence[bytes]) -> Decision | None:
        """A refusal if any CA certificate of the verified chain (DER, leaf first) is revoked, else None.

        Revoking an intermediate CA revokes everything it issued: the leaf's own serial is not enough. The leaf
        (``chain[0]``) is left to `check`, which names it by serial; here the reason names the CA.
        """
        if not self._entries:
            return None
        for der in chain[1:]:
            try:
                issuer, serial, subject = _chain_link(bytes(der))
            except _PARSE_ERRORS:
                # OpenSSL verified it, so it is a CA; one we cannot read is one we cannot vouch for.
                return Decision(False, "bad-cert", "a CA certificate of the chain cannot be parsed to check the CRL")
            entry = self._entries.get((issuer, serial))
            if entry is not None:
                return Decision(False, "crl", f"intermediate {subject} revoked ({entry.describe(serial)})")
        return None

    def revoked_by(self, peer: PeerIdentity) -> str | None:
        """The CRL file that revokes peer, for ``policy check``."""
        entry = self._entries.get((peer.issuer, peer.serial))
        return entry.source if entry else None

    def chain_revoked_by(self, chain: Sequence[bytes]) -> str | None:
        """The CRL file that revokes a CA of the chain, for ``policy check``."""
        for der in chain[1:]:
            issuer, serial, _ = _chain_link(bytes(der))
            entry = self._entries.get((issuer, serial))
            if entry is not None:
                return entry.source
        return None

    def summary(self) -> str:
        if not self.sources:
            return "no CRL"
        return ", ".join(f"{s.path} ({s.revoked} revoked)" for s in self.sources)

    def __len__(self) -> int:
        return len(self._entries)


def _read_crls(path: str | Path) -> list[x509.CertificateRevocationList]:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CertificateError(f"--crl: cannot read {path}: {err.strerror or err}") from None
    try:
        if b"-----BEGIN" in data:
            blocks = _CRL_PEM.findall(data)
            if not blocks:
                raise ValueError("no CRL block")
            return [x509.load_pem_x509_crl(block) for block in blocks]
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise CertificateError(f"--crl: {path} is not a CRL (expected PEM 'X509 CRL' blocks or DER)") from None


def _crl_signer(crl: x509.CertificateRevocationList, ca_certs: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for ca in ca_certs:
        if ca.subject != crl.issuer:
            continue
        try:
            if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return ca
        except (TypeError, UnsupportedAlgorithm):
            continue
    return None


def _revocation_reason(revoked: x509.RevokedCertificate) -> str | None:
    try:
        reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None
    return None if reason is x509.ReasonFlags.unspecified else str(reason.value)


# --- the verified chain of a live connection ----------------------------------------------------------------

_CHAIN_MEMORY = 1024
_remembered_chains: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()


def verified_chain(tls: ssl.SSLSocket, leaf_der: bytes) -> tuple[bytes, ...]:
    """The chain OpenSSL verified for the peer of ``tls``, leaf first, as DER; ``(leaf_der,)`` when unknown.

    The one place the engine hands policy a live socket: it reads a property of the finished handshake, no I/O.
    Python has it publicly from 3.13 (``SSLSocket.get_verified_chain``, DER bytes); 3.10-3.12 have it only on the
    private ``_sslobj`` (``_ssl.Certificate`` objects), used here guarded so a future Python degrades to the
    leaf alone instead of failing.

    A resumed session has no chain: OpenSSL keeps only the leaf in a session, and does not verify again. So the
    chain of each full handshake is remembered by leaf (a bounded, per-process memory), and a resumed session
    gets the chain its leaf was last verified with. A session resumed in a process that never saw its full
    handshake (another worker) gets only the leaf: docs/access-control.md ("Revocation") says so.
    """
    key = hashlib.sha256(leaf_der).digest()
    chain = _read_verified_chain(tls)
    if len(chain) > 1 and chain[0] == leaf_der:
        _remembered_chains[key] = chain
        _remembered_chains.move_to_end(key)
        if len(_remembered_chains) > _CHAIN_MEMORY:
            _remembered_chains.popitem(last=False)
        return chain
    return _remembered_chains.get(key) or (leaf_der,)


def _read_verified_chain(tls: ssl.SSLSocket) -> tuple[bytes, ...]:
    getter = internals.verified_chain_getter(tls)
    if getter is None:
        return ()
    try:
        items = getter() or ()
        return tuple(item if isinstance(item, bytes) else item.public_bytes(_ssl.ENCODING_DER) for item in items)
    except (AttributeError, TypeError, ValueError, ssl.SSLError):
        return ()


# --- chain (for policy check) --------------------------------------------------------------------------------

_MAX_CHAIN = 8


def verify_client_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    ca_certs: Sequence[x509.Certificate],
    *,
    now: datetime | None = None,
) -> tuple[Decision, tuple[x509.Certificate, ...]]:
    """Would the handshake accept leaf as a client certificate? The decision, and the chain built (leaf first).

    The verdict comes from cryptography's RFC 5280 path builder, which checks what the handshake checks and
    `verify_chain` does not: extended key usage (clientAuth), name constraints, path lengths. It is told to be
    as lenient as OpenSSL where the Web PKI profile it defaults to is stricter (see `_openssl_like_policies`), so
    that ``policy check`` and the handshake agree. `verify_chain` then only explains a refusal in our words.
    The chain is empty when verification fails.
    """
    now = _utc(now)
    if not ca_certs:
        return Decision(False, "untrusted", "no CA certificate to check against (give --cacert)"), ()
    ca_policy, ee_policy = _openssl_like_policies()
    verifier = (
        PolicyBuilder()
        .store(Store(list(ca_certs)))
        .time(now)
        .max_chain_depth(_MAX_CHAIN)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        # Not a verdict on the chain: cryptography could not run. Our walk is all that is left.
        return _walk_only(leaf, intermediates, ca_certs, now, f"cryptography cannot verify it: {_parse_problem(err)}")
    except VerificationError as err:
        problem = _verification_problem(err)
        if _FORBIDDEN_ALGORITHM.search(problem):
            # The Web PKI profile allows only a few key and signature algorithms; OpenSSL also takes Ed25519 and
            # Ed448, which tlsgate's own CA can issue. For such a chain only our walk can judge.
            return _walk_only(leaf, intermediates, ca_certs, now, "cryptography's verifier refuses its algorithms")
        explained = verify_chain(leaf, intermediates, ca_certs, now=now)
        if explained.allowed and not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            # The handshake names an out-of-date leaf "expired" (or "not yet valid"), and so do we.
            if now > leaf.not_valid_after_utc:
                return Decision(False, "expired", f"client certificate expired {_when(leaf.not_valid_after_utc)}"), ()
            until = _when(leaf.not_valid_before_utc)
            return Decision(False, "not-yet-valid", f"client certificate not valid until {until}"), ()
        if not explained.allowed:
            return explained, ()
        return Decision(False, "untrusted", problem), ()
    chain = tuple(verified.chain)
    via = [_name(c.subject) for c in chain[1:-1]]
    reason = f"signed by {_name(chain[-1].subject)}" + (f" via {', '.join(via)}" if via else "")
    return Decision(True, "chain", reason), chain


def _walk_only(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    ca_certs: Sequence[x509.Certificate],
    now: datetime,
    why: str,
) -> tuple[Decision, tuple[x509.Certificate, ...]]:
    """The verdict of `verify_chain` and the leaf's EKU, saying what went unchecked and why."""
    explained = verify_chain(leaf, intermediates, ca_certs, now=now)
    if not explained.allowed:
        return explained, ()
    if (eku := _client_auth_problem(leaf)) is not None:
        return Decision(False, "untrusted", eku), ()
    return Decision(True, "chain", f"{explained.reason} (name constraints and path lengths unchecked: {why})"), ()


@functools.cache
def _openssl_like_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """Web PKI extension rules, relaxed where OpenSSL's client-certificate check (purpose ``sslclient``) is.

    OpenSSL accepts a client certificate without a SubjectAltName or an AuthorityKeyIdentifier, or with a
    critical ExtendedKeyUsage, and a CA certificate without KeyUsage (but with KeyUsage, it must allow
    certificate signing). cryptography's defaults refuse all four. Found by running the same certificates
    through both; tests/test_attack_policy.py keeps them in step.
    """
    ca = ExtensionPolicy.webpki_defaults_ca().may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
    ee = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _client_auth_usage)
    )
    return ca, ee


_FORBIDDEN_ALGORITHM = re.compile(r"Forbidden (?:public key|signature) algorithm")


def _client_auth_usage(_policy: object, cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None) -> None:
    # Replacing the default EKU rule (which also wants the extension non-critical, as trustme does not make it)
    # drops its check too, so here it is: with an EKU, it must name clientAuth, as OpenSSL requires.
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise ValueError(f"{_name(cert.subject)}: extended key usage does not include clientAuth")


def _client_auth_problem(leaf: x509.Certificate) -> str | None:
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, *_PARSE_ERRORS):
        return None  # unreadable extensions are the certificate step's refusal ("bad-cert"), as in the server
    if ExtendedKeyUsageOID.CLIENT_AUTH in usage:
        return None
    return f"{_name(leaf.subject)}: extended key usage does not include clientAuth"


def _ca_key_usage(_policy: object, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    if usage is not None and not usage.key_cert_sign:
        raise ValueError(f"{_name(cert.subject)}: KeyUsage does not allow signing certificates")


def _verification_problem(err: VerificationError) -> str:
    """cryptography's message without the certificate repr it appends."""
    text = str(err).split(" (encountered processing", 1)[0]
    return _shorten(text.removeprefix("validation failed: "), 200)


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    ca_certs: Sequence[x509.Certificate],
    *,
    now: datetime | None = None,
) -> Decision:
    """Is leaf signed, through the given intermediates, by one of ca_certs, with every issuer within its dates?

    Only an explanation: `verify_client_chain` gives the verdict, and calls this to say in plain words which
    link is missing when it can. The leaf's own dates are left to `check_validity`. It does not check key
    usage, name constraints or path lengths, so it must never be the only check.
    """
    now = _utc(now)
    if not ca_certs:
        return Decision(False, "untrusted", "no CA certificate to check against (give --cacert)")
    current = leaf
    path: list[str] = []
    for _ in range(_MAX_CHAIN):
        anchors = [ca for ca in ca_certs if ca.subject == current.issuer]
        for ca in anchors:
            if _signed_by(current, ca):
                expired = _outside_validity(ca, now, "CA")
                if expired:
                    return Decision(False, "untrusted", expired)
                via = f" via {', '.join(path)}" if path else ""
                return Decision(True, "chain", f"signed by {_name(ca.subject)}{via}")
        issuers = [c for c in intermediates if c.subject == current.issuer and c is not current]
        issuer = next((c for c in issuers if _signed_by(current, c)), None)
        if issuer is None:
            if anchors or issuers:
                return Decision(
                    False,
                    "untrusted",
                    f"{_name(current.subject)} names issuer {_name(current.issuer)}, but that certificate's key "
                    "did not sign it (a different CA with the same name?)",
                )
            return Decision(False, "untrusted", f"issuer {_name(current.issuer)} is not in --cacert")
        if not _is_ca(issuer):
            return Decision(False, "untrusted", f"intermediate {_name(issuer.subject)} is not a CA certificate")
        expired = _outside_validity(issuer, now, "intermediate")
        if expired:
            return Decision(False, "untrusted", expired)
        path.append(_name(issuer.subject))
        current = issuer
    return Decision(False, "untrusted", f"no path to --cacert within {_MAX_CHAIN} certificates")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _outside_validity(cert: x509.Certificate, now: datetime, role: str) -> str | None:
    if now > cert.not_valid_after_utc:
        return f"{role} {_name(cert.subject)} expired {_when(cert.not_valid_after_utc)}"
    if now < cert.not_valid_before_utc:
        return f"{role} {_name(cert.subject)} not valid until {_when(cert.not_valid_before_utc)}"
    return None


# --- the whole policy ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """Everything that decides whether a peer may connect, built once per (re)load and then only read.

    ``identity`` is None under ``--disable-authentication``: no client certificate is asked for or checked.
    """

    addresses: AddressRules
    identity: IdentityRules | None
    revocation: RevocationList = field(default_factory=RevocationList)

    @property
    def role(self) -> str:
        """Who the peer is, for reasons: the client in server mode (``--allow-*``), else the server."""
        return "server" if self.identity is not None and self.identity.flag_prefix == "verify" else "client"

    def check_address(self, ip: str) -> Decision:
        """At accept, before the handshake."""
        return self.addresses.check(ip)

    def check_peer(
        self, leaf_der: bytes | None, *, chain: Sequence[bytes] = (), now: datetime | None = None
    ) -> tuple[Decision, PeerIdentity | None]:
        """After the handshake: certificate present and readable, in its dates, not revoked (the leaf nor any
        certificate of ``chain``, the verified chain as DER, leaf first), and allowed by an identity rule.

        Returns the decision and the parsed identity (for the log line), None when there is no certificate or
        it cannot be read. Never raises: the engine calls this from an event-loop callback, where an exception
        would fire again each time the socket is readable, so every failure is a refusal (fail closed).
        """
        try:
            return self._check_peer(leaf_der, chain, now)
        except Exception as err:
            # A bug of ours, not the peer's doing; still one refusal and one log line, never a loop.
            return Decision(False, "policy-error", f"internal error checking the certificate: {err!r}"[:200]), None

    def _check_peer(
        self, leaf_der: bytes | None, chain: Sequence[bytes], now: datetime | None
    ) -> tuple[Decision, PeerIdentity | None]:
        if self.identity is None:
            return _NO_AUTHENTICATION, None
        role = self.role
        if not leaf_der:
            return Decision(False, f"no-{role}-cert", f"no {role} certificate"), None
        try:
            peer = PeerIdentity.from_der(leaf_der)
        except CertificateError as err:
            return Decision(False, "bad-cert", f"{role} {err}"), None
        now = _utc(now)
        if not peer.not_before <= now <= peer.not_after:
            # Only a refusal pays for formatting dates.
            return check_validity(peer, now=now, role=role), peer
        revoked = self.revocation.check(peer) or self.revocation.check_chain(chain)
        if revoked is not None:
            return revoked, peer
        return self.identity.check(peer, leaf_der), peer

    def summary(self) -> str:
        """One line for the start-up log."""
        identity = "authentication disabled" if self.identity is None else self.identity.summary()
        return f"identity: {identity}; address: {self.addresses.summary()}; revocation: {self.revocation.summary()}"


def build_policy(
    *,
    allow_all: bool = False,
    allow_cn: Iterable[str] = (),
    allow_ou: Iterable[str] = (),
    allow_dns: Iterable[str] = (),
    allow_uri: Iterable[str] = (),
    allow_spki_sha256: Iterable[str] = (),
    allow_ip: Iterable[str] = (),
    allow_from: Iterable[str] = (),
    deny_from: Iterable[str] = (),
    crl: Iterable[str | Path] = (),
    ca_certs: Sequence[x509.Certificate] = (),
    disable_authentication: bool = False,
    allow_policy: str | None = None,
    allow_query: str | None = None,
) -> Policy:
    """The server-mode policy from the ``access_options`` flags, with ghostunnel's rules on which go together.

    As in ghostunnel, ``--allow-policy``/``--allow-query`` go together and exclude every other identity flag
    (``--allow-all``, ``--allow-cn`` ... and ``--disable-authentication``): the policy is the whole rule.
    """
    identity_flags = {
        "--allow-cn": tuple(allow_cn),
        "--allow-ou": tuple(allow_ou),
        "--allow-dns": tuple(allow_dns),
        "--allow-uri": tuple(allow_uri),
        "--allow-spki-sha256": tuple(allow_spki_sha256),
        "--allow-ip": tuple(allow_ip),
    }
    given = [flag for flag, values in identity_flags.items() if values]
    crl_paths = tuple(crl)
    if (allow_policy is None) != (allow_query is None):
        raise ConfigError("--allow-policy and --allow-query go together: give both, or neither")
    if allow_policy is not None:
        if disable_authentication:
            raise ConfigError("--disable-authentication contradicts --allow-policy: no client certificate to check")
        if allow_all or given:
            other = "--allow-all" if allow_all else given[0]
            raise ConfigError(
                f"--allow-policy/--allow-query and {other} are mutually exclusive (as in ghostunnel: "
                "put every rule in the policy)"
            )
    if disable_authentication:
        if allow_all or given:
            flag = "--allow-all" if allow_all else given[0]
            raise ConfigError(
                f"--disable-authentication contradicts {flag}: without client certificates it cannot match"
            )
        if crl_paths:
            raise ConfigError("--disable-authentication contradicts --crl: no client certificate is asked to revoke")
    elif not allow_all and not given and allow_policy is None:
        raise ConfigError(
            "server mode needs --allow-all, --allow-cn, --allow-ou, --allow-dns, --allow-uri, --allow-spki-sha256, "
            "--allow-policy/--allow-query or --disable-authentication"
        )
    if allow_all and given:
        raise ConfigError(
            f"--allow-all and {given[0]} are mutually exclusive (--allow-all already allows every client)"
        )
    addresses = AddressRules.parse(allow_from, deny_from)
    rego = None
    if allow_policy is not None and allow_query is not None:
        from tlsgate.policy.rego import load_policy

        rego = load_policy(allow_policy, allow_query, flag_prefix="allow")
    identity = (
        None
        if disable_authentication
        else IdentityRules.parse(
            allow_all=allow_all,
            cn=identity_flags["--allow-cn"],
            ou=identity_flags["--allow-ou"],
            dns=identity_flags["--allow-dns"],
            uri=identity_flags["--allow-uri"],
            spki_sha256=identity_flags["--allow-spki-sha256"],
            ip=identity_flags["--allow-ip"],
            rego=rego,
        )
    )
    return Policy(addresses, identity, RevocationList.load(crl_paths, ca_certs))


# --- small helpers -------------------------------------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _name(name: x509.Name) -> str:
    """A distinguished name for people: RFC 4514, or a placeholder for the empty name."""
    return name.rfc4514_string() or "(empty name)"


def _listing(values: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(values[:limit])
    return shown if len(values) <= limit else f"{shown}, +{len(values) - limit} more"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
