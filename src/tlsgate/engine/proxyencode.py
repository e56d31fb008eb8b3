"""Building the PROXY header tlsgate sends to its target: ``encode_v1``, ``encode_v2`` and ``tls_tlvs``.

Sans-IO: the tunnel gives the connection's two ends (as accept() and getsockname() saw them) and what the TLS
handshake showed, and gets bytes back to send before the first byte of the client's stream.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Final

from tlsgate.engine.proxywire import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CLIENT_CERT,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    UNIX_PATH_BYTES,
    V2_SIGNATURE,
    PeerAddress,
    format_ipv6,
)

# --- encoding ------------------------------------------------------------------------------------------------
# Everything constant about a v2 header is built once; a header is then prefix + length + addresses + TLVs.

_V2_PROXY_TCP4: Final = V2_SIGNATURE + b"\x21\x11"
_V2_PROXY_TCP6: Final = V2_SIGNATURE + b"\x21\x21"
_V2_PROXY_UNIX: Final = V2_SIGNATURE + b"\x21\x31"
_V2_LOCAL: Final = V2_SIGNATURE + b"\x20\x00"
_V1_UNKNOWN: Final = b"PROXY UNKNOWN\r\n"
_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"
_U16: Final = struct.Struct("!H")
_PORTS: Final = struct.Struct("!HH")
_TLV_HEAD: Final = struct.Struct("!BH")
_SSL_HEAD: Final = struct.Struct("!BI")


def encode_v1(src: PeerAddress | None, dst: PeerAddress | None) -> bytes:
    """The v1 line for a connection from ``src`` to ``dst``.

    ``PROXY TCP4 ...`` or ``PROXY TCP6 ...``; ``PROXY UNKNOWN\\r\\n`` when either side is ``None`` or not an IP
    address (v1 has no form for a unix socket). IPv4-mapped IPv6 addresses are written as IPv4 when both sides
    allow it.
    """
    packed = _pack_endpoints(src, dst)
    if packed is None:
        return _V1_UNKNOWN
    src_ip, dst_ip, src_port, dst_port = packed
    if len(src_ip) == 4:
        protocol, source, destination = "TCP4", inet_ntop(AF_INET, src_ip), inet_ntop(AF_INET, dst_ip)
    else:
        protocol, source, destination = "TCP6", format_ipv6(src_ip), format_ipv6(dst_ip)
    return f"PROXY {protocol} {source} {destination} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v2(
    src: PeerAddress | None,
    dst: PeerAddress | None,
    *,
    tlvs: Sequence[tuple[int, bytes]] = (),
    local: bool = False,
) -> bytes:
    """The v2 header for a connection from ``src`` to ``dst``, followed by ``tlvs`` in the order given.

    * Two IP endpoints give ``PROXY`` over ``AF_INET``/``AF_INET6`` and ``STREAM``.
    * Two unix socket addresses (``str`` paths or ``bytes`` abstract names, as ``accept()`` and
      ``getsockname()`` return them) give ``PROXY`` over ``AF_UNIX`` and ``STREAM``: each address takes 108
      bytes, NUL-padded, so an unbound peer (``""``) is all zeros. This is what ghostunnel sends, and what a
      receiver needs to tell a unix-socket client from the proxy's own health check.
    * ``local=True``, an unknown side, or one IP and one unix side give ``LOCAL`` with ``AF_UNSPEC`` and no
      addresses, as HAProxy sends: every receiver must accept ``LOCAL`` and then use the real endpoints, while
      ``PROXY`` with ``AF_UNSPEC`` may be refused.
    """
    try:
        extra = b"".join([_TLV_HEAD.pack(kind, len(value)) + value for kind, value in tlvs]) if tlvs else b""
    except struct.error:
        raise ValueError("PROXY v2 TLV types must be 0-255 and values at most 65535 bytes") from None
    prefix, addresses = _V2_LOCAL, b""
    if not local:
        packed = _pack_endpoints(src, dst)
        if packed is not None:
            src_ip, dst_ip, src_port, dst_port = packed
            prefix = _V2_PROXY_TCP4 if len(src_ip) == 4 else _V2_PROXY_TCP6
            addresses = src_ip + dst_ip + _PORTS.pack(src_port, dst_port)
        else:
            paths = _pack_unix(src), _pack_unix(dst)
            if paths[0] is not None and paths[1] is not None:
                prefix, addresses = _V2_PROXY_UNIX, paths[0] + paths[1]
    length = len(addresses) + len(extra)
    if length > 0xFFFF:
        raise ValueError(f"PROXY v2 header would carry {length} bytes after the fixed part; the limit is 65535")
    return prefix + _U16.pack(length) + addresses + extra


def _pack_unix(address: PeerAddress | None) -> bytes | None:
    """A unix socket address as v2's 108 NUL-padded bytes, or None if it is not one (or cannot fit)."""
    if isinstance(address, str):
        try:
            raw = address.encode("utf-8", "surrogateescape")  # what os.fsencode does on Linux
        except UnicodeEncodeError:
            return None
    elif isinstance(address, bytes | bytearray):
        raw = bytes(address)
    else:
        return None
    # The kernel never reports more than sun_path holds; anything longer did not come from a socket.
    if len(raw) > UNIX_PATH_BYTES:
        return None
    return raw.ljust(UNIX_PATH_BYTES, b"\x00")


def tls_tlvs(
    *,
    version: str | None,
    sni: str | None,
    client_cn: str | None,
    cipher: str | None,
    verified: bool,
    has_client_cert: bool,
    alpn: str | None = None,
    client_cert: bytes | None = None,
    certificate_details: bool = True,
) -> list[tuple[int, bytes]]:
    """TLVs describing the client's TLS session, as HAProxy, hitch and ghostunnel send them.

    ``PP2_TYPE_ALPN`` carries the negotiated application protocol and ``PP2_TYPE_AUTHORITY`` the SNI, each
    only when there is one. ``PP2_TYPE_SSL`` carries the client flags, the 32-bit verify field and the sub-TLVs
    ``PP2_SUBTYPE_SSL_VERSION`` (``"TLSv1.3"``), ``PP2_SUBTYPE_SSL_CN``, ``PP2_SUBTYPE_SSL_CIPHER`` and
    ``PP2_SUBTYPE_SSL_CLIENT_CERT`` (``client_cert``, the DER), in that order, each only when it has a value.

    ``certificate_details`` decides whether the client certificate is described: its flags
    (``PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS``, both, when ``has_client_cert``, since one presented on
    this connection was presented in its session), its CN and its DER. Without them (ghostunnel's ``tls``
    mode) only ``PP2_CLIENT_SSL`` is set and neither the CN nor the certificate is sent, whatever the caller
    passes.

    verify is 0 only for a certificate that was presented and verified, 1 otherwise, details or not: it says
    whether the client authenticated, not who it is. The spec asks for exactly that; HAProxy instead leaves 0
    when no certificate was presented (and ghostunnel always sends 0), which fools receivers that test
    ``verify == 0`` alone into trusting an anonymous client.

    Values are sent whole, never shortened: a receiver may decide on the CN. One too long for its 16-bit length
    field raises ``ValueError``, and ``encode_v2`` does the same when the whole header would not fit.
    """
    result: list[tuple[int, bytes]] = []
    if alpn:
        result.append((PP2_TYPE_ALPN, alpn.encode("utf-8")))
    if sni:
        result.append((PP2_TYPE_AUTHORITY, sni.encode("utf-8")))
    flagged = has_client_cert and certificate_details
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS if flagged else 0)
    parts = [_SSL_HEAD.pack(client, 0 if (has_client_cert and verified) else 1)]
    sub_fields = (
        (PP2_SUBTYPE_SSL_VERSION, _utf8(version)),
        (PP2_SUBTYPE_SSL_CN, _utf8(client_cn) if certificate_details else None),
        (PP2_SUBTYPE_SSL_CIPHER, _utf8(cipher)),
        (PP2_SUBTYPE_SSL_CLIENT_CERT, client_cert if certificate_details else None),
    )
    for kind, value in sub_fields:
        if value:
            if len(value) > 0xFFFF:
                raise ValueError(f"PROXY v2 SSL sub-TLV 0x{kind:02x} of {len(value)} bytes does not fit in 65535")
            parts.append(_TLV_HEAD.pack(kind, len(value)) + value)
    result.append((PP2_TYPE_SSL, b"".join(parts)))
    return result


def _utf8(text: str | None) -> bytes | None:
    return text.encode("utf-8") if text else None


def _pack_endpoints(src: PeerAddress | None, dst: PeerAddress | None) -> tuple[bytes, bytes, int, int] | None:
    """Both addresses packed in one family (4 or 16 bytes each) with the ports, or None if not both IP."""
    if not isinstance(src, tuple) or not isinstance(dst, tuple):
        return None
    src_ip = _pack_host(src[0])
    dst_ip = _pack_host(dst[0])
    if src_ip is None or dst_ip is None:
        return None
    # A header has one family for both addresses; when they differ, IPv6 can express both and IPv4 cannot.
    if len(src_ip) != len(dst_ip):
        if len(src_ip) == 4:
            src_ip = _V4_MAPPED_PREFIX + src_ip
        else:
            dst_ip = _V4_MAPPED_PREFIX + dst_ip
    src_port, dst_port = src[1], dst[1]
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF):
        raise ValueError(f"PROXY header ports must be in 0-65535, got {src_port} and {dst_port}")
    return src_ip, dst_ip, src_port, dst_port


def _pack_host(host: str) -> bytes | None:
    """4 bytes for IPv4 (and IPv4-mapped IPv6, as a dual-stack socket reports IPv4 peers), 16 for IPv6."""
    if not isinstance(host, str):
        return None
    # inet_pton raises ValueError, not OSError, for a NUL or a non-ASCII character in the text.
    try:
        return inet_pton(AF_INET, host)
    except (OSError, ValueError):
        pass
    try:
        # The scope of a link-local address means nothing to the receiving host, and the header has no room for it.
        packed = inet_pton(AF_INET6, host.partition("%")[0])
    except (OSError, ValueError):
        return None
    return packed[12:] if packed[:12] == _V4_MAPPED_PREFIX else packed
