"""The one reader of X.509 certificates and private keys, and the one SPKI computation.

Every part of tlsgate that reads a certificate or a key file goes through here: the TLS contexts
(``--cert``/``--key``/``--keystore``/``--cacert``), the certificate authority and ``certs show`` in
`tlsgate.pki`, and ``tlsgate policy check``. So a file is understood (or refused) the same way everywhere,
and a key's password is handled one way:

* an encrypted key without a password: ``KEY is encrypted: give its password with --key-pass``;
* a wrong password: ``KEY: wrong password (--key-pass)``;
* a password for a key that is *not* encrypted: refused, ``KEY: the key is not encrypted, but --key-pass was
  given`` -- as ghostunnel does. A password that is silently ignored hides a mix-up (the wrong key file, or a
  key someone decrypted on disk) that the operator wants to hear about.

The flag named in those messages is the caller's (``--key-pass``, ``--ca-pass``, ``--storepass``).

Files are PEM (any number of ``-----BEGIN X-----`` blocks, other blocks ignored) or DER (one object).
Errors are one-line `~tlsgate.errors.CertificateError` naming the file (or the ``source`` label given).
The SPKI (SubjectPublicKeyInfo: the public key with its algorithm) is what ``--allow-spki-sha256`` pins and
how a key is matched to its certificate: `spki_der` (of a key) and `certificate_spki_der` (as a certificate
encodes it) are the only places it is computed. CRLs are read by `parse_crls`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
    load_pem_private_key,
)

from tlsgate.errors import CertificateError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
"""The private keys tlsgate signs and handshakes with. DSA is left out: TLS 1.3 dropped it."""
SIGNING_KEY_TYPES = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
"""`PrivateKey` as a tuple, for ``isinstance``."""

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_KEY_BEGIN = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def read_file(path: str | Path, source: str | None = None) -> bytes:
    """The bytes of ``path``, or a one-line `CertificateError` naming ``source`` (default: the path)."""
    label = source or str(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise CertificateError(f"{label} is a directory, not a file") from None
    except PermissionError:
        raise CertificateError(f"{label}: permission denied") from None
    except OSError as err:
        raise CertificateError(f"{label}: cannot read ({err.strerror or err})") from None


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """The ``-----BEGIN X-----`` blocks of a PEM file as (label, block) pairs, in file order."""
    return [(match.group(1).decode("ascii"), match.group(0)) for match in _PEM_BLOCK.finditer(data)]


def is_pem(data: bytes) -> bool:
    """True when ``data`` is PEM text (anything else is read as DER)."""
    return b"-----BEGIN " in data


def load_certificates(path: str | Path, source: str | None = None) -> list[x509.Certificate]:
    """Read every certificate in a file: a PEM file may hold several (a chain, a bundle), a DER file holds one.

    Raises `CertificateError` naming ``source`` (default: the path) when the file holds no certificate or a
    damaged one.
    """
    return parse_certificates(read_file(path, source), source or str(path))


def parse_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """`load_certificates` for bytes already read; ``source`` names them in errors."""
    if not is_pem(data):
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise CertificateError(f"{source}: not a certificate (expected PEM or DER)") from None
    blocks = pem_blocks(data)
    certs: list[x509.Certificate] = []
    for label, block in blocks:
        if label != "CERTIFICATE":
            continue
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise CertificateError(f"{source}: certificate {len(certs) + 1} in the file is damaged") from None
    if not certs:
        found = ", ".join(sorted({label for label, _ in blocks})) or "no complete PEM block"
        raise CertificateError(f"{source}: no certificate in this file (found: {found})")
    return certs


def load_private_key(path: str | Path, password: bytes | None, *, password_flag: str = "--key-pass") -> PrivateKey:
    """Read a private key (PEM or DER; PKCS#8 or the older OpenSSL forms), decrypting it with ``password``.

    A PEM file may hold other blocks too (a combined cert + key file); the first private key block is used.
    Errors are one line and name the file: ``server.key: wrong password``, ``server.key is encrypted: give
    its password with --key-pass``, ``server.key: the key is not encrypted, but --key-pass was given``,
    ``server.key: not a private key``. ``password_flag`` is the flag those messages point to.
    """
    return parse_private_key(read_file(path), password, source=str(path), password_flag=password_flag)


def parse_private_key(data: bytes, password: bytes | None, *, source: str, password_flag: str) -> PrivateKey:
    """`load_private_key` for bytes already read; ``source`` names them in errors."""
    if is_pem(data):
        blocks = [block for label, block in pem_blocks(data) if label.endswith("PRIVATE KEY")]
        if not blocks:
            if _KEY_BEGIN.search(data):
                # Worded without the PEM armour: a server logs this on a failed reload, and logs carry no key text.
                raise CertificateError(f"{source}: not a private key (its key block is cut short, no END line)")
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
        _check_is_a_key(loader, data, source)
        raise CertificateError(f"{source}: the key is not encrypted, but {password_flag} was given") from None
    except ValueError as err:
        # A wrong password usually fails the decryption's padding check ("incorrect password"), but about one
        # time in 256 the padding looks right and the garbage fails to parse instead: still a wrong password.
        if password is not None and ("password" in str(err).lower() or pem_looks_encrypted(data) or not is_pem(data)):
            raise CertificateError(f"{source}: wrong password ({password_flag})") from None
        raise CertificateError(f"{source}: not a private key (expected PEM or DER)") from None
    except UnsupportedAlgorithm:
        raise CertificateError(f"{source}: a kind of private key this system cannot read") from None
    return _signing_key(key, source)


def _check_is_a_key(loader: Callable[[bytes, bytes | None], PrivateKeyTypes], data: bytes, source: str) -> None:
    # A password the file does not need: say "not encrypted" only when the file really is a readable key.
    try:
        loader(data, None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{source}: not a private key (expected PEM or DER)") from None


def _signing_key(key: PrivateKeyTypes, source: str) -> PrivateKey:
    if isinstance(key, SIGNING_KEY_TYPES):
        return key
    kind = "DSA" if isinstance(key, dsa.DSAPrivateKey) else type(key).__name__.removeprefix("_")
    raise CertificateError(f"{source}: a {kind} key; tlsgate needs an EC, RSA, Ed25519 or Ed448 key")


def pem_looks_encrypted(data: bytes) -> bool:
    """True when a PEM private key is encrypted (PKCS#8 ``ENCRYPTED PRIVATE KEY`` or OpenSSL's old header)."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def spki_der(public_key: CertificatePublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key: compare two of them to see if two keys are the same."""
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo, in lowercase hex: the value ``--allow-spki-sha256`` takes.

    The SPKI is the public key plus its algorithm. Pinning its hash (rather than the certificate's) keeps a
    pin valid when the same key is re-certified with new dates, names or a new serial. The bytes hashed are
    `certificate_spki_der`, so a pin works for any key, even one ``cryptography`` cannot load.
    """
    return hashlib.sha256(certificate_spki_der(cert)).hexdigest()


def public_key_sha256(public_key: CertificatePublicKeyTypes) -> str:
    """`spki_sha256` of a bare public key (say, a private key's), for comparing a key file with a pin."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()


def certificate_spki_der(cert: x509.Certificate) -> bytes:
    """The SubjectPublicKeyInfo exactly as the certificate encodes it.

    Pins are hashes of these bytes (as Go's ``RawSubjectPublicKeyInfo`` and ``openssl x509 -pubkey``);
    re-encoding the parsed key (`spki_der`) gives the same bytes for common keys but fails on key types
    ``cryptography`` cannot load. ``cryptography`` has parsed the certificate, so its DER is well formed.
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


def parse_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (its ``X509 CRL`` blocks), or the one CRL of a DER file.

    Raises ``ValueError`` when there is none or one is damaged; callers word the error, since a CRL file is
    refused (``--crl``) in some places and merely skipped (``certs crl`` looking for an earlier output) in others.
    """
    if is_pem(data):
        blocks = [block for label, block in pem_blocks(data) if label == "X509 CRL"]
        if not blocks:
            raise ValueError("no X509 CRL block")
        return [x509.load_pem_x509_crl(block) for block in blocks]
    return [x509.load_der_x509_crl(data)]


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
