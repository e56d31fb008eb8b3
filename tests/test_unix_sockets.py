"""unix:PATH on either side: a local service behind TLS, and a client tunnel that apps reach by path."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from helpers import client_context, echo, port_of, tls_connect, tunnel, wait_until

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def unix_echo(path: Path) -> AsyncIterator[None]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await echo(reader, writer)
        finally:
            writer.close()

    srv = await asyncio.start_unix_server(handle, str(path))
    try:
        yield
    finally:
        srv.close()
        await srv.wait_closed()


async def test_server_forwards_to_a_unix_socket(pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path) -> None:
    sock = tmp_path / "svc.sock"
    async with (
        unix_echo(sock),
        tunnel(
            target=f"unix:{sock}",
            cert=[str(pki_files["cert"])],
            key=[str(pki_files["key"])],
            disable_authentication=True,
        ) as tun,
    ):
        reader, writer = await tls_connect(tun, client_context(ca))
        writer.write(b"via unix")
        assert await reader.readexactly(8) == b"via unix"
        writer.close()
        await writer.wait_closed()


async def test_client_tunnel_listens_on_a_unix_socket(
    pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    listen = tmp_path / "client.sock"
    backend_sock = tmp_path / "svc.sock"
    async with (
        unix_echo(backend_sock),
        tunnel(
            target=f"unix:{backend_sock}",
            cert=[str(pki_files["cert"])],
            key=[str(pki_files["key"])],
            disable_authentication=True,
        ) as srv,
        tunnel(
            "client", listen=f"unix:{listen}", target=f"localhost:{port_of(srv)}", cacert=str(pki_files["ca"])
        ) as cli,
    ):
        reader, writer = await asyncio.open_unix_connection(str(listen))
        writer.write(b"end to end")
        assert await reader.readexactly(10) == b"end to end"
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: cli.stats.closed == 1)
    assert not listen.exists(), "the socket file is removed on shutdown"


async def test_stale_unix_socket_file_is_replaced(pki_files: dict[str, Path], tmp_path: Path) -> None:
    import socket

    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a file left behind by a process that died
    async with tunnel(
        listen=f"unix:{path}",
        target="127.0.0.1:1",
        cert=[str(pki_files["cert"])],
        key=[str(pki_files["key"])],
        disable_authentication=True,
    ) as tun:
        assert tun.addresses == [f"unix:{path}"]
