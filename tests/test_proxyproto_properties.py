"""Property tests for the PROXY protocol codec: round trips, and a parser that cannot be made to misbehave."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.engine.proxyproto import (
    DEFAULT_MAX_TLV_BYTES,
    PP2_TYPE_CRC32C,
    PP2_TYPE_SSL,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    max_header_length,
    parse,
    parse_tlv_ssl,
    tls_tlvs,
)

bounded = settings(max_examples=200, deadline=None)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

addresses = st.ip_addresses()
ports = st.integers(min_value=0, max_value=65535)
# CRC32C and SSL are left out: a random value would (rightly) fail the checksum or the SSL record's layout
# (test_attack_proxy.py throws random bytes at those).
tlv_types = st.integers(min_value=0, max_value=255).filter(lambda kind: kind not in (PP2_TYPE_CRC32C, PP2_TYPE_SSL))
tlv_lists = st.lists(st.tuples(tlv_types, st.binary(max_size=64)), max_size=6)
short_texts = st.none() | st.text(max_size=40)

# Inputs that reach past the first byte: near-valid headers of each form, so the deep checks are exercised too.
v1_tokens = st.sampled_from(
    [b"1.2.3.4", b"255.255.255.255", b"01.2.3.4", b"::1", b"2001:db8::1", b"0", b"65535", b"65536", b"080", b""]
) | st.binary(max_size=6)


@st.composite
def v1_like(draw: st.DrawFn) -> bytes:
    protocol = draw(st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN", b"TCP5", b""]))
    fields = draw(st.lists(v1_tokens, max_size=6))
    ending = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""]))
    return b" ".join([b"PROXY", protocol, *fields]) + ending + draw(st.binary(max_size=16))


@st.composite
def v2_like(draw: st.DrawFn) -> bytes:
    version_command = draw(st.sampled_from([0x21, 0x21, 0x20, 0x22, 0x11]))
    family = draw(st.sampled_from([0x11, 0x21, 0x00, 0x31, 0x12, 0x99]))
    size = {0x11: 12, 0x12: 12, 0x21: 36, 0x31: 216}.get(family, 0)
    addresses = draw(st.binary(min_size=size, max_size=size))
    tlvs = b"".join(kind.to_bytes(1, "big") + len(v).to_bytes(2, "big") + v for kind, v in draw(tlv_lists))
    body = addresses + tlvs + draw(st.sampled_from([b"", b"", b"\x02", b"\x02\x00", b"\x03\x00\x04abcd"]))
    declared = max(0, len(body) + draw(st.sampled_from([0, 0, 0, -1, 1, -7])))
    return (
        V2_SIGNATURE
        + bytes([version_command, family])
        + declared.to_bytes(2, "big")
        + body
        + draw(st.binary(max_size=16))
    )


any_input = st.binary(max_size=200) | v1_like() | v2_like()


def sent_as(src: IPAddress, dst: IPAddress) -> tuple[IPAddress, IPAddress]:
    """The addresses a header carries: mapped IPv4 unmapped, then both IPv6 if the families still differ."""

    def unmapped(address: IPAddress) -> IPAddress:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped
        return address

    src, dst = unmapped(src), unmapped(dst)
    if src.version != dst.version:
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
    return src, dst


def check_addresses(header: ProxyHeader, src: IPAddress, sport: int, dst: IPAddress, dport: int) -> None:
    assert header.source is not None
    assert header.destination is not None
    expected_src, expected_dst = sent_as(src, dst)
    assert ipaddress.ip_address(header.source[0]) == expected_src
    assert ipaddress.ip_address(header.destination[0]) == expected_dst
    assert (header.source[1], header.destination[1]) == (sport, dport)


@bounded
@given(src=addresses, sport=ports, dst=addresses, dport=ports, tlvs=tlv_lists, tail=st.binary(max_size=32))
def test_v2_round_trip(
    src: IPAddress, sport: int, dst: IPAddress, dport: int, tlvs: list[tuple[int, bytes]], tail: bytes
) -> None:
    data = encode_v2((str(src), sport), (str(dst), dport), tlvs=tlvs)
    header = parse(data + tail)
    assert header is not None
    assert (header.version, header.command, header.length) == (2, "PROXY", len(data))
    assert header.tlvs == tuple(tlvs)
    check_addresses(header, src, sport, dst, dport)


@bounded
@given(src=addresses, sport=ports, dst=addresses, dport=ports, tail=st.binary(max_size=32))
def test_v1_round_trip(src: IPAddress, sport: int, dst: IPAddress, dport: int, tail: bytes) -> None:
    data = encode_v1((str(src), sport), (str(dst), dport))
    assert len(data) <= V1_MAX_LENGTH
    header = parse(data + tail)
    assert header is not None
    assert (header.version, header.command, header.length) == (1, "PROXY", len(data))
    check_addresses(header, src, sport, dst, dport)


@bounded
@given(tlvs=tlv_lists)
def test_v2_local_round_trip(tlvs: list[tuple[int, bytes]]) -> None:
    header = parse(encode_v2(None, None, tlvs=tlvs, local=True))
    assert header is not None
    assert (header.command, header.source, header.destination, header.tlvs) == ("LOCAL", None, None, tuple(tlvs))


@bounded
@given(
    version=short_texts,
    sni=short_texts,
    client_cn=short_texts,
    cipher=short_texts,
    verified=st.booleans(),
    has_client_cert=st.booleans(),
)
def test_tls_tlvs_round_trip(
    version: str | None,
    sni: str | None,
    client_cn: str | None,
    cipher: str | None,
    verified: bool,
    has_client_cert: bool,
) -> None:
    tlvs = tls_tlvs(
        version=version, sni=sni, client_cn=client_cn, cipher=cipher, verified=verified, has_client_cert=has_client_cert
    )
    header = parse(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=tlvs))
    assert header is not None
    assert header.tlv(0x02) == (sni.encode() if sni else None)
    ssl_value = header.tlv(0x20)
    assert ssl_value is not None
    info = parse_tlv_ssl(ssl_value)
    assert (info.version, info.cn, info.cipher) == (version or None, client_cn or None, cipher or None)
    assert info.client_ssl
    assert info.cert_conn == info.cert_sess == has_client_cert
    assert info.verified == (verified and has_client_cert)


@bounded
@given(src=st.text(max_size=50) | addresses.map(str), dst=st.text(max_size=50) | addresses.map(str), port=ports)
def test_encoders_turn_any_host_text_into_a_header_that_parses(src: str, dst: str, port: int) -> None:
    for data in (encode_v1((src, port), (dst, port)), encode_v2((src, port), (dst, port))):
        header = parse(data)
        assert header is not None
        assert header.length == len(data)


def outcome(data: bytes) -> ProxyHeader | str | None:
    """What parse makes of data: a header, None, or the reason it gave. Anything else escapes and fails."""
    try:
        return parse(data)
    except ProxyProtocolError as err:
        assert str(err)
        return f"error: {err}"


@bounded
@given(data=any_input)
def test_parse_answers_with_a_header_none_or_a_proxy_protocol_error(data: bytes) -> None:
    result = outcome(data)
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)
        assert result.version in (1, 2)
        assert result.command in ("PROXY", "LOCAL")
        # The header alone is enough, and what follows it is not read.
        assert parse(data[: result.length]) == result
        assert parse(data + b"\x00" * 8) == result


@bounded
@given(data=any_input, split=st.integers(min_value=0, max_value=400))
def test_more_bytes_never_change_a_decision(data: bytes, split: int) -> None:
    early = outcome(data[:split])
    if early is None:
        return
    late = outcome(data)
    if isinstance(early, ProxyHeader):
        assert late == early
    else:
        assert isinstance(late, str)


@bounded
@given(
    data=any_input,
    padding=st.sampled_from([b"\x00", b"f", b" ", b"\r\n"]),
    max_tlv_bytes=st.integers(min_value=0, max_value=DEFAULT_MAX_TLV_BYTES),
)
def test_a_buffer_of_max_header_length_always_gets_an_answer(data: bytes, padding: bytes, max_tlv_bytes: int) -> None:
    limit = max_header_length(max_tlv_bytes)
    padded = (data + padding * limit)[: max(limit, len(data))]
    try:
        assert parse(padded, max_tlv_bytes=max_tlv_bytes) is not None
    except ProxyProtocolError as err:
        assert str(err)


@bounded
@given(value=st.binary(max_size=80))
def test_parse_tlv_ssl_only_raises_proxy_protocol_error(value: bytes) -> None:
    try:
        info = parse_tlv_ssl(value)
    except ProxyProtocolError:
        return
    assert len(value) >= 5
    assert sum(3 + len(sub) for _, sub in info.sub_tlvs) == len(value) - 5
