"""The status port's HTTP(S) server: listening, one request per connection, the routes, HTTPS certificates.

The server is ours, on asyncio streams: a few GET paths, one request per connection, bounded request size and
time. It sees a probe every few seconds, so it has no reason to be fast, only to be small and strict. The pages
themselves come from ``health`` (/_status), ``exposition`` (/_metrics, /metrics) and ``pprof``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tlsgate import logs
from tlsgate.engine.sockets import bind_listeners
from tlsgate.errors import StartupError, TlsgateError
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import TunnelConfig
from tlsgate.settings.status import parse_status_address
from tlsgate.status.exposition import json_metrics, prometheus_text
from tlsgate.status.health import check_backend, status_document
from tlsgate.status.model import ServerSource, StatusSource
from tlsgate.status.pprof import pprof_page
from tlsgate.tls import contexts

if TYPE_CHECKING:
    from tlsgate.process.supervisor import Server

# A request line and headers larger than this are refused: a probe sends a few hundred bytes.
_MAX_REQUEST = 8192
# Time a client has to send its request, and to take the answer.
_REQUEST_TIMEOUT = 5.0


class _Certificate:
    """The HTTPS context of the status port: the tunnel's certificate, no client certificate asked for.

    Rebuilt from the tunnel's files when its token changes (a reload succeeded), and swapped in during the next
    handshake, so the status port and the tunnel never disagree about which certificate is current.
    """

    def __init__(self, source: StatusSource) -> None:
        self.source = source
        self.token: object = None
        self.context: ssl.SSLContext | None = None

    def current(self) -> ssl.SSLContext | None:
        found = self.source.certificate()
        if found is None:
            return self.context
        cfg, token = found
        if self.context is None or token is not self.token:
            try:
                self.context = _status_context(cfg)
            except TlsgateError as err:
                if self.context is None:
                    raise
                logs.event("status port keeps its certificate", logging.WARNING, error=str(err))
            self.token = token
        return self.context

    def listening_context(self) -> ssl.SSLContext:
        ctx = self.current()
        assert ctx is not None
        ctx.sni_callback = self._swap
        return ctx

    def _swap(self, sslobj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
        ctx = self.current()
        if ctx is not None and ctx is not sslobj.context:
            sslobj.context = ctx


def _status_context(cfg: TunnelConfig) -> ssl.SSLContext:
    material = contexts.load_key_material(
        cert=cfg.cert[0] if cfg.cert else None,
        key=cfg.key[0] if cfg.key else None,
        keystore=cfg.keystore,
        storepass=cfg.storepass,
        key_pass=cfg.key_pass,
    )
    return contexts.server_context(material, client_ca=None, require_client_cert=False)


# -- the server ----------------------------------------------------------------------------------------------------


class StatusServer:
    """The listening status port. ``close()`` stops it at once, open requests included."""

    def __init__(
        self,
        source: StatusSource,
        prefix: str,
        *,
        shutdown: Callable[[], None] | None = None,
        pprof: bool = False,
    ) -> None:
        self.source = source
        self.prefix = prefix
        # --enable-pprof: serve /debug/pprof/ (tlsgate.status.pprof).
        self.pprof = pprof
        # --enable-shutdown: what POST /_shutdown calls (the same graceful stop as SIGTERM); None: no such path.
        self.shutdown = shutdown
        self.addresses: list[str] = []
        self.https = False
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._unix_path: str | None = None

    def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._servers = []
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None

    async def _listen(self, address: Address, ssl_ctx: ssl.SSLContext | None, flag: str) -> None:
        kwargs: dict[str, Any] = {"limit": _MAX_REQUEST, "ssl": ssl_ctx}
        if ssl_ctx is not None:
            kwargs["ssl_handshake_timeout"] = _REQUEST_TIMEOUT
        # Bound where tunnels are bound (stale unix sockets, v6-only, systemd sockets alike); served by asyncio's
        # streams, whose memory per connection does not matter for a handful of health checks.
        sockets = bind_listeners(address, flag="--status")
        try:
            for sock in sockets:
                if sock.family == socket.AF_UNIX:
                    server = await asyncio.start_unix_server(self._handle, sock=sock, **kwargs)
                else:
                    server = await asyncio.start_server(self._handle, sock=sock, **kwargs)
                self._servers.append(server)
        except OSError as err:
            for sock in sockets:
                sock.close()
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise StartupError(f"{flag}: cannot serve ({reason})") from None
        if address.is_unix:
            # systemd owns an activated socket's path; only a path we bound is ours to remove.
            self._unix_path = address.path
        for sock in sockets:
            name = sock.getsockname()
            if isinstance(name, str):
                self.addresses.append(f"unix:{name}")
            else:
                self.addresses.append(str(Address(host=name[0], port=name[1])))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        stop = False
        try:
            response = await self._respond(reader)
            if isinstance(response, _Shutdown):
                stop = True
                response = _response(200, "text/plain", b"shutting down\n")
            if response is not None:
                writer.write(response)
                await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client left or stalled; nothing to tell it
        finally:
            if stop:
                # After the answer is on its way: stopping closes this server and aborts its open connections.
                self._stop_process()
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), _REQUEST_TIMEOUT)

    def _stop_process(self) -> None:
        logs.event("shutdown was requested via the status port", logging.WARNING)
        assert self.shutdown is not None
        try:
            self.shutdown()
        except Exception as err:  # a failing stop must not kill the status port's callback
            logs.event("shutdown request failed", logging.ERROR, error=repr(err))

    async def _respond(self, reader: asyncio.StreamReader) -> bytes | _Shutdown | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            return _response(431, "text/plain", b"request too large\n")
        except asyncio.IncompleteReadError:
            return None  # closed before a whole request: a TCP probe, or a client that gave up
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, "text/plain", b"bad request\n")
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path == "/_shutdown" and self.shutdown is not None:
            # ghostunnel answers anything but POST with a bare 405: a GET (a crawler, a prefetch) never stops us.
            if method != "POST":
                return _response(405, "text/plain", b"method not allowed; use POST\n", allow="POST")
            return _SHUTDOWN
        if self.pprof and (path == "/debug/pprof" or path.startswith("/debug/pprof/")):
            if method not in ("GET", "HEAD"):
                return _response(405, "text/plain", b"method not allowed\n", allow="GET, HEAD")
            code, content_type, body = await pprof_page(path, target.partition("?")[2])
            return _response(code, content_type, body, head_only=method == "HEAD")
        route = _ROUTES.get(path)
        if route is None:
            return _response(404, "text/plain", b"not found; try /_status, /_metrics or /metrics\n")
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain", b"method not allowed\n", allow="GET, HEAD")
        code, content_type, body = await route(self)
        return _response(code, content_type, body, head_only=method == "HEAD")

    async def _status(self) -> tuple[int, str, bytes]:
        snapshot = await self.source.snapshot()
        errors = await asyncio.gather(*(check_backend(view) for view in snapshot.tunnels))
        code, doc = status_document(snapshot, list(errors))
        return code, "application/json", json.dumps(doc, indent=2).encode() + b"\n"

    async def _metrics_json(self) -> tuple[int, str, bytes]:
        entries = json_metrics(await self.source.snapshot(), self.prefix)
        return 200, "application/json", json.dumps(entries, indent=2).encode() + b"\n"

    async def _metrics_prometheus(self) -> tuple[int, str, bytes]:
        text = prometheus_text(await self.source.snapshot(), self.prefix)
        return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()


class _Shutdown:
    """What _respond returns for an accepted POST /_shutdown: _handle answers 200, then stops the process."""


_SHUTDOWN = _Shutdown()

_ROUTES = {
    "/_status": StatusServer._status,
    "/_metrics": StatusServer._metrics_json,
    # ghostunnel's explicit forms of the same two answers.
    "/_metrics/json": StatusServer._metrics_json,
    "/_metrics/prometheus": StatusServer._metrics_prometheus,
    "/metrics": StatusServer._metrics_prometheus,
}

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _response(code: int, content_type: str, body: bytes, *, allow: str = "", head_only: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {code} {_REASONS[code]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        lines.append(f"Allow: {allow}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head if head_only else head + body


async def serve_status(
    address: str,
    source: StatusSource,
    *,
    prefix: str = "tlsgate",
    shutdown: Callable[[], None] | None = None,
    pprof: bool = False,
) -> StatusServer:
    """Listen on ``address`` (a ``--status`` value, see ``parse_status_address``; a bare HOST:PORT is HTTPS when
    a tunnel has a certificate, else plain HTTP with a warning) and answer from ``source``; with ``shutdown``, a
    ``POST /_shutdown`` calls it (``--enable-shutdown``); with ``pprof``, /debug/pprof/ is served."""
    flag = f"--status {address}"
    where = parse_status_address(address)
    status = StatusServer(source, prefix, shutdown=shutdown, pprof=pprof)
    ssl_ctx = None
    if where.https or where.https_if_possible:
        certificate = _Certificate(source)
        if certificate.current() is not None:
            ssl_ctx = certificate.listening_context()
        elif where.https:
            raise StartupError(f"{flag}: no server certificate to serve HTTPS with (client mode); use http://")
        else:
            logs.event(
                "status port serves plain HTTP: no tunnel has a server certificate", logging.WARNING,
                status=address,
            )  # fmt: skip
    await status._listen(where.address, ssl_ctx, flag)
    status.https = ssl_ctx is not None
    scheme = "https" if status.https else "http"
    shown = [a if a.startswith("unix:") else f"{scheme}://{a}" for a in status.addresses]
    paths = "/_status,/_metrics,/metrics" + (",/_shutdown" if shutdown is not None else "")
    paths += ",/debug/pprof/" if pprof else ""
    logs.event("status", listen=",".join(shown), paths=paths)
    return status


async def start_status_server(server: Server, address: str) -> StatusServer:
    """The status port of one process (``--status``); ``close()`` it on shutdown."""
    options = server.options
    shutdown = server.stop if options.enable_shutdown else None
    return await serve_status(
        address, ServerSource(server), prefix=options.metrics_prefix, shutdown=shutdown, pprof=options.enable_pprof
    )
