"""PostgreSQL STARTTLS (#16 part 2): the opening exchange as plain values, then a real PostgreSQL and psql.

The first half drives ``tlsgate.engine.postgres`` with bytes: every way of splitting a request, every refusal,
and that no input can make an opening wait without taking a byte (which would spin the event loop). The second
half starts a real PostgreSQL (``initdb`` + ``postgres`` from the Debian packages, as the unprivileged
``postgres`` user when the tests run as root) on loopback once for the module, and connects ``psql`` to it
through ``tlsgate server --protocol postgres`` and ``tlsgate client --target-protocol postgres``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.engine.postgres import (
    ALPN,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET,
    PROTOCOL_3,
    SSL_REQUEST,
    SSL_REQUEST_CODE,
    AppOpening,
    ServerOpening,
    Step,
    error_response,
    target_answer,
)

GSSENC_REQUEST = struct.pack("!II", 8, GSSENC_REQUEST_CODE)
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def startup_message(user: str = "alice", database: str = "app") -> bytes:
    body = struct.pack("!I", PROTOCOL_3)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def cancel_request() -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, 4242, 0x5EC12E7)


def parse_error_response(message: bytes) -> dict[str, str]:
    """The fields of one ErrorResponse, as libpq reads them."""
    assert message[:1] == b"E"
    (length,) = struct.unpack("!I", message[1:5])
    assert length == len(message) - 1
    body = message[5:]
    assert body.endswith(b"\0\0")
    fields = {}
    for field in body[:-1].split(b"\0")[:-1]:
        fields[field[:1].decode()] = field[1:].decode()
    return fields


def drive(opening: ServerOpening | AppOpening, data: bytes, cuts: Sequence[int] = ()) -> tuple[list[Step], int]:
    """Feed ``data`` as a socket would hand it over, arriving in pieces split at ``cuts``; peek, consume, repeat.

    Returns the steps taken and how many bytes they consumed. Checks the rule that keeps the loop from spinning:
    a step that waits for more ("read") has taken at least one byte, so the socket is not left readable.
    """
    arrivals = sorted({c for c in cuts if 0 < c < len(data)} | {len(data)})
    steps: list[Step] = []
    position = 0
    for arrived in arrivals:
        while position < arrived:
            peeked = data[position : min(arrived, position + opening.wanted())]
            assert peeked, "an opening asked to peek nothing"
            step = opening.receive(peeked)
            steps.append(step)
            assert 0 <= step.consume <= len(peeked)
            position += step.consume
            if step.then != "read":
                return steps, position
            assert step.consume > 0, "a waiting step that took no byte: the socket stays readable and the loop spins"
    return steps, position


# -- the server's side: tlsgate in front of a plaintext PostgreSQL ---------------------------------------------


def test_ssl_request_is_answered_s_and_only_its_eight_bytes_are_taken() -> None:
    steps, consumed = drive(ServerOpening(), SSL_REQUEST)
    assert steps[-1] == Step(8, "tls", reply=b"S")
    assert consumed == 8


@given(st.lists(st.integers(min_value=1, max_value=7), max_size=7))
def test_ssl_request_split_anywhere_still_gets_its_s(cuts: list[int]) -> None:
    steps, consumed = drive(ServerOpening(), SSL_REQUEST, cuts)
    assert steps[-1].then == "tls" and steps[-1].reply == b"S"
    assert consumed == 8
    assert b"".join(s.reply for s in steps) == b"S"


def test_gssenc_request_is_declined_then_ssl_request_accepted() -> None:
    opening = ServerOpening()
    steps, _ = drive(opening, GSSENC_REQUEST)
    assert steps == [Step(8, "read", reply=b"N")]
    steps, _ = drive(opening, SSL_REQUEST)
    assert steps[-1] == Step(8, "tls", reply=b"S")


def test_a_second_gssenc_request_is_refused() -> None:
    opening = ServerOpening()
    drive(opening, GSSENC_REQUEST)
    steps, _ = drive(opening, GSSENC_REQUEST)
    assert steps[-1].then == "refuse"
    assert "not a PostgreSQL startup packet" in steps[-1].reason


def test_direct_tls_client_hello_is_left_in_the_socket_for_openssl() -> None:
    steps, consumed = drive(ServerOpening(), CLIENT_HELLO_START)
    assert steps == [Step(0, "tls", direct=True)]
    assert consumed == 0


def test_bytes_sent_after_ssl_request_before_the_answer_are_refused() -> None:
    """CVE-2021-23214: plaintext queued behind the SSLRequest must never pass as if it came through TLS."""
    steps, _ = drive(ServerOpening(), SSL_REQUEST + startup_message())
    assert steps[-1].then == "refuse"
    assert steps[-1].consume == 8
    assert "after SSLRequest" in steps[-1].reason
    assert steps[-1].reply == b""


@pytest.mark.parametrize("packet", [startup_message(), cancel_request()], ids=["startup", "cancel"])
def test_plaintext_session_is_refused_with_an_error_response_after_its_whole_packet(packet: bytes) -> None:
    steps, consumed = drive(ServerOpening(), packet)
    final = steps[-1]
    assert final.then == "refuse"
    # The whole packet is read first: closing on unread bytes would send a reset that can beat the answer.
    assert consumed == len(packet)
    fields = parse_error_response(final.reply)
    assert fields["S"] == fields["V"] == "FATAL"
    assert fields["C"] == "28000"
    assert "sslmode=require" in fields["M"]
    assert "TLS required" in final.reason


@given(st.binary(min_size=1, max_size=64), st.lists(st.integers(min_value=1, max_value=63), max_size=6))
def test_any_bytes_end_in_tls_or_a_refusal_and_never_spin(data: bytes, cuts: list[int]) -> None:
    opening = ServerOpening()
    steps, consumed = drive(opening, data, cuts)
    final = steps[-1]
    if final.then == "read":  # bytes ran out mid-packet: everything seen was taken
        assert consumed == len(data)
    else:
        assert final.then in ("tls", "refuse")
    for step in steps:
        assert step.reply in (b"", b"S", b"N") or step.reply.startswith(b"E")


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=2**32 - 1))
def test_a_header_that_is_no_request_is_refused_as_garbage(length: int, code: int) -> None:
    known = {SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE, PROTOCOL_3}
    if code in known or (length >> 24) == 0x16:
        return
    steps, consumed = drive(ServerOpening(), struct.pack("!II", length, code))
    assert steps[-1].then == "refuse"
    assert consumed <= 8


def test_an_overlong_startup_packet_is_refused_at_once() -> None:
    steps, consumed = drive(ServerOpening(), struct.pack("!II", MAX_STARTUP_PACKET + 1, PROTOCOL_3) + b"x" * 64)
    assert steps[-1].then == "refuse"
    assert consumed == 8
    assert parse_error_response(steps[-1].reply)["C"] == "08P01"


@given(st.text(max_size=200))
def test_error_response_is_well_formed_for_any_message(message: str) -> None:
    fields = parse_error_response(error_response(message))
    assert fields["M"] == message.encode("utf-8", "replace").replace(b"\0", b"").decode()


# -- the application's side: tlsgate client in front of a plaintext PostgreSQL application ----------------------


def test_app_ssl_and_gssenc_requests_are_declined_and_the_startup_message_handed_on() -> None:
    opening = AppOpening()
    message = startup_message()
    steps, consumed = drive(opening, GSSENC_REQUEST + SSL_REQUEST + message)
    assert [s.reply for s in steps] == [b"N", b"N", b""]
    assert steps[-1].then == "relay"
    assert steps[-1].forward == message[:8]
    assert consumed == 24  # the rest of the StartupMessage stays in the socket for the relay


@given(st.lists(st.integers(min_value=1, max_value=15), max_size=8))
def test_app_opening_split_anywhere_forwards_exactly_the_header(cuts: list[int]) -> None:
    message = startup_message()
    steps, consumed = drive(AppOpening(), SSL_REQUEST + message, cuts)
    assert steps[-1].then == "relay"
    assert steps[-1].forward + message[consumed - 8 :] == message


def test_app_that_starts_tls_itself_is_refused() -> None:
    steps, consumed = drive(AppOpening(), CLIENT_HELLO_START)
    assert steps[-1].then == "refuse" and consumed == 0
    assert "direct" in steps[-1].reason


@given(st.binary(min_size=1, max_size=32), st.lists(st.integers(min_value=1, max_value=31), max_size=4))
def test_app_opening_never_spins(data: bytes, cuts: list[int]) -> None:
    steps, _ = drive(AppOpening(), data, cuts)
    assert steps[-1].then in ("read", "relay", "refuse")


# -- the target's answer to our SSLRequest (client mode) ------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"S", ""),
        (b"N", "does not accept TLS"),
        (b"E\0\0\0\x10SFATAL\0Mno\0\0", "ErrorResponse"),
        (b"S\x16\x03\x03", "CVE-2021-23222"),
        (b"", "closed"),
        (b"HTTP/1.1 400", "not a PostgreSQL server"),
    ],
)
def test_target_answer(answer: bytes, expected: str) -> None:
    reason = target_answer(answer)
    assert (reason == "") if not expected else (expected in reason)


def test_alpn_is_postgresql() -> None:
    assert ALPN == "postgresql"
