"""PROXY protocol v1/v2: byte-exact encoding against the spec, strict incremental parsing, TLVs."""

from __future__ import annotations

import struct

import pytest

from tlsgate.engine.proxyproto import (
    DEFAULT_MAX_TLV_BYTES,
    MAX_HEADER,
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    SslInfo,
    encode_v1,
    encode_v2,
    max_header_length,
    parse,
    parse_tlv_ssl,
    tls_tlvs,
)
from tlsgate.engine.proxywire import crc32c as _crc32c
from tlsgate.errors import TlsgateError

# Written out byte by byte from proxy-protocol.txt section 2.2, not built with the code under test.
SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"

V2_TCP4 = (
    SIG
    + b"\x21"  # version 2, PROXY
    + b"\x11"  # AF_INET, STREAM
    + b"\x00\x0c"  # 12 address bytes
    + b"\xc0\x00\x02\x01"  # 192.0.2.1
    + b"\xc6\x33\x64\x07"  # 198.51.100.7
    + b"\xdc\x04"  # 56324
    + b"\x01\xbb"  # 443
)
V2_TCP6 = (
    SIG
    + b"\x21"
    + b"\x21"  # AF_INET6, STREAM
    + b"\x00\x24"  # 36 address bytes
    + b"\x20\x01\x0d\xb8"
    + b"\x00" * 11
    + b"\x01"  # 2001:db8::1
    + b"\x20\x01\x0d\xb8"
    + b"\x00" * 11
    + b"\x02"  # 2001:db8::2
    + b"\x04\xd2"  # 1234
    + b"\x01\xbb"  # 443
)
V2_LOCAL = SIG + b"\x20" + b"\x00" + b"\x00\x00"
V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"


def reason(data: bytes, **kwargs: int) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data, **kwargs)
    return str(info.value)


# --- encoding -------------------------------------------------------------------------------------------------


def test_v2_signature_is_the_one_in_the_spec() -> None:
    assert V2_SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n" == SIG


def test_v1_tcp4_is_byte_exact() -> None:
    assert encode_v1(("192.0.2.1", 56324), ("198.51.100.7", 443)) == V1_TCP4


def test_v1_tcp6_is_byte_exact() -> None:
    assert encode_v1(("2001:db8::1", 1234), ("2001:db8::2", 443)) == V1_TCP6


def test_v1_longest_tcp4_line_is_56_bytes() -> None:
    line = encode_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535))
    assert line == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(line) == 56


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (None, None),
        (None, ("192.0.2.1", 443)),
        (("192.0.2.1", 1), None),
        (("/run/tlsgate.sock", 0), ("192.0.2.1", 443)),
        (("", 0), ("", 0)),
        (("192.0.2.1\x00", 1), ("192.0.2.2", 443)),
        (("bücher.example", 1), ("192.0.2.2", 443)),
        (("192.0.2.1", 1), ("::1\x00", 443)),
    ],
)
def test_unknown_addresses_give_v1_unknown_and_v2_local(
    src: tuple[str, int] | None, dst: tuple[str, int] | None
) -> None:
    assert encode_v1(src, dst) == V1_UNKNOWN
    assert encode_v2(src, dst) == V2_LOCAL


def test_v2_tcp4_is_byte_exact() -> None:
    assert encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443)) == V2_TCP4


def test_v2_tcp6_is_byte_exact() -> None:
    assert encode_v2(("2001:db8::1", 1234), ("2001:db8::2", 443)) == V2_TCP6


def test_v2_local_is_byte_exact_and_ignores_the_addresses() -> None:
    assert encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443), local=True) == V2_LOCAL


def test_v2_tlvs_follow_the_addresses_and_count_in_the_length() -> None:
    header = encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443), tlvs=[(0x02, b"a.test"), (0xE0, b"")])
    assert header == (SIG + b"\x21\x11" + b"\x00\x18" + V2_TCP4[16:] + b"\x02\x00\x06a.test" + b"\xe0\x00\x00")


def test_v2_local_carries_tlvs_without_addresses() -> None:
    assert encode_v2(None, None, tlvs=[(0x04, b"xy")], local=True) == SIG + b"\x20\x00\x00\x05\x04\x00\x02xy"


def test_ipv4_mapped_addresses_on_both_sides_are_sent_as_ipv4() -> None:
    # What a dual-stack [::] listener reports for an IPv4 client.
    src, dst = ("::ffff:192.0.2.1", 56324), ("::ffff:198.51.100.7", 443)
    assert encode_v2(src, dst) == V2_TCP4
    assert encode_v1(src, dst) == V1_TCP4


def test_ipv4_mapped_source_with_ipv4_destination_is_sent_as_ipv4() -> None:
    assert encode_v2(("::ffff:192.0.2.1", 56324), ("198.51.100.7", 443)) == V2_TCP4


def test_mixed_families_are_both_sent_as_ipv6() -> None:
    header = encode_v2(("192.0.2.1", 1234), ("2001:db8::2", 443))
    assert header[13] == 0x21
    assert header[16:32] == b"\x00" * 10 + b"\xff\xff" + b"\xc0\x00\x02\x01"
    assert header[32:48] == V2_TCP6[32:48]
    assert encode_v1(("::ffff:192.0.2.1", 1234), ("2001:db8::2", 443)) == (
        b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 1234 443\r\n"
    )


def test_ipv6_peername_four_tuple_and_scope_are_accepted() -> None:
    assert encode_v2(("2001:db8::1", 1234, 0, 0), ("2001:db8::2%eth0", 443, 0, 2)) == V2_TCP6
    assert encode_v1(("2001:db8::1", 1234, 0, 0), ("2001:db8::2%2", 443, 0, 2)) == V1_TCP6


@pytest.mark.parametrize("ports", [(-1, 443), (1, 65536)])
def test_out_of_range_ports_are_a_programming_error(ports: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="0-65535"):
        encode_v1(("192.0.2.1", ports[0]), ("192.0.2.2", ports[1]))
    with pytest.raises(ValueError, match="0-65535"):
        encode_v2(("192.0.2.1", ports[0]), ("192.0.2.2", ports[1]))


def test_v2_rejects_tlvs_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="0-255"):
        encode_v2(None, None, tlvs=[(256, b"")])
    with pytest.raises(ValueError, match="65535"):
        encode_v2(None, None, tlvs=[(1, b"x" * 65536)])
    with pytest.raises(ValueError, match="limit is 65535"):
        encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[(1, b"x" * 65530)])


# --- TLS TLVs -------------------------------------------------------------------------------------------------


def test_tls_tlvs_for_a_verified_client_certificate_are_byte_exact() -> None:
    tlvs = tls_tlvs(
        version="TLSv1.3",
        sni="example.com",
        client_cn="alice",
        cipher="TLS_AES_128_GCM_SHA256",
        verified=True,
        has_client_cert=True,
    )
    assert tlvs == [
        (0x02, b"example.com"),
        (
            0x20,
            b"\x07"  # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
            + b"\x00\x00\x00\x00"  # verify: 0 = presented and verified
            + b"\x21\x00\x07TLSv1.3"
            + b"\x22\x00\x05alice"
            + b"\x23\x00\x16TLS_AES_128_GCM_SHA256",
        ),
    ]


def test_tls_tlvs_without_a_client_certificate_say_not_verified() -> None:
    tlvs = tls_tlvs(version="TLSv1.2", sni=None, client_cn=None, cipher=None, verified=False, has_client_cert=False)
    assert tlvs == [(0x20, b"\x01" + b"\x00\x00\x00\x01" + b"\x21\x00\x07TLSv1.2")]


def test_tls_tlvs_never_claim_verified_without_a_certificate() -> None:
    tlvs = tls_tlvs(version=None, sni=None, client_cn=None, cipher=None, verified=True, has_client_cert=False)
    info = parse_tlv_ssl(dict(tlvs)[PP2_TYPE_SSL])
    assert info.verify == 1
    assert not info.verified


def test_tls_tlvs_for_an_unverified_certificate_keep_the_flags_and_a_nonzero_verify() -> None:
    tlvs = tls_tlvs(
        version="TLSv1.3", sni="b.test", client_cn="mallory", cipher=None, verified=False, has_client_cert=True
    )
    info = parse_tlv_ssl(dict(tlvs)[PP2_TYPE_SSL])
    assert info.client == PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    assert info.verify != 0
    assert not info.verified
    assert info.cn == "mallory"


def test_tls_tlvs_survive_a_v2_round_trip() -> None:
    tlvs = tls_tlvs(
        version="TLSv1.3",
        sni="bücher.example",
        client_cn="Zoë",
        cipher="TLS_CHACHA20_POLY1305_SHA256",
        verified=True,
        has_client_cert=True,
    )
    header = parse(encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443), tlvs=tlvs))
    assert header is not None
    assert header.tlvs == tuple(tlvs)
    assert header.tlv(PP2_TYPE_AUTHORITY) == "bücher.example".encode()
    ssl_value = header.tlv(PP2_TYPE_SSL)
    assert ssl_value is not None
    assert parse_tlv_ssl(ssl_value) == SslInfo(
        client=0x07,
        verify=0,
        version="TLSv1.3",
        cn="Zoë",
        cipher="TLS_CHACHA20_POLY1305_SHA256",
        sub_tlvs=(
            (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3"),
            (PP2_SUBTYPE_SSL_CN, "Zoë".encode()),
            (PP2_SUBTYPE_SSL_CIPHER, b"TLS_CHACHA20_POLY1305_SHA256"),
        ),
    )
    assert header.tlv(0x99) is None


def test_ssl_info_from_haproxy_without_a_certificate_is_not_verified() -> None:
    # HAProxy leaves verify at 0 when the client sent no certificate.
    info = parse_tlv_ssl(b"\x01\x00\x00\x00\x00")
    assert info.client_ssl
    assert not info.cert_conn
    assert not info.cert_sess
    assert not info.verified


def test_ssl_info_keeps_unknown_sub_tlvs_and_decodes_sig_and_key_alg() -> None:
    value = b"\x05\x00\x00\x00\x00" + b"\x24\x00\x0aRSA-SHA256" + b"\x25\x00\x07RSA2048" + b"\xe5\x00\x01\xff"
    info = parse_tlv_ssl(value)
    assert (info.sig_alg, info.key_alg) == ("RSA-SHA256", "RSA2048")
    assert info.cert_sess
    assert not info.cert_conn
    assert info.verified
    assert info.sub_tlvs[-1] == (0xE5, b"\xff")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"\x01\x00\x00\x00", "SSL TLV must be at least 5 bytes, got 4"),
        (b"\x01\x00\x00\x00\x00\x21\x00", "SSL sub-TLV truncated: 2 bytes left, a TLV needs at least 3"),
        (b"\x01\x00\x00\x00\x00\x21\x00\x09TLS", "SSL sub-TLV 0x21 of 9 bytes runs past the end of its block"),
        (b"\x01\x00\x00\x00\x00\x22\x00\x01\xff", "SSL sub-TLV 0x22 is not valid UTF-8"),
    ],
)
def test_malformed_ssl_tlv_is_refused_with_its_reason(value: bytes, expected: str) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_tlv_ssl(value)
    assert str(info.value) == expected


# --- parsing: good headers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (V1_TCP4, ProxyHeader(1, "PROXY", ("192.0.2.1", 56324), ("198.51.100.7", 443), (), len(V1_TCP4))),
        (V1_TCP6, ProxyHeader(1, "PROXY", ("2001:db8::1", 1234), ("2001:db8::2", 443), (), len(V1_TCP6))),
        (V1_UNKNOWN, ProxyHeader(1, "PROXY", None, None, (), 15)),
        (V2_TCP4, ProxyHeader(2, "PROXY", ("192.0.2.1", 56324), ("198.51.100.7", 443), (), 28)),
        (V2_TCP6, ProxyHeader(2, "PROXY", ("2001:db8::1", 1234), ("2001:db8::2", 443), (), 52)),
        (V2_LOCAL, ProxyHeader(2, "LOCAL", None, None, (), 16)),
    ],
)
def test_spec_headers_parse_and_the_rest_of_the_stream_is_kept(data: bytes, expected: ProxyHeader) -> None:
    stream = data + CLIENT_HELLO_START
    header = parse(stream)
    assert header == expected
    assert stream[header.length :] == CLIENT_HELLO_START


@pytest.mark.parametrize("data", [V1_TCP4, V1_TCP6, V1_UNKNOWN, V2_TCP4, V2_TCP6, V2_LOCAL])
def test_headers_fed_one_byte_at_a_time_need_every_byte(data: bytes) -> None:
    stream = data + CLIENT_HELLO_START
    for end in range(len(data)):
        assert parse(stream[:end]) is None, end
    header = parse(stream[: len(data)])
    assert header is not None
    assert header.length == len(data)
    assert parse(stream) == header


def test_parse_accepts_bytearray_and_memoryview() -> None:
    expected = parse(V2_TCP4)
    assert parse(bytearray(V2_TCP4)) == expected
    assert parse(memoryview(V2_TCP4 + b"rest")) == expected
    assert parse(memoryview(bytearray(V1_TCP4))) == parse(V1_TCP4)


def test_v1_longest_unknown_line_of_107_bytes_is_accepted() -> None:
    v6 = b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = b"PROXY UNKNOWN " + v6 + b" " + v6 + b" 65535 65535\r\n"
    assert len(line) == V1_MAX_LENGTH
    assert parse(line + CLIENT_HELLO_START) == ProxyHeader(1, "PROXY", None, None, (), 107)


def test_v1_tcp6_addresses_are_normalised() -> None:
    header = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:192.0.2.1 1 2\r\n")
    assert header is not None
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("::ffff:c000:201", 2)


def test_v1_accepts_port_zero_and_the_extremes() -> None:
    header = parse(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n")
    assert header is not None
    assert header.source == ("0.0.0.0", 0)
    assert header.destination == ("255.255.255.255", 65535)


def test_v2_local_with_an_address_family_is_skipped_whole() -> None:
    # LOCAL's family is ignored by the spec; the length still has to be skipped.
    data = SIG + b"\x20\x11\x00\x0c" + V2_TCP4[16:]
    assert parse(data + b"x") == ProxyHeader(2, "LOCAL", None, None, (), 28)
    short = SIG + b"\x20\x11\x00\x03abc"
    assert parse(short) == ProxyHeader(2, "LOCAL", None, None, (), 19)
    odd = SIG + b"\x20\x99\x00\x02ab"
    assert parse(odd) == ProxyHeader(2, "LOCAL", None, None, (), 18)


def test_v2_local_tlvs_round_trip() -> None:
    header = parse(encode_v2(None, None, tlvs=[(0x05, b"id-1")], local=True))
    assert header == ProxyHeader(2, "LOCAL", None, None, ((0x05, b"id-1"),), 23)


def test_v2_proxy_over_unspec_has_no_addresses_but_keeps_tlvs() -> None:
    data = SIG + b"\x21\x00\x00\x05\x02\x00\x02ok"
    assert parse(data) == ProxyHeader(2, "PROXY", None, None, ((0x02, b"ok"),), 21)


def test_v2_proxy_over_unix_stream_has_no_addresses() -> None:
    data = SIG + b"\x21\x31" + struct.pack("!H", 216 + 4) + b"/a".ljust(108, b"\x00") + b"/b".ljust(108, b"\x00")
    data += b"\x04\x00\x01z"
    assert parse(data) == ProxyHeader(2, "PROXY", None, None, ((0x04, b"z"),), 16 + 220)


def test_v2_ipv4_mapped_source_is_returned_as_sent() -> None:
    header = parse(encode_v2(("192.0.2.1", 1234), ("2001:db8::2", 443)))
    assert header is not None
    assert header.source == ("::ffff:c000:201", 1234)


def test_v2_tlvs_up_to_the_limit_are_accepted() -> None:
    header = parse(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[(0xE0, b"x" * (DEFAULT_MAX_TLV_BYTES - 3))]))
    assert header is not None
    assert header.tlvs == ((0xE0, b"x" * (DEFAULT_MAX_TLV_BYTES - 3)),)


def test_v2_tlv_limit_is_configurable() -> None:
    data = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[(0xE0, b"x" * 17)])
    assert reason(data, max_tlv_bytes=19) == "v2 TLVs of 20 bytes exceed the limit of 19"
    assert parse(data, max_tlv_bytes=20) is not None
    assert reason(data[:16], max_tlv_bytes=19) == "v2 TLVs of 20 bytes exceed the limit of 19"


def test_max_header_length_bounds_what_a_caller_buffers() -> None:
    assert max_header_length() == MAX_HEADER == 16 + 216 + DEFAULT_MAX_TLV_BYTES
    assert max_header_length(0) == 232
    assert max_header_length(-1000) == V1_MAX_LENGTH


def test_crc32c_matches_the_standard_check_values() -> None:
    assert _crc32c(b"123456789") == 0xE3069283
    assert _crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4
    assert _crc32c(b"\xff" * 32) == 0x62A8AB43


def with_crc(header_without_crc: bytes) -> bytes:
    """Append a CRC32C TLV to a v2 header, fixing up the length, as a sender following the spec would."""
    length = struct.unpack("!H", header_without_crc[14:16])[0] + 7
    zeroed = header_without_crc[:14] + struct.pack("!H", length) + header_without_crc[16:] + b"\x03\x00\x04" + bytes(4)
    return zeroed[:-4] + struct.pack("!I", _crc32c(zeroed))


def test_v2_header_with_a_correct_crc32c_is_accepted() -> None:
    data = with_crc(encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443), tlvs=[(0x02, b"a.test")]))
    header = parse(data)
    assert header is not None
    assert [kind for kind, _ in header.tlvs] == [PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C]


# --- parsing: everything malformed, with its reason -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Not a PROXY header at all: refused on the first byte, not after waiting for more.
        (b"\x16", "no PROXY header"),
        (CLIENT_HELLO_START, "no PROXY header"),
        (b"GET / HTTP/1.1\r\n", "no PROXY header"),
        (b"PRX", "no PROXY header"),
        (b"proxy TCP4", "no PROXY header"),
        # v1
        (b"PROXY\r\n", "v1 header: expected a single space after PROXY"),
        (b"PROXYTCP4", "v1 header: expected a single space after PROXY"),
        (b"PROXY \r\n", "v1 header has no protocol"),
        (b"PROXY  TCP4", "v1 header fields must be separated by single spaces"),
        (b"PROXY TCP5 ", "unsupported v1 protocol 'TCP5' (expected TCP4, TCP6 or UNKNOWN)"),
        (b"PROXY TCPX", "unsupported v1 protocol 'TCPX' (expected TCP4, TCP6 or UNKNOWN)"),
        (b"PROXY UNKNOWNX\r\n", "unsupported v1 protocol 'UNKNOWNX' (expected TCP4, TCP6 or UNKNOWN)"),
        (b"PROXY TCP4\x16", "v1 header contains an unexpected byte 0x16"),
        (b"PROXY TCP4 1.2.3.4\x00", "v1 header contains an unexpected byte 0x00"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "v1 header must end with CRLF (a lone CR or LF is not accepted)"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "v1 header must end with CRLF (a lone CR or LF is not accepted)"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "v1 header must end with CRLF (a lone CR or LF is not accepted)"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "v1 header fields must be separated by single spaces"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "v1 header fields must be separated by single spaces"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1 TCP4 header needs 4 fields after the protocol, got 3"),
        (b"PROXY TCP6 ::1 ::2 1 2 3\r\n", "v1 TCP6 header needs 4 fields after the protocol, got 5"),
        (b"PROXY TCP4\r\n", "v1 TCP4 header needs 4 fields after the protocol, got 0"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1 source address '01.2.3.4' is not a valid IPv4 address"),
        (b"PROXY TCP4 1.2.3.4 256.0.0.1 1 2\r\n", "v1 destination address '256.0.0.1' is not a valid IPv4 address"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "v1 source address '1.2.3' is not a valid IPv4 address"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "v1 destination address '::1' is not a valid IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1 source address '1.2.3.4' is not a valid IPv6 address"),
        (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", "v1 destination address '1::2::3' is not a valid IPv6 address"),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            "v1 source port '65536' is not a number in 0-65535 (without leading zeros)",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n",
            "v1 destination port '080' is not a number in 0-65535 (without leading zeros)",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n",
            "v1 destination port '00' is not a number in 0-65535 (without leading zeros)",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 a 2\r\n",
            "v1 source port 'a' is not a number in 0-65535 (without leading zeros)",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n",
            "v1 source port '100000' is not a number in 0-65535 (without leading zeros)",
        ),
        (b"PROXY TCP6 " + b"f" * 96, "v1 header longer than 107 bytes"),
        (b"PROXY UNKNOWN " + b"1" * 200 + b"\r\n", "v1 header longer than 107 bytes"),
        # v2
        (b"\r\r", "bad v2 signature"),
        (b"\r\n\r\n\x01", "bad v2 signature"),
        (SIG[:11] + b"\r" + b"\x21\x11\x00\x0c", "bad v2 signature"),
        (SIG + b"\x11", "unsupported v2 version 0x1"),
        (SIG + b"\x31", "unsupported v2 version 0x3"),
        (SIG + b"\x23", "unsupported v2 command 0x3"),
        (SIG + b"\x2f", "unsupported v2 command 0xf"),
        (SIG + b"\x21\x41", "unsupported v2 address family 0x4"),
        (SIG + b"\x21\x13", "unsupported v2 transport protocol 0x3"),
        (
            SIG + b"\x21\x12",
            "unsupported v2 address family/transport 0x12 (expected TCP over IPv4/IPv6, unix stream or UNSPEC)",
        ),
        (
            SIG + b"\x21\x10",
            "unsupported v2 address family/transport 0x10 (expected TCP over IPv4/IPv6, unix stream or UNSPEC)",
        ),
        (SIG + b"\x21\x11\x00\x08", "v2 header length 8 is shorter than its addresses (12 bytes for family 0x11)"),
        (SIG + b"\x21\x21\x00\x0c", "v2 header length 12 is shorter than its addresses (36 bytes for family 0x21)"),
        (SIG + b"\x21\x11" + struct.pack("!H", 12 + 4097), "v2 TLVs of 4097 bytes exceed the limit of 4096"),
        (SIG + b"\x21\x00\xff\xff", "v2 TLVs of 65535 bytes exceed the limit of 4096"),
        (SIG + b"\x20\x99\xff\xff", "v2 header of 65551 bytes exceeds the limit"),
        (
            SIG + b"\x21\x11\x00\x0e" + V2_TCP4[16:] + b"\x02\x00",
            "v2 TLV truncated: 2 bytes left, a TLV needs at least 3",
        ),
        (
            SIG + b"\x21\x11\x00\x13" + V2_TCP4[16:] + b"\x02\x00\x06a.te",
            "v2 TLV 0x02 of 6 bytes runs past the end of its block",
        ),
        (SIG + b"\x21\x11\x00\x12" + V2_TCP4[16:] + b"\x03\x00\x03abc", "v2 CRC32C TLV must be 4 bytes, got 3"),
        (
            SIG + b"\x21\x11\x00\x13" + V2_TCP4[16:] + b"\x03\x00\x04abcd",
            "v2 CRC32C checksum does not match the header",
        ),
    ],
)
def test_malformed_input_is_refused_with_its_reason(data: bytes, expected: str) -> None:
    assert reason(data) == expected
    # More bytes never rescue a header that is already wrong (the reason may name a later fault first).
    with pytest.raises(ProxyProtocolError):
        parse(data + CLIENT_HELLO_START + b"\r\n" * 60)


def test_a_tampered_crc32c_header_is_refused() -> None:
    data = bytearray(with_crc(encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443))))
    data[17] ^= 0x01
    assert reason(bytes(data)) == "v2 CRC32C checksum does not match the header"


def test_v1_without_crlf_waits_up_to_107_bytes_then_gives_up() -> None:
    partial = b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 15)
    assert len(partial) == V1_MAX_LENGTH - 1
    assert parse(partial) is None
    assert reason(partial + b"f") == "v1 header longer than 107 bytes"
    # A CR as the 107th byte cannot be followed by its LF within the limit.
    assert reason(partial + b"\r") == "v1 header longer than 107 bytes"


def test_v1_waits_for_the_lf_after_a_final_cr() -> None:
    assert parse(V1_TCP4[:-1]) is None
    assert parse(b"PROXY UNKNOWN\r") is None


def test_empty_input_needs_more_bytes() -> None:
    assert parse(b"") is None
    assert parse(memoryview(b"")) is None


def test_proxy_protocol_error_is_a_tlsgate_error() -> None:
    assert issubclass(ProxyProtocolError, TlsgateError)
    assert str(ProxyProtocolError("no PROXY header")) == "no PROXY header"
