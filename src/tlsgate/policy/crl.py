"""``--crl``: `RevocationList`, the revoked certificates of one or more CRL files, keyed by (issuer, serial).

`RevocationList.load` reads the files (PEM or DER) once, at start-up or reload, and refuses a CRL that no CA
of ``--cacert`` signed. `check` looks the leaf up and `check_chain` every CA of the verified chain (revoking
an intermediate revokes what it issued); each is one dict probe. `CrlSource` describes a loaded file for
``policy check`` and the start-up log.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from tlsgate.errors import CertificateError
from tlsgate.policy.decision import Decision, readable_name
from tlsgate.policy.peer import PARSE_ERRORS, PeerIdentity
from tlsgate.tls.x509 import parse_crls


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
    return cert.issuer.rfc4514_string(), cert.serial_number, readable_name(cert.subject)


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
                        f"{path}: not signed by any CA in --cacert (the CRL's issuer is {readable_name(crl.issuer)})"
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
            except PARSE_ERRORS:
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
        return parse_crls(data)
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
