"""``tlsgate demo`` (what ``make run`` starts): a plaintext HTTP backend, a local CA, and a TLS front before it.

Everything it needs is made on first run under ``certs/demo`` (kept out of git) and reused afterwards, so the
printed ``curl --cacert`` line keeps working between runs.
"""

from __future__ import annotations

import asyncio
import datetime
import html
from pathlib import Path

import click

from tlsgate import logs
from tlsgate.pki.ca import CertificateAuthority
from tlsgate.process.lifecycle import choose_loop
from tlsgate.process.supervisor import Server
from tlsgate.settings.config import tunnel_config
from tlsgate.tls.x509 import load_certificates

_PAGE = """<!doctype html>
<title>tlsgate demo</title>
<h1>Hello through tlsgate</h1>
<p>This page came from a plaintext HTTP backend on {backend}; tlsgate terminated TLS in front of it.</p>
<p>Request: <code>{request}</code></p>
"""
_RENEW_BEFORE = datetime.timedelta(days=7)


def ensure_demo_certs(directory: Path) -> tuple[Path, Path, Path]:
    """The demo CA and a localhost certificate in ``directory``; made once, renewed when near expiry."""
    if CertificateAuthority.exists(directory):
        ca = CertificateAuthority.load(directory)
    else:
        ca = CertificateAuthority.create(directory, name="tlsgate demo CA")
    cert, key = directory / "localhost.pem", directory / "localhost.key"
    fresh = False
    if cert.exists() and key.exists():
        leaf = load_certificates(cert)[0]
        now = datetime.datetime.now(datetime.UTC)
        fresh = leaf.not_valid_after_utc - now > _RENEW_BEFORE and leaf.issuer == ca.certificate.subject
    if not fresh:
        issued = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1", "::1"], server=True)
        issued.write(directory, "localhost", force=True)
    return ca.cert_path, cert, key


async def serve_demo_backend(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """A tiny HTTP/1.1 server with keep-alive: enough for curl, browsers and the benchmark."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                sock = writer.get_extra_info("sockname")
                # The request line is the client's text: escaped, so a crafted path cannot inject markup into the page.
                body = _PAGE.format(backend=f"{sock[0]}:{sock[1]}", request=html.escape(request_line)).encode()
                close = b"connection: close" in head.lower()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
                    + f"content-length: {len(body)}\r\n".encode()
                    + (b"connection: close\r\n" if close else b"")
                    + b"\r\n"
                    + body
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


def run_demo(*, listen: str, backend_port: int, certs_dir: str) -> int:
    logs.setup_logging()
    ca_path, cert, key = ensure_demo_certs(Path(certs_dir))

    async def main() -> int:
        backend = await serve_demo_backend(port=backend_port)
        bport = backend.sockets[0].getsockname()[1]
        cfg = tunnel_config(
            "server",
            {
                "listen": listen,
                "target": f"127.0.0.1:{bport}",
                "cert": [str(cert)],
                "key": [str(key)],
                "disable_authentication": True,
                "shutdown_timeout": "5s",
            },
            name="demo",
        )

        def announce(server: Server) -> None:
            front = server.tunnels["demo"].addresses[0]
            port = front.rsplit(":", 1)[1]
            click.echo(
                f"\ntlsgate demo is running\n"
                f"  plaintext backend  http://127.0.0.1:{bport}/\n"
                f"  TLS front          https://localhost:{port}/  (certificate from the demo CA)\n\n"
                f"Try it:\n"
                f"  curl --cacert {ca_path} https://localhost:{port}/\n\n"
                f"Press Ctrl-C to stop.\n"
            )

        try:
            return await Server([cfg]).serve(ready=announce)
        finally:
            backend.close()

    return int(choose_loop()(main()))
