"""Backends and a server runner for end-to-end tests: real sockets on loopback, port 0, no fixed sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tlsgate.config import tunnel_config
from tlsgate.pki import CertificateAuthority
from tlsgate.supervisor import ProcessOptions, Server
from tlsgate.tunnel import Tunnel

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Backend:
    """A plaintext TCP server that records every connection and the bytes it received."""

    server: asyncio.Server
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def backend(
    handler: Handler | None = None, host: str = "127.0.0.1", *, ssl_ctx: ssl.SSLContext | None = None
) -> AsyncIterator[Backend]:
    """``handler`` defaults to echo. The Backend counts connections and keeps what each one received."""
    state: dict[str, Backend] = {}

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        be = state["be"]
        be.connections += 1
        try:
            await (handler or echo)(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            be.done.set()

    srv = await asyncio.start_server(wrapped, host, 0, ssl=ssl_ctx)
    be = Backend(srv)
    state["be"] = be
    try:
        yield be
    finally:
        srv.close()
        await srv.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def recording(store: list[bytes]) -> Handler:
    """Reads until EOF and keeps what came; answers nothing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        store.append(await reader.read())

    return handle


async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers only once the client has finished sending: needs half-close to survive the tunnel."""
    data = await reader.read()
    writer.write(b"got " + str(len(data)).encode() + b" bytes, sha256 " + hashlib.sha256(data).hexdigest().encode())
    await writer.drain()


@contextlib.asynccontextmanager
async def tunnel(mode: str = "server", **options: Any) -> AsyncIterator[Tunnel]:
    """Run one tlsgate tunnel in this event loop; yields it once it listens (port from tunnel.addresses)."""
    options.setdefault("listen", "127.0.0.1:0")
    cfg = tunnel_config(mode, options)
    server = Server([cfg], ProcessOptions())
    task = asyncio.create_task(server.serve())
    started = asyncio.create_task(server.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up error
    tun = next(iter(server.tunnels.values()))
    tun.server = server  # type: ignore[attr-defined]
    try:
        yield tun
    finally:
        if not server.stopping:
            server.stop()
        await task


def server_opts(pki_files: dict[str, Path], target: str, **extra: object) -> dict[str, object]:
    """Options for a server tunnel with the test PKI's certificate, verifying clients against the test CA."""
    opts: dict[str, object] = {
        "target": target,
        "cert": [str(pki_files["cert"])],
        "key": [str(pki_files["key"])],
        "cacert": str(pki_files["ca"]),
    }
    opts.update(extra)
    return opts


def port_of(tun: Tunnel) -> int:
    return int(tun.addresses[0].rsplit(":", 1)[1])


async def tls_connect(
    tun: Tunnel, ctx: ssl.SSLContext, *, local_addr: tuple[str, int] | None = None, server_hostname: str = "localhost"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port_of(tun), ssl=ctx, server_hostname=server_hostname, local_addr=local_addr
    )


async def wait_until(predicate: Callable[[], bool], attempts: int = 1000) -> None:
    """Poll a condition, yielding to the loop between tries (bounded, no fixed sleeps)."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def assert_cut(reader: asyncio.StreamReader, timeout: float = 10) -> None:
    """The server ended the connection without sending anything: a clean EOF or a reset are both fine."""
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except (ConnectionError, ssl.SSLError):
        return
    assert data == b"", data


@contextlib.contextmanager
def fd_limit_at_least(wanted: int) -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE (the in-process server shares it) for the duration."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} descriptors this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class RevocableClient:
    """A CA, a server certificate, client "alice" and a CRL file: a tunnel that checks revocation, and a way to
    revoke alice in the middle of a test."""

    ca: CertificateAuthority
    serial: int
    crl: Path
    ctx: ssl.SSLContext  # alice's client context
    options: dict[str, Any]  # tunnel(...) options: certificate, client CA, allow-cn alice, the CRL

    def revoke(self) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        self.ca.revoke(self.serial)
        self.crl.write_bytes(self.ca.build_crl().public_bytes(Encoding.PEM))


def revocable_client(tmp_path: Path) -> RevocableClient:
    from cryptography.hazmat.primitives.serialization import Encoding

    ca = CertificateAuthority.create(tmp_path / "ca")
    server = ca.issue("localhost").write(tmp_path, "server")
    alice = ca.issue("alice", client=True, server=False)
    alice_files = alice.write(tmp_path, "alice")
    crl = tmp_path / "crl.pem"
    crl.write_bytes(ca.build_crl().public_bytes(Encoding.PEM))
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.load_cert_chain(alice_files["cert"], alice_files["key"])
    options: dict[str, Any] = {
        "cert": [str(server["cert"])],
        "key": [str(server["key"])],
        "cacert": str(ca.cert_path),
        "allow_cn": ["alice"],
        "crl": [str(crl)],
    }
    return RevocableClient(ca, alice.serial, crl, ctx, options)
