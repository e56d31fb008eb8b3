"""PostgreSQL STARTTLS (#16 part 2): the opening exchange as plain values, then a real PostgreSQL and psql.

The first half drives ``tlsgate.engine.postgres`` with bytes: every way of splitting a request, every refusal,
and that no input can make an opening wait without taking a byte (which would spin the event loop). The second
half starts a real PostgreSQL (``initdb`` + ``postgres`` from the Debian packages, as the unprivileged
``postgres`` user when the tests run as root) on loopback once for the module, and connects ``psql`` to it
through ``tlsgate server --protocol postgres`` and ``tlsgate client --target-protocol postgres``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.cli import cli
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
from tlsgate.settings.config import ConfigErrors, tunnel_config

from helpers import backend, invoke, port_of, postgres_server, refused, server_opts, tunnel, wait_until

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


# -- a real PostgreSQL for the module ---------------------------------------------------------------------------


@dataclass
class Postgres:
    """The module's PostgreSQL: plaintext and TLS (``ssl = on``, certificate from ``ca``) on 127.0.0.1:``port``."""

    port: int
    ca: trustme.CA
    directory: Path


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    ca = trustme.CA(organization_name="tlsgate postgres test CA")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tls = (cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes())
    with postgres_server(tls=tls) as server:
        yield Postgres(server.port, ca, server.directory)


def psql_binary() -> str:
    found = shutil.which("psql")
    if found is None:
        pytest.fail("psql is not installed: apt-get install postgresql-client (see .ci/run)")
    return found


async def psql(conninfo: str, query: str = "select 1") -> tuple[int, str]:
    """Run ``psql`` (never blocking the loop tlsgate runs in): exit code and everything it printed."""
    proc = await asyncio.create_subprocess_exec(
        psql_binary(), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query, conninfo,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PGCONNECT_TIMEOUT": "30", "PGAPPNAME": "tlsgate-test"},
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


@pytest.mark.asyncio
async def test_the_module_postgres_answers_plaintext_and_tls(postgres: Postgres) -> None:
    code, out = await psql(f"host=127.0.0.1 port={postgres.port} user=tester dbname=postgres sslmode=disable")
    assert (code, out) == (0, "1")
    ca_file = postgres.directory / "ca.pem"
    postgres.ca.cert_pem.write_to_path(str(ca_file))
    code, out = await psql(
        f"host=127.0.0.1 port={postgres.port} user=tester dbname=postgres sslmode=verify-full sslrootcert={ca_file}",
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    assert (code, out) == (0, "t")


# -- psql through tlsgate server --protocol postgres, to the plaintext side of a real PostgreSQL -----------------


def private(path: Path) -> str:
    """libpq refuses a key file that others may read."""
    os.chmod(path, 0o600)
    return str(path)


def conninfo(port: int, **params: object) -> str:
    base = {"host": "127.0.0.1", "port": port, "user": "tester", "dbname": "postgres", "connect_timeout": 30}
    return " ".join(f"{key}={value}" for key, value in {**base, **params}.items())


def verified(pki_files: dict[str, Path], port: int, **params: object) -> str:
    """psql's strictest mode: the server's certificate must chain to our CA and name 127.0.0.1."""
    options: dict[str, object] = {
        "sslmode": "verify-full",
        "sslrootcert": pki_files["ca"],
        "sslcert": pki_files["client_cert"],
        "sslkey": private(pki_files["client_key"]),
    }
    return conninfo(port, **{**options, **params})


def logged(caplog: pytest.LogCaptureFixture, *needles: str) -> bool:
    text = "\n".join(record.getMessage() + " " + str(getattr(record, "fields", "")) for record in caplog.records)
    return all(needle in text for needle in needles)


SSL_IN_USE = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


@pytest.mark.asyncio
async def test_psql_verify_full_with_client_certificate_reaches_plaintext_postgres(
    postgres: Postgres, pki_files: dict[str, Path]
) -> None:
    opts = server_opts(pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres")
    async with tunnel(**opts) as tun:
        code, out = await psql(verified(pki_files, port_of(tun)), "select current_user || ' ' || 6 * 7")
        assert (code, out) == (0, "tester 42")
        # The hop behind tlsgate is plaintext: PostgreSQL itself sees no TLS.
        code, out = await psql(verified(pki_files, port_of(tun)), SSL_IN_USE)
        assert (code, out) == (0, "f")
        assert tun.stats.established == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("who", ["no certificate", "wrong CA", "disallowed CN"])
async def test_psql_refused_client_sees_an_error_and_never_reaches_postgres(
    postgres: Postgres,
    pki_files: dict[str, Path],
    ca: trustme.CA,
    other_ca: trustme.CA,
    tmp_path: Path,
    who: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    params: dict[str, object] = {}
    if who == "no certificate":
        params = {"sslcert": tmp_path / "none.pem", "sslkey": tmp_path / "none.key"}
    else:
        issuer = other_ca if who == "wrong CA" else ca
        leaf = issuer.issue_cert("bob@example.test", common_name="alice" if who == "wrong CA" else "bob")
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "bob.pem"))
        leaf.private_key_pem.write_to_path(str(tmp_path / "bob.key"))
        params = {"sslcert": tmp_path / "bob.pem", "sslkey": private(tmp_path / "bob.key")}
    opts = server_opts(pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres")
    async with tunnel(**opts) as tun:
        code, out = await psql(verified(pki_files, port_of(tun), **params))
        # psql names the TLS alert tlsgate sent during the handshake.
        alert = {"no certificate": "certificate required", "wrong CA": "unknown ca", "disallowed CN": "bad certificate"}
        assert code != 0
        assert "SSL error: " in out and alert[who] in out, out
        await wait_until(lambda: sum(tun.stats.refused.values()) == 1)
        assert tun.stats.established == 0
    expected = {"no certificate": "no client certificate", "wrong CA": "not signed by a CA", "disallowed CN": "CN=bob"}
    assert logged(caplog, expected[who])


@pytest.mark.asyncio
async def test_psql_without_tls_is_told_why_in_its_own_words(
    postgres: Postgres, pki_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    opts = server_opts(pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres")
    async with tunnel(**opts) as tun:
        code, out = await psql(conninfo(port_of(tun), sslmode="disable"))
        assert code != 0
        assert "FATAL:  this server accepts TLS connections only" in out, out
        assert tun.stats.refused == {"postgres": 1}
        assert tun.stats.established == 0
    assert logged(caplog, "plaintext StartupMessage: TLS required")


async def startup_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Send a StartupMessage as user tester; return PostgreSQL's first message type (R: authentication)."""
    writer.write(startup_message("tester", "postgres"))
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(1), 30)


def alice_context(pki_files: dict[str, Path], alpn: Sequence[str] = ()) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki_files["ca"]))
    ctx.load_cert_chain(str(pki_files["client_cert"]), str(pki_files["client_key"]))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


@pytest.mark.asyncio
async def test_gssenc_request_is_declined_then_tls_reaches_postgres(
    postgres: Postgres, pki_files: dict[str, Path]
) -> None:
    """What libpq does with a Kerberos ticket (gssencmode=prefer): GSSENCRequest, N, SSLRequest, S, TLS."""
    opts = server_opts(pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres")
    async with tunnel(**opts) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(GSSENC_REQUEST)
        assert await asyncio.wait_for(reader.readexactly(1), 30) == b"N"
        writer.write(SSL_REQUEST)
        assert await asyncio.wait_for(reader.readexactly(1), 30) == b"S"
        await writer.start_tls(alice_context(pki_files), server_hostname="127.0.0.1")
        assert await startup_over(reader, writer) == b"R"
        writer.close()


@pytest.mark.asyncio
async def test_direct_tls_with_alpn_postgresql_reaches_postgres(postgres: Postgres, pki_files: dict[str, Path]) -> None:
    """PostgreSQL 17's sslnegotiation=direct: the ClientHello first, ALPN postgresql, no SSLRequest."""
    opts = server_opts(pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres")
    async with tunnel(**opts) as tun:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port_of(tun), ssl=alice_context(pki_files, [ALPN]), server_hostname="127.0.0.1"
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == ALPN
        assert await startup_over(reader, writer) == b"R"
        writer.close()


@pytest.mark.asyncio
async def test_direct_tls_without_alpn_is_refused(
    postgres: Postgres, pki_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """As PostgreSQL 17 does: a direct ClientHello must say it is for PostgreSQL, or it could be any protocol
    aimed at this port (the ALPN cross-protocol attacks)."""
    opts = server_opts(pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres")
    async with tunnel(**opts) as tun:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port_of(tun), ssl=alice_context(pki_files), server_hostname="127.0.0.1"
            )
            await startup_over(reader, writer)
        await wait_until(lambda: tun.stats.refused.get("postgres", 0) == 1)
        assert tun.stats.established == 0
    assert logged(caplog, "ALPN")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00\x00\x08\x12\x34\x56\x78", b"\x00\x00\x00\x04" + SSL_REQUEST],
    ids=["http", "unknown code", "short length"],
)
async def test_garbage_before_ssl_request_is_refused(
    postgres: Postgres, pki_files: dict[str, Path], garbage: bytes
) -> None:
    opts = server_opts(pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres")
    async with tunnel(**opts) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(garbage)
        with contextlib.suppress(ConnectionError):
            answer = await asyncio.wait_for(reader.read(), 30)
            assert answer[:1] in (b"", b"E")  # never an S
        writer.close()
        await wait_until(lambda: tun.stats.refused.get("postgres", 0) == 1)
        assert tun.stats.established == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("sent", [SSL_REQUEST, SSL_REQUEST[:5]], ids=["after SSLRequest", "inside SSLRequest"])
async def test_a_client_that_stalls_is_cut_at_the_handshake_timeout(
    postgres: Postgres, pki_files: dict[str, Path], sent: bytes
) -> None:
    opts = server_opts(
        pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres", handshake_timeout="300ms"
    )
    async with tunnel(**opts) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(sent)
        expected = b"S" if sent == SSL_REQUEST else b""
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 30) == expected  # then closed by tlsgate, not by us
        writer.close()
        await wait_until(lambda: tun.stats.handshake_timeouts == 1)
        assert tun.stats.established == 0
        assert not tun.setups


# -- a plaintext application through tlsgate client --target-protocol postgres, to PostgreSQL with ssl = on ------


def postgres_ca_file(postgres: Postgres) -> str:
    path = postgres.directory / "ca.pem"
    postgres.ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.asyncio
@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
async def test_plaintext_psql_reaches_a_tls_postgres_through_the_client(postgres: Postgres, sslmode: str) -> None:
    """sslmode=prefer (libpq's default) asks tlsgate for TLS first: tlsgate declines (N), since it encrypts."""
    opts = {"target": f"127.0.0.1:{postgres.port}", "cacert": postgres_ca_file(postgres), "target_protocol": "postgres"}
    async with tunnel("client", **opts) as tun:
        code, out = await psql(conninfo(port_of(tun), sslmode=sslmode), SSL_IN_USE)
        assert (code, out) == (0, "t")  # PostgreSQL itself sees TLS
        assert tun.stats.established == 1


async def answers(reply: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stand-in for a PostgreSQL server: read the SSLRequest, answer ``reply``."""
    assert await reader.readexactly(8) == SSL_REQUEST
    writer.write(reply)
    await writer.drain()
    await reader.read()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("reply", "reason"),
    [(b"N", "does not accept TLS"), (b"E\x00\x00\x00\x05\x00", "ErrorResponse"), (b"S\x16\x03\x03", "CVE-2021-23222")],
    ids=["N", "E", "bytes after S"],
)
async def test_client_gives_up_on_a_target_that_refuses_tls_and_says_why(
    postgres: Postgres, reply: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answers(reply, reader, writer)

    async with backend(handler) as be:
        opts = {"target": be.address, "cacert": postgres_ca_file(postgres), "target_protocol": "postgres"}
        async with tunnel("client", **opts) as tun:
            code, out = await psql(conninfo(port_of(tun), sslmode="disable"))
            assert code != 0, out
            await wait_until(lambda: tun.stats.target_errors == 1)
            assert tun.stats.established == 0
    assert logged(caplog, reason)


@pytest.mark.asyncio
async def test_psql_through_server_to_a_tls_postgres_asks_it_for_tls_first(
    postgres: Postgres, pki_files: dict[str, Path]
) -> None:
    """Both ends PostgreSQL's way: psql's SSLRequest answered by tlsgate, tlsgate's own SSLRequest to the target."""
    opts = server_opts(
        pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres", target_tls=True,
        target_cacert=postgres_ca_file(postgres), target_protocol="postgres",
    )  # fmt: skip
    async with tunnel(**opts) as tun:
        code, out = await psql(verified(pki_files, port_of(tun)), SSL_IN_USE)
        assert (code, out) == (0, "t")


# -- flags ---------------------------------------------------------------------------------------------------


def test_an_unknown_protocol_is_refused_in_one_line(pki_files: dict[str, Path]) -> None:
    result = invoke(
        cli, "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:5432", "--cert", pki_files["cert"],
        "--key", pki_files["key"], "--disable-authentication", "--protocol", "mysql",
    )  # fmt: skip
    refused(result, "--protocol")


def test_target_protocol_in_server_mode_needs_target_tls(pki_files: dict[str, Path]) -> None:
    result = invoke(
        cli, "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:5432", "--cert", pki_files["cert"],
        "--key", pki_files["key"], "--disable-authentication", "--target-protocol", "postgres",
    )  # fmt: skip
    refused(result, "--target-protocol postgres asks the target for TLS: give --target-tls too")


def test_protocol_in_a_client_mode_tunnel_is_refused_with_the_key_to_use() -> None:
    with pytest.raises(ConfigErrors) as caught:
        tunnel_config("client", {"listen": "127.0.0.1:0", "target": "127.0.0.1:5432", "protocol": "postgres"})
    assert "--protocol is for server mode" in str(caught.value)
    assert "--target-protocol postgres" in str(caught.value)


# -- odd but valid: IPv6, a unix socket, a PROXY header first -----------------------------------------------------


@pytest.mark.asyncio
async def test_psql_over_ipv6_to_the_server(postgres: Postgres, pki_files: dict[str, Path]) -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6; the loopback ::1 is needed")
    opts = server_opts(
        pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres", listen="[::1]:0"
    )
    async with tunnel(**opts) as tun:
        port = int(tun.addresses[0].rsplit(":", 1)[1])
        code, out = await psql(verified(pki_files, port, host="::1"), "select 'over ipv6'")
        assert (code, out) == (0, "over ipv6")


@pytest.mark.asyncio
async def test_psql_by_unix_socket_through_the_client(postgres: Postgres) -> None:
    """libpq never asks for TLS on a unix socket: its StartupMessage comes first, and is handed on whole."""
    directory = Path(tempfile.mkdtemp(prefix="tlsgate-pgsock-"))
    try:
        opts = {
            "listen": f"unix:{directory}/.s.PGSQL.5432",  # where libpq looks for host=DIR port=5432
            "target": f"127.0.0.1:{postgres.port}",
            "cacert": postgres_ca_file(postgres),
            "target_protocol": "postgres",
        }
        async with tunnel("client", **opts):
            code, out = await psql(f"host={directory} port=5432 user=tester dbname=postgres", SSL_IN_USE)
            assert (code, out) == (0, "t")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.asyncio
async def test_proxy_header_then_ssl_request(postgres: Postgres, pki_files: dict[str, Path]) -> None:
    """Behind a trusted load balancer the PROXY header comes first, then PostgreSQL's opening."""
    opts = server_opts(
        pki_files, f"127.0.0.1:{postgres.port}", allow_cn=["alice"], protocol="postgres",
        accept_proxy_from=["127.0.0.1/32"],
    )  # fmt: skip
    async with tunnel(**opts) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 5433\r\n" + SSL_REQUEST)
        assert await asyncio.wait_for(reader.readexactly(1), 30) == b"S"
        await writer.start_tls(alice_context(pki_files), server_hostname="127.0.0.1")
        assert await startup_over(reader, writer) == b"R"
        writer.close()
