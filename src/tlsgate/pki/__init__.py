"""A small certificate authority for tlsgate: make a CA, issue server and client certificates, revoke, show.

X.509 in five sentences, enough to read this module:

* A *certificate* binds a public key to names (the *subject* and the *Subject Alternative Names*, SANs) and is
  signed by an *issuer*. A *CA certificate* is one whose key may sign other certificates; a *leaf* is the end
  of the chain, the thing a server or client presents.
* *Extensions* say what a certificate may be used for. ``BasicConstraints`` says whether it is a CA,
  ``KeyUsage`` which key operations are allowed (signing certificates, signing CRLs, TLS signatures),
  ``ExtendedKeyUsage`` which protocol roles (``serverAuth``, ``clientAuth``). An extension marked *critical*
  must be understood by the verifier or the certificate is rejected.
* The *Subject Key Identifier* (SKI) names a key; a certificate's *Authority Key Identifier* (AKI) repeats its
  issuer's SKI, so verifiers can find the right issuer quickly even when two CAs share a name.
* Each certificate carries a *serial number* unique to its issuer. Revoking a certificate means publishing
  its serial in a *Certificate Revocation List* (CRL), a list signed by the CA with a "next update" deadline.
* Modern TLS clients ignore the Common Name (CN) and match the host name against the SANs only, so every
  server certificate here gets at least one DNS or IP SAN.

The module is three small classes with verbs:

* `CertificateAuthority` -- a CA that lives in a directory: ``create`` it once, ``load`` it later, then
  ``issue`` leaves, ``revoke`` them and ``build_crl``.
* `IssuedCert` -- a fresh leaf in memory (certificate, private key, chain) that can ``write`` itself out as
  PEM files and, optionally, a PKCS#12 keystore.
* `Revocation` -- one line of the CA's revocation record.

plus the readers tlsgate uses everywhere else (`load_certificates`, `load_private_key`, `spki_sha256`,
`describe_file`). Everything goes through ``cryptography``; bad input becomes a one-line
`~tlsgate.errors.CertificateError` or `~tlsgate.errors.ConfigError` that names the file, flag or value.

A CA directory holds three files:

``ca.pem``
    The CA certificate. Give it to servers and clients as their trust anchor (``--cacert``).
``ca.key``
    The CA private key, mode 0600, optionally encrypted with a password. Whoever has it can mint
    certificates your servers will trust: never copy it anywhere, never commit it.
``ca.json``
    The CA's record: every serial it issued, every revocation, and the last CRL number. It is plain JSON so
    you can read it; tlsgate rewrites it atomically on each change. One writer at a time, please: two
    processes issuing from the same CA at the same instant may lose one record (the certificates stay valid).
    A CA brought from elsewhere (``ca.pem`` + ``ca.key`` made with openssl) works too; ``ca.json`` is created
    on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    KeySerializationEncryption,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_private_key,
    load_pem_private_key,
    pkcs12,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsgate.errors import CertificateError, ConfigError, shown

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CA_STATE_FILE",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CA_NAME",
    "DEFAULT_CRL_DAYS",
    "DEFAULT_LEAF_DAYS",
    "REVOCATION_REASONS",
    "CertificateAuthority",
    "IssuedCert",
    "PrivateKey",
    "Revocation",
    "default_basename",
    "describe_file",
    "key_description",
    "load_certificates",
    "load_private_key",
    "parse_serial",
    "refuse_existing",
    "spki_sha256",
    "write_private_file",
    "write_public_file",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
"""The private keys tlsgate signs and handshakes with. DSA is left out: TLS 1.3 dropped it."""
_SIGNING_KEY_TYPES = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)

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

_STATE_FORMAT = "tlsgate-ca/1"

REVOCATION_REASONS: tuple[str, ...] = tuple(
    # removeFromCRL only has meaning in delta CRLs, which this CA does not make.
    reason.value
    for reason in x509.ReasonFlags
    if reason is not x509.ReasonFlags.remove_from_crl
)
"""The CRL reason codes ``revoke`` accepts, spelled as in RFC 5280 (``keyCompromise``, ``superseded`` ...)."""

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")
# X.509's upper bound for CN and OU (RFC 5280, ub-common-name and ub-organizational-unit-name).
_MAX_NAME_ATTRIBUTE = 64


# --------------------------------------------------------------------------------------------------------------
# Files


def write_private_file(path: Path, data: bytes, *, force: bool) -> None:
    """Write a secret (a private key, a keystore) readable by its owner only.

    The file is created with mode 0600 by ``os.open`` itself, so there is no moment when another user could
    open it. An existing file is replaced only with ``force``, and then atomically: a reader sees the old
    file or the new one, never half of each.
    """
    _write_file(path, data, mode=0o600, force=force)


def write_public_file(path: Path, data: bytes, *, force: bool) -> None:
    """Write something meant to be shared (a certificate, a chain, a CRL) with mode 0644; see `write_private_file`."""
    _write_file(path, data, mode=0o644, force=force)


def _write_file(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not force:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                raise CertificateError(f"{path} already exists; pass --force to replace it") from None
            with os.fdopen(fd, "wb") as out:
                # The umask may have narrowed the mode; certificates should still be readable by everyone.
                _set_mode(out.fileno(), mode)
                out.write(data)
            return
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                _set_mode(out.fileno(), mode)
                out.write(data)
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
    except OSError as err:
        raise CertificateError(f"{path}: cannot write ({err.strerror or err})") from None


def _set_mode(fd: int, mode: int) -> None:
    # Windows has no os.fchmod before Python 3.13, and no POSIX modes to set: the file's ACL decides there.
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)


def refuse_existing(paths: Iterable[Path], *, force: bool) -> None:
    """Unless ``force``, raise `CertificateError` naming the first of ``paths`` that exists.

    Checking every target before writing any means a refused run leaves no half-written set of files behind.
    """
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise CertificateError(f"{path} already exists; pass --force to replace it")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CertificateError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise CertificateError(f"{path}: permission denied") from None
    except OSError as err:
        raise CertificateError(f"{path}: cannot read ({err.strerror or err})") from None


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """The ``-----BEGIN X-----`` blocks of a PEM file as (label, block) pairs, in file order."""
    return [(match.group(1).decode("ascii"), match.group(0)) for match in _PEM_BLOCK.finditer(data)]


def _is_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data


# --------------------------------------------------------------------------------------------------------------
# Certificates and keys


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Read every certificate in a file: a PEM file may hold several (a chain, a bundle), a DER file holds one.

    Raises `CertificateError` naming the file when it holds no certificate or a damaged one.
    """
    data = _read_bytes(path)
    if not _is_pem(data):
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise CertificateError(f"{path}: not a certificate (expected PEM or DER)") from None
    blocks = _pem_blocks(data)
    certs: list[x509.Certificate] = []
    for label, block in blocks:
        if label != "CERTIFICATE":
            continue
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise CertificateError(f"{path}: certificate {len(certs) + 1} in the file is damaged") from None
    if not certs:
        found = ", ".join(sorted({label for label, _ in blocks})) or "no complete PEM block"
        raise CertificateError(f"{path}: no certificate in this file (found: {found})")
    return certs


def load_private_key(path: Path, password: bytes | None, *, password_flag: str = "--key-pass") -> PrivateKey:
    """Read a private key (PEM or DER; PKCS#8 or the older OpenSSL forms), decrypting it with ``password``.

    A PEM file may hold other blocks too (a combined cert + key file); the first private key block is used.
    A password given for a key that is not encrypted is ignored. Errors are one line and name the file:
    ``server.key: wrong password``, ``server.key is encrypted: give its password with --key-pass``,
    ``server.key: not a private key``. ``password_flag`` is the flag those messages point to.
    """
    return _parse_private_key(_read_bytes(path), password, source=str(path), password_flag=password_flag)


def _parse_private_key(data: bytes, password: bytes | None, *, source: str, password_flag: str) -> PrivateKey:
    if _is_pem(data):
        blocks = [block for label, block in _pem_blocks(data) if label.endswith("PRIVATE KEY")]
        if not blocks:
            raise CertificateError(f"{source}: not a private key (no PRIVATE KEY block)")
        data = blocks[0]
        loader: Callable[[bytes, bytes | None], PrivateKeyTypes] = load_pem_private_key
    else:
        loader = load_der_private_key
    try:
        key = loader(data, password)
    except TypeError:
        # cryptography says TypeError when the password does not fit the key's encryption state.
        if password is None:
            raise CertificateError(f"{source} is encrypted: give its password with {password_flag}") from None
        key = _load_unencrypted(loader, data, source)
    except ValueError as err:
        if password is not None and "password" in str(err).lower():
            raise CertificateError(f"{source}: wrong password ({password_flag})") from None
        raise CertificateError(f"{source}: not a private key (expected PEM or DER)") from None
    except UnsupportedAlgorithm:
        raise CertificateError(f"{source}: a kind of private key this system cannot read") from None
    return _signing_key(key, source)


def _load_unencrypted(
    loader: Callable[[bytes, bytes | None], PrivateKeyTypes], data: bytes, source: str
) -> PrivateKeyTypes:
    try:
        return loader(data, None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{source}: not a private key (expected PEM or DER)") from None


def _signing_key(key: PrivateKeyTypes, source: str) -> PrivateKey:
    if isinstance(key, _SIGNING_KEY_TYPES):
        return key
    kind = "DSA" if isinstance(key, dsa.DSAPrivateKey) else type(key).__name__.removeprefix("_")
    raise CertificateError(f"{source}: a {kind} key; tlsgate needs an EC, RSA, Ed25519 or Ed448 key")


def _pem_looks_encrypted(data: bytes) -> bool:
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def _spki_der(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo, in lowercase hex: the value ``--allow-spki-sha256`` takes.

    The SPKI is the public key plus its algorithm. Pinning its hash (rather than the certificate's) keeps a
    pin valid when the same key is re-certified with new dates, names or a new serial.
    """
    return hashlib.sha256(_spki_der(cert.public_key())).hexdigest()


def key_description(key: CertificatePublicKeyTypes | PrivateKey) -> str:
    """A key's algorithm and size the way people say it: ``EC P-256``, ``RSA 2048``, ``Ed25519``."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {_CURVE_NAMES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    return type(key).__name__.removeprefix("_")


def _encryption(password: bytes | None) -> KeySerializationEncryption:
    # BestAvailableEncryption is PKCS#8 with PBKDF2 and AES-256-CBC: what OpenSSL and Python's ssl read.
    return BestAvailableEncryption(password) if password else NoEncryption()


def _private_key_pem(key: PrivateKey, password: bytes | None) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, _encryption(password))


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


def parse_serial(text: str) -> int:
    """A serial number as ``certs show`` prints it: hex, with or without ``0x`` and ``:`` separators."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        serial = int(cleaned, 16)
    except ValueError:
        raise ConfigError(
            f"serial {shown(text)}: not a hex serial number (as `tlsgate certs show` prints it)"
        ) from None
    if serial <= 0:
        raise ConfigError(f"serial {shown(text)}: serial numbers are positive")
    return serial


def _serial_hex(serial: int) -> str:
    return format(serial, "x")


def default_basename(name: str) -> str:
    """The file name stem for a certificate called ``name``: ``*.example.com`` -> ``_wildcard.example.com``.

    Anything but letters, digits, ``.``, ``-``, ``_`` and ``@`` becomes ``_`` so a name can never point
    outside the output folder.
    """
    stem = name.replace("*", "_wildcard")
    stem = re.sub(r"[^A-Za-z0-9._@-]", "_", stem).lstrip(".")
    return stem or "cert"


# --------------------------------------------------------------------------------------------------------------
# Names


def _dns_name(value: str) -> str | None:
    """The A-label (ASCII, lowercase) form of a DNS name, or None when ``value`` is not one.

    A leading ``*.`` is allowed: a wildcard matches exactly one label, and only as the leftmost one.
    International names are converted with Python's IDNA codec (``café.test`` -> ``xn--caf-dma.test``).
    """
    wildcard = value.startswith("*.")
    host = value[2:] if wildcard else value
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = ascii_host.split(".")
    if len(ascii_host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return None
    # An all-numeric last label is a mistyped IP address (10.0.0.256), never a host name (RFC 1123 2.1).
    if labels[-1].isdigit():
        return None
    return "*." + ascii_host if wildcard else ascii_host


def _ip_address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if "%" in value:  # a zone index (fe80::1%eth0) means nothing outside the host that wrote it
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _subject_alt_names(
    name: str, dns: Sequence[str], ips: Sequence[str], uris: Sequence[str]
) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for value in dns:
        dns_name = _dns_name(value)
        if dns_name is None:
            raise ConfigError(
                f"--dns {value!r}: not a valid DNS name (dot-separated labels of letters, digits and hyphens; "
                "'*.' allowed in front)"
            )
        sans.append(x509.DNSName(dns_name))
    for value in ips:
        address = _ip_address(value)
        if address is None:
            raise ConfigError(f"--ip {shown(value)}: not an IP address (expected e.g. 127.0.0.1 or ::1)")
        sans.append(x509.IPAddress(address))
    if not dns and not ips:
        # The name people type is usually the host name; make it a SAN so the certificate just works.
        address = _ip_address(name)
        dns_name = _dns_name(name)
        if address is not None:
            sans.append(x509.IPAddress(address))
        elif dns_name is not None:
            sans.append(x509.DNSName(dns_name))
    for value in uris:
        if not _URI.fullmatch(value):
            raise ConfigError(f"--uri {shown(value)}: not an absolute URI (expected e.g. spiffe://example.org/service)")
        sans.append(x509.UniformResourceIdentifier(value))
    return sans


def _name_attribute(oid: x509.ObjectIdentifier, value: str, flag: str) -> x509.NameAttribute[str]:
    if not value or len(value) > _MAX_NAME_ATTRIBUTE:
        raise ConfigError(f"{flag} {shown(value)}: must be 1 to {_MAX_NAME_ATTRIBUTE} characters (an X.509 limit)")
    return x509.NameAttribute(oid, value)


def _format_name(name: x509.Name) -> str:
    # In certificate order (most significant first, as written), which is how openssl prints it too.
    return ", ".join(attribute.rfc4514_string() for attribute in name) or "(empty)"


def _common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


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


# --------------------------------------------------------------------------------------------------------------
# CA state (ca.json)


class _IssuedEntry(TypedDict):
    subject: str
    not_after: str
    issued_at: str


class _RevokedEntry(TypedDict):
    revoked_at: str
    reason: str | None


class _State(TypedDict):
    format: str
    crl_number: int
    issued: dict[str, _IssuedEntry]
    revoked: dict[str, _RevokedEntry]


def _empty_state() -> _State:
    return {"format": _STATE_FORMAT, "crl_number": 0, "issued": {}, "revoked": {}}


def _read_state(path: Path) -> _State:
    if not path.exists():
        return _empty_state()
    try:
        state = json.loads(_read_bytes(path))
    except ValueError as err:
        raise CertificateError(f"{path}: not valid JSON ({err})".splitlines()[0]) from None
    if (
        not isinstance(state, dict)
        or state.get("format") != _STATE_FORMAT
        or not isinstance(state.get("crl_number"), int)
        or not isinstance(state.get("issued"), dict)
        or not isinstance(state.get("revoked"), dict)
    ):
        raise CertificateError(f"{path}: not a tlsgate CA record (expected format {shown(_STATE_FORMAT)})")
    return cast(_State, state)


def _write_state(path: Path, state: _State) -> None:
    write_private_file(path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(), force=True)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------------------------------------------
# The CA


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate: its serial, when it was revoked, and why (None: no reason given)."""

    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None


class IssuedCert:
    """A freshly issued leaf certificate with its private key, in memory until you `write` it.

    ``chain`` is the leaf followed by the CA certificate: what a server sends so peers can link the leaf to
    a CA they trust. (Sending the root itself is harmless; peers ignore it and use their own copy.)
    """

    def __init__(self, certificate: x509.Certificate, private_key: PrivateKey, chain: list[x509.Certificate]):
        self.certificate = certificate
        self.private_key = private_key
        self.chain = chain

    @property
    def name(self) -> str:
        """The Common Name the certificate was issued for."""
        return _common_name(self.certificate.subject) or ""

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        return b"".join(cert.public_bytes(Encoding.PEM) for cert in self.chain)

    def private_key_pem(self, password: bytes | None = None) -> bytes:
        """The key as PKCS#8 PEM, encrypted with ``password`` when one is given."""
        return _private_key_pem(self.private_key, password)

    def pkcs12(self, password: bytes | None = None, *, friendly_name: str | None = None) -> bytes:
        """A PKCS#12 keystore (``.p12``/``.pfx``) holding the key, the leaf and the CA certificate.

        PKCS#12 bundles everything a TLS endpoint needs in one file, which Java, Windows and browsers import
        directly. With a password the store uses AES-256 and PBKDF2; without one it is not encrypted at all,
        so treat it like a bare private key.
        """
        name = (friendly_name or self.name or "tlsgate").encode()
        return pkcs12.serialize_key_and_certificates(
            name, self.private_key, self.certificate, self.chain[1:], _encryption(password)
        )

    @staticmethod
    def file_paths(out_dir: Path, basename: str, *, p12: bool = False) -> dict[str, Path]:
        """The files `write` makes, by role (``cert``, ``key``, ``chain``, maybe ``p12``); check them with
        `refuse_existing` before issuing so a refused run does not record a serial for nothing."""
        paths = {
            "cert": out_dir / f"{basename}.pem",
            "key": out_dir / f"{basename}.key",
            "chain": out_dir / f"{basename}-chain.pem",
        }
        if p12:
            paths["p12"] = out_dir / f"{basename}.p12"
        return paths

    def write(
        self,
        out_dir: Path,
        basename: str | None = None,
        *,
        key_password: bytes | None = None,
        p12_password: bytes | None = None,
        p12: bool = False,
        force: bool = False,
    ) -> dict[str, Path]:
        """Write ``BASENAME.pem`` (leaf), ``BASENAME.key`` (0600), ``BASENAME-chain.pem`` (leaf + CA) and,
        with ``p12`` or a ``p12_password``, ``BASENAME.p12``. Returns the paths by role:
        ``cert``, ``key``, ``chain`` and maybe ``p12``.

        Nothing is written when any target exists and ``force`` is false, so a refused run changes nothing.
        """
        stem = basename or default_basename(self.name)
        paths = self.file_paths(out_dir, stem, p12=p12 or bool(p12_password))
        refuse_existing(paths.values(), force=force)
        _make_private_dir(out_dir)
        write_private_file(paths["key"], self.private_key_pem(key_password), force=force)
        write_public_file(paths["cert"], self.cert_pem, force=force)
        write_public_file(paths["chain"], self.chain_pem, force=force)
        if "p12" in paths:
            write_private_file(paths["p12"], self.pkcs12(p12_password, friendly_name=stem), force=force)
        return paths


def _make_private_dir(directory: Path) -> None:
    # A new folder that will hold private keys is made owner-only; an existing folder is left as it is.
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise CertificateError(f"{directory} exists and is not a directory") from None
    except OSError as err:
        raise CertificateError(f"{directory}: cannot create ({err.strerror or err})") from None


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
        return _common_name(self.certificate.subject) or _format_name(self.certificate.subject)

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
        subject = x509.Name([_name_attribute(NameOID.COMMON_NAME, name, "--name")])
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
        _make_private_dir(directory)
        ca = cls(directory, certificate, key)
        write_private_file(ca.key_path, _private_key_pem(key, key_password), force=force)
        write_public_file(ca.cert_path, ca.cert_pem, force=force)
        _write_state(ca.state_path, _empty_state())
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
        if _spki_der(key.public_key()) != _spki_der(certificate.public_key()):
            raise CertificateError(f"{key_path} is not the key of {cert_path}")
        ca = cls(directory, certificate, key)
        _read_state(ca.state_path)  # a damaged record is reported now, not halfway through an issue
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
            raise CertificateError(f"{self.cert_path}: the CA expired on {_format_time(ca_not_after)}; make a new CA")
        subject = x509.Name(
            [_name_attribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou, "--ou") for ou in ous]
            + [_name_attribute(NameOID.COMMON_NAME, name, "--name")]
        )
        sans = _subject_alt_names(name, dns, ips, uris)
        if server and not sans:
            raise ConfigError(
                f"--name {name!r} is neither a DNS name nor an IP address; a server certificate needs "
                "--dns or --ip so clients can match it"
            )
        start = not_before.astimezone(UTC) if not_before is not None else now - _BACKDATE
        end = min(start + timedelta(days=days), ca_not_after)
        if end <= start:
            raise ConfigError(
                f"the certificate would end before it starts (the CA expires {_format_time(ca_not_after)})"
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

        def record(state: _State) -> None:
            state["issued"][_serial_hex(certificate.serial_number)] = {
                "subject": _format_name(subject),
                "not_after": _iso(end),
                "issued_at": _iso(now),
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
                    f"the certificate with serial {_serial_hex(target.serial_number)} was not issued by the CA in "
                    f"{self.directory}"
                ) from None
            serial, proven = target.serial_number, True
        else:
            serial, proven = target, False
        key = _serial_hex(serial)
        result: list[tuple[Revocation, bool]] = []

        def record(state: _State) -> None:
            if key in state["revoked"]:
                result.append((_revocation(key, state["revoked"][key]), False))
                return
            if not proven and key not in state["issued"]:
                raise CertificateError(
                    f"serial {key} is not in {self.state_path}: this CA did not issue it "
                    "(give the certificate file instead if it did)"
                )
            entry: _RevokedEntry = {"revoked_at": _iso(_now()), "reason": reason_flag.value if reason_flag else None}
            state["revoked"][key] = entry
            result.append((_revocation(key, entry), True))

        self._update_state(record)
        return result[0]

    def revocations(self) -> list[Revocation]:
        """Every revocation on record, oldest first."""
        state = _read_state(self.state_path)
        entries = [_revocation(key, entry) for key, entry in state["revoked"].items()]
        return sorted(entries, key=lambda revocation: revocation.revoked_at)

    def issued_serials(self) -> set[int]:
        """The serial of every certificate this CA has recorded issuing."""
        return {int(key, 16) for key in _read_state(self.state_path)["issued"]}

    def build_crl(self, *, days: int = DEFAULT_CRL_DAYS) -> x509.CertificateRevocationList:
        """Sign a CRL listing every revoked serial, valid for ``days`` days (its *next update*).

        A CRL carries a *CRL number* that grows with each new list, so a verifier can tell the newer of two
        lists; the number is kept in ``ca.json``. The AKI extension ties the list to this CA's key. Publish a
        new CRL before ``next update`` passes: verifiers that check it refuse everyone once it is stale.
        """
        if days < 1:
            raise ConfigError(f"--days {days}: a CRL must be valid for at least 1 day")
        numbers: list[int] = []

        def bump(state: _State) -> None:
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

    def _update_state(self, change: Callable[[_State], None]) -> None:
        # Read, change, write back atomically: another process may have issued since this object was loaded.
        state = _read_state(self.state_path)
        change(state)
        _write_state(self.state_path, state)


def _reason(reason: x509.ReasonFlags | str | None) -> x509.ReasonFlags | None:
    if reason is None or isinstance(reason, x509.ReasonFlags):
        return reason
    if reason not in REVOCATION_REASONS:
        raise ConfigError(f"--reason {shown(reason)}: expected one of {', '.join(REVOCATION_REASONS)}")
    return x509.ReasonFlags(reason)


def _revocation(key: str, entry: _RevokedEntry) -> Revocation:
    reason = x509.ReasonFlags(entry["reason"]) if entry["reason"] else None
    return Revocation(int(key, 16), _from_iso(entry["revoked_at"]), reason)


# --------------------------------------------------------------------------------------------------------------
# Describing files (`tlsgate certs show`)


def describe_file(path: Path, *, password: bytes | None = None, now: datetime | None = None) -> str:
    """A readable report on a certificate, chain, CRL, private key or PKCS#12 file: what ``certs show`` prints.

    PEM files are described block by block (a chain shows each certificate); DER files may hold a
    certificate, a CRL or a key; anything else is tried as PKCS#12 with ``password``. ``now`` fixes the
    clock for the "expires in" arithmetic.
    """
    data = _read_bytes(path)
    moment = now or datetime.now(UTC)
    if _is_pem(data):
        return _describe_pem(path, data, password, moment)
    return _describe_der(path, data, password, moment)


def _describe_pem(path: Path, data: bytes, password: bytes | None, now: datetime) -> str:
    blocks = _pem_blocks(data)
    cert_count = sum(1 for label, _ in blocks if label == "CERTIFICATE")
    sections: list[str] = []
    cert_index = 0
    for label, block in blocks:
        if label == "CERTIFICATE":
            cert_index += 1
            try:
                cert = x509.load_pem_x509_certificate(block)
            except ValueError:
                raise CertificateError(f"{path}: certificate {cert_index} in the file is damaged") from None
            where = f"{cert_index} of {cert_count} in" if cert_count > 1 else "in"
            sections.append(_describe_certificate(cert, f"certificate {where} {path}", now))
        elif label == "X509 CRL":
            try:
                crl = x509.load_pem_x509_crl(block)
            except ValueError:
                raise CertificateError(f"{path}: the CRL in the file is damaged") from None
            sections.append(_describe_crl(crl, f"CRL in {path}", now))
        elif label.endswith("PRIVATE KEY"):
            sections.append(_describe_key(block, password, path, pem=True))
    if not sections:
        found = ", ".join(sorted({label for label, _ in blocks})) or "no complete PEM block"
        raise CertificateError(f"{path}: no certificate, CRL or private key in this file (found: {found})")
    return "\n\n".join(sections)


def _describe_der(path: Path, data: bytes, password: bytes | None, now: datetime) -> str:
    with contextlib.suppress(ValueError):
        return _describe_certificate(x509.load_der_x509_certificate(data), f"certificate in {path}", now)
    with contextlib.suppress(ValueError):
        return _describe_crl(x509.load_der_x509_crl(data), f"CRL in {path}", now)
    with contextlib.suppress(ValueError, TypeError, UnsupportedAlgorithm):
        load_der_private_key(data, None)
        return _describe_key(data, None, path, pem=False)
    try:
        store = pkcs12.load_pkcs12(data, password)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        if path.suffix.lower() in (".p12", ".pfx"):
            hint = "wrong --storepass" if password else "it may need --storepass"
            raise CertificateError(f"{path}: cannot open this PKCS#12 file ({hint}, or it is damaged)") from None
        raise CertificateError(
            f"{path}: not a certificate, CRL, private key or PKCS#12 file (or a PKCS#12 file that needs --storepass)"
        ) from None
    return _describe_pkcs12(store, path, now)


def _describe_pkcs12(store: pkcs12.PKCS12KeyAndCertificates, path: Path, now: datetime) -> str:
    certs = ([store.cert.certificate] if store.cert else []) + [extra.certificate for extra in store.additional_certs]
    lines = [f"PKCS#12 keystore {path}"]
    if store.key is not None:
        key = store.key
        matches = (
            store.cert is not None
            and isinstance(key, _SIGNING_KEY_TYPES)
            and _spki_der(key.public_key()) == _spki_der(store.cert.certificate.public_key())
        )
        match_note = ", matches certificate 1" if matches else (", matches no certificate" if store.cert else "")
        lines.append(_field("private key", f"{_private_key_kind(store.key)}{match_note}"))
    else:
        lines.append(_field("private key", "none"))
    lines.append(_field("certificates", str(len(certs))))
    sections = ["\n".join(lines)]
    for index, cert in enumerate(certs, start=1):
        sections.append(_describe_certificate(cert, f"certificate {index} of {len(certs)} in {path}", now))
    return "\n\n".join(sections)


def _private_key_kind(key: PrivateKeyTypes) -> str:
    if isinstance(key, _SIGNING_KEY_TYPES):
        return key_description(key)
    return type(key).__name__.removeprefix("_")


def _describe_key(data: bytes, password: bytes | None, path: Path, *, pem: bool) -> str:
    heading = f"private key in {path}"
    if pem and _pem_looks_encrypted(data) and password is None:
        return f"{heading}\n{_field('key', 'encrypted (give --key-pass to see its type)')}"
    key = _parse_private_key(data, password, source=str(path), password_flag="--key-pass")
    spki = hashlib.sha256(_spki_der(key.public_key())).hexdigest()
    encrypted = " (encrypted)" if pem and _pem_looks_encrypted(data) else ""
    return "\n".join([heading, _field("key", key_description(key) + encrypted), _field("SPKI sha256", spki)])


def _describe_certificate(cert: x509.Certificate, heading: str, now: datetime) -> str:
    extensions = cert.extensions
    lines = [
        heading,
        _field("subject", _format_name(cert.subject)),
        _field("issuer", _format_name(cert.issuer)),
        _field("serial", _serial_hex(cert.serial_number)),
    ]
    san = _extension(extensions, x509.SubjectAlternativeName)
    lines.append(_field("SANs", ", ".join(_format_general_name(n) for n in san) if san else "none"))
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    lines.append(_field("valid from", _format_time(not_before)))
    lines.append(_field("valid until", _format_time(not_after)))
    lines.append(_field("status", _validity_status(not_before, not_after, now)))
    try:
        lines.append(_field("key", key_description(cert.public_key())))
        lines.append(_field("SPKI sha256", spki_sha256(cert)))
    except (ValueError, UnsupportedAlgorithm):
        lines.append(_field("key", "of a kind this system cannot read"))
    lines.append(_field("cert sha256", cert.fingerprint(hashes.SHA256()).hex()))
    eku = _extension(extensions, x509.ExtendedKeyUsage)
    lines.append(_field("EKU", ", ".join(EKU_NAMES.get(oid, oid.dotted_string) for oid in eku) if eku else "none"))
    usage = _extension(extensions, x509.KeyUsage)
    if usage is not None:
        lines.append(_field("key usage", _format_key_usage(usage)))
    constraints = _extension(extensions, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        path_length = "" if constraints.path_length is None else f" (path length {constraints.path_length})"
        lines.append(_field("CA", "yes" + path_length))
    else:
        lines.append(_field("CA", "no"))
    return "\n".join(lines)


def _describe_crl(crl: x509.CertificateRevocationList, heading: str, now: datetime) -> str:
    number = _extension(crl.extensions, x509.CRLNumber)
    lines = [
        heading,
        _field("issuer", _format_name(crl.issuer)),
        _field("CRL number", str(number.crl_number) if number is not None else "none"),
        _field("last update", _format_time(crl.last_update_utc)),
    ]
    next_update = crl.next_update_utc
    if next_update is None:
        lines.append(_field("next update", "none"))
    elif next_update < now:
        lines.append(_field("next update", f"{_format_time(next_update)} (STALE since {_span(now - next_update)})"))
    else:
        lines.append(_field("next update", f"{_format_time(next_update)} (in {_span(next_update - now)})"))
    revoked = sorted(crl, key=lambda entry: entry.revocation_date_utc)
    lines.append(_field("revoked", str(len(revoked)) if revoked else "none"))
    for entry in revoked:
        reason = _extension(entry.extensions, x509.CRLReason)
        why = f"  {reason.reason.value}" if reason is not None else ""
        lines.append(f"    {_serial_hex(entry.serial_number)}  revoked {_format_time(entry.revocation_date_utc)}{why}")
    return "\n".join(lines)


def _extension(extensions: x509.Extensions, kind: type[Any]) -> Any:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _field(label: str, value: str) -> str:
    return f"  {label + ':':<14}{value}"


def _format_general_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"dirName:{_format_name(name.value)}"
    return str(name.value)


def _format_key_usage(usage: x509.KeyUsage) -> str:
    names = [
        ("digitalSignature", usage.digital_signature),
        ("nonRepudiation", usage.content_commitment),
        ("keyEncipherment", usage.key_encipherment),
        ("dataEncipherment", usage.data_encipherment),
        ("keyAgreement", usage.key_agreement),
        ("keyCertSign", usage.key_cert_sign),
        ("cRLSign", usage.crl_sign),
    ]
    return ", ".join(name for name, present in names if present) or "none"


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(delta: timedelta) -> str:
    """A duration the way people say it, in its largest unit, rounded: ``12 days``, ``3 hours``.

    Rounding (not truncating) keeps a 30-day CRL read a second after it was made at "30 days".
    """
    seconds = abs(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = round(seconds / size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    count = round(seconds)
    return f"{count} second{'s' if count != 1 else ''}"


def _validity_status(not_before: datetime, not_after: datetime, now: datetime) -> str:
    if now < not_before:
        return f"not valid until {_format_time(not_before)} (in {_span(not_before - now)})"
    if now > not_after:
        return f"EXPIRED {_span(now - not_after)} ago"
    return f"valid, expires in {_span(not_after - now)}"
