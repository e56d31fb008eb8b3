"""What the policy reads from a peer's leaf certificate: `PeerIdentity`, parsed once per certificate and cached.

Every rule looks at these plain values, never at the certificate itself: the last CN (as Go and ghostunnel),
the OUs, the DNS/URI/IP SANs, the SubjectPublicKeyInfo as encoded and its SHA-256 (what the ``--allow-spki-pin``
and ``--allow-spki-sha256`` pins compare), and the issuer and serial CRL entries are keyed by. A certificate
cryptography cannot read raises `CertificateError` (`PARSE_ERRORS` lists what cryptography raises), which callers
turn into a refusal. `check_validity` compares the dates with now.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from tlsgate.errors import CertificateError
from tlsgate.policy.decision import Decision, shorten, utc, when
from tlsgate.tls.x509 import certificate_spki_der


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
    spki_der: bytes = b""
    """The DER SubjectPublicKeyInfo as the certificate encodes it: what ``--allow-spki-pin`` pins hash (with
    SHA-256, -384 or -512). Empty for an identity built by hand, which no pin then matches."""

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
        return shorten(text, limit)

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
            spki = certificate_spki_der(cert)
            return cls(
                common_name=common_names[-1] if common_names else None,
                other_common_names=common_names[:-1],
                organizational_units=_attribute_values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
                dns_names=tuple(sans.get_values_for_type(x509.DNSName)),
                uris=tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)),
                ip_addresses=tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
                spki_sha256=hashlib.sha256(spki).hexdigest(),
                serial=cert.serial_number,
                issuer=cert.issuer.rfc4514_string(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                spki_der=spki,
            )
        except PARSE_ERRORS as err:
            # cryptography parses extensions lazily, so a malformed one only shows up here, long after OpenSSL
            # accepted the certificate: OpenSSL keeps an IP SAN of 5 bytes as an opaque string, we cannot.
            raise CertificateError(f"certificate cannot be parsed: {parse_problem(err)}") from None


# What cryptography raises for a certificate it cannot read. Not all are ValueErrors.
PARSE_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def parse_problem(err: Exception) -> str:
    """cryptography's message, shortened: it may quote bytes of the certificate, which the peer chose."""
    return shorten(str(err) or type(err).__name__, 160)


@functools.lru_cache(maxsize=1024)
def _identity_from_der(der: bytes) -> PeerIdentity:
    try:
        cert = x509.load_der_x509_certificate(der)
    except PARSE_ERRORS as err:
        raise CertificateError(f"certificate is not a DER X.509 certificate: {parse_problem(err)}") from None
    return PeerIdentity.from_certificate(cert)


def _attribute_values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    values = []
    for attribute in name.get_attributes_for_oid(oid):
        value = attribute.value
        values.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return tuple(values)


def check_validity(peer: PeerIdentity, *, now: datetime | None = None, role: str = "client") -> Decision:
    """Is ``now`` within the certificate's notBefore..notAfter? ``role`` names the peer in the reason."""
    now = utc(now)
    if now > peer.not_after:
        return Decision(False, "expired", f"{role} certificate expired {when(peer.not_after)}")
    if now < peer.not_before:
        return Decision(False, "not-yet-valid", f"{role} certificate not valid until {when(peer.not_before)}")
    return Decision(True, "validity", f"valid until {when(peer.not_after)}")
