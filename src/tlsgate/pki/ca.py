"""`CertificateAuthority`: a CA that lives in a directory, and `Revocation`, one line of its revocation record.

``create`` a CA once, ``load`` it later, then ``issue`` leaves (an `~tlsgate.pki.issued.IssuedCert`),
``revoke`` them and ``build_crl``. A CA directory holds three files:

``ca.pem``
    The CA certificate. Give it to servers and clients as their trust anchor (``--cacert``).
``ca.key``
    The CA private key, mode 0600, optionally encrypted with a password. Whoever has it can mint
    certificates your servers will trust: never copy it anywhere, never commit it.
``ca.json``
    The CA's record (see `tlsgate.pki.state`): every serial it issued, every revocation, and the last CRL
    number. One writer at a time, please: two processes issuing from the same CA at the same instant may lose
    one record (the certificates stay valid). A CA brought from elsewhere (``ca.pem`` + ``ca.key`` made with
    openssl) works too; ``ca.json`` is created on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsgate.errors import CertificateError, ConfigError, shown
from tlsgate.pki.files import make_private_dir, refuse_existing, write_private_file, write_public_file
from tlsgate.pki.issued import IssuedCert, encode_private_key
from tlsgate.pki.names import common_name, format_name, format_time, name_attribute, serial_hex, subject_alt_names
from tlsgate.pki.state import CaState, RevokedEntry, empty_state, from_iso, iso, read_state, write_state
from tlsgate.tls.x509 import PrivateKey, load_certificates, load_private_key, spki_der

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CA_STATE_FILE = "ca.json"

DEFAULT_CA_NAME = "tlsgate local CA"
DEFAULT_CA_DAYS = 3650
# 825 days is the longest validity Apple platforms accept for a TLS server certificate, even one from a
# private CA (mkcert uses the same figure). Shorter is better hygiene; longer breaks Safari and curl on macOS.
DEFAULT_LEAF_DAYS = 825
DEFAULT_CRL_DAYS = 30

# Certificates start a little in the past so a peer whose clock runs a few minutes slow still accepts them.
_BACKDATE = timedelta(minutes=5)

REVOCATION_REASONS: tuple[str, ...] = tuple(
    # removeFromCRL only has meaning in delta CRLs, which this CA does not make.
    reason.value
    for reason in x509.ReasonFlags
    if reason is not x509.ReasonFlags.remove_from_crl
)
"""The CRL reason codes ``revoke`` accepts, spelled as in RFC 5280 (``keyCompromise``, ``superseded`` ...)."""


def _generate_key(rsa_bits: int | None) -> PrivateKey:
    """ECDSA P-256 unless RSA is asked for: small, fast, and understood by every TLS stack of the last decade."""
    if rsa_bits is None:
        return ec.generate_private_key(ec.SECP256R1())
    if rsa_bits < 2048:
        raise ConfigError(f"--rsa {rsa_bits}: RSA keys must have at least 2048 bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 and Ed448 hash internally and must be given no hash algorithm.
    return None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()


def _now() -> datetime:
    # X.509 times have one-second resolution; dropping microseconds keeps in-memory and parsed values equal.
    return datetime.now(UTC).replace(microsecond=0)


def _key_usage(*, digital_signature: bool, key_encipherment: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CertificateError(f"{path} is not a CA certificate (it has no BasicConstraints extension)") from None
    if not constraints.ca:
        raise CertificateError(f"{path} is not a CA certificate (its BasicConstraints say ca=False)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CertificateError(f"{path} cannot sign certificates (its KeyUsage lacks keyCertSign)")


def _authority_key_identifier(cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # An imported CA without SKI: derive the identifier from its key, as RFC 5280 4.2.1.2 method 1 does.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(cast(Any, cert.public_key()))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate: its serial, when it was revoked, and why (None: no reason given)."""

    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None


class CertificateAuthority:
    """A certificate authority that keeps its certificate, key and records in one directory.

    Make one with `create`, open it again with `load`::

        ca = CertificateAuthority.create(Path("certs/ca"))
        leaf = ca.issue("localhost")                       # DNS SAN localhost, serverAuth, 825 days
        leaf.write(Path("certs"))                          # certs/localhost.pem, .key, -chain.pem
        ca = CertificateAuthority.load(Path("certs/ca"))
        ca.revoke(leaf.serial, reason="keyCompromise")
        crl = ca.build_crl()

    The CA certificate is self-signed: its issuer is its own subject and its signature is made with its own
    key. Trust in it cannot be checked cryptographically; it comes from you handing ``ca.pem`` to the peers
    (``--cacert``). That is also why ``ca.key`` must stay secret.
    """

    def __init__(self, directory: Path, certificate: x509.Certificate, private_key: PrivateKey) -> None:
        self.directory = directory
        self.certificate = certificate
        self._private_key = private_key

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / CA_KEY_FILE

    @property
    def state_path(self) -> Path:
        return self.directory / CA_STATE_FILE

    @property
    def name(self) -> str:
        return common_name(self.certificate.subject) or format_name(self.certificate.subject)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(Encoding.PEM)

    @staticmethod
    def exists(directory: Path) -> bool:
        """True when ``directory`` holds a CA certificate and key (whether or not it can be opened)."""
        return (directory / CA_CERT_FILE).is_file() and (directory / CA_KEY_FILE).is_file()

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        name: str = DEFAULT_CA_NAME,
        rsa_bits: int | None = None,
        days: int = DEFAULT_CA_DAYS,
        key_password: bytes | None = None,
        force: bool = False,
        name_constraints: x509.NameConstraints | None = None,
    ) -> CertificateAuthority:
        """Make a new self-signed CA in ``directory`` (created if missing) and return it.

        The key is ECDSA P-256 unless ``rsa_bits`` asks for RSA. The certificate has
        BasicConstraints ``ca=True, pathlen=0`` (critical): it may sign leaves but no intermediate CAs, which
        is all a local CA needs and limits the damage a stray intermediate could do. KeyUsage (critical)
        allows keyCertSign and cRLSign for certificates and CRLs, and digitalSignature for OCSP-style signing.

        An existing CA is replaced only with ``force``, and that is a *new* CA: every certificate the old
        one issued stops being trusted by peers that get the new ``ca.pem``.

        ``name_constraints`` limits the names the CA can vouch for, whoever holds its key: verifiers refuse a
        leaf with a subjectAltName (or, lacking those, a Common Name host name) outside the permitted subtrees.
        The extension is marked critical, as RFC 5280 requires, so a verifier that cannot enforce it refuses
        the CA rather than ignoring the limit. The local development CA uses it (see `tlsgate.dev`).
        """
        if days < 1:
            raise ConfigError(f"--days {days}: a CA must be valid for at least 1 day")
        subject = x509.Name([name_attribute(NameOID.COMMON_NAME, name, "--name")])
        if directory.exists() and not directory.is_dir():
            raise CertificateError(f"{directory} exists and is not a directory")
        refuse_existing((directory / f for f in (CA_CERT_FILE, CA_KEY_FILE, CA_STATE_FILE)), force=force)

        key = _generate_key(rsa_bits)
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_encipherment=False, cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        )
        if name_constraints is not None:
            builder = builder.add_extension(name_constraints, critical=True)
        certificate = builder.sign(key, _signature_hash(key))
        make_private_dir(directory)
        ca = cls(directory, certificate, key)
        write_private_file(ca.key_path, encode_private_key(key, key_password), force=force)
        write_public_file(ca.cert_path, ca.cert_pem, force=force)
        write_state(ca.state_path, empty_state())
        return ca

    @classmethod
    def load(
        cls, directory: Path, *, key_password: bytes | None = None, password_flag: str = "--ca-pass"
    ) -> CertificateAuthority:
        """Open the CA in ``directory``: check ``ca.pem`` is a CA certificate and ``ca.key`` is its key."""
        hint = f"create one with `tlsgate certs ca --out {directory}`"
        if not directory.exists():
            raise CertificateError(f"{directory}: no such CA directory; {hint}")
        if not directory.is_dir():
            raise CertificateError(f"{directory} is not a CA directory (it is a file)")
        cert_path = directory / CA_CERT_FILE
        key_path = directory / CA_KEY_FILE
        if not cert_path.exists():
            raise CertificateError(f"{directory} has no CA ({CA_CERT_FILE} not found); {hint}")
        certificate = load_certificates(cert_path)[0]
        _check_is_ca(certificate, cert_path)
        if not key_path.exists():
            raise CertificateError(f"{key_path} not found: a CA needs its private key to sign")
        key = load_private_key(key_path, key_password, password_flag=password_flag)
        if spki_der(key.public_key()) != spki_der(certificate.public_key()):
            raise CertificateError(f"{key_path} is not the key of {cert_path}")
        ca = cls(directory, certificate, key)
        read_state(ca.state_path)  # a damaged record is reported now, not halfway through an issue
        return ca

    def issue(
        self,
        name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        ous: Sequence[str] = (),
        server: bool = True,
        client: bool = False,
        days: int = DEFAULT_LEAF_DAYS,
        not_before: datetime | None = None,
        rsa_bits: int | None = None,
    ) -> IssuedCert:
        """Issue a leaf certificate with subject ``CN=name`` (plus one ``OU`` per entry of ``ous``).

        SANs are the ``dns`` names, ``ips`` and ``uris``. When neither ``dns`` nor ``ips`` is given, ``name``
        itself becomes a DNS SAN (when it is a valid DNS name) or an IP SAN (when it is an IP address): what
        you want for ``issue("localhost")`` or ``issue("10.0.0.5")``. A server certificate must end up with
        at least one SAN, since that is all TLS clients match; a client certificate may have none and be
        recognised by its CN (``--allow-cn``) or OU.

        ExtendedKeyUsage is ``serverAuth`` for ``server``, ``clientAuth`` for ``client``, both when both are
        set: a TLS stack refuses a certificate in a role it does not list. KeyUsage is digitalSignature (the
        handshake signature), plus keyEncipherment for RSA keys, which TLS 1.2's RSA key exchange needs.

        The certificate is valid from ``not_before`` (default: a few minutes ago) for ``days`` days, but
        never beyond the CA's own expiry. The serial is 159 random bits (RFC 5280 allows up to 20 octets;
        CA/Browser rules ask for at least 64 bits of entropy so serials cannot be predicted). The serial is
        recorded in ``ca.json`` at once, even if the certificate is never written out.
        """
        if not server and not client:
            raise ConfigError("a certificate must be for --server, --client or both")
        if days < 1:
            raise ConfigError(f"--days {days}: a certificate must be valid for at least 1 day")
        now = _now()
        ca_not_after = self.certificate.not_valid_after_utc
        if ca_not_after <= now:
            raise CertificateError(f"{self.cert_path}: the CA expired on {format_time(ca_not_after)}; make a new CA")
        subject = x509.Name(
            [name_attribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou, "--ou") for ou in ous]
            + [name_attribute(NameOID.COMMON_NAME, name, "--name")]
        )
        sans = subject_alt_names(name, dns, ips, uris)
        if server and not sans:
            raise ConfigError(
                f"--name {name!r} is neither a DNS name nor an IP address; a server certificate needs "
                "--dns or --ip so clients can match it"
            )
        start = not_before.astimezone(UTC) if not_before is not None else now - _BACKDATE
        end = min(start + timedelta(days=days), ca_not_after)
        if end <= start:
            raise ConfigError(
                f"the certificate would end before it starts (the CA expires {format_time(ca_not_after)})"
            )

        key = _generate_key(rsa_bits)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(
                    digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey), cert_sign=False
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_authority_key_identifier(self.certificate), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = builder.sign(self._private_key, _signature_hash(self._private_key))

        def record(state: CaState) -> None:
            state["issued"][serial_hex(certificate.serial_number)] = {
                "subject": format_name(subject),
                "not_after": iso(end),
                "issued_at": iso(now),
            }

        self._update_state(record)
        return IssuedCert(certificate, key, [certificate, self.certificate])

    def revoke(
        self, target: int | x509.Certificate, *, reason: x509.ReasonFlags | str | None = None
    ) -> tuple[Revocation, bool]:
        """Record that a certificate must no longer be trusted; it appears in every CRL built from now on.

        ``target`` is a serial number this CA issued (as recorded in ``ca.json``) or a certificate, which must
        carry this CA's signature; a certificate is accepted even when ``ca.json`` does not know it (a CA
        brought from elsewhere). ``reason`` is an RFC 5280 reason code such as ``keyCompromise``; leave it out
        rather than say ``unspecified``, as the RFC asks.

        Returns the revocation and whether it is new: revoking twice keeps the first date and reason.
        """
        reason_flag = _reason(reason)
        if isinstance(target, x509.Certificate):
            try:
                target.verify_directly_issued_by(self.certificate)
            except (ValueError, TypeError, InvalidSignature):
                raise CertificateError(
                    f"the certificate with serial {serial_hex(target.serial_number)} was not issued by the CA in "
                    f"{self.directory}"
                ) from None
            serial, proven = target.serial_number, True
        else:
            serial, proven = target, False
        key = serial_hex(serial)
        result: list[tuple[Revocation, bool]] = []

        def record(state: CaState) -> None:
            if key in state["revoked"]:
                result.append((_revocation(key, state["revoked"][key]), False))
                return
            if not proven and key not in state["issued"]:
                raise CertificateError(
                    f"serial {key} is not in {self.state_path}: this CA did not issue it "
                    "(give the certificate file instead if it did)"
                )
            entry: RevokedEntry = {"revoked_at": iso(_now()), "reason": reason_flag.value if reason_flag else None}
            state["revoked"][key] = entry
            result.append((_revocation(key, entry), True))

        self._update_state(record)
        return result[0]

    def revocations(self) -> list[Revocation]:
        """Every revocation on record, oldest first."""
        state = read_state(self.state_path)
        entries = [_revocation(key, entry) for key, entry in state["revoked"].items()]
        return sorted(entries, key=lambda revocation: revocation.revoked_at)

    def issued_serials(self) -> set[int]:
        """The serial of every certificate this CA has recorded issuing."""
        return {int(key, 16) for key in read_state(self.state_path)["issued"]}

    def build_crl(self, *, days: int = DEFAULT_CRL_DAYS) -> x509.CertificateRevocationList:
        """Sign a CRL listing every revoked serial, valid for ``days`` days (its *next update*).

        A CRL carries a *CRL number* that grows with each new list, so a verifier can tell the newer of two
        lists; the number is kept in ``ca.json``. The AKI extension ties the list to this CA's key. Publish a
        new CRL before ``next update`` passes: verifiers that check it refuse everyone once it is stale.
        """
        if days < 1:
            raise ConfigError(f"--days {days}: a CRL must be valid for at least 1 day")
        numbers: list[int] = []

        def bump(state: CaState) -> None:
            state["crl_number"] += 1
            numbers.append(state["crl_number"])

        self._update_state(bump)
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(now + timedelta(days=days))
            .add_extension(x509.CRLNumber(numbers[0]), critical=False)
            .add_extension(_authority_key_identifier(self.certificate), critical=False)
        )
        for revocation in self.revocations():
            entry = (
                x509.RevokedCertificateBuilder().serial_number(revocation.serial).revocation_date(revocation.revoked_at)
            )
            if revocation.reason is not None:
                entry = entry.add_extension(x509.CRLReason(revocation.reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(self._private_key, _signature_hash(self._private_key))

    def _update_state(self, change: Callable[[CaState], None]) -> None:
        # Read, change, write back atomically: another process may have issued since this object was loaded.
        state = read_state(self.state_path)
        change(state)
        write_state(self.state_path, state)


def _reason(reason: x509.ReasonFlags | str | None) -> x509.ReasonFlags | None:
    if reason is None or isinstance(reason, x509.ReasonFlags):
        return reason
    if reason not in REVOCATION_REASONS:
        raise ConfigError(f"--reason {shown(reason)}: expected one of {', '.join(REVOCATION_REASONS)}")
    return x509.ReasonFlags(reason)


def _revocation(key: str, entry: RevokedEntry) -> Revocation:
    reason = x509.ReasonFlags(entry["reason"]) if entry["reason"] else None
    return Revocation(int(key, 16), from_iso(entry["revoked_at"]), reason)
