"""Routes by server name at run time: the route table of a tunnel, and the SNI callback that picks a route.

A tunnel with routes builds one ``Runtime`` per route (``runtime.build_runtime`` on the route's own config:
its certificates, its access rules in its own verify callback, its target context) and one for the tunnel
itself, whose accepting context every handshake starts on. That context's SNI callback (``install_selector``)
runs inside the handshake, once OpenSSL has read the ClientHello and before it answers it:

1. ``NameTable.match`` finds the route claiming the client's server name; none (or no SNI at all) means the
   tunnel's own target when it has one (the route called ``default``), else the handshake is refused with the
   TLS alert ``unrecognized_name`` and the reason is left on the socket for the engine's refusal line;
2. the route's context replaces the starting one (``SSLSocket.context``, which is OpenSSL's
   ``SSL_set_SSL_CTX``): the certificate the client gets and the trust store its certificate is verified
   against are the route's from here on, and the verify callback (``tls.internals``) looks its check up by
   that context, so the route's access rules refuse inside the handshake;
3. the route is left on the socket; once the handshake is done the engine runs the route's rules again (the
   second line, which alone decides for a resumed session) and connects to the route's target.

Why the client-certificate mode and CA bundle are the listener's, not each route's: OpenSSL copies the verify
mode into the connection when the ClientHello has not been read yet, and a session resumed on one route is not
verified again when the client presents its ticket under another name. With one CA per listener a resumed
session carries a chain that this listener's CA verified, and the route's identity rules still run on it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlsgate import logs
from tlsgate.settings.routes import DEFAULT_ROUTE, NameTable
from tlsgate.tls.contexts import quiet_undecodable_server_names

if TYPE_CHECKING:
    from tlsgate.engine.runtime import Runtime
    from tlsgate.settings.config import TunnelConfig

__all__ = ["Route", "RouteTable", "chosen_route", "install_selector", "route_field", "route_refusal"]

_ROUTE_ATTRIBUTE = "tlsgate_route"
_REFUSAL_ATTRIBUTE = "tlsgate_route_refusal"


@dataclass(frozen=True, eq=False)
class Route:
    """One destination of a tunnel: its name (logs, metrics), its config and what was built from it."""

    name: str
    cfg: TunnelConfig
    runtime: Runtime


class RouteTable:
    """A tunnel's routes by server name, and the default route (the tunnel's own target) if it has one."""

    __slots__ = ("by_name", "default", "names")

    def __init__(self, routes: list[tuple[tuple[str, ...], Route]], default: Route | None) -> None:
        self.names: NameTable[Route] = NameTable((name, route) for names, route in routes for name in names)
        self.default = default
        self.by_name: dict[str, Route] = {route.name: route for _, route in routes}
        if default is not None:
            self.by_name[DEFAULT_ROUTE] = default

    def __iter__(self) -> Iterator[Route]:
        return iter(self.by_name.values())

    def pick(self, server_name: str | None) -> tuple[Route | None, str]:
        """The route for ``server_name`` (None: refuse), and, when refusing, why in words."""
        route = self.names.match(server_name)
        if route is not None:
            return route, ""
        if self.default is not None:
            return self.default, ""
        if not server_name:
            return None, "no server name (SNI) sent, and the tunnel has no default target"
        return None, f"no route for server name {server_name[:253]!r}, and the tunnel has no default target"


def install_selector(ctx: ssl.SSLContext, table: RouteTable) -> None:
    """Make ``ctx`` (the context every handshake of the tunnel starts on) pick a route by server name.

    Each route's context may carry an SNI callback of its own (several certificates picked by name, the SNI
    kept for --proxy-protocol); it runs after the switch, as it would on a tunnel without routes.
    """
    own: dict[int, Any] = {}
    for route in table:
        route_ctx = route.runtime.accept_ctx
        if route_ctx is not None:
            own[id(route_ctx)] = route_ctx.sni_callback

    def select(sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, start: ssl.SSLContext) -> int | None:
        # Runs inside OpenSSL's handshake: an exception would only be printed and fail the handshake with no
        # reason in our log, so every failure becomes a refusal with its reason.
        try:
            route, reason = table.pick(server_name)
            if route is None or route.runtime.accept_ctx is None:
                setattr(sslobj, _REFUSAL_ATTRIBUTE, reason or "route has no certificate")
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            setattr(sslobj, _ROUTE_ATTRIBUTE, route)
            chosen = route.runtime.accept_ctx
            if chosen is not start:
                sslobj.context = chosen
            callback = own.get(id(chosen))
            # typeshed types the callback narrower than the ssl module calls it (SSLSocket owners, None names).
            return callback(sslobj, server_name, chosen) if callback is not None else None
        except Exception as err:
            try:
                setattr(sslobj, _REFUSAL_ATTRIBUTE, f"internal error picking a route: {type(err).__name__}")
                logs.LOGGER.debug("route selection failed", exc_info=err)
            except Exception:  # not even the bookkeeping may raise into OpenSSL
                pass
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR

    quiet_undecodable_server_names()
    ctx.sni_callback = select


def chosen_route(sock: ssl.SSLSocket) -> Route | None:
    """The route the SNI callback picked for ``sock``'s handshake; None when it picked none."""
    route = getattr(sock, _ROUTE_ATTRIBUTE, None)
    return route if isinstance(route, Route) else None


def route_refusal(sock: ssl.SSLSocket, err: BaseException) -> str | None:
    """Why no route was picked for ``sock``'s failed handshake (the TLS alert says only ``unrecognized_name``),
    or None when the handshake failed for another reason."""
    reason = getattr(sock, _REFUSAL_ATTRIBUTE, None)
    if isinstance(reason, str):
        return reason
    if isinstance(err, ssl.SSLError) and err.reason == "CALLBACK_FAILED":
        # CPython could not decode the server name as ASCII and never called the selector (see
        # tls.contexts.quiet_undecodable_server_names): raw UTF-8 or garbage where an A-label belongs.
        return "server name (SNI) is not ASCII: international names are sent as xn-- A-labels"
    return None


def route_field(route: str) -> dict[str, Any]:
    """The ``route`` field of a log line: only for a connection that took a route, so tunnels without routes
    log exactly as before."""
    return {"route": route} if route else {}


def build_route_table(cfg: TunnelConfig, runtime: Runtime) -> RouteTable:
    """Every route of ``cfg`` built (files read, contexts made), with ``runtime`` as the default route when the
    tunnel has its own target. A failure raises as ``build_runtime`` does (CertificateError: one line)."""
    from tlsgate.engine.runtime import build_runtime

    built = [(route.server_names, Route(route.name, route.cfg, build_runtime(route.cfg))) for route in cfg.route]
    default = Route(DEFAULT_ROUTE, cfg, runtime) if cfg.route_default else None
    table = RouteTable(built, default)
    if runtime.accept_ctx is not None:
        install_selector(runtime.accept_ctx, table)
    logs.event("routes", logging.DEBUG, tunnel=cfg.label, routes=",".join(r.name for r in table), default=bool(default))
    return table
