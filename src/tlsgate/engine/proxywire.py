"""The PROXY protocol's vocabulary, shared by the encoder (``proxyencode``) and the parser (``proxyproto``).

The constants of HAProxy's proxy-protocol.txt, the error a bad header raises, the two values a parse returns
(``ProxyHeader``, ``SslInfo``), and the two helpers both directions need (IPv6 text, CRC32c). No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from socket import AF_INET6, inet_ntop
from typing import Final

from tlsgate.errors import TlsgateError

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH: Final = 107
"""The longest v1 line the spec allows, CRLF included: ``PROXY UNKNOWN <v6> <v6> 65535 65535\\r\\n``."""
DEFAULT_MAX_TLV_BYTES: Final = 4096
"""How many TLV bytes ``parse`` accepts by default. The wire allows 65535; nobody honest sends that much."""

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_SUBTYPE_SSL_CLIENT_CERT: Final = 0x28
"""The client's certificate, DER: ghostunnel's ``--proxy-protocol-mode tls-full`` (go-proxyproto's name); not in
HAProxy's spec, so a receiver that does not know it skips it."""

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

PeerAddress = tuple[str, int] | tuple[str, int, int, int] | str | bytes
"""What ``accept()``/``getsockname()`` return: ``(host, port)`` for TCP over IPv4, ``(host, port, flowinfo,
scope_id)`` over IPv6, and for a unix socket its path (``str``; ``""`` for an unbound peer) or an abstract name
(``bytes`` starting with a NUL)."""
UNIX_PATH_BYTES: Final = 108
"""How many bytes v2 gives each unix socket address: ``sun_path``'s size on Linux, NUL-padded."""


class ProxyProtocolError(TlsgateError):
    """The peer sent something that is not a valid PROXY header; ``str(err)`` is the short reason.

    It is the sender's fault (the load balancer, or a client that should not be talking to this port), so
    the tunnel closes that one connection and logs the reason; nothing about tlsgate's start-up is wrong.
    """


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header.

    ``source`` and ``destination`` are ``None`` when the header carries no usable addresses (v1 ``UNKNOWN``,
    v2 ``LOCAL``, ``AF_UNSPEC`` or ``AF_UNIX``): the spec then says to use the real connection's endpoints.
    ``length`` is how many bytes the header took, so ``data[length:]`` is the start of the proxied stream.
    """

    version: int
    command: str
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...]
    length: int

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of ``tlv_type``, or ``None`` when the header has none."""
        for kind, value in self.tlvs:
            if kind == tlv_type:
                return value
        return None


@dataclass(frozen=True, slots=True)
class SslInfo:
    """A decoded ``PP2_TYPE_SSL`` TLV: the client flags, the verify result and the known sub-TLVs."""

    client: int
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    sub_tlvs: tuple[tuple[int, bytes], ...] = ()
    client_cert: bytes | None = None
    """The DER of ``PP2_SUBTYPE_SSL_CLIENT_CERT``, when the sender included it (tlsgate's and ghostunnel's tls-full)."""

    @property
    def client_ssl(self) -> bool:
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def cert_conn(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_CONN)

    @property
    def cert_sess(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_SESS)

    @property
    def verified(self) -> bool:
        """True only when a certificate was presented *and* verify is zero.

        HAProxy leaves verify at zero for a client that presented no certificate, so zero alone proves nothing.
        """
        return self.verify == 0 and bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))


def format_ipv6(packed: bytes) -> str:
    """Canonical hex text for an IPv6 address: the v1 spec wants hex groups, never a dotted IPv4 tail."""
    text = inet_ntop(AF_INET6, packed)
    if "." in text:
        head = text.rpartition(":")[0]
        text = f"{head}:{packed[12] << 8 | packed[13]:x}:{packed[14] << 8 | packed[15]:x}"
    return text


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli, RFC 4960 appendix B); the standard library only has the zlib polynomial."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
