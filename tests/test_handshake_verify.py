"""Identity and revocation rules inside the TLS handshake (the ``verify`` path of tlsgate.tls.internals).

A peer refused by tlsgate's own rules gets a TLS alert during the handshake, as with ghostunnel, instead of a
completed handshake and then a reset: in client mode the target sees ``bad_certificate`` for a server that fails
``--verify-*``, in server mode the client sees it for a certificate that fails ``--allow-*`` (and
``certificate_revoked`` for one in a ``--crl``). The post-handshake check stays as the second line: with the
path off (kill switch) the same peers are refused the old way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tlsgate.engine import runtime
from tlsgate.tls import contexts, internals

from helpers import (
    TlsTarget,
    backend,
    client_context,
    echo,
    port_of,
    revocable_client,
    server_opts,
    tls_connect,
    tunnel,
)
from helpers import tls_target as target_with

pytestmark = pytest.mark.skipif(not internals.enabled("verify"), reason="the verify path is off here")


def tls_target(cert: trustme.LeafCert) -> contextlib.AbstractAsyncContextManager[TlsTarget]:
    """A TLS target serving ``cert`` that records how each handshake ended."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return target_with(ctx)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


# -- client mode: the target is refused with an alert -------------------------------------------------------------


async def _through_client_tunnel(port: int) -> bytes:
    """Send ``ping`` through a client tunnel; what comes back (nothing when the tunnel cuts the connection)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionError:
        return b""  # cut so fast that the connect itself saw the reset
    writer.write(b"ping")
    try:
        return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_client_mode_verify_cn_refuses_the_target_with_a_bad_certificate_alert(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        tls_target(ca.issue_cert("localhost", common_name="localhost")) as target,
        tunnel("client", target=f"localhost:{target.port}", cacert=str(pki_files["ca"]), verify_cn=["db"]) as cli,
    ):
        assert await _through_client_tunnel(port_of(cli)) == b""
        assert await target.results.get() == "SSLV3_ALERT_BAD_CERTIFICATE"
        [line] = events(caplog, "target refused")
        assert line.fields["rule"] == "identity" or "cn" in line.fields["rule"]  # type: ignore[attr-defined]
        assert "CN=localhost" in line.fields["reason"]  # type: ignore[attr-defined]
        assert cli.stats.target_errors == 1


@pytest.mark.asyncio
async def test_client_mode_accepts_a_target_that_meets_verify_cn(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with (
        tls_target(ca.issue_cert("localhost", common_name="localhost")) as target,
        tunnel(
            "client", target=f"localhost:{target.port}", cacert=str(pki_files["ca"]), verify_cn=["localhost"]
        ) as cli,
    ):
        assert await _through_client_tunnel(port_of(cli)) == b"ping"
        assert await target.results.get() == "ok"


@pytest.mark.asyncio
async def test_with_the_verify_path_off_the_target_is_still_refused_after_the_handshake(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(internals, "_VERIFY", None)  # what TLSGATE_INTERNALS=-verify leaves
    async with (
        tls_target(ca.issue_cert("localhost", common_name="localhost")) as target,
        tunnel("client", target=f"localhost:{target.port}", cacert=str(pki_files["ca"]), verify_cn=["db"]) as cli,
    ):
        assert await _through_client_tunnel(port_of(cli)) == b""
        assert await target.results.get() != "SSLV3_ALERT_BAD_CERTIFICATE"  # a completed handshake, then a cut
        assert len(events(caplog, "target refused")) == 1
        assert cli.stats.target_errors == 1


@pytest.mark.asyncio
async def test_an_exception_in_the_check_refuses_the_peer_and_is_logged_once(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_rules: object) -> internals.PeerCheck:
        def check(leaf: bytes, chain: tuple[bytes, ...]) -> internals.Refusal | None:
            raise RuntimeError("injected")

        return check

    monkeypatch.setattr(runtime, "_target_check", broken)
    monkeypatch.setattr(internals, "_callback_failed", False)
    async with (
        tls_target(ca.issue_cert("localhost", common_name="localhost")) as target,
        tunnel(
            "client", target=f"localhost:{target.port}", cacert=str(pki_files["ca"]), verify_cn=["localhost"]
        ) as cli,
    ):
        for _ in range(2):
            assert await _through_client_tunnel(port_of(cli)) == b""
            assert await target.results.get() == "SSLV3_ALERT_HANDSHAKE_FAILURE"  # fail closed, with an alert
        [failed] = events(caplog, "verify callback failed")
        assert "RuntimeError: injected" in failed.fields["error"]  # type: ignore[attr-defined]
        assert len(events(caplog, "handshake failed")) == 2
        assert cli.stats.target_errors == 2


# -- server mode: the client is refused with an alert -------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_server_mode_refuses_a_client_by_allow_cn_with_a_bad_certificate_alert(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture, version: ssl.TLSVersion
) -> None:
    async with backend(echo) as be, tunnel("server", **server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
        bob = client_context(ca, ca.issue_cert("bob.test", common_name="bob"))
        bob.maximum_version = version
        # TLS 1.3: the server checks the client's certificate after its own Finished, so the client's handshake
        # is done when the alert comes; it reads it as the answer to its first request. TLS 1.2: in the handshake.
        with pytest.raises(ssl.SSLError, match="BAD_CERTIFICATE"):
            reader, writer = await tls_connect(tun, bob)
            writer.write(b"ping")
            await reader.read()
        [line] = events(caplog, "refused")
        assert line.fields["identity"] and "CN=bob" in line.fields["reason"]  # type: ignore[attr-defined]
        assert be.connections == 0


@pytest.mark.asyncio
async def test_with_the_verify_path_off_the_server_still_refuses_after_the_handshake(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(internals, "_VERIFY", None)  # what TLSGATE_INTERNALS=-verify leaves
    async with backend(echo) as be, tunnel("server", **server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
        bob = client_context(ca, ca.issue_cert("bob.test", common_name="bob"))
        reader, writer = await tls_connect(tun, bob)  # TLS 1.3: done before the server refuses
        writer.write(b"ping")
        try:
            assert await reader.read() == b""
        except ConnectionError:
            pass  # the reset of the post-handshake refusal
        except ssl.SSLError as err:
            assert "BAD_CERTIFICATE" not in str(err)  # no alert on this path
        writer.close()
        [line] = events(caplog, "refused")
        assert "CN=bob" in line.fields["reason"]  # type: ignore[attr-defined]
        assert be.connections == 0


@pytest.mark.asyncio
async def test_server_mode_refuses_a_revoked_client_with_a_certificate_revoked_alert(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = revocable_client(tmp_path)
    client.revoke()
    async with backend(echo) as be, tunnel("server", **{**client.options, "target": be.address}) as tun:
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
            reader, writer = await tls_connect(tun, client.ctx)
            writer.write(b"ping")
            await reader.read()
        [line] = events(caplog, "refused")
        assert line.fields["rule"] == "crl"  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_openssl_s_client_shows_the_alert(pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path) -> None:
    bob = ca.issue_cert("bob.test", common_name="bob")
    bob.cert_chain_pems[0].write_to_path(str(tmp_path / "bob.pem"))
    bob.private_key_pem.write_to_path(str(tmp_path / "bob.key"))
    async with backend(echo) as be, tunnel("server", **server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{port_of(tun)}", "-CAfile", str(pki_files["ca"]),
            "-cert", str(tmp_path / "bob.pem"), "-key", str(tmp_path / "bob.key"), "-ign_eof",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(proc.communicate(b"ping\n"), 60)
    assert b"alert bad certificate" in output, output.decode(errors="replace")[-2000:]


# -- the callback itself ------------------------------------------------------------------------------------------


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLError | None:
    """A TLS 1.2 handshake over memory BIOs (the refusal lands inside it); the server side's error, if any."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(8):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as err:
                if side is s:
                    return err
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return None


@pytest.fixture
def refusing_server(pki_files: dict[str, Path]) -> Iterator[ssl.SSLContext]:
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    ctx = contexts.server_context(material, client_ca=str(pki_files["ca"]), require_client_cert=True)
    assert internals.install_peer_check(ctx, lambda leaf, chain: internals.Refusal("identity", "not wanted"))
    yield ctx


def test_setting_verify_mode_afterwards_keeps_the_callback(refusing_server: ssl.SSLContext) -> None:
    pointer = internals._context_pointer(refusing_server)
    assert pointer is not None and internals._VERIFY is not None
    refusing_server.verify_mode = ssl.CERT_OPTIONAL
    refusing_server.verify_mode = ssl.CERT_REQUIRED
    assert internals._VERIFY.get_verify_callback(pointer) == internals._VERIFY_CALLBACK_ADDRESS


def test_a_thousand_refused_handshakes_leak_nothing(refusing_server: ssl.SSLContext, ca: trustme.CA) -> None:
    client = client_context(ca, ca.issue_cert("bob.test", common_name="bob"))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    for _ in range(100):  # warm-up: caches, interned strings, the first log line
        assert isinstance(_handshake(client, refusing_server), ssl.SSLCertVerificationError)
    internals._refusals.clear()
    gc.collect()
    objects = len(gc.get_objects())
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(1000):
        err = _handshake(client, refusing_server)
        assert isinstance(err, ssl.SSLCertVerificationError) and err.verify_code in internals.REFUSAL_CODES
        assert internals.take_refusal(-1) == internals.Refusal("identity", "not wanted")  # memory BIO: no fd
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 64 * 1024, grown  # 1,000 leaked DER copies alone would be ~500 KB
    assert len(gc.get_objects()) - objects < 100
    assert internals._refusals == {}


def test_a_context_that_dies_takes_its_check_with_it(pki_files: dict[str, Path]) -> None:
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    ctx = contexts.server_context(material, client_ca=str(pki_files["ca"]), require_client_cert=True)
    assert internals.install_peer_check(ctx, lambda leaf, chain: None)
    pointer = internals._context_pointer(ctx)
    assert pointer in internals._checks
    del ctx
    gc.collect()
    assert pointer not in internals._checks
