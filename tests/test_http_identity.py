"""--target-http-headers: the backend learns who the client is (X-Forwarded-Client-Cert, -For, -Proto), and no
client can say it for itself. Sans-IO rules first (engine.httpid, engine.xfcc), then real sockets on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import struct
from pathlib import Path
from urllib.parse import unquote

import h11
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate.cli import cli
from tlsgate.engine import httpid
from tlsgate.engine.httpid import HttpIdentity, HttpRefused
from tlsgate.engine.xfcc import client_cert_value, identity_headers

from helpers import (
    Handler,
    backend,
    invoke,
    pki_client_context,
    port_of,
    read_until_end,
    refused,
    server_opts,
    tls_connect,
    tunnel,
    wait_until,
)

OURS = b"X-Forwarded-Client-Cert: Hash=ab\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: https\r\n"
OUR_NAMES = ("x-forwarded-client-cert", "x-forwarded-for", "x-forwarded-proto", "forwarded")


# -- what a backend parses out of what we send --------------------------------------------------------------------


def backend_view(stream: bytes) -> list[tuple[h11.Request, bytes, list[tuple[bytes, bytes]]]]:
    """Parse ``stream`` as an HTTP/1.1 server would: (request, body, trailers) for each request in it."""
    requests = []
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    request, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            break
        if event is h11.PAUSED:
            conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
            continue
        if isinstance(event, h11.Request):
            request, body = event, b""
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            requests.append((request, body, list(event.headers)))
    return requests


def header_values(request: h11.Request, name: str) -> list[bytes]:
    return [value for key, value in request.headers if key == name.encode()]


def rewrite(*pieces: bytes, added: bytes = OURS) -> bytes:
    http = HttpIdentity(added)
    out = b""
    for piece in pieces:
        out += bytes(http.requests.receive(piece))
        while http.requests.backlog:
            out += http.requests.pull()
    return out


def assert_only_ours(request: h11.Request) -> None:
    names = [key.decode().replace("_", "-") for key, _ in request.headers]
    assert names.count("x-forwarded-client-cert") == 1
    assert names.count("x-forwarded-for") == 1
    assert names.count("x-forwarded-proto") == 1
    assert "forwarded" not in names
    assert header_values(request, "x-forwarded-client-cert") == [b"Hash=ab"]
    assert header_values(request, "x-forwarded-for") == [b"192.0.2.7"]
    assert header_values(request, "x-forwarded-proto") == [b"https"]
    for value in header_values(request, "connection"):
        assert not any(token.strip().lower().replace(b"_", b"-") in {n.encode() for n in OUR_NAMES}
                       for token in value.split(b","))  # fmt: skip


# -- forging -----------------------------------------------------------------------------------------------------

spellings = st.sampled_from(OUR_NAMES).flatmap(
    lambda name: st.tuples(*(st.sampled_from(sorted({c, c.upper(), "_" if c == "-" else c})) for c in name)).map(
        "".join
    )
)
forged_lines = st.lists(
    st.tuples(spellings, st.sampled_from(["evil", "Hash=00;Subject=\"CN=admin\"", "10.0.0.1", "https", ""]),
              st.booleans()),
    min_size=1, max_size=8,
)  # fmt: skip


def forged_head(lines: list[tuple[str, str, bool]], path: str = "/") -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: app\r\n"
    for name, value, folded in lines:
        # obs-fold: the value continues on a line that starts with white space (h11 unfolds it).
        head += f"{name}: {value}\r\n  more\r\n" if folded else f"{name}: {value}\r\n"
    head += "Connection: keep-alive, " + ", ".join(name for name, _, _ in lines) + "\r\n"
    return head.encode() + b"\r\n"


@settings(max_examples=200, deadline=None)
@given(forged_lines)
def test_forged_identity_headers_never_reach_the_backend_in_any_spelling(lines: list[tuple[str, str, bool]]) -> None:
    ((request, _, _),) = backend_view(rewrite(forged_head(lines)))
    assert_only_ours(request)


@settings(max_examples=100, deadline=None)
@given(forged_lines, st.lists(st.integers(min_value=1, max_value=400), max_size=6))
def test_pipelined_keep_alive_requests_each_get_ours_wherever_the_reads_split(
    lines: list[tuple[str, str, bool]], cuts: list[int]
) -> None:
    stream = (
        forged_head(lines, "/a")
        + b"POST /b HTTP/1.1\r\nHost: app\r\nContent-Length: 11\r\nX-Forwarded-For: 1.1.1.1\r\n\r\nhello world"
        + b"PUT /c HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nX-FORWARDED-PROTO: http\r\n\r\n"
        + b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Forwarded-Client-Cert: forged\r\nChecksum: 1\r\n\r\n"
        + forged_head(lines, "/d")
    )
    points = sorted({c % len(stream) for c in cuts} - {0})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    requests = backend_view(rewrite(*pieces))
    assert [r.target for r, _, _ in requests] == [b"/a", b"/b", b"/c", b"/d"]
    for request, _, _ in requests:
        assert_only_ours(request)
    assert requests[1][1] == b"hello world"
    assert requests[2][1] == b"hello world"
    assert requests[2][2] == [(b"checksum", b"1")]  # the forged trailer is gone, the other one kept


def test_a_content_length_body_passes_unparsed_even_when_it_looks_like_a_head() -> None:
    body = b"GET /x HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    head = b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n" % len(body)
    ((request, seen, _),) = backend_view(rewrite(head, body))
    assert seen == body
    assert_only_ours(request)


def test_content_length_beside_chunked_is_dropped_so_the_backend_frames_as_we_did() -> None:
    stream = (
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nGET \r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    out = rewrite(stream)
    assert b"Content-Length" not in out.split(b"\r\n\r\n")[0]
    requests = backend_view(out)
    assert [r.target for r, _, _ in requests] == [b"/", b"/next"]
    assert_only_ours(requests[1][0])


# -- protocol switches --------------------------------------------------------------------------------------------

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_after_101_the_bytes_pass_raw_both_ways() -> None:
    http = HttpIdentity(OURS)
    out = bytes(http.requests.receive(UPGRADE + b"\x81\x05hello"))
    assert out.endswith(OURS + b"\r\n") and http.requests.waiting  # held until the answer
    http.responses.receive(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert http.requests.resume() and http.requests.raw
    assert http.requests.pull() == b"\x81\x05hello"
    frame = b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"  # WebSocket data, however it looks
    assert bytes(http.requests.receive(frame)) == frame


def test_a_refused_upgrade_keeps_parsing_so_a_forged_header_after_it_is_stripped() -> None:
    http = HttpIdentity(OURS)
    smuggled = b"GET /admin HTTP/1.1\r\nHost: app\r\nX-Forwarded-Client-Cert: Hash=00\r\n\r\n"
    out = bytes(http.requests.receive(UPGRADE + smuggled))
    assert http.requests.waiting
    http.responses.receive(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert http.requests.resume() and not http.requests.waiting
    out += http.requests.pull()
    requests = backend_view(out)
    assert [r.target for r, _, _ in requests] == [b"/ws", b"/admin"]
    for request, _, _ in requests:
        assert_only_ours(request)


def test_connect_switches_on_2xx_only() -> None:
    for status, raw in ((b"200", True), (b"403", False)):
        http = HttpIdentity(OURS)
        http.requests.receive(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
        assert http.requests.waiting
        http.responses.receive(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n")
        assert http.requests.resume()
        assert http.requests.raw is raw


@pytest.mark.parametrize("chunked", [False, True])
def test_a_101_inside_a_body_the_client_chose_is_not_taken_for_a_switch(chunked: bool) -> None:
    http = HttpIdentity(OURS)
    http.requests.receive(b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n\r\n" + UPGRADE)
    fake = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    if chunked:
        first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(fake), fake)
    else:
        first = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(fake), fake)
    http.responses.receive(first)
    assert http.requests.waiting and http.responses.switched is None  # the upgrade's own answer is still due
    http.responses.receive(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    assert http.requests.resume() and not http.requests.raw


@pytest.mark.parametrize(
    "odd",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",  # bare LF
        b"HTTP/1.1 200 OK\r\nX: a\r\n  folded\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",  # to a request that asked for no switch
        b"SSH-2.0-x\r\n\r\n",
    ],
)
def test_a_response_the_watcher_cannot_follow_makes_it_stop_believing_switches(odd: bytes) -> None:
    http = HttpIdentity(OURS)
    http.requests.receive(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    http.responses.receive(odd)
    assert not http.responses.known and not http.may_answer()
    http.requests.receive(UPGRADE)
    assert not http.requests.resume()


def test_a_switch_request_after_the_target_lost_us_ends_the_connection() -> None:
    http = HttpIdentity(OURS)
    http.responses.receive(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # nobody asked: we lose count
    http.requests.receive(UPGRADE)
    assert http.requests.waiting
    assert not http.requests.resume()
    assert not http.may_answer()


def test_expect_100_continue_and_the_body_after_it_pass() -> None:
    http = HttpIdentity(OURS)
    head = b"PUT /f HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    out = bytes(http.requests.receive(head))
    http.responses.receive(b"HTTP/1.1 100 Continue\r\n\r\n")
    out += bytes(http.requests.receive(b"abc"))
    ((request, body, _),) = backend_view(out)
    assert body == b"abc" and header_values(request, "expect") == [b"100-continue"]
    assert http.responses.outstanding == 1
    http.responses.receive(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert http.responses.outstanding == 0 and http.may_answer()


def test_responses_are_counted_through_head_chunked_and_length_bodies() -> None:
    http = HttpIdentity(OURS)
    http.requests.receive(
        b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert http.responses.outstanding == 3
    stream = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"  # HEAD: no body despite the length
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    )
    for i in range(len(stream)):  # one byte at a time: the worst split
        http.responses.receive(stream[i : i + 1])
    assert http.responses.outstanding == 0 and http.responses.known


# -- refusals -----------------------------------------------------------------------------------------------------


def test_large_bodies_are_followed_in_relay_sized_reads() -> None:
    http = HttpIdentity(OURS)
    http.requests.receive(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    big = os.urandom(300_000)
    stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(big), big)
    stream += b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big)
    http.responses.receive(stream[:10])  # a head cut short, then full relay reads behind it
    for i in range(10, len(stream), 65536):
        http.responses.receive(memoryview(stream)[i : i + 65536])
    assert http.responses.known and http.responses.outstanding == 0


@pytest.mark.parametrize(
    ("sent", "status", "words"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "HTTP/2.0"),
        (b"GET /\r\n", 400, "HTTP/0.9"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "bad HTTP/1.x request"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", 400, "not HTTP/1.x"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "chunked"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "Content-Length"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400, "illegal header line"),
    ],
)
def test_what_is_not_http_1_is_refused_with_a_reason(sent: bytes, status: int, words: str) -> None:
    http = HttpIdentity(OURS)
    with pytest.raises(HttpRefused) as caught:
        http.requests.receive(sent)
    assert caught.value.status == status
    assert words in caught.value.reason
    response = caught.value.response()
    assert response.startswith(b"HTTP/1.1 %d " % status) and b"Connection: close" in response
    assert http.may_answer()  # nothing was forwarded, so the answer cannot land inside another one


def test_a_head_longer_than_the_limit_is_refused_with_431_and_not_buffered() -> None:
    http = HttpIdentity(OURS)
    line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
    http.requests.receive(b"GET / HTTP/1.1\r\nHost: app\r\n")
    with pytest.raises(HttpRefused) as caught:
        for _ in range(httpid.MAX_HEAD // len(line) + 2):
            http.requests.receive(line)
    assert caught.value.status == 431


def test_a_head_over_the_limit_is_refused_even_when_it_arrives_whole() -> None:
    head = b"GET / HTTP/1.1\r\nHost: app\r\nX-Padding: " + b"a" * httpid.MAX_HEAD + b"\r\n\r\n"
    with pytest.raises(HttpRefused) as caught:
        HttpIdentity(OURS).requests.receive(head)
    assert caught.value.status == 431


def test_many_tiny_requests_in_one_read_come_out_in_bounded_steps() -> None:
    added = b"X-Forwarded-Client-Cert: " + b"C" * 2000 + b"\r\n"
    tiny = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    http = HttpIdentity(added)
    count = 65536 // len(tiny)
    first = http.requests.receive(tiny * count)
    sizes = [len(first)]
    while http.requests.backlog:
        sizes.append(len(http.requests.pull()))
    assert max(sizes) <= httpid.OUTPUT_BUDGET + len(tiny) + len(added) + 2
    assert sum(sizes) == count * (len(tiny) + len(added))
    assert http.requests.requests == count


# -- X-Forwarded-Client-Cert -------------------------------------------------------------------------------------


def make_cert(subject: x509.Name, sans: list[x509.GeneralName]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_xfcc_has_envoys_keys_in_envoys_order() -> None:
    der = make_cert(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "eng"),
                   x509.NameAttribute(NameOID.COMMON_NAME, "alice")]),
        [x509.UniformResourceIdentifier("spiffe://example.org/alice"), x509.DNSName("alice.example.org"),
         x509.DNSName("a.example.org"), x509.IPAddress(ipaddress.ip_address("192.0.2.1"))],
    )  # fmt: skip
    value = client_cert_value(der)
    assert value == (
        f'Hash={hashlib.sha256(der).hexdigest()};Subject="CN=alice,OU=eng";URI=spiffe://example.org/alice;'
        "DNS=alice.example.org;DNS=a.example.org"
    )


def test_xfcc_cert_is_the_url_escaped_pem_and_uri_stays_when_empty() -> None:
    der = make_cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bob")]), [])
    value = client_cert_value(der, with_cert=True)
    assert ";URI=" in value and value.endswith("URI=")
    cert = value.split('Cert="', 1)[1].split('"', 1)[0]
    assert "+" not in cert and "/" not in cert and "\n" not in cert
    assert ssl.PEM_cert_to_DER_cert(unquote(cert)) == der


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=16), st.text(alphabet=st.characters(max_codepoint=127), min_size=1, max_size=30))
def test_no_name_a_ca_signs_can_break_out_of_its_value_or_the_header(cn: str, dns: str) -> None:
    der = make_cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), [x509.DNSName(dns)])
    lines = identity_headers(leaf=der, client_ip="2001:db8::1", tls=True)
    assert all(0x20 <= b < 0x7F for b in lines.replace(b"\r\n", b""))
    assert lines.count(b"\r\n") == 3
    value = lines.split(b"\r\n")[0].split(b": ", 1)[1].decode()
    # Outside quotes, the separators are ours alone: exactly Hash, Subject, URI and one DNS.
    keys, quoted, escaped, field = [], False, False, ""
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            keys.append(field.split("=", 1)[0])
            field = ""
            continue
        field += ch
    keys.append(field.split("=", 1)[0])
    assert not quoted
    assert keys == ["Hash", "Subject", "URI", "DNS"]


def test_without_a_client_certificate_only_for_and_proto_are_set() -> None:
    assert identity_headers(leaf=None, client_ip="192.0.2.7", tls=True) == (
        b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: https\r\n"
    )
    assert identity_headers(leaf=None, client_ip="", tls=False) == b"X-Forwarded-Proto: http\r\n"


# -- on loopback: a real client (curl), a real tunnel, an HTTP backend that records what it parsed ----------------


@dataclasses.dataclass
class SeenRequests:
    """What an HTTP/1.1 backend (h11, as a real one parses) received: every request and its body."""

    requests: list[h11.Request] = dataclasses.field(default_factory=list)
    bodies: list[bytes] = dataclasses.field(default_factory=list)
    raw_after_switch: bytearray = dataclasses.field(default_factory=bytearray)


def http_backend(seen: SeenRequests) -> Handler:
    """Answers each request with ``seen N``; 101 to a WebSocket upgrade, then echoes raw bytes back."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                seen.requests.append(event)
                body = b""
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                seen.bodies.append(body)
                request = seen.requests[-1]
                if header_values(request, "upgrade") == [b"websocket"]:
                    switch = [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
                    writer.write(conn.send(h11.InformationalResponse(status_code=101, headers=switch)))
                    seen.raw_after_switch += conn.trailing_data[0]
                    writer.write(conn.trailing_data[0])
                    while data := await reader.read(65536):
                        seen.raw_after_switch += data
                        writer.write(data)
                        await writer.drain()
                    return
                reply = b"seen %d" % len(seen.requests)
                writer.write(
                    conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"%d" % len(reply))]))
                )
                writer.write(conn.send(h11.Data(data=reply)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
                conn.start_next_cycle()
            else:  # ConnectionClosed
                return

    return handle


def curl(*args: str) -> list[str]:
    binary = shutil.which("curl")
    assert binary, "curl is needed (.ci/run installs it)"
    return [binary, "-sS", "--max-time", "30", *args]


async def run(command: list[str], stdin: bytes = b"") -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode == 0, err.decode()
    return out


def curl_client(pki_files: dict[str, Path], port: int) -> list[str]:
    return [
        "--cacert", str(pki_files["ca"]), "--cert", str(pki_files["client_cert"]),
        "--key", str(pki_files["client_key"]), "--resolve", f"localhost:{port}:127.0.0.1",
    ]  # fmt: skip


def xfcc_of(pki_files: dict[str, Path]) -> bytes:
    der = ssl.PEM_cert_to_DER_cert(pki_files["client_cert"].read_text())
    return client_cert_value(der).encode()


@pytest.mark.asyncio
async def test_curl_forging_every_header_on_keep_alive_requests_and_the_backend_sees_only_ours(
    pki_files: dict[str, Path],
) -> None:
    seen = SeenRequests()
    async with backend(http_backend(seen)) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True)
    ) as tun:  # fmt: skip
        port = port_of(tun)
        forged = [
            "X-Forwarded-Client-Cert: Hash=00;Subject=\"CN=admin\"", "x-forwarded-for: 10.6.6.6",
            "X-FORWARDED-PROTO: http", "X_Forwarded_For: 10.6.6.7", "Forwarded: for=10.6.6.8",
            "Connection: X-Forwarded-For",
        ]  # fmt: skip
        url = f"https://localhost:{port}/"
        args = curl(*curl_client(pki_files, port), *(a for h in forged for a in ("-H", h)), url, url + "second")
        out = await run(args)
    assert out == b"seen 1seen 2"  # one connection, kept alive: curl reused it
    assert be.connections == 1
    assert [r.target for r in seen.requests] == [b"/", b"/second"]
    for request in seen.requests:
        assert header_values(request, "x-forwarded-client-cert") == [xfcc_of(pki_files)]
        assert header_values(request, "x-forwarded-for") == [b"127.0.0.1"]
        assert header_values(request, "x-forwarded-proto") == [b"https"]
        names = [name.replace(b"_", b"-") for name, _ in request.headers]
        assert names.count(b"x-forwarded-for") == 1 and b"forwarded" not in names
        assert b"x-forwarded-for" not in b",".join(header_values(request, "connection")).lower()


@pytest.mark.asyncio
async def test_uploads_pass_intact_chunked_and_sized_with_100_continue(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload)
    seen = SeenRequests()
    async with backend(http_backend(seen)) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True)
    ) as tun:  # fmt: skip
        port = port_of(tun)
        base = curl(*curl_client(pki_files, port))
        url = f"https://localhost:{port}/up"
        await run([*base, "-H", "Expect: 100-continue", "--data-binary", f"@{upload}", url])
        await run([*base, "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", url])
    assert [hashlib.sha256(b).hexdigest() for b in seen.bodies] == [hashlib.sha256(payload).hexdigest()] * 2
    assert header_values(seen.requests[0], "expect") == [b"100-continue"]
    assert header_values(seen.requests[1], "transfer-encoding") == [b"chunked"]
    for request in seen.requests:
        assert header_values(request, "x-forwarded-client-cert") == [xfcc_of(pki_files)]


@pytest.mark.asyncio
async def test_after_a_websocket_upgrade_the_bytes_pass_raw_both_ways(pki_files: dict[str, Path]) -> None:
    seen = SeenRequests()
    ctx = pki_client_context(pki_files)
    async with backend(http_backend(seen)) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True)
    ) as tun:  # fmt: skip
        reader, writer = await tls_connect(tun, ctx)
        # Sent at once with the upgrade: held until the 101, then passed raw (a frame that looks like a request).
        early = b"GET /x HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
        writer.write(UPGRADE + early)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await asyncio.wait_for(reader.readexactly(len(early)), 20) == early
        later = b"\x81\x05hello X-Forwarded-Client-Cert: x\r\n"
        writer.write(later)
        assert await asyncio.wait_for(reader.readexactly(len(later)), 20) == later
        writer.close()
    assert bytes(seen.raw_after_switch) == early + later
    (request,) = seen.requests
    assert header_values(request, "x-forwarded-for") == [b"127.0.0.1"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sent", "status", "reason"),
    [
        (b"GET /\r\n", b"400", b"HTTP/0.9"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"505", b"HTTP/2.0"),
        (b"\x00\x01garbage\r\n\r\n", b"400", b"bad HTTP/1.x request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 40000 + b"\r\n\r\n", b"431", b"longer than"),
    ],
)
async def test_what_is_not_http_1_gets_an_error_response_and_never_reaches_the_backend(
    pki_files: dict[str, Path], caplog: pytest.LogCaptureFixture, sent: bytes, status: bytes, reason: bytes
) -> None:
    seen = SeenRequests()
    async with backend(http_backend(seen)) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True)
    ) as tun:  # fmt: skip
        reader, writer = await tls_connect(tun, pki_client_context(pki_files))
        writer.write(sent)
        answer = await read_until_end(reader)
        writer.close()
        await wait_until(lambda: any(e.startswith("http " + status.decode()) for e in ends(caplog)))
        assert tun.stats.http_refused == 1
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert reason in answer and b"Connection: close" in answer
    assert seen.requests == []


@pytest.mark.asyncio
async def test_a_burst_of_pipelined_requests_each_gets_the_whole_certificate(pki_files: dict[str, Path]) -> None:
    seen = SeenRequests()
    count = 400  # ~30 bytes each in, ~1.5 KiB each out: many output steps behind one read
    async with backend(http_backend(seen)) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True, target_http_cert=True)
    ) as tun:  # fmt: skip
        reader, writer = await tls_connect(tun, pki_client_context(pki_files))
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n" * count)
        answers = b""
        while answers.count(b"seen ") < count:
            answers += await asyncio.wait_for(reader.read(65536), 20)
        writer.close()
    assert len(seen.requests) == count
    cert = ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(pki_files["client_cert"].read_text()))
    for request in seen.requests:
        (value,) = header_values(request, "x-forwarded-client-cert")
        assert unquote(value.decode().split('Cert="', 1)[1].split('"', 1)[0]) == cert
        assert header_values(request, "x-forwarded-for") == [b"127.0.0.1"]


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["ipv6", "unix"])
async def test_the_client_address_over_ipv6_and_none_for_a_unix_peer(
    pki_files: dict[str, Path], tmp_path: Path, where: str
) -> None:
    if where == "ipv6":
        with socket.socket(socket.AF_INET6) as probe:
            try:
                probe.bind(("::1", 0))
            except OSError:
                pytest.skip("no IPv6 loopback on this machine")
    seen = SeenRequests()
    listen = "[::1]:0" if where == "ipv6" else f"unix:{tmp_path / 'web.sock'}"
    ctx = pki_client_context(pki_files)
    async with backend(http_backend(seen)) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True, listen=listen)
    ) as tun:  # fmt: skip
        if where == "ipv6":
            reader, writer = await asyncio.open_connection("::1", port_of(tun), ssl=ctx, server_hostname="localhost")
        else:
            path = str(tmp_path / "web.sock")
            reader, writer = await asyncio.open_unix_connection(path, ssl=ctx, server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"seen 1"), 20)).startswith(b"HTTP/1.1 200 ")
        writer.close()
    (request,) = seen.requests
    assert header_values(request, "x-forwarded-for") == ([b"::1"] if where == "ipv6" else [])
    assert header_values(request, "x-forwarded-proto") == [b"https"]
    assert header_values(request, "x-forwarded-client-cert") == [xfcc_of(pki_files)]


@pytest.mark.asyncio
async def test_a_switch_after_a_response_we_could_not_follow_is_cut_at_once(
    pki_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    received = bytearray()

    async def bare_lf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")  # valid to some clients, not to the watcher
        await writer.drain()
        while data := await reader.read(65536):
            received.extend(data)

    async with backend(bare_lf) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True)
    ) as tun:  # fmt: skip
        reader, writer = await tls_connect(tun, pki_client_context(pki_files))
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"ok"), 20)).endswith(b"\n\nok")
        writer.write(UPGRADE + b"GET /raw HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        await read_until_end(reader)
        writer.close()
        await wait_until(lambda: any("could not be followed" in e for e in ends(caplog)))
    assert b"6.6.6.6" not in received


@pytest.mark.asyncio
async def test_a_tls_target_gets_the_headers_too(pki_files: dict[str, Path], server_cert: trustme.LeafCert) -> None:
    target_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(target_ctx)
    seen = SeenRequests()
    async with backend(http_backend(seen), ssl_ctx=target_ctx) as be, tunnel(
        **server_opts(pki_files, f"localhost:{be.port}", allow_all=True, target_http_headers=True,
                      target_tls=True, target_cacert=str(pki_files["ca"]))
    ) as tun:  # fmt: skip
        port = port_of(tun)
        url = f"https://localhost:{port}/"
        assert await run(curl(*curl_client(pki_files, port), "-H", "X-Forwarded-Proto: http", url, url)) == (
            b"seen 1seen 2"
        )
    assert [header_values(r, "x-forwarded-proto") for r in seen.requests] == [[b"https"], [b"https"]]
    assert [header_values(r, "x-forwarded-client-cert") for r in seen.requests] == [[xfcc_of(pki_files)]] * 2


@pytest.mark.asyncio
async def test_a_client_that_resets_in_the_middle_of_a_head_is_no_internal_error(pki_files: dict[str, Path]) -> None:
    seen = SeenRequests()
    async with backend(http_backend(seen)) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True)
    ) as tun:  # fmt: skip
        _, writer = await tls_connect(tun, pki_client_context(pki_files))
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-")
        await writer.drain()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await wait_until(lambda: tun.stats.closed == 1)
        assert tun.stats.internal_errors == 0
    assert seen.requests == []


@pytest.mark.asyncio
async def test_a_target_that_stops_reading_stops_us_reading_the_client(pki_files: dict[str, Path]) -> None:
    stalled = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stalled.wait()

    burst = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * (8 * 1024 * 1024 // 27)  # 8 MiB of tiny requests
    async with backend(never_reads) as be, tunnel(
        **server_opts(pki_files, be.address, allow_all=True, target_http_headers=True, target_http_cert=True)
    ) as tun:  # fmt: skip
        _, writer = await tls_connect(tun, pki_client_context(pki_files))
        writer.write(burst)
        await wait_until(lambda: any(r.outbound.pending is not None for r in tun.relays), attempts=6000)
        (relay,) = tun.relays
        # Each request grows by a whole PEM (about 50x); what we hold is one step of output, and what we read of
        # the client is what the target's socket took (over 50) plus that step: about 100 KiB of the 8 MiB sent.
        assert relay.outbound.pending is not None
        assert len(relay.outbound.pending) <= httpid.OUTPUT_BUDGET + 4096
        assert relay.bytes_in < len(burst) // 16
        stalled.set()
        writer.transport.abort()


def test_only_http_1_may_be_negotiated_by_alpn() -> None:
    assert httpid.refuse_alpn(None) is None and httpid.refuse_alpn("http/1.1") is None
    refusal = httpid.refuse_alpn("h2")
    assert refusal is not None and "ALPN 'h2'" in refusal.reason


def ends(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``end`` of every ``closed`` log line: how each relayed connection ended."""
    return [str(getattr(r, "fields", {}).get("end")) for r in caplog.records if r.getMessage() == "closed"]


def test_the_flags_are_checked(pki_files: dict[str, Path]) -> None:
    base = ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--cert", str(pki_files["cert"]),
            "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"]), "--allow-all"]  # fmt: skip
    refused(invoke(cli, *base, "--target-http-cert"), "--target-http-cert needs --target-http-headers")
    client = invoke(cli, "client", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--disable-authentication",
                    "--target-http-headers")  # fmt: skip
    assert client.exit_code == 2 and "--target-http-headers" in client.output + client.stderr
    refused(invoke(cli, *base, "--target-http-headers", "--alpn", "h2,http/1.1"), "HTTP/1.x only")
    refused(invoke(cli, *base, "--target-http-headers", "--protocol", "postgres"), "a postgres tunnel has none")


def test_the_file_keys_are_the_flags(pki_files: dict[str, Path], tmp_path: Path) -> None:
    def tunnel_file(extra: str) -> Path:
        path = tmp_path / "tlsgate.toml"
        path.write_text(
            '[[tunnel]]\nname = "web"\nmode = "server"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\n'
            f"allow-all = true\ncert = {json.dumps(str(pki_files['cert']))}\n"
            f"key = {json.dumps(str(pki_files['key']))}\n"
            f"cacert = {json.dumps(str(pki_files['ca']))}\n{extra}\n"
        )
        return path

    ok = invoke(cli, "check-config", tunnel_file("target-http-headers = true\ntarget-http-cert = true"))
    assert ok.exit_code == 0 and "X-Forwarded-* headers with the PEM" in ok.output
    refused(invoke(cli, "check-config", tunnel_file("target-http-cert = true")), "needs target-http-headers")
