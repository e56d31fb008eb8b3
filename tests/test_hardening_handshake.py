"""Hostile handshakes and protocol downgrades, against an in-process tunnel on loopback.

Whatever arrives instead of a good ClientHello, the connection ends (refused at once, or cut at
--handshake-timeout), nothing reaches the backend, and the listener keeps serving everyone else. Old protocol
versions, CBC and non-ECDHE suites and client-initiated renegotiation are refused; what is accepted is
TLS 1.2/1.3 with ECDHE and an AEAD cipher, without compression. (tests/test_hardening_scan.py checks the same
with sslyze from the outside.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme

from helpers import (
    backend,
    client_context,
    fd_limit_at_least,
    port_of,
    round_trip,
    server_opts,
    tls_connect,
    tunnel,
    wait_until,
)

pytestmark = pytest.mark.asyncio

_RANDOM = random.Random(20261125)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of every tlsgate log event called ``name``."""
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.name == "tlsgate" and r.getMessage() == name]


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The bytes of a real ClientHello from ``ctx``, made in memory (nothing is sent)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def ends(reader: asyncio.StreamReader, within: float = 20) -> None:
    """The server ends the connection (clean EOF or reset) within ``within`` seconds, sending nothing but
    perhaps a TLS alert."""
    try:
        data = await asyncio.wait_for(reader.read(), within)
    except ConnectionError:
        return
    assert data == b"" or data.startswith(b"\x15\x03"), data  # nothing, or a TLS alert record


# --- not a ClientHello ---------------------------------------------------------------------------------------

REFUSED_AT_ONCE = {
    "http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "random": _RANDOM.randbytes(1024),
    "nul-bytes": b"\x00" * 64,
    "handshake-record-of-garbage": b"\x16\x03\x01\x00\x40" + _RANDOM.randbytes(64),
    "oversized-record": b"\x16\x03\x01\xff\xff" + _RANDOM.randbytes(100),
    "alert-first": b"\x15\x03\x03\x00\x02\x02\x28",
    "application-data-first": b"\x17\x03\x03\x00\x10" + _RANDOM.randbytes(16),
    "change-cipher-spec-first": b"\x14\x03\x03\x00\x01\x01",
}


@pytest.mark.parametrize("what", sorted(REFUSED_AT_ONCE))
async def test_bytes_that_are_not_a_client_hello_are_refused_at_once(
    what: str, pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    # A long handshake timeout: the cut must come from the refusal, not from the timer.
    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True, handshake_timeout="60s")) as tun,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(REFUSED_AT_ONCE[what])
        await ends(reader)
        writer.close()
        await wait_until(lambda: tun.active == 0)
        assert tun.stats.handshake_errors == 1
        assert be.connections == 0
        assert events(caplog, "handshake failed") and not events(caplog, "setup failed")
        await round_trip(tun, client_context(ca))


INCOMPLETE = {
    "half-a-client-hello": lambda hello: hello[: len(hello) // 2],
    "record-header-only": lambda hello: hello[:5],
    "empty-handshake-record": lambda hello: b"\x16\x03\x01\x00\x00",
    "nothing": lambda hello: b"",
}


@pytest.mark.parametrize("what", sorted(INCOMPLETE))
async def test_an_incomplete_client_hello_then_silence_is_cut_at_handshake_timeout(
    what: str, pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 0.3
    hello = INCOMPLETE[what](client_hello(client_context(ca)))
    async with (
        backend() as be,
        tunnel(
            **server_opts(pki_files, be.address, disable_authentication=True, handshake_timeout=f"{timeout}s")
        ) as tun,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        if hello:
            writer.write(hello)
        await ends(reader)
        elapsed = loop.time() - started
        writer.close()
        await wait_until(lambda: tun.active == 0)
        # Not before the timeout (the timer starts after our connect, so this bound is exact).
        assert elapsed >= timeout - 0.01
        assert [e["reason"] for e in events(caplog, "setup failed")] == ["handshake timeout"]
        assert tun.stats.handshake_errors == 1
        assert be.connections == 0


async def test_a_client_hello_trickled_byte_by_byte_is_cut_at_handshake_timeout(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """The handshake timeout is a deadline, not an idle timer: bytes that keep coming do not extend it."""
    hello = client_hello(client_context(ca))
    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True, handshake_timeout="500ms")) as tun,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        sent = 0
        cut = asyncio.ensure_future(ends(reader, within=30))
        try:
            # One byte per 20 ms would take several seconds for the whole hello; the server must not wait.
            while not cut.done() and sent < len(hello):
                with contextlib.suppress(ConnectionError):
                    writer.write(hello[sent : sent + 1])
                sent += 1
                await asyncio.wait({cut}, timeout=0.02)
            await cut
        finally:
            cut.cancel()
            writer.close()
        assert sent < len(hello)
        assert [e["reason"] for e in events(caplog, "setup failed")] == ["handshake timeout"]
        assert be.connections == 0


async def test_a_silent_client_does_not_hold_up_others(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True, handshake_timeout="2s")) as tun,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        await wait_until(lambda: len(tun.setups) == 1)
        for _ in range(3):
            await round_trip(tun, client_context(ca))
        assert len(tun.setups) == 1, "the silent client was cut before the others were served"
        await ends(reader)
        writer.close()
        await wait_until(lambda: tun.active == 0)
        assert [e["reason"] for e in events(caplog, "setup failed")] == ["handshake timeout"]
        assert be.connections == 3


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_thousand_slowloris_clients_do_not_block_a_real_one(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    """500 silent clients and 500 that sent half a ClientHello, all at once: a real client still gets through,
    while every one of them is still waiting, and all of them are cleaned up when they go."""
    count = 1000
    hello = client_hello(client_context(ca))
    with fd_limit_at_least(4 * count + 512):
        async with (
            backend() as be,
            tunnel(**server_opts(pki_files, be.address, disable_authentication=True, handshake_timeout="120s")) as tun,
        ):
            port = port_of(tun)
            writers: list[asyncio.StreamWriter] = []
            try:
                for batch in range(0, count, 100):
                    pairs = await asyncio.gather(
                        *(asyncio.open_connection("127.0.0.1", port) for _ in range(batch, batch + 100))
                    )
                    for i, (_reader, writer) in enumerate(pairs):
                        if (batch + i) % 2:
                            writer.write(hello[: len(hello) // 2])
                        writers.append(writer)
                await wait_until(lambda: len(tun.setups) == count, attempts=6000)
                await round_trip(tun, client_context(ca))
                assert len(tun.setups) == count  # served while all of them were still waiting
                assert tun.stats.handshake_errors == 0
            finally:
                for writer in writers:
                    writer.close()
            await wait_until(lambda: tun.active == 0, attempts=6000)
            assert be.connections == 1
            assert tun.stats.handshake_errors == count


# --- protocol downgrade --------------------------------------------------------------------------------------


@pytest.fixture
def rsa_pki(tmp_path: Path) -> tuple[trustme.CA, dict[str, Path]]:
    """An RSA CA and server certificate: RSA key exchange and DHE suites are only possible with an RSA key, so
    refusing them must be the cipher policy's doing, not the key type's."""
    rsa_ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = rsa_ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    files = {"ca": tmp_path / "rsa-ca.pem", "cert": tmp_path / "rsa.pem", "key": tmp_path / "rsa.key"}
    rsa_ca.cert_pem.write_to_path(str(files["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    return rsa_ca, files


def legacy_client(ca: trustme.CA, version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """A client that offers only ``version`` and ``ciphers`` (security level 0, so OpenSSL sends them at all)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1 and TLSv1_1 are deprecated
        ctx.minimum_version = ctx.maximum_version = version
    if version <= ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers(ciphers)
    return ctx


async def handshake_refused(tun: Any, ctx: ssl.SSLContext) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await round_trip(tun, ctx)
    await wait_until(lambda: tun.stats.handshake_errors == 1)


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
async def test_tls_1_0_and_1_1_are_refused(
    version: str,
    key_type: str,
    pki_files: dict[str, Path],
    ca: trustme.CA,
    rsa_pki: tuple[trustme.CA, dict[str, Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer, files = (ca, pki_files) if key_type == "ecdsa" else rsa_pki
    async with backend() as be, tunnel(**server_opts(files, be.address, disable_authentication=True)) as tun:
        await handshake_refused(tun, legacy_client(issuer, getattr(ssl.TLSVersion, version), "ALL:@SECLEVEL=0"))
        assert be.connections == 0
    assert [e["reason"] for e in events(caplog, "handshake failed")] == [
        "client offered only TLS versions older than 1.2"
    ]


REFUSED_TLS12_SUITES = {
    "ecdsa": {
        "cbc": "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384",
        "ccm": "ECDHE-ECDSA-AES128-CCM:ECDHE-ECDSA-AES256-CCM:ECDHE-ECDSA-AES128-CCM8",
        "null-and-anon": "ECDHE-ECDSA-NULL-SHA:AECDH-AES128-SHA:ADH-AES128-GCM-SHA256",
    },
    "rsa": {
        "cbc": "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384",
        "static-rsa-aead": "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-CCM",
        "dhe-aead": "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305",
    },
}


@pytest.mark.parametrize(
    ("key_type", "suites"), [(key, name) for key, group in REFUSED_TLS12_SUITES.items() for name in group]
)
async def test_tls_1_2_without_ecdhe_and_aead_is_refused(
    key_type: str,
    suites: str,
    pki_files: dict[str, Path],
    ca: trustme.CA,
    rsa_pki: tuple[trustme.CA, dict[str, Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer, files = (ca, pki_files) if key_type == "ecdsa" else rsa_pki
    ciphers = REFUSED_TLS12_SUITES[key_type][suites] + ":@SECLEVEL=0"
    async with backend() as be, tunnel(**server_opts(files, be.address, disable_authentication=True)) as tun:
        try:
            ctx = legacy_client(issuer, ssl.TLSVersion.TLSv1_2, ciphers)
        except ssl.SSLError:
            pytest.skip(f"this OpenSSL cannot even offer {suites} suites")
        await handshake_refused(tun, ctx)
        assert be.connections == 0
    assert [e["reason"] for e in events(caplog, "handshake failed")] == [
        "no cipher suite in common with the client (AEAD with ECDHE required)"
    ]


ACCEPTED_TLS12_SUITES = {
    "ecdsa": ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"],
    "rsa": ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"],
}


@pytest.mark.parametrize(
    ("key_type", "suite"), [(key, suite) for key, suites in ACCEPTED_TLS12_SUITES.items() for suite in suites]
)
async def test_tls_1_2_with_ecdhe_and_aead_is_accepted_without_compression(
    key_type: str,
    suite: str,
    pki_files: dict[str, Path],
    ca: trustme.CA,
    rsa_pki: tuple[trustme.CA, dict[str, Path]],
) -> None:
    issuer, files = (ca, pki_files) if key_type == "ecdsa" else rsa_pki
    async with backend() as be, tunnel(**server_opts(files, be.address, disable_authentication=True)) as tun:
        reader, writer = await tls_connect(tun, legacy_client(issuer, ssl.TLSVersion.TLSv1_2, suite))
        tls = writer.get_extra_info("ssl_object")
        assert tls.version() == "TLSv1.2"
        assert tls.cipher()[0] == suite
        assert tls.compression() is None
        writer.write(b"ok")
        assert await reader.readexactly(2) == b"ok"
        writer.close()
        await writer.wait_closed()


async def test_tls_1_3_is_accepted_without_compression(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun:
        _reader, writer = await tls_connect(tun, client_context(ca))
        tls = writer.get_extra_info("ssl_object")
        assert tls.version() == "TLSv1.3"
        assert tls.compression() is None
        writer.close()
        await writer.wait_closed()


def _recorder(store: list[bytes]) -> Any:
    async def echo_and_record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            store.append(data)
            writer.write(data)
            await writer.drain()

    return echo_and_record


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line tool (s_client)")
async def test_client_initiated_renegotiation_is_refused(
    pki_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Python's ssl module cannot renegotiate, so `openssl s_client -tls1_2` does: its `R` command starts a new
    handshake inside the established connection. The server must refuse it (OP_NO_RENEGOTIATION; OpenSSL 3 also
    refuses client-initiated renegotiation unless SSL_OP_ALLOW_CLIENT_RENEGOTIATION is set, and this test fails
    when it is): the client gives up, the connection ends, and there was only one handshake."""
    caplog.set_level(logging.INFO, logger="tlsgate")
    received: list[bytes] = []
    async with (
        backend(_recorder(received)) as be,
        tunnel(**server_opts(pki_files, be.address, allow_cn=["alice"])) as tun,
    ):
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{port_of(tun)}", "-servername", "localhost",
            "-CAfile", str(pki_files["ca"]), "-cert", str(pki_files["client_cert"]),
            "-key", str(pki_files["client_key"]),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdin is not None
        try:
            proc.stdin.write(b"before\n")
            await wait_until(lambda: b"".join(received) == b"before\n", attempts=4000)
            proc.stdin.write(b"R\n")  # s_client: renegotiate
            await wait_until(lambda: tun.stats.closed == 1, attempts=4000)
            proc.stdin.close()
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert b"RENEGOTIATING" in output
        # The server's no_renegotiation alert; under load s_client sometimes reads the record that follows it first
        # and names that instead. Either way the renegotiation failed: the handshake count below is what matters.
        assert b"no renegotiation" in output.lower() or b"unexpected record" in output.lower(), output
        assert tun.stats.handshakes == 1
        assert b"".join(received) == b"before\n"
        assert be.connections == 1
    (closed,) = events(caplog, "closed")
    assert "closed first" not in closed["end"], closed  # an error, not a clean end
