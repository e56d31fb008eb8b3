"""``--status``: /_status for load balancers, /_metrics (ghostunnel's JSON) and /metrics (Prometheus) for people.

Addresses follow ghostunnel: ``http://HOST:PORT``, ``https://HOST:PORT``, ``unix:PATH``, and a bare ``HOST:PORT``,
which is HTTPS with a tunnel's certificate (`status_certificate_config`; client mode's too), plain HTTP when no
tunnel has one. Like ghostunnel, the status port never asks for a client certificate (a load balancer's probe has
none), and it serves the certificate the tunnel reloaded.

The numbers come from a ``StatusSource``: this process's tunnels (``ServerSource``), or, with ``--workers``, the
parent's sum of what every worker reports (``tlsgate.process.workers``). Both speak in ``TunnelView``s, plain data that
crosses a process boundary as JSON.

The HTTP server is ours, on asyncio streams: three GET paths, one request per connection, bounded request size
and time. It sees a probe every few seconds, so it has no reason to be fast, only to be small and strict.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import cProfile
import io
import json
import logging
import math
import os
import platform
import pstats
import re
import socket
import ssl
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from tlsgate import __version__, logs
from tlsgate.engine import tunnel as tunnel_module
from tlsgate.engine.tunnel import Stats, Tunnel
from tlsgate.errors import ConfigError, StartupError, TlsgateError, shown
from tlsgate.settings.addresses import Address, parse_address
from tlsgate.settings.config import TunnelConfig, check_socket_path
from tlsgate.tls import contexts, internals

if TYPE_CHECKING:
    from tlsgate.process.supervisor import ProcessOptions, Server

# A request line and headers larger than this are refused: a probe sends a few hundred bytes.
_MAX_REQUEST = 8192
# Time a client has to send its request, and to take the answer.
_REQUEST_TIMEOUT = 5.0
# A backend that does not accept a TCP connection this fast counts as down. Kept under a second so /_status
# answers within Kubernetes' default probe timeout (1s) even when the backend hangs.
_BACKEND_TIMEOUT = 0.8

# Every plain number in Stats is a counter to report (handshake_errors, bytes_in, ...), looked up by name so a
# counter added to Stats shows up here without a second list to keep in step.
COUNTER_FIELDS = tuple(f.name for f in fields(Stats) if f.type in ("int", "float"))


@dataclass
class TunnelView:
    """One tunnel as the status endpoints see it: counters summed over every worker that runs it."""

    key: str
    label: str
    mode: str
    listen: list[str]
    target: str
    open: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    # Open connections a reload's re-check closed, by rule (tunnel.Stats.rechecked_closed).
    rechecked_closed: dict[str, int] = field(default_factory=dict)
    # Handshakes per latency bucket (not cumulative); empty unless tunnel.Stats keeps them.
    handshake_buckets: list[int] = field(default_factory=list)
    # Recent durations in seconds ("handshake", "lifetime"), for ghostunnel's timers; every worker's, joined.
    samples: dict[str, list[float]] = field(default_factory=dict)
    last_reload: float = 0.0
    cert_not_after: float = 0.0
    # A tunnel a reload removed or replaced, still relaying the connections it had: reported apart from its
    # successor (same key) until the last of them ends, so no open connection drops out of the numbers.
    retiring: bool = False
    # --target-status: the URL /_status GETs over a connection to the target ("" = a TCP connect is enough),
    # and the CA bundle an https:// one is verified with ("" = the system store).
    target_status: str = ""
    target_status_cafile: str = ""

    @property
    def state(self) -> str:
        return "retiring" if self.retiring else "active"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TunnelView:
        return cls(**doc)

    def add(self, other: TunnelView) -> None:
        """Fold another worker's view of the same tunnel into this one."""
        self.open += other.open
        for name, value in other.counters.items():
            self.counters[name] = self.counters.get(name, 0) + value
        for rule, count in other.refused.items():
            self.refused[rule] = self.refused.get(rule, 0) + count
        for rule, count in other.rechecked_closed.items():
            self.rechecked_closed[rule] = self.rechecked_closed.get(rule, 0) + count
        if len(other.handshake_buckets) > len(self.handshake_buckets):
            self.handshake_buckets += [0] * (len(other.handshake_buckets) - len(self.handshake_buckets))
        for i, count in enumerate(other.handshake_buckets):
            self.handshake_buckets[i] += count
        for name, values in other.samples.items():
            self.samples[name] = self.samples.get(name, []) + values
        self.last_reload = max(self.last_reload, other.last_reload)
        expiries = [t for t in (self.cert_not_after, other.cert_not_after) if t > 0]
        self.cert_not_after = min(expiries, default=0.0)
        self.listen = self.listen or other.listen


def view_of(key: str, tunnel: Tunnel, *, retiring: bool = False) -> TunnelView:
    stats = tunnel.stats
    counters: dict[str, float] = {name: getattr(stats, name) for name in COUNTER_FIELDS}
    # Bytes of open connections count too, so a long transfer shows as it happens rather than in one jump at its
    # end. A relay adds its bytes to Stats in the same callback that drops it from tunnel.relays: no double count.
    counters["bytes_in"] += sum(relay.bytes_in for relay in tunnel.relays)
    counters["bytes_out"] += sum(relay.bytes_out for relay in tunnel.relays)
    return TunnelView(
        key=key,
        label=tunnel.label,
        mode=tunnel.cfg.mode,
        listen=tunnel.addresses,
        target=str(tunnel.cfg.target),
        open=tunnel.active,
        counters=counters,
        refused=dict(stats.refused),
        rechecked_closed=dict(stats.rechecked_closed),
        handshake_buckets=list(stats.handshake_buckets),
        samples={"handshake": list(stats.handshake_samples), "lifetime": list(stats.lifetime_samples)},
        last_reload=tunnel.last_reload,
        cert_not_after=tunnel.runtime.cert_not_after,
        retiring=retiring,
        target_status=tunnel.cfg.target_status or "",
        target_status_cafile=tunnel.cfg.target_cacert or "",
    )


def views_of(server: Server) -> list[TunnelView]:
    """The running tunnels, then those a reload retired that still have connections draining."""
    views = [view_of(key, tunnel) for key, tunnel in server.tunnels.items()]
    views += [view_of(key, tunnel, retiring=True) for tunnel, key in server.retired.items()]
    return views


def merge_views(groups: Iterable[Iterable[TunnelView]]) -> list[TunnelView]:
    """Sum views of the same tunnel (same key and state) from several workers; first-seen order is kept."""
    merged: dict[tuple[str, bool], TunnelView] = {}
    for group in groups:
        for view in group:
            have = merged.get((view.key, view.retiring))
            if have is None:
                merged[view.key, view.retiring] = copy.deepcopy(view)
            else:
                have.add(view)
    return list(merged.values())


@dataclass
class Snapshot:
    """Everything one status request reports."""

    tunnels: list[TunnelView]
    # ghostunnel's message: "initializing", "listening", "draining"; with --workers also "no worker running".
    state: str
    # Process-wide counters that belong to no tunnel (log lines dropped, worker restarts, workers running).
    process: dict[str, float] = field(default_factory=dict)
    # --workers: one entry per worker process (index, pid, ready, restarts); None in a single process.
    workers: list[dict[str, Any]] | None = None


class StatusSource(Protocol):
    async def snapshot(self) -> Snapshot: ...

    def certificate(self) -> tuple[TunnelConfig, object] | None:
        """The tunnel whose certificate HTTPS status serves, and a token that changes whenever it is reloaded."""


class ServerSource:
    """The tunnels of this process."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def snapshot(self) -> Snapshot:
        server = self.server
        if server.stopping:
            state = "draining"
        elif server.started.is_set():
            state = "listening"
        else:
            state = "initializing"
        return Snapshot(views_of(server), state, {"log_lines_dropped": logs.STATE.dropped_lines})

    def certificate(self) -> tuple[TunnelConfig, object] | None:
        tunnels = list(self.server.tunnels.values())
        chosen = status_certificate_config([tunnel.cfg for tunnel in tunnels])
        for tunnel in tunnels:
            if tunnel.cfg is chosen:
                return tunnel.cfg, tunnel.runtime
        return None


# -- the address and the certificate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusAddress:
    address: Address
    https: bool
    # A bare HOST:PORT: HTTPS when a tunnel has a certificate, else HTTP with a warning (ghostunnel's rule).
    https_if_possible: bool = False

    @property
    def exposed(self) -> bool:
        """True when other machines can reach it: ``:PORT``, ``0.0.0.0``, ``[::]`` or a non-loopback host."""
        return not self.address.is_loopback


def parse_status_address(text: str) -> StatusAddress:
    """``http://HOST:PORT``, ``https://HOST:PORT``, ``unix:PATH`` or ``HOST:PORT``; ConfigError names --status."""
    value = text.strip()
    scheme, sep, rest = value.partition("://")
    if not sep:
        address = check_socket_path(parse_address(value, name="--status", activated=True), "--status")
        return StatusAddress(address, https=False, https_if_possible=not address.is_unix)
    if scheme.lower() not in ("http", "https"):
        raise ConfigError(f"--status {shown(text)}: scheme {shown(scheme)} is not http or https")
    rest = rest.rstrip("/")
    if "/" in rest:
        raise ConfigError(f"--status {shown(text)}: give only HOST:PORT after {scheme}:// (the paths are fixed)")
    address = parse_address(rest, name="--status", activated=True)
    return StatusAddress(address, https=scheme.lower() == "https")


def status_certificate_config(configs: Sequence[TunnelConfig]) -> TunnelConfig | None:
    """The tunnel whose certificate an HTTPS status port presents, or None (then the port speaks plain HTTP).

    The first server-mode tunnel: its certificate is the one clients of this host already trust. Failing that, the
    first client-mode tunnel that presents a certificate (``--keystore`` or ``--cert``/``--key``): ghostunnel's
    client mode serves its status port with the client certificate, and health checks written for it expect a
    TLS handshake there. A client with ``--disable-authentication`` has nothing to present.
    """
    servers = [cfg for cfg in configs if cfg.mode == "server"]
    clients = [cfg for cfg in configs if cfg.mode == "client" and (cfg.keystore or cfg.cert)]
    return next(iter(servers + clients), None)


def check_status_setting(text: str, configs: Sequence[TunnelConfig]) -> StatusAddress:
    """``--status`` judged with the tunnels it serves, before anything listens: an address that cannot work
    is a one-line exit 2 at start, not an error after the tunnels already said "listening"."""
    where = parse_status_address(text)
    if where.https and status_certificate_config(configs) is None:
        raise ConfigError(
            f"--status {shown(text)}: no server certificate to serve HTTPS with (no tunnel has one); use http://"
        )
    return where


def status_option_problems(options: ProcessOptions) -> list[str]:
    """The status port's optional endpoints without a status port, one message each (ghostunnel refuses them
    the same way), so a flag that would silently do nothing is a start-up error instead."""
    flags = (("--enable-pprof", options.enable_pprof), ("--enable-shutdown", options.enable_shutdown))
    wanted = [name for name, on in flags if on]
    return [] if options.status else [f"{name} requires --status" for name in wanted]


def exposed_status_warning(where: StatusAddress, text: str) -> None:
    """One start-up line when the status port answers other machines: its pages name every tunnel, target and
    counter, to anyone who asks (no client certificate is ever asked for)."""
    if where.exposed:
        logs.event(
            "status port is reachable from other machines; bind it to 127.0.0.1 or unix:PATH unless intended",
            logging.WARNING, status=text,
        )  # fmt: skip


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
        # --enable-pprof: serve /debug/pprof/ (tlsgate.status's _pprof).
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
        try:
            if address.is_activated:
                from tlsgate.process.systemd import activated_listener

                # systemd bound it (and owns a unix path): serve on it, never unlink it.
                server = await asyncio.start_server(
                    self._handle, sock=activated_listener(address.systemd, "--status"), **kwargs
                )
            elif address.is_unix:
                _remove_stale_socket(address.path, flag)
                server = await asyncio.start_unix_server(self._handle, address.path, **kwargs)
                self._unix_path = address.path
            else:
                server = await asyncio.start_server(self._handle, address.host or None, address.port, **kwargs)
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise StartupError(f"{flag}: cannot listen on {address} ({reason})") from None
        self._servers.append(server)
        for sock in server.sockets:
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
            code, content_type, body = await _pprof(path, target.partition("?")[2])
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
        errors = await asyncio.gather(*(_check_backend(view) for view in snapshot.tunnels))
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


def _remove_stale_socket(path: str, flag: str) -> None:
    """A socket file left by a process that died is removed; a live one, or any other file, is an error."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{flag}: unix:{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise StartupError(f"{flag}: unix:{path}: another process is listening there")


async def serve_status(
    address: str,
    source: StatusSource,
    *,
    prefix: str = "tlsgate",
    shutdown: Callable[[], None] | None = None,
    pprof: bool = False,
) -> StatusServer:
    """Listen on ``address`` (see the module docstring) and answer from ``source``; with ``shutdown``, a
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


# -- /_status ------------------------------------------------------------------------------------------------------


async def _check_backend(view: TunnelView) -> str | None:
    """None if the target is up, else why not; the whole check takes at most _BACKEND_TIMEOUT.

    Up means: it accepts a TCP (or unix socket) connection, and with ``--target-status URL`` it also answers a
    GET of that URL, sent over that same connection, with 200 (ghostunnel's check: the URL names what to ask
    for and the Host header, the target where to ask).
    """
    target = view.target
    try:
        async with asyncio.timeout(_BACKEND_TIMEOUT):
            address = parse_address(target, name="target")
            if address.is_unix:
                reader, writer = await asyncio.open_unix_connection(address.path, limit=_MAX_REQUEST)
            else:
                reader, writer = await asyncio.open_connection(address.host, address.port, limit=_MAX_REQUEST)
            try:
                if view.target_status:
                    return await _get_target_status(view, reader, writer)
                return None
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"{target}: no answer within {_BACKEND_TIMEOUT}s"
    except ConfigError as err:
        return str(err)
    except ssl.SSLError as err:
        why = getattr(err, "verify_message", None) or err.reason or str(err)
        return f"{target}: TLS handshake for --target-status failed: {why}"
    except OSError as err:
        # asyncio and uvloop word a refused connect differently; the errno says the same thing on both.
        if isinstance(err, socket.gaierror) or not err.errno:
            return f"{target}: {err.strerror or err}"
        return f"{target}: {os.strerror(err.errno)}"
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return f"{target}: --target-status: no HTTP answer"


async def _get_target_status(
    view: TunnelView, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> str | None:
    """GET ``view.target_status`` over the open connection to the target; None on 200, else why not.

    An ``https://`` URL is TLS on that connection, verified as Go's default client does for ghostunnel: the
    certificate must chain to the system store (or to ``--target-cacert`` when the tunnel has one) and name the
    URL's host. Redirects are not followed: only 200 means up, as in ghostunnel.
    """
    parts = urlsplit(view.target_status)
    host = parts.hostname or ""
    if parts.scheme.lower() == "https":
        ctx = ssl.create_default_context(cafile=view.target_status_cafile or None)
        await writer.start_tls(ctx, server_hostname=host)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc.rpartition('@')[2]}\r\n"
        f"User-Agent: tlsgate/{__version__}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    writer.write(request.encode("ascii", "replace"))
    await writer.drain()
    line = await reader.readuntil(b"\n")
    match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r?\n", line)
    if match is None:
        return f"{view.target}: --target-status: no HTTP answer"
    code = int(match.group(1))
    return None if code == 200 else f"target returned status: {code}"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).astimezone().isoformat()


def status_document(snapshot: Snapshot, backend_errors: list[str | None]) -> tuple[int, dict[str, Any]]:
    """ghostunnel's /_status body and HTTP code: 200 when listening and every backend answers, else 503.

    With several tunnels the top-level listen/forward addresses are the first tunnel's (as ghostunnel has one),
    ``backend_ok`` covers all of them, and ``tunnels`` lists each one.
    """
    tunnels = snapshot.tunnels
    several = len(tunnels) > 1
    # A retiring tunnel is listed, but it takes no new connections: its backend no longer decides health.
    problems = [
        f"tunnel {view.label}: {error}" if several else error
        for view, error in zip(tunnels, backend_errors, strict=True)
        if error is not None and not view.retiring
    ]
    active = [view for view in tunnels if not view.retiring]
    if not active:
        problems.append("no tunnel is running")
    backend_ok = not problems
    ok = backend_ok and snapshot.state == "listening"
    first = active[0] if active else None
    doc: dict[str, Any] = {
        "ok": ok,
        "status": "ok" if ok else "critical",
        "listen_address": ",".join(first.listen) if first else "",
        "forward_address": first.target if first else "",
        "backend_ok": backend_ok,
        "backend_status": "ok" if backend_ok else "critical",
        "backend_error": "; ".join(problems),
        "time": datetime.now().astimezone().isoformat(),
        "hostname": socket.gethostname(),
        "message": snapshot.state,
        "revision": __version__,
        "compiler": f"{platform.python_implementation()} {platform.python_version()}",
        "last_reload": _iso(max((v.last_reload for v in active), default=time.time())),
    }
    if several:
        doc["tunnels"] = [
            {
                "name": view.label,
                "state": view.state,
                "mode": view.mode,
                "listen_address": ",".join(view.listen),
                "forward_address": view.target,
                "backend_ok": error is None,
                "backend_status": "ok" if error is None else "critical",
                "backend_error": error or "",
                "open": view.open,
                "last_reload": _iso(view.last_reload),
            }
            for view, error in zip(tunnels, backend_errors, strict=True)
        ]
    if snapshot.workers is not None:
        doc["workers"] = snapshot.workers
    return (200 if ok else 503), doc


# -- /_metrics and /metrics ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metric:
    field: str  # a TunnelView.counters key, or "open"
    kind: str  # Prometheus type: counter or gauge
    prometheus: str  # name after "<prefix>_"
    dotted: str  # ghostunnel-style name after "<prefix>." in /_metrics
    help: str


# fmt: off
_METRICS = (
    _Metric("open", "gauge", "connections_open", "conn.open", "Connections open now, in set-up or relaying."),
    _Metric("accepted", "counter", "connections_accepted_total", "accept.total", "Connections accepted."),
    _Metric("established", "counter", "connections_established_total", "accept.success",
            "Connections that passed every check and were connected to the target."),
    _Metric("closed", "counter", "connections_closed_total", "conn.closed", "Relayed connections that ended."),
    _Metric("handshake_errors", "counter", "handshake_errors_total", "accept.error",
            "Client TLS handshakes that failed or timed out, untrusted and expired certificates included."),
    _Metric("handshake_timeouts", "counter", "handshake_timeouts_total", "accept.timeout",
            "Client TLS handshakes cut by --handshake-timeout (counted in handshake_errors_total too)."),
    _Metric("connect_timeouts", "counter", "connect_timeouts_total", "conn.timeout",
            "Targets that did not connect, or finish their TLS handshake, within --connect-timeout."),
    _Metric("target_errors", "counter", "target_errors_total", "conn.target_error",
            "Connections whose target could not be reached, or failed its TLS handshake or identity check."),
    _Metric("proxy_header_errors", "counter", "proxy_header_errors_total", "accept.proxy_header_error",
            "Connections refused for a malformed PROXY protocol header."),
    _Metric("accept_errors", "counter", "accept_errors_total", "accept.os_error",
            "accept() failures, such as running out of file descriptors."),
    _Metric("internal_errors", "counter", "internal_errors_total", "conn.internal_error",
            "Exceptions caught in tlsgate's own connection code (bugs); each cut one connection."),
    _Metric("bytes_in", "counter", "received_bytes_total", "conn.bytes_in", "Bytes from clients to targets."),
    _Metric("bytes_out", "counter", "sent_bytes_total", "conn.bytes_out", "Bytes from targets to clients."),
    _Metric("reloads", "counter", "reloads_total", "reload.total", "Reloads of certificates and policies."),
    _Metric("reload_errors", "counter", "reload_errors_total", "reload.error",
            "Reloads that failed and kept the running certificates and policies."),
)
# fmt: on

# Upper bounds (seconds) of handshake_duration_seconds buckets, used when tunnel.Stats counts handshakes per bucket.
HANDSHAKE_BUCKETS: tuple[float, ...] = getattr(tunnel_module, "HANDSHAKE_BUCKETS", ())


def _value(view: TunnelView, name: str) -> float:
    return view.open if name == "open" else view.counters.get(name, 0)


def json_metrics(snapshot: Snapshot, prefix: str) -> list[dict[str, Any]]:
    """ghostunnel's /_metrics: a list of {"metric": name, "value": number}, with the tunnel named per entry."""
    now = int(time.time())
    host = socket.gethostname()
    entries: list[dict[str, Any]] = []

    def add(name: str, value: float, view: TunnelView | None) -> None:
        entry: dict[str, Any] = {"timestamp": now, "metric": f"{prefix}.{name}", "value": value, "hostname": host}
        if view is not None:
            entry["tunnel"] = view.label
            if view.retiring:
                entry["state"] = view.state
        entries.append(entry)

    for view in snapshot.tunnels:
        for metric in _METRICS:
            add(metric.dotted, _value(view, metric.field), view)
        for rule, count in sorted(view.refused.items()):
            add(f"accept.refused.{rule}", count, view)
        for rule, count in sorted(view.rechecked_closed.items()):
            add(f"conn.rechecked_closed.{rule}", count, view)
        add("conn.handshake.count", _value(view, "handshakes"), view)
        add("conn.handshake.seconds", _value(view, "handshake_seconds_total"), view)
        for suffix, value in timer_entries(view.samples.get("handshake", [])):
            add(f"conn.handshake.{suffix}", value, view)
        add("conn.lifetime.count", _value(view, "closed"), view)
        add("conn.lifetime.seconds", _value(view, "lifetime_seconds_total"), view)
        for suffix, value in timer_entries(view.samples.get("lifetime", [])):
            add(f"conn.lifetime.{suffix}", value, view)
        if view.cert_not_after:
            add("cert.not_after", int(view.cert_not_after), view)
    for name, value in sorted(snapshot.process.items()):
        add(f"process.{name}", value, None)
    return entries


TIMER_PERCENTILES = (0.5, 0.75, 0.95, 0.99)


def timer_entries(samples: Sequence[float]) -> list[tuple[str, float]]:
    """ghostunnel's timer entries after ``.count``: min, max, mean and the 50/75/95/99th percentiles of the
    recent samples, in **nanoseconds** as Go's timers report them (0 with no sample, as there).

    Percentiles interpolate as go-metrics' ``SamplePercentiles`` does: position p*(n+1) in the sorted sample.
    """
    # Whole nanoseconds first, as Go's timers hold them, so min/max and the percentiles agree exactly.
    ordered = sorted(round(value * 1e9) for value in samples)
    n = len(ordered)
    if not n:
        return [(name, 0) for name in ("min", "max", "mean", *(_percentile_name(p) for p in TIMER_PERCENTILES))]
    entries: list[tuple[str, float]] = [("min", ordered[0]), ("max", ordered[-1]), ("mean", sum(ordered) / n)]
    for p in TIMER_PERCENTILES:
        pos = p * (n + 1)
        if pos < 1:
            value: float = ordered[0]
        elif pos >= n:
            value = ordered[-1]
        else:
            lower, upper = ordered[int(pos) - 1], ordered[int(pos)]
            value = lower + (pos - math.floor(pos)) * (upper - lower)
        entries.append((_percentile_name(p), value))
    return entries


def _percentile_name(p: float) -> str:
    return f"{round(p * 100)}-percentile"


def prometheus_name(prefix: str) -> str:
    """``prefix`` made a valid Prometheus metric name prefix: anything outside [a-zA-Z0-9_:] becomes ``_``."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", prefix)
    return name if name and not name[0].isdigit() else f"_{name}"


class _Exposition:
    """Prometheus text format 0.0.4: ``# HELP``, ``# TYPE``, then ``name{label="value"} number`` lines."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prometheus_name(prefix)
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> str:
        full = f"{self.prefix}_{name}"
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {full} {escaped}", f"# TYPE {full} {kind}"]
        return full

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        if labels:
            inner = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(view: TunnelView) -> dict[str, str]:
    """A tunnel's series labels. A retiring tunnel adds ``state="retiring"``, so it never collides with its
    successor under the same name, and running tunnels keep the label set dashboards already use."""
    if view.retiring:
        return {"tunnel": view.label, "state": view.state}
    return {"tunnel": view.label}


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def prometheus_text(snapshot: Snapshot, prefix: str) -> str:
    out = _Exposition(prefix)
    tunnels = snapshot.tunnels

    def per_tunnel() -> Iterator[tuple[TunnelView, dict[str, str]]]:
        for view in tunnels:
            yield view, _labels(view)

    for metric in _METRICS:
        name = out.family(metric.prometheus, metric.kind, metric.help)
        for view, labels in per_tunnel():
            out.sample(name, labels, _value(view, metric.field))

    name = out.family("connections_refused_total", "counter", "Connections refused, by the rule that refused them.")
    for view, labels in per_tunnel():
        for rule, count in sorted(view.refused.items()):
            out.sample(name, {**labels, "rule": rule}, count)

    name = out.family(
        "rechecked_closed_total", "counter", "Open connections a reload closed: the new rules or CRLs refuse them."
    )
    for view, labels in per_tunnel():
        for rule, count in sorted(view.rechecked_closed.items()):
            out.sample(name, {**labels, "rule": rule}, count)

    _handshake_family(out, tunnels)

    name = out.family(
        "connection_duration_seconds", "summary", "How long relayed connections lasted, from accept to close."
    )
    for view, labels in per_tunnel():
        out.sample(f"{name}_sum", labels, _value(view, "lifetime_seconds_total"))
        out.sample(f"{name}_count", labels, _value(view, "closed"))

    name = out.family("last_reload_timestamp_seconds", "gauge", "When certificates and policies were last loaded.")
    for view, labels in per_tunnel():
        out.sample(name, labels, view.last_reload)

    name = out.family(
        "certificate_expiry_timestamp_seconds", "gauge", "When the certificate this tunnel presents expires."
    )
    for view, labels in per_tunnel():
        if view.cert_not_after:
            out.sample(name, labels, int(view.cert_not_after))

    process_metrics = {
        "log_lines_dropped": ("log_lines_dropped_total", "counter", "Log lines lost to a broken log destination."),
        "workers": ("workers", "gauge", "Worker processes running (--workers)."),
        "worker_restarts": ("worker_restarts_total", "counter", "Worker processes restarted after dying."),
    }
    for key, (metric_name, kind, help_text) in process_metrics.items():
        if key in snapshot.process:
            out.sample(out.family(metric_name, kind, help_text), {}, snapshot.process[key])

    name = out.family("build_info", "gauge", "Always 1; the labels say which tlsgate and Python are running.")
    labels = {"version": __version__, "python": platform.python_version(), "internals": internals.report().label()}
    out.sample(name, labels, 1)
    return out.text()


def _handshake_family(out: _Exposition, tunnels: list[TunnelView]) -> None:
    bounds = HANDSHAKE_BUCKETS
    with_buckets = bool(bounds) and all(len(v.handshake_buckets) >= len(bounds) for v in tunnels)
    help_text = "Time from accept to a completed TLS handshake with the client."
    name = out.family("handshake_duration_seconds", "histogram" if with_buckets else "summary", help_text)
    for view in tunnels:
        labels = _labels(view)
        count = _value(view, "handshakes")
        if with_buckets:
            running = 0
            for bound, in_bucket in zip(bounds, view.handshake_buckets, strict=False):
                running += in_bucket
                out.sample(f"{name}_bucket", {**labels, "le": _number(bound)}, running)
            out.sample(f"{name}_bucket", {**labels, "le": "+Inf"}, count)
        out.sample(f"{name}_sum", labels, _value(view, "handshake_seconds_total"))
        out.sample(f"{name}_count", labels, count)


# -- /debug/pprof/ (--enable-pprof) --------------------------------------------------------------------------------

# profile?seconds=N: Go's default window, and a ceiling so one request cannot hold the profiler for long.
_PROFILE_DEFAULT = 30
_PROFILE_MAX = 60
# Lines of the profile report: the functions with the most cumulative time.
_PROFILE_LINES = 60
# A window is running: Python has one profiling hook per thread, and two windows would clobber each other.
_profiling = False

_PPROF_INDEX = b"""tlsgate /debug/pprof/ (--enable-pprof): Python's counterparts of Go's pprof pages, as plain text.

/debug/pprof/goroutine          the stack of every thread of this process, then of every asyncio task
/debug/pprof/profile?seconds=N  cProfile of the event loop's thread for N seconds (default 30, 1 to 60),
                                the functions sorted by cumulative time
"""


async def _pprof(path: str, query: str) -> tuple[int, str, bytes]:
    """``/debug/pprof/``: the index, ``goroutine`` (stacks) or ``profile`` (a cProfile window)."""
    name = path.removeprefix("/debug/pprof").strip("/")
    if name == "":
        return 200, "text/plain; charset=utf-8", _PPROF_INDEX
    if name == "goroutine":
        return 200, "text/plain; charset=utf-8", stack_dump().encode("utf-8", "replace")
    if name == "profile":
        seconds = _profile_seconds(query)
        if seconds is None:
            return 400, "text/plain", f"seconds: give a whole number from 1 to {_PROFILE_MAX}\n".encode()
        report = await profile_window(seconds)
        if report is None:
            return 409, "text/plain", b"another profile is running; try again when it ends\n"
        return 200, "text/plain; charset=utf-8", report.encode("utf-8", "replace")
    return 404, "text/plain", b"not found; try /debug/pprof/\n"


def _profile_seconds(query: str) -> int | None:
    values = [v for k, _, v in (part.partition("=") for part in query.split("&")) if k == "seconds"]
    if not values:
        return _PROFILE_DEFAULT
    text = values[-1]
    if not text.isascii() or not text.isdigit() or len(text) > 3:
        return None
    seconds = int(text)
    return seconds if 1 <= seconds <= _PROFILE_MAX else None


def stack_dump() -> str:
    """Every thread's stack (innermost call last), then every asyncio task of the running loop with the
    coroutine frames it is suspended in: what Go's ``goroutine?debug=2`` shows, in Python's terms.

    Only code locations: file, line, function and source line; never a local variable, so nothing a
    connection carries (keys, passwords, payload) can appear.
    """
    out = io.StringIO()
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    frames = sys._current_frames()
    out.write(f"threads: {len(frames)}\n\n")
    for ident, frame in frames.items():
        out.write(f"thread {names.get(ident, '?')} ({ident}):\n")
        out.write("".join(traceback.format_stack(frame)))
        out.write("\n")
    tasks = sorted(asyncio.all_tasks(), key=lambda task: task.get_name())
    out.write(f"asyncio tasks: {len(tasks)}\n\n")
    for task in tasks:
        out.write(f"task {task.get_name()} {task.get_coro()!r}:\n")
        for frame in task.get_stack():
            out.write("".join(traceback.format_stack(frame, limit=1)))
        out.write("\n")
    return out.getvalue()


async def profile_window(seconds: float) -> str | None:
    """cProfile the event loop's thread, where every connection is served, for ``seconds``; the report, or
    None when a profiler is already running (one at a time: Python allows one per thread)."""
    global _profiling
    if _profiling:
        return None
    profiler = cProfile.Profile()
    try:
        profiler.enable()
    except ValueError:  # another tool (a debugger, coverage) holds the profiling hook
        return None
    _profiling = True
    try:
        await asyncio.sleep(seconds)
    finally:
        # Also when the status port closes mid-window: the profiler must not outlive the request.
        profiler.disable()
        _profiling = False
    out = io.StringIO()
    out.write(f"cProfile of the event loop thread for {seconds:g}s, by cumulative time\n")
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(_PROFILE_LINES)
    return out.getvalue()
