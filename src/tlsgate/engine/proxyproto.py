"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt), sans-IO: bytes in, bytes or a header out.

The PROXY protocol lets a proxy tell the server behind it who the real client was. The sender writes one
header at the very start of the connection, before any payload:

* **v1** is one line of text: ``PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\\r\\n`` (at most 107 bytes),
  or ``PROXY UNKNOWN\\r\\n`` when the sender has no addresses to give.
* **v2** is binary: a 12-byte signature (``\\r\\n\\r\\n\\x00\\r\\nQUIT\\n``), a version/command byte, a
  family/transport byte, a 16-bit length, the packed addresses and ports, then optional TLVs
  (type-length-value records) such as the TLS SNI (``PP2_TYPE_AUTHORITY``) or a ``PP2_TYPE_SSL`` record
  describing the client's TLS session.

tlsgate *sends* a header to its target (``encode_v1``, ``encode_v2``, ``tls_tlvs``) and, behind a trusted
load balancer, *receives* one before the client's TLS ClientHello (``parse``). Nothing here touches a
socket: the tunnel feeds bytes in and acts on what comes back, so every rule is tested with plain values.

This module is the parser and the public face of the codec (``__all__``); the vocabulary every part shares
(constants, ``ProxyHeader``, ``SslInfo``, ``ProxyProtocolError``) lives in ``proxywire``, the sending side in
``proxyencode``.
"""

from __future__ import annotations

import ipaddress
import struct
from socket import AF_INET, inet_ntop
from typing import Final

from tlsgate.engine.proxyencode import encode_v1, encode_v2, tls_tlvs
from tlsgate.engine.proxywire import (
    DEFAULT_MAX_TLV_BYTES,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CLIENT_CERT,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_KEY_ALG,
    PP2_SUBTYPE_SSL_SIG_ALG,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    UNIX_PATH_BYTES,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    PeerAddress,
    ProxyHeader,
    ProxyProtocolError,
    SslInfo,
    crc32c,
    format_ipv6,
)
from tlsgate.errors import shown

# The public API of the PROXY codec, whichever module defines each name: docs and tests import it from here.
__all__ = [
    "DEFAULT_MAX_TLV_BYTES",
    "MAX_HEADER",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CLIENT_CERT",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "UNIX_PATH_BYTES",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "PeerAddress",
    "ProxyHeader",
    "ProxyProtocolError",
    "SslInfo",
    "encode_v1",
    "encode_v2",
    "max_header_length",
    "parse",
    "parse_tlv_ssl",
    "tls_tlvs",
]

# --- parsing -------------------------------------------------------------------------------------------------

_V1_PREFIX: Final = b"PROXY "
_V1_PROTOCOLS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")
# Everything a valid v1 line can hold before its CRLF. Checking bytes as they arrive turns a stray TLS record
# or binary junk into an error at once instead of after 107 bytes.
_V1_LINE_BYTES: Final = b"PROXYTCP46UNKNOW 0123456789abcdefABCDEF.:"
# Address bytes per (family << 4 | transport) value the spec defines; tlsgate proxies TCP, so a PROXY
# command may only use the stream ones (or UNSPEC), while LOCAL's block is skipped whatever it says.
_V2_ADDRESS_LENGTHS: Final = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_V2_PROXY_FAMILIES: Final = frozenset({0x00, 0x11, 0x21, 0x31})
_V2_MAX_ADDRESS_LENGTH: Final = 216
_U16: Final = struct.Struct("!H")
_PORTS: Final = struct.Struct("!HH")
_TLV_HEAD: Final = struct.Struct("!BH")
_SSL_HEAD: Final = struct.Struct("!BI")


def max_header_length(max_tlv_bytes: int = DEFAULT_MAX_TLV_BYTES) -> int:
    """The most bytes ``parse`` can need before it answers: once a buffer is this long it never returns None."""
    return max(V1_MAX_LENGTH, 16 + _V2_MAX_ADDRESS_LENGTH + max_tlv_bytes)


MAX_HEADER: Final = max_header_length()
"""How many bytes to read (or peek) so that ``parse`` with the default TLV limit is sure to answer."""


def parse(data: bytes | bytearray | memoryview, *, max_tlv_bytes: int = DEFAULT_MAX_TLV_BYTES) -> ProxyHeader | None:
    """Parse a PROXY header (v1 or v2) from the start of ``data``, everything received so far.

    Returns ``None`` while the header is incomplete (call again with more bytes), the header once it is
    complete, and raises ``ProxyProtocolError`` as soon as the bytes cannot be a valid header, including when
    they can no longer fit in the bound: 107 bytes for v1, 16 + addresses + ``max_tlv_bytes`` for v2. A caller
    therefore never needs to buffer more than that before it has an answer. Bytes past the header are not read.
    """
    view = memoryview(data).cast("B")
    if not view:
        return None
    first = view[0]
    if first == 0x0D:
        return _parse_v2(view, max_tlv_bytes)
    if first == 0x50:  # "P"
        head = bytes(view[:V1_MAX_LENGTH])
        if not _V1_PREFIX.startswith(head[:6]):
            if _V1_PREFIX.startswith(head[:5]):
                raise ProxyProtocolError("v1 header: expected a single space after PROXY")
            raise ProxyProtocolError("no PROXY header")
        return _parse_v1(head)
    raise ProxyProtocolError("no PROXY header")


def _parse_v1(head: bytes) -> ProxyHeader | None:
    end = head.find(b"\r\n")
    line = head if end < 0 else head[:end]
    stray = line.translate(None, _V1_LINE_BYTES)
    if stray:
        if end < 0 and stray == b"\r" and line.endswith(b"\r"):
            pass  # the CR of the CRLF; its LF has not arrived yet
        elif stray[0] in b"\r\n":
            raise ProxyProtocolError("v1 header must end with CRLF (a lone CR or LF is not accepted)")
        else:
            raise ProxyProtocolError(f"v1 header contains an unexpected byte 0x{stray[0]:02x}")
    _check_v1_protocol(line, complete=end >= 0)
    if end < 0:
        if len(head) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX_LENGTH} bytes")
        return None

    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":
        # The spec tells receivers to ignore whatever follows UNKNOWN and use the real connection.
        return ProxyHeader(1, "PROXY", None, None, (), end + 2)
    if b"" in fields:
        raise ProxyProtocolError("v1 header fields must be separated by single spaces")
    protocol = fields[1].decode("ascii")
    if len(fields) != 6:
        raise ProxyProtocolError(f"v1 {protocol} header needs 4 fields after the protocol, got {len(fields) - 2}")
    version = 4 if protocol == "TCP4" else 6
    source = _v1_address(fields[2], version, "source")
    destination = _v1_address(fields[3], version, "destination")
    source_port = _v1_port(fields[4], "source")
    destination_port = _v1_port(fields[5], "destination")
    return ProxyHeader(1, "PROXY", (source, source_port), (destination, destination_port), (), end + 2)


def _check_v1_protocol(line: bytes, *, complete: bool) -> None:
    """Reject an unknown protocol word as soon as enough of it has arrived to tell."""
    body = line[len(_V1_PREFIX) :]
    if body.endswith(b"\r"):
        body, complete = body[:-1], True
    word, space, _ = body.partition(b" ")
    if space or complete:
        if word in _V1_PROTOCOLS:
            return
        if not word:
            raise ProxyProtocolError(
                "v1 header fields must be separated by single spaces" if space else "v1 header has no protocol"
            )
    elif any(protocol.startswith(word) for protocol in _V1_PROTOCOLS):
        return
    raise ProxyProtocolError(
        f"unsupported v1 protocol {word.decode('ascii', 'replace')!r} (expected TCP4, TCP6 or UNKNOWN)"
    )


def _v1_address(field: bytes, version: int, role: str) -> str:
    text = field.decode("ascii")
    try:
        # ipaddress is strict where the spec is: no leading zeros in IPv4, exactly 128 bits in IPv6.
        if version == 4:
            return str(ipaddress.IPv4Address(text))
        return format_ipv6(ipaddress.IPv6Address(text).packed)
    except ValueError:
        raise ProxyProtocolError(f"v1 {role} address {shown(text)} is not a valid IPv{version} address") from None


def _v1_port(field: bytes, role: str) -> int:
    if field.isdigit() and len(field) <= 5 and (field == b"0" or field[0] != 0x30):
        port = int(field)
        if port <= 0xFFFF:
            return port
    raise ProxyProtocolError(
        f"v1 {role} port {field.decode('ascii')!r} is not a number in 0-65535 (without leading zeros)"
    )


def _parse_v2(view: memoryview, max_tlv_bytes: int) -> ProxyHeader | None:
    available = len(view)
    fixed = bytes(view[:16])
    if not V2_SIGNATURE.startswith(fixed[:12]):
        raise ProxyProtocolError("bad v2 signature")
    if available < 13:
        return None
    if fixed[12] >> 4 != 2:
        raise ProxyProtocolError(f"unsupported v2 version 0x{fixed[12] >> 4:x}")
    command = fixed[12] & 0x0F
    if command > 1:
        raise ProxyProtocolError(f"unsupported v2 command 0x{command:x}")
    local = command == 0
    if available < 14:
        return None
    family = fixed[13]
    if not local and family not in _V2_PROXY_FAMILIES:
        raise ProxyProtocolError(_v2_family_reason(family))
    if available < 16:
        return None

    declared = _U16.unpack_from(fixed, 14)[0]
    address_length = _V2_ADDRESS_LENGTHS.get(family, -1)
    if local and not 0 <= address_length <= declared:
        # LOCAL's family "is ignored" by the spec; without a block we can lay out, skip it whole.
        if declared > _V2_MAX_ADDRESS_LENGTH + max_tlv_bytes:
            raise ProxyProtocolError(f"v2 header of {16 + declared} bytes exceeds the limit")
        if available < 16 + declared:
            return None
        return ProxyHeader(2, "LOCAL", None, None, (), 16 + declared)
    if declared < address_length:
        raise ProxyProtocolError(
            f"v2 header length {declared} is shorter than its addresses "
            f"({address_length} bytes for family 0x{family:02x})"
        )
    if declared - address_length > max_tlv_bytes:
        raise ProxyProtocolError(f"v2 TLVs of {declared - address_length} bytes exceed the limit of {max_tlv_bytes}")
    total = 16 + declared
    if available < total:
        return None

    header = bytes(view[:total])
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if not local and family == 0x11:
        source_port, destination_port = _PORTS.unpack_from(header, 24)
        source = (inet_ntop(AF_INET, header[16:20]), source_port)
        destination = (inet_ntop(AF_INET, header[20:24]), destination_port)
    elif not local and family == 0x21:
        source_port, destination_port = _PORTS.unpack_from(header, 48)
        source = (format_ipv6(header[16:32]), source_port)
        destination = (format_ipv6(header[32:48]), destination_port)
    tlvs = _split_tlvs(header, 16 + address_length, "v2 TLV")
    offset = 16 + address_length
    for kind, value in tlvs:
        if kind == PP2_TYPE_CRC32C:
            _checkcrc32c(header, offset + 3, value)
        else:
            _check_tlv(kind, value)
        offset += 3 + len(value)
    return ProxyHeader(2, "LOCAL" if local else "PROXY", source, destination, tlvs, total)


def _v2_family_reason(family: int) -> str:
    if family >> 4 > 3:
        return f"unsupported v2 address family 0x{family >> 4:x}"
    if family & 0x0F > 2:
        return f"unsupported v2 transport protocol 0x{family & 0x0F:x}"
    return (
        f"unsupported v2 address family/transport 0x{family:02x} (expected TCP over IPv4/IPv6, unix stream or UNSPEC)"
    )


def _split_tlvs(block: bytes, start: int, what: str) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset, end = start, len(block)
    while offset < end:
        if end - offset < 3:
            raise ProxyProtocolError(f"{what} truncated: {end - offset} bytes left, a TLV needs at least 3")
        kind, length = _TLV_HEAD.unpack_from(block, offset)
        offset += 3
        if offset + length > end:
            raise ProxyProtocolError(f"{what} 0x{kind:02x} of {length} bytes runs past the end of its block")
        tlvs.append((kind, block[offset : offset + length]))
        offset += length
    return tuple(tlvs)


_MAX_UNIQUE_ID: Final = 128


def _check_tlv(kind: int, value: bytes) -> None:
    """Refuse a TLV whose value cannot be what its type says, so no later reader trusts a malformed one.

    A container (``PP2_TYPE_SSL``) must hold exactly its 5-byte head and whole sub-TLVs: a sub-TLV length
    that runs past the SSL record would otherwise make a reader take the next TLV's bytes as part of it.
    """
    if kind == PP2_TYPE_SSL:
        parse_tlv_ssl(value)
    elif kind == PP2_TYPE_UNIQUE_ID and len(value) > _MAX_UNIQUE_ID:
        raise ProxyProtocolError(f"v2 UNIQUE_ID TLV of {len(value)} bytes exceeds the {_MAX_UNIQUE_ID} the spec allows")


def _checkcrc32c(header: bytes, position: int, value: bytes) -> None:
    """The spec makes a receiver that understands PP2_TYPE_CRC32C reject a header whose checksum is wrong."""
    if len(value) != 4:
        raise ProxyProtocolError(f"v2 CRC32C TLV must be 4 bytes, got {len(value)}")
    # The checksum covers the whole header with the checksum's own 4 bytes zeroed.
    zeroed = header[:position] + b"\x00\x00\x00\x00" + header[position + 4 :]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyProtocolError("v2 CRC32C checksum does not match the header")


def parse_tlv_ssl(value: bytes) -> SslInfo:
    """Decode the value of a ``PP2_TYPE_SSL`` TLV: client flags, verify, then sub-TLVs."""
    if len(value) < _SSL_HEAD.size:
        raise ProxyProtocolError(f"SSL TLV must be at least 5 bytes, got {len(value)}")
    client, verify = _SSL_HEAD.unpack_from(value, 0)
    sub_tlvs = _split_tlvs(bytes(value), 5, "SSL sub-TLV")
    texts: dict[int, str] = {}
    for kind, sub_value in sub_tlvs:
        if kind in (
            PP2_SUBTYPE_SSL_VERSION,
            PP2_SUBTYPE_SSL_CN,
            PP2_SUBTYPE_SSL_CIPHER,
            PP2_SUBTYPE_SSL_SIG_ALG,
            PP2_SUBTYPE_SSL_KEY_ALG,
        ):
            try:
                texts.setdefault(kind, sub_value.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProxyProtocolError(f"SSL sub-TLV 0x{kind:02x} is not valid UTF-8") from None
    return SslInfo(
        client=client,
        verify=verify,
        version=texts.get(PP2_SUBTYPE_SSL_VERSION),
        cn=texts.get(PP2_SUBTYPE_SSL_CN),
        cipher=texts.get(PP2_SUBTYPE_SSL_CIPHER),
        sig_alg=texts.get(PP2_SUBTYPE_SSL_SIG_ALG),
        key_alg=texts.get(PP2_SUBTYPE_SSL_KEY_ALG),
        client_cert=next((value for kind, value in sub_tlvs if kind == PP2_SUBTYPE_SSL_CLIENT_CERT), None),
        sub_tlvs=sub_tlvs,
    )
