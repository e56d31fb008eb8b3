"""``tlsgate certs show``: a readable report on a certificate, chain, CRL, private key or PKCS#12 file.

`describe_file` is the entry point; it reads the file once, then describes PEM files block by block and
tries DER files as a certificate, a CRL, a key and finally a PKCS#12 keystore.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_der_private_key, pkcs12

from tlsgate.errors import CertificateError
from tlsgate.pki.names import EKU_NAMES, format_name, format_time, serial_hex
from tlsgate.tls.x509 import (
    SIGNING_KEY_TYPES,
    is_pem,
    key_description,
    parse_private_key,
    pem_blocks,
    pem_looks_encrypted,
    public_key_sha256,
    read_file,
    spki_der,
    spki_sha256,
)


def describe_file(path: Path, *, password: bytes | None = None, now: datetime | None = None) -> str:
    """A readable report on a certificate, chain, CRL, private key or PKCS#12 file: what ``certs show`` prints.

    PEM files are described block by block (a chain shows each certificate); DER files may hold a
    certificate, a CRL or a key; anything else is tried as PKCS#12 with ``password``. ``now`` fixes the
    clock for the "expires in" arithmetic.
    """
    data = read_file(path)
    moment = now or datetime.now(UTC)
    if is_pem(data):
        return _describe_pem(path, data, password, moment)
    return _describe_der(path, data, password, moment)


def _describe_pem(path: Path, data: bytes, password: bytes | None, now: datetime) -> str:
    blocks = pem_blocks(data)
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
            and isinstance(key, SIGNING_KEY_TYPES)
            and spki_der(key.public_key()) == spki_der(store.cert.certificate.public_key())
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
    if isinstance(key, SIGNING_KEY_TYPES):
        return key_description(key)
    return type(key).__name__.removeprefix("_")


def _describe_key(data: bytes, password: bytes | None, path: Path, *, pem: bool) -> str:
    heading = f"private key in {path}"
    encrypted = pem and pem_looks_encrypted(data)
    if encrypted and password is None:
        return f"{heading}\n{_field('key', 'encrypted (give --key-pass to see its type)')}"
    # ``show`` takes one password for whatever the file holds (a keystore, a key): an unencrypted key next to
    # it is simply shown, where loading a key for use would refuse a password it does not need.
    key = parse_private_key(data, password if encrypted else None, source=str(path), password_flag="--key-pass")
    kind = key_description(key) + (" (encrypted)" if encrypted else "")
    return "\n".join([heading, _field("key", kind), _field("SPKI sha256", public_key_sha256(key.public_key()))])


def _describe_certificate(cert: x509.Certificate, heading: str, now: datetime) -> str:
    extensions = cert.extensions
    lines = [
        heading,
        _field("subject", format_name(cert.subject)),
        _field("issuer", format_name(cert.issuer)),
        _field("serial", serial_hex(cert.serial_number)),
    ]
    san = _extension(extensions, x509.SubjectAlternativeName)
    lines.append(_field("SANs", ", ".join(_format_general_name(n) for n in san) if san else "none"))
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    lines.append(_field("valid from", format_time(not_before)))
    lines.append(_field("valid until", format_time(not_after)))
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
        _field("issuer", format_name(crl.issuer)),
        _field("CRL number", str(number.crl_number) if number is not None else "none"),
        _field("last update", format_time(crl.last_update_utc)),
    ]
    next_update = crl.next_update_utc
    if next_update is None:
        lines.append(_field("next update", "none"))
    elif next_update < now:
        lines.append(_field("next update", f"{format_time(next_update)} (STALE since {_span(now - next_update)})"))
    else:
        lines.append(_field("next update", f"{format_time(next_update)} (in {_span(next_update - now)})"))
    revoked = sorted(crl, key=lambda entry: entry.revocation_date_utc)
    lines.append(_field("revoked", str(len(revoked)) if revoked else "none"))
    for entry in revoked:
        reason = _extension(entry.extensions, x509.CRLReason)
        why = f"  {reason.reason.value}" if reason is not None else ""
        lines.append(f"    {serial_hex(entry.serial_number)}  revoked {format_time(entry.revocation_date_utc)}{why}")
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
        return f"dirName:{format_name(name.value)}"
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
        return f"not valid until {format_time(not_before)} (in {_span(not_before - now)})"
    if now > not_after:
        return f"EXPIRED {_span(now - not_after)} ago"
    return f"valid, expires in {_span(not_after - now)}"
