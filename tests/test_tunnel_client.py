"""Client mode, client -> server chains, re-encryption to TLS targets, SNI and ALPN."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from helpers import (
    Backend,
    Handler,
    assert_cut,
    backend,
    client_context,
    port_of,
    recording,
    reply_after_eof,
    server_opts,
    tls_connect,
    tunnel,
    wait_until,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture
def alice_files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    alice = ca.issue_cert("alice.example.test", common_name="alice")
    files = {"cert": tmp_path / "alice.pem", "key": tmp_path / "alice.key"}
    alice.cert_chain_pems[0].write_to_path(str(files["cert"]))
    alice.private_key_pem.write_to_path(str(files["key"]))
    return files


@contextlib.asynccontextmanager
async def tls_backend(cert: trustme.LeafCert, handler: Handler | None = None) -> AsyncIterator[Backend]:
    """A TLS server (asyncio) standing in for a real TLS service behind tlsgate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    async with backend(handler, ssl_ctx=ctx) as be:
        yield be


def plain_half_close(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


async def test_client_to_server_chain_with_mtls_carries_half_close(
    pki_files: dict[str, Path], alice_files: dict[str, Path]
) -> None:
    payload = os.urandom(200_000)
    async with (
        backend(reply_after_eof) as be,
        tunnel(
            **server_opts(
                pki_files,
                be.address,
                allow_cn=["alice"],
            )
        ) as srv,
        tunnel(
            "client",
            target=f"localhost:{port_of(srv)}",
            cert=[str(alice_files["cert"])],
            key=[str(alice_files["key"])],
            cacert=str(pki_files["ca"]),
            verify_dns=["localhost"],
        ) as cli,
    ):
        reply = await asyncio.to_thread(plain_half_close, port_of(cli), payload)
        await wait_until(lambda: srv.stats.closed == 1 and cli.stats.closed == 1)
        assert srv.stats.handshakes == 1
    assert reply == b"got 200000 bytes, sha256 " + hashlib.sha256(payload).hexdigest().encode()


async def test_client_without_certificate_is_refused_by_the_server(pki_files: dict[str, Path]) -> None:
    async with (
        backend() as be,
        tunnel(
            **server_opts(
                pki_files,
                be.address,
                allow_cn=["alice"],
            )
        ) as srv,
        tunnel("client", target=f"localhost:{port_of(srv)}", cacert=str(pki_files["ca"])) as cli,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(cli))
        writer.write(b"hello")
        await assert_cut(reader)
        writer.close()
        await wait_until(lambda: srv.stats.refused.get("no-client-cert") == 1)
        assert be.connections == 0


@pytest.mark.parametrize(
    ("rules", "allowed"),
    [({"verify_cn": ["localhost"]}, True), ({"verify_cn": ["someone-else"]}, False), ({"verify_dns": ["nope"]}, False)],
)
async def test_client_verifies_the_server_identity(
    pki_files: dict[str, Path], ca: trustme.CA, rules: dict[str, list[str]], allowed: bool
) -> None:
    server_cert = ca.issue_cert("localhost", common_name="localhost")
    async with (
        tls_backend(server_cert) as be,
        tunnel("client", target=f"localhost:{be.port}", cacert=str(pki_files["ca"]), **rules) as cli,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(cli))
        writer.write(b"ping")
        if allowed:
            assert await reader.readexactly(4) == b"ping"
        else:
            await assert_cut(reader)
            assert cli.stats.target_errors == 1
        writer.close()


async def test_client_refuses_a_server_from_another_ca(pki_files: dict[str, Path], other_ca: trustme.CA) -> None:
    heard: list[bytes] = []
    async with (
        tls_backend(other_ca.issue_cert("localhost"), recording(heard)) as be,
        tunnel("client", target=f"localhost:{be.port}", cacert=str(pki_files["ca"])) as cli,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(cli))
        writer.write(b"secret")
        await assert_cut(reader)
        writer.close()
        await wait_until(lambda: cli.stats.target_errors == 1)
    assert heard == []


@pytest.mark.parametrize("case", ["verified", "wrong CA", "wrong name"])
async def test_server_reencrypts_to_a_verified_tls_target(
    pki_files: dict[str, Path], ca: trustme.CA, other_ca: trustme.CA, tmp_path: Path, case: str
) -> None:
    upstream_ca = other_ca if case == "wrong CA" else ca
    upstream_cert = upstream_ca.issue_cert("db.internal.test", "localhost")
    opts: dict[str, object] = {
        "cert": [str(pki_files["cert"])],
        "key": [str(pki_files["key"])],
        "disable_authentication": True,
        "target_tls": True,
        "target_cacert": str(pki_files["ca"]),
        "target_server_name": "wrong.example.test" if case == "wrong name" else "db.internal.test",
    }
    async with tls_backend(upstream_cert) as be, tunnel(target=f"127.0.0.1:{be.port}", **opts) as srv:
        reader, writer = await tls_connect(srv, client_context(ca))
        writer.write(b"query")
        if case == "verified":
            assert await reader.readexactly(5) == b"query"
        else:
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                await assert_cut(reader)
                raise ConnectionResetError
            assert srv.stats.target_errors == 1
        writer.close()


async def test_sni_picks_the_matching_certificate(pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path) -> None:
    other = ca.issue_cert("other.example.test")
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other.key"
    other.cert_chain_pems[0].write_to_path(str(other_cert))
    other.private_key_pem.write_to_path(str(other_key))
    async with (
        backend() as be,
        tunnel(
            target=be.address,
            cert=[str(pki_files["cert"]), str(other_cert)],
            key=[str(pki_files["key"]), str(other_key)],
            disable_authentication=True,
        ) as srv,
    ):
        for name, expected in (("other.example.test", "other.example.test"), ("localhost", "localhost")):
            _, writer = await tls_connect(srv, client_context(ca), server_hostname=name)
            peer = writer.get_extra_info("peercert")
            sans = [value for kind, value in peer["subjectAltName"] if kind == "DNS"]
            assert expected in sans
            writer.close()
            await writer.wait_closed()


async def test_alpn_is_offered(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with (
        backend() as be,
        tunnel(
            **server_opts(pki_files, be.address, disable_authentication=True),
            alpn=["h2", "http/1.1"],
        ) as srv,
    ):
        ctx = client_context(ca)
        ctx.set_alpn_protocols(["h2"])
        _, writer = await tls_connect(srv, ctx)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        writer.close()
        await writer.wait_closed()
