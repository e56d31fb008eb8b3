"""The input a Rego policy sees: a certificate laid out as Go's ``encoding/json`` writes an ``x509.Certificate``.

`certificate_input` builds ``input.certificate`` (``Subject.CommonName``, ``DNSNames``, ``URIs[0].Host``, ...)
with Go's field names, numbers for algorithms and key usages, and base64 for bytes, so a policy written for
ghostunnel runs unchanged. `peer_input_json` is the whole document, pretty-printed, for
``tlsgate policy check --show-input``.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsgate.errors import CertificateError
from tlsgate.policy.decision import shorten
from tlsgate.tls.x509 import certificate_spki_der

__all__ = ["certificate_input", "peer_input_json"]

_SIGNATURE_ALGORITHMS = {  # Go's x509.SignatureAlgorithm numbers, by OID
    "1.2.840.113549.1.1.4": 2,  # MD5WithRSA
    "1.2.840.113549.1.1.5": 3,  # SHA1WithRSA
    "1.2.840.113549.1.1.11": 4,  # SHA256WithRSA
    "1.2.840.113549.1.1.12": 5,  # SHA384WithRSA
    "1.2.840.113549.1.1.13": 6,  # SHA512WithRSA
    "1.2.840.10040.4.3": 7,  # DSAWithSHA1
    "2.16.840.1.101.3.4.3.2": 8,  # DSAWithSHA256
    "1.2.840.10045.4.1": 9,  # ECDSAWithSHA1
    "1.2.840.10045.4.3.2": 10,  # ECDSAWithSHA256
    "1.2.840.10045.4.3.3": 11,  # ECDSAWithSHA384
    "1.2.840.10045.4.3.4": 12,  # ECDSAWithSHA512
    "1.3.101.112": 16,  # PureEd25519
}
_EXT_KEY_USAGES = {  # Go's x509.ExtKeyUsage numbers
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: 0,
    ExtendedKeyUsageOID.SERVER_AUTH: 1,
    ExtendedKeyUsageOID.CLIENT_AUTH: 2,
    ExtendedKeyUsageOID.CODE_SIGNING: 3,
    ExtendedKeyUsageOID.EMAIL_PROTECTION: 4,
    ExtendedKeyUsageOID.IPSEC_IKE: 5,
    ExtendedKeyUsageOID.TIME_STAMPING: 8,
    ExtendedKeyUsageOID.OCSP_SIGNING: 9,
}
_KEY_USAGE_BITS = (  # Go's x509.KeyUsage bits, lowest first
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)
_NAME_FIELDS = (  # pkix.Name's list fields, in Go's order
    ("Country", NameOID.COUNTRY_NAME),
    ("Organization", NameOID.ORGANIZATION_NAME),
    ("OrganizationalUnit", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ("Locality", NameOID.LOCALITY_NAME),
    ("Province", NameOID.STATE_OR_PROVINCE_NAME),
    ("StreetAddress", NameOID.STREET_ADDRESS),
    ("PostalCode", NameOID.POSTAL_CODE),
)


def certificate_input(cert: x509.Certificate) -> dict[str, Any]:
    """``cert`` as ghostunnel hands it to a policy: Go's JSON of an ``x509.Certificate``.

    Byte fields are base64 strings, OIDs are arrays of integers, times RFC 3339 strings, enumerations Go's
    numbers (``ExtKeyUsage`` 2 is clientAuth), and empty lists ``null``, because that is what Go writes.
    Public keys are given as Go writes the common ones (RSA ``N``/``E``, ECDSA ``X``/``Y``, Ed25519 bytes).
    """
    extensions = list(cert.extensions)
    by_class = {type(ext.value): ext.value for ext in extensions}
    basic = by_class.get(x509.BasicConstraints)
    usage = by_class.get(x509.KeyUsage)
    eku = by_class.get(x509.ExtendedKeyUsage)
    san = by_class.get(x509.SubjectAlternativeName)
    ski = by_class.get(x509.SubjectKeyIdentifier)
    aki = by_class.get(x509.AuthorityKeyIdentifier)
    aia = by_class.get(x509.AuthorityInformationAccess)
    crl_dp = by_class.get(x509.CRLDistributionPoints)
    policies = by_class.get(x509.CertificatePolicies)
    public_key = cert.public_key()
    key_algorithm, key_value = _public_key(public_key)
    sig_oid = cert.signature_algorithm_oid.dotted_string
    return {
        "Raw": _b64(cert.public_bytes(_DER)),
        "RawTBSCertificate": _b64(cert.tbs_certificate_bytes),
        "RawSubjectPublicKeyInfo": _b64(certificate_spki_der(cert)),
        "RawSubject": _b64(cert.subject.public_bytes()),
        "RawIssuer": _b64(cert.issuer.public_bytes()),
        "Signature": _b64(cert.signature),
        "SignatureAlgorithm": _SIGNATURE_ALGORITHMS.get(sig_oid, 0),
        "PublicKeyAlgorithm": key_algorithm,
        "PublicKey": key_value,
        "Version": cert.version.value + 1,
        "SerialNumber": cert.serial_number,
        "Issuer": _name(cert.issuer),
        "Subject": _name(cert.subject),
        "NotBefore": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "NotAfter": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "KeyUsage": _key_usage(usage),
        "Extensions": [
            {"Id": _oid(ext.oid), "Critical": ext.critical, "Value": _b64(_extension_der(ext))} for ext in extensions
        ]
        or None,
        "ExtraExtensions": None,
        "UnhandledCriticalExtensions": None,
        "ExtKeyUsage": [_EXT_KEY_USAGES[u] for u in eku if u in _EXT_KEY_USAGES] or None if eku else None,
        "UnknownExtKeyUsage": [_oid(u) for u in eku if u not in _EXT_KEY_USAGES] or None if eku else None,
        "BasicConstraintsValid": basic is not None,
        "IsCA": bool(basic and basic.ca),
        "MaxPathLen": (basic.path_length if basic.path_length is not None else -1) if basic else 0,
        "MaxPathLenZero": bool(basic and basic.path_length == 0),
        "SubjectKeyId": _b64(ski.digest) if ski else None,
        "AuthorityKeyId": _b64(aki.key_identifier) if aki and aki.key_identifier else None,
        "OCSPServer": _access(aia, "1.3.6.1.5.5.7.48.1"),
        "IssuingCertificateURL": _access(aia, "1.3.6.1.5.5.7.48.2"),
        "DNSNames": list(san.get_values_for_type(x509.DNSName)) or None if san else None,
        "EmailAddresses": list(san.get_values_for_type(x509.RFC822Name)) or None if san else None,
        "IPAddresses": [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] or None if san else None,
        "URIs": [_url(uri) for uri in san.get_values_for_type(x509.UniformResourceIdentifier)] or None if san else None,
        "PermittedDNSDomainsCritical": False,
        "PermittedDNSDomains": None,
        "ExcludedDNSDomains": None,
        "PermittedIPRanges": None,
        "ExcludedIPRanges": None,
        "PermittedEmailAddresses": None,
        "ExcludedEmailAddresses": None,
        "PermittedURIDomains": None,
        "ExcludedURIDomains": None,
        "CRLDistributionPoints": _distribution_points(crl_dp),
        "PolicyIdentifiers": [_oid(p.policy_identifier) for p in policies] or None if policies else None,
        "Policies": [p.policy_identifier.dotted_string for p in policies] or None if policies else None,
    }


_DER = Encoding.DER


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _oid(oid: x509.ObjectIdentifier) -> list[int]:
    return [int(arc) for arc in oid.dotted_string.split(".")]


def _name(name: x509.Name) -> dict[str, Any]:
    """A pkix.Name: the list fields, SerialNumber and the LAST CommonName (as Go), and every attribute in Names."""
    result: dict[str, Any] = {}
    for field, oid in _NAME_FIELDS:
        result[field] = [_text(a.value) for a in name.get_attributes_for_oid(oid)] or None
    serials = name.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    result["SerialNumber"] = _text(serials[-1].value) if serials else ""
    common_names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    result["CommonName"] = _text(common_names[-1].value) if common_names else ""
    result["Names"] = [{"Type": _oid(a.oid), "Value": _text(a.value)} for a in name] or None
    result["ExtraNames"] = None
    return result


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _key_usage(usage: x509.KeyUsage | None) -> int:
    if usage is None:
        return 0
    bits = 0
    for index, attribute in enumerate(_KEY_USAGE_BITS):
        try:
            if getattr(usage, attribute):
                bits |= 1 << index
        except ValueError:  # encipher_only/decipher_only are undefined without key_agreement
            continue
    return bits


def _public_key(key: Any) -> tuple[int, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return 1, {"N": numbers.n, "E": numbers.e}
    if isinstance(key, dsa.DSAPublicKey):
        return 2, {"Y": key.public_numbers().y}
    if isinstance(key, ec.EllipticCurvePublicKey):
        point = key.public_numbers()
        return 3, {"Curve": {}, "X": point.x, "Y": point.y}
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 4, _b64(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    if isinstance(key, ed448.Ed448PublicKey):
        return 0, None  # Go cannot parse Ed448 keys at all
    return 0, None


def _extension_der(ext: x509.Extension[x509.ExtensionType]) -> bytes:
    try:
        return ext.value.public_bytes()
    except (NotImplementedError, AttributeError, ValueError):
        return b""


def _access(aia: x509.AuthorityInformationAccess | None, method: str) -> list[str] | None:
    if aia is None:
        return None
    found = [
        d.access_location.value
        for d in aia
        if d.access_method.dotted_string == method and isinstance(d.access_location, x509.UniformResourceIdentifier)
    ]
    return found or None


def _distribution_points(points: x509.CRLDistributionPoints | None) -> list[str] | None:
    if points is None:
        return None
    urls = [
        name.value
        for point in points
        for name in point.full_name or ()
        if isinstance(name, x509.UniformResourceIdentifier)
    ]
    return urls or None


def _url(text: str) -> dict[str, Any]:
    """A url.URL as Go's encoding/json writes it (a struct of its parsed parts)."""
    try:
        parts = urlsplit(text)
        host = parts.netloc.rpartition("@")[2]
        user = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
        scheme, path, query, fragment = parts.scheme, parts.path, parts.query, parts.fragment
    except ValueError:
        scheme, host, user, path, query, fragment = "", "", None, text, "", ""
    opaque = ""
    if scheme and not text[len(scheme) + 1 :].startswith("/"):
        opaque, path = text[len(scheme) + 1 :].split("?")[0].split("#")[0], ""
    return {
        "Scheme": scheme,
        "Opaque": opaque,
        "User": {} if user is not None else None,
        "Host": host,
        "Path": path,
        "RawPath": "",
        "OmitHost": False,
        "ForceQuery": False,
        "RawQuery": query,
        "Fragment": fragment,
        "RawFragment": "",
    }


def peer_input_json(der: bytes) -> str:
    """The whole input document for ``der``, pretty-printed, for ``policy check`` to show what the policy sees."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise CertificateError(f"certificate is not a DER X.509 certificate: {shorten(str(err), 120)}") from None
    return json.dumps({"certificate": certificate_input(cert)}, indent=2, ensure_ascii=False)
