"""The identity headers ``--target-http-headers`` adds to every request, built once per connection (sans-IO).

``X-Forwarded-Client-Cert`` follows Envoy's format (``forward_client_cert_details: SANITIZE_SET``), so backends
and libraries that read Envoy's header read ours: semicolon-separated ``Key=value`` pairs, in Envoy's order::

    Hash=<sha256 of the leaf's DER, hex>;Cert="<URL-escaped PEM>";Subject="<RFC 4514 DN>";
    URI=<each URI SAN>;DNS=<each DNS SAN>      (one line, without the break)

``Cert`` only with ``--target-http-cert``; ``URI=`` stays (empty) when the certificate has no URI SAN, as Envoy
does; one ``DNS=`` per DNS SAN. Envoy's ``By`` (our own certificate's URI SAN) is left out: it names the proxy,
which the backend knows.

Every value the certificate carries is text the client's CA chose, not the client, but a CA may still put
``;``, ``,``, ``"``, control or non-ASCII characters in a name. So each value is made safe for a header (no
byte outside visible ASCII and space: others become ``\\XX`` escapes of their UTF-8 bytes, as OpenSSL's RFC 2253
printer does) and is double-quoted whenever it holds a separator, as Envoy's header grammar asks; a name can
never add a pair of its own nor end the header line.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
from urllib.parse import quote

from cryptography import x509

# What a value must be quoted for: the pair, element and key separators, the quote, the escape, and space.
_NEEDS_QUOTES = frozenset(',;="\\ ')


def _ascii_escaped(text: str) -> str:
    """``text`` with every character outside printable ASCII as ``\\XX`` escapes of its UTF-8 bytes."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        ch if " " <= ch <= "~" else "".join(f"\\{byte:02X}" for byte in ch.encode("utf-8", "surrogatepass"))
        for ch in text
    )


def _value(text: str) -> str:
    """A URI or DNS SAN as an XFCC value: bare when it is plain, else quoted with ``"`` and ``\\`` escaped."""
    if text and text.isascii() and text.isprintable() and not _NEEDS_QUOTES.intersection(text):
        return text
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _ascii_escaped(quoted) + '"'


@functools.lru_cache(maxsize=1024)
def client_cert_value(der: bytes, *, with_cert: bool = False) -> str:
    """The ``X-Forwarded-Client-Cert`` value for the verified leaf ``der`` (visible ASCII only).

    Cached: clients reconnect with the same certificate, and parsing it costs more than a request does.
    """
    cert = x509.load_der_x509_certificate(der)
    parts = ["Hash=" + hashlib.sha256(der).hexdigest()]
    if with_cert:
        # Everything but the unreserved characters is escaped (quote(safe="")): "+" as %2B, so a decoder that
        # reads "+" as a space (Java's URLDecoder, as Keycloak uses) still gets the PEM back.
        parts.append('Cert="' + quote(ssl.DER_cert_to_PEM_cert(der), safe="") + '"')
    # rfc4514_string() already escapes the DN's own specials (including '"' and '\'), so only the
    # non-ASCII and control characters are left to escape for the header.
    parts.append('Subject="' + _ascii_escaped(cert.subject.rfc4514_string()) + '"')
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if uris:
        parts.extend("URI=" + _value(uri) for uri in uris)
    else:
        parts.append("URI=")  # Envoy keeps the key when there is no URI SAN
    parts.extend("DNS=" + _value(name) for name in sans.get_values_for_type(x509.DNSName))
    return ";".join(parts)


def identity_headers(*, leaf: bytes | None, client_ip: str, tls: bool, with_cert: bool = False) -> bytes:
    """The header lines (each ending in CRLF) added to every request of one connection.

    ``leaf`` is the client's verified certificate (None: no client certificate, so no XFCC at all, as Envoy);
    ``client_ip`` the address the rules matched (a trusted PROXY header's source, else the TCP peer; empty for
    a unix peer, which then gets no ``X-Forwarded-For``); ``tls`` says whether the client spoke TLS to us.
    """
    lines = []
    if leaf:
        lines.append("X-Forwarded-Client-Cert: " + client_cert_value(leaf, with_cert=with_cert))
    if client_ip:
        lines.append("X-Forwarded-For: " + client_ip)
    lines.append("X-Forwarded-Proto: " + ("https" if tls else "http"))
    return "".join(line + "\r\n" for line in lines).encode("ascii")
