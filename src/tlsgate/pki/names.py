"""Names in certificates: checking the DNS names, IPs and URIs people type, and printing names, serials, times.

`subject_alt_names` turns ``--dns``/``--ip``/``--uri`` into SANs (a bare ``--name`` that is a host name or an
IP becomes one, so the certificate just works); `name_attribute` checks a CN or OU against X.509's length
limit. The ``format_*`` helpers print what ``certs show`` and the CA's messages show.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tlsgate.errors import ConfigError, shown

EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}

_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")
# X.509's upper bound for CN and OU (RFC 5280, ub-common-name and ub-organizational-unit-name).
_MAX_NAME_ATTRIBUTE = 64


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


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def default_basename(name: str) -> str:
    """The file name stem for a certificate called ``name``: ``*.example.com`` -> ``_wildcard.example.com``.

    Anything but letters, digits, ``.``, ``-``, ``_`` and ``@`` becomes ``_`` so a name can never point
    outside the output folder.
    """
    stem = name.replace("*", "_wildcard")
    stem = re.sub(r"[^A-Za-z0-9._@-]", "_", stem).lstrip(".")
    return stem or "cert"


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


def subject_alt_names(name: str, dns: Sequence[str], ips: Sequence[str], uris: Sequence[str]) -> list[x509.GeneralName]:
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


def name_attribute(oid: x509.ObjectIdentifier, value: str, flag: str) -> x509.NameAttribute[str]:
    if not value or len(value) > _MAX_NAME_ATTRIBUTE:
        raise ConfigError(f"{flag} {shown(value)}: must be 1 to {_MAX_NAME_ATTRIBUTE} characters (an X.509 limit)")
    return x509.NameAttribute(oid, value)


def format_name(name: x509.Name) -> str:
    # In certificate order (most significant first, as written), which is how openssl prints it too.
    return ", ".join(attribute.rfc4514_string() for attribute in name) or "(empty)"


def common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
