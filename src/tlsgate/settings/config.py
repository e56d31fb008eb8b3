"""Typed, validated settings for one tunnel, built once from CLI flags or a TOML table.

Both sources are a mapping whose keys are the flag names (``allow-cn`` or ``allow_cn``), so every flag has a
config-file key of the same name and one validator serves both. Validation collects every problem before
failing, because an operator fixing a config file wants the whole list, not one error per run.
Each value is converted by ``settings.convert`` and the rules between values are ``settings.checks``. Access-rule
values are held parsed (networks, IP addresses, key pins, URI patterns: ``settings.values``), the form
``tlsgate.policy`` takes. Files are only checked (exist, readable), never parsed: ``tlsgate.process.check``
parses them with the engine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from tlsgate.errors import ConfigError, shown
from tlsgate.settings.access import ServerAccess, identity_problems
from tlsgate.settings.addresses import Address
from tlsgate.settings.checks import cross_checks
from tlsgate.settings.convert import check_paths, convert, flag
from tlsgate.settings.patterns import UriPattern
from tlsgate.settings.pins import KeyPin
from tlsgate.settings.proxyurl import ProxyURL
from tlsgate.settings.routes import RouteConfig, build_routes
from tlsgate.settings.table import SETTINGS, process_settings, setting
from tlsgate.settings.values import UNIX_SOURCE, IPAddress, Network, ProxySource, SpkiPin

Mode = Literal["server", "client"]


class ConfigErrors(ConfigError):
    """Several problems at once; ``str()`` gives one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class Timeouts:
    """Seconds; 0 means no limit. Defaults follow ghostunnel where it has the flag."""

    connect: float = 10.0
    handshake: float = 10.0
    # ghostunnel closes 1s after either side finishes; a backend that answers only after EOF needs longer,
    # so a half-closed connection may linger this long before it is cut.
    close: float = 60.0
    idle: float = 0.0
    max_conn_lifetime: float = 0.0
    shutdown: float = 300.0


@dataclass(frozen=True)
class TunnelConfig:
    """Everything one listener needs. Field names are the flag names with ``_`` for ``-``."""

    mode: Mode
    listen: Address
    target: Address
    name: str = ""
    # TLS identity of this side (server mode: presented to clients; client mode: presented to the server).
    cert: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    keystore: str | None = None
    storepass: bytes | None = field(default=None, repr=False)
    key_pass: bytes | None = field(default=None, repr=False)
    cacert: str | None = None
    disable_authentication: bool = False
    # Access control (server mode), as in settings.access.ServerAccess (what tlsgate.policy.build_policy takes).
    allow_all: bool = False
    allow_cn: tuple[str, ...] = ()
    allow_ou: tuple[str, ...] = ()
    allow_dns: tuple[str, ...] = ()
    allow_ip: tuple[IPAddress, ...] = ()
    allow_uri: tuple[UriPattern, ...] = ()
    allow_spki_sha256: tuple[SpkiPin, ...] = ()
    # ghostunnel's pin-only authentication: when set, the pins are the whole client check (no CA, no dates).
    allow_spki_pin: tuple[KeyPin, ...] = ()
    allow_from: tuple[Network, ...] = ()
    deny_from: tuple[Network, ...] = ()
    crl: tuple[str, ...] = ()
    allow_policy: str | None = None
    allow_query: str | None = None
    # Client mode: who the server must be.
    verify_cn: tuple[str, ...] = ()
    verify_ou: tuple[str, ...] = ()
    verify_dns: tuple[str, ...] = ()
    verify_ip: tuple[IPAddress, ...] = ()
    verify_uri: tuple[UriPattern, ...] = ()
    verify_spki_sha256: tuple[SpkiPin, ...] = ()
    verify_spki_pin: tuple[KeyPin, ...] = ()
    verify_policy: str | None = None
    verify_query: str | None = None
    override_server_name: str | None = None
    # Client mode --proxy: the target is reached through this HTTP CONNECT or SOCKS5 proxy (its repr hides secrets).
    proxy: ProxyURL | None = None
    # Server mode re-encryption to a TLS upstream.
    target_tls: bool = False
    target_cacert: str | None = None
    target_server_name: str | None = None
    target_cert: str | None = None
    target_key: str | None = None
    alpn: tuple[str, ...] = ()
    # STARTTLS-style openings (tlsgate.engine.postgres): the clients' (server mode) and the target's; None: TLS at once.
    protocol: str | None = None
    target_protocol: str | None = None
    # Server mode: "shared" (one derived key per process tree), "per-context" (OpenSSL's own), "off".
    session_tickets: str = "shared"
    unsafe_target: bool = False
    unsafe_listen: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_concurrent_conns: int = 0
    # ghostunnel's bare --proxy-protocol, which means --proxy-protocol-mode conn; read proxy_mode, not these two.
    proxy_protocol: bool = False
    proxy_protocol_mode: str | None = None
    # Rewrite each HTTP/1.x request head with the client's identity (engine.httprelay); the cert adds its PEM.
    target_http_headers: bool = False
    target_http_cert: bool = False
    proxy_protocol_version: int = 2
    accept_proxy_from: tuple[ProxySource, ...] = ()
    timed_reload: float = 0.0
    # On every successful reload, check open connections again against the new rules and CRLs (Tunnel.recheck).
    recheck_on_reload: bool = True
    # Refuse to start (or to apply a reload) with a CRL whose lastUpdate is older than this; 0 means no limit.
    crl_max_age: float = 0.0
    # ghostunnel's --max-tls-version: "TLS1.2" caps every TLS context of the tunnel; None leaves OpenSSL's (1.3).
    max_tls_version: str | None = None
    # ghostunnel's --cipher-suites names in order of preference; () keeps tls.contexts' default (AES and CHACHA).
    cipher_suites: tuple[str, ...] = ()
    allow_unsafe_cipher_suites: bool = False
    # ghostunnel's --target-status: /_status GETs this http(s):// URL over a connection to the target.
    target_status: str | None = None
    # Routes by server name (settings.routes): each a tunnel config of its own, picked by the client's SNI.
    route: tuple[RouteConfig, ...] = ()
    # Whether names no route claims (and clients sending none) go to ``target``. False only for a tunnel with
    # routes and no target of its own: such clients are refused, and ``target`` holds the first route's target
    # for the code that shows one (check-config, /_status), never connected to for them.
    route_default: bool = True

    @property
    def label(self) -> str:
        """How logs name this tunnel: its config name, or its listen address."""
        return self.name or str(self.listen)

    @property
    def access(self) -> ServerAccess:
        """The server access settings, as ``tlsgate.policy.build_policy`` takes them."""
        return ServerAccess.of(self)

    @property
    def proxy_mode(self) -> str | None:
        """What the PROXY header sent to the target says: ``conn``, ``tls``, ``tls-full``, or None for no header."""
        return "conn" if self.proxy_protocol else self.proxy_protocol_mode

    @property
    def target_label(self) -> str:
        """How logs and status show the target: ``target``, with the routes by server name after it, if any."""
        if not self.route:
            return str(self.target)
        routes = ",".join(route.name for route in self.route)
        return f"{self.target if self.route_default else 'no default'} (routes: {routes})"

    @property
    def proxy_from_unix(self) -> bool:
        """``--accept-proxy-from unix``: every peer of this unix-socket listener must start with a PROXY header.

        A unix peer has no IP address to list, and whoever may open the socket is decided by its file
        permissions, so the listener trusts its peers as a whole, never a CIDR.
        """
        return UNIX_SOURCE in self.accept_proxy_from

    @property
    def proxy_source_networks(self) -> tuple[Network, ...]:
        """The networks of ``--accept-proxy-from``: the TCP peers whose PROXY headers are trusted."""
        return tuple(value for value in self.accept_proxy_from if not isinstance(value, str))


# The Timeouts field each timeout setting fills.
_TIMEOUT_KEYS = {
    "connect_timeout": "connect",
    "handshake_timeout": "handshake",
    "close_timeout": "close",
    "idle_timeout": "idle",
    "max_conn_lifetime": "max_conn_lifetime",
    "shutdown_timeout": "shutdown",
}


# Keys that only the process as a whole uses (status port, workers, logging); a tunnel ignores them.
PROCESS_KEYS = frozenset(s.name for s in process_settings())


KNOWN_KEYS = frozenset(s.name for s in SETTINGS)


# Keys whose value is a password or names where one comes from: an error never shows what was given.
SECRET_KEYS = frozenset(s.name for s in SETTINGS if s.secret)


SESSION_TICKETS = setting("session_tickets").choices


# Prometheus metric names: anything else in the prefix would make /metrics unparseable for the scraper.
_METRIC_PREFIX = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def check_metrics_prefix(text: str) -> str:
    """``--metrics-prefix``/``metrics-prefix``: a Prometheus metric name, or ConfigError."""
    if not _METRIC_PREFIX.fullmatch(text):
        raise ConfigError(f"--metrics-prefix: {shown(text)} is not a metric name (letters, digits, _ and :)")
    return text


def normalise_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


class _Collector:
    """Runs each check, keeps going after a failure, and remembers every message."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.problems: list[str] = []

    def add(self, message: str) -> None:
        self.problems.append(self.prefix + message)

    def run(self, check: Callable[[], object]) -> None:
        try:
            check()
        except ConfigError as err:
            self.add(str(err))


def tunnel_config(
    mode: str, options: Mapping[str, Any], *, name: str = "", require_client_identity: bool = False
) -> TunnelConfig:
    """Validate ``options`` (flag-named keys) into a TunnelConfig, or raise ConfigErrors with every problem.

    ``require_client_identity``: the command line and files pass True to apply ghostunnel's rule that a client
    names its certificate or says --disable-authentication; the library API lets a bare client (plain TLS) be.
    """
    where = _Collector(f"tunnel {name!r}: " if name else "")
    opts = {normalise_key(k): v for k, v in options.items()}
    route_value = opts.pop("route", None)
    for key in sorted(set(opts) - KNOWN_KEYS - {"name", "mode"}):
        where.add(f"unknown key {shown(key)}")
    if mode not in ("server", "client"):
        where.add(f"mode: {shown(mode)} is not 'server' or 'client'")
        raise ConfigErrors(where.problems)

    values: dict[str, Any] = {}
    timeouts: dict[str, float] = {}
    for key, value in opts.items():
        if key not in KNOWN_KEYS or key in PROCESS_KEYS or key in ("mode", "name") or value is None:
            continue
        try:
            converted = convert(key, value)
        except ConfigError as err:
            where.add(str(err))
            continue
        if key in _TIMEOUT_KEYS:
            timeouts[_TIMEOUT_KEYS[key]] = converted
        else:
            values[key] = converted

    routes, route_problems = build_routes(mode, opts, route_value)
    for problem in route_problems:
        where.add(problem)
    for key in ("listen", "target"):
        if key not in values and key not in opts and not (key == "target" and (routes or route_problems)):
            where.add(f"{flag(key)} is required")
    # Files first, then bundles, each in the table's order: the order of the messages is stable.
    for kind in ("file", "files", "bundle"):
        for entry in SETTINGS:
            if entry.kind == kind and entry.name in values:
                where.run(partial(check_paths, entry, values[entry.name]))
    if where.problems:
        raise ConfigErrors(where.problems)

    if routes:
        values["route"] = routes
        if "target" not in values:
            values.update(target=routes[0].cfg.target, route_default=False)
    cfg = TunnelConfig(mode=mode, name=name, timeouts=Timeouts(**timeouts), **values)  # type: ignore[arg-type]
    for problem in cross_checks(cfg, require_client_identity=require_client_identity):
        where.add(problem)
    if where.problems:
        raise ConfigErrors(where.problems)
    return cfg


def server_access(
    *,
    allow_all: bool | None = False,
    allow_cn: Iterable[str] = (),
    allow_ou: Iterable[str] = (),
    allow_dns: Iterable[str] = (),
    allow_ip: Iterable[str] = (),
    allow_uri: Iterable[str] = (),
    allow_spki_sha256: Iterable[str] = (),
    allow_spki_pin: Iterable[str] = (),
    allow_from: Iterable[str] = (),
    deny_from: Iterable[str] = (),
    crl: Iterable[str | os.PathLike[str]] = (),
    allow_policy: str | None = None,
    allow_query: str | None = None,
    disable_authentication: bool | None = False,
) -> ServerAccess:
    """A server's access settings from raw flag values, for library callers and ``tlsgate policy check``.

    The values go through the converters ``tunnel_config`` uses and the same rules on which flags go together,
    so a caller gets the messages the command line and a file give (ConfigErrors, one line per problem). Files
    are not opened here: ``policy.build_policy`` reads the CRLs. None means not given, as from click. Pass the
    result to ``policy.build_policy``::

        policy = build_policy(server_access(allow_cn=["alice"], allow_from=["10.0.0.0/8"]))
    """
    where = _Collector("")
    raw: dict[str, object] = {
        "allow_all": allow_all,
        "allow_cn": tuple(allow_cn),
        "allow_ou": tuple(allow_ou),
        "allow_dns": tuple(allow_dns),
        "allow_ip": tuple(allow_ip),
        "allow_uri": tuple(allow_uri),
        "allow_spki_sha256": tuple(allow_spki_sha256),
        "allow_spki_pin": tuple(allow_spki_pin),
        "allow_from": tuple(allow_from),
        "deny_from": tuple(deny_from),
        "crl": tuple(os.fspath(path) for path in crl),
        "allow_policy": allow_policy,
        "allow_query": allow_query,
        "disable_authentication": disable_authentication,
    }
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue  # not given (click's None for an absent flag): the default, as in tunnel_config
        try:
            values[key] = convert(key, value)
        except ConfigError as err:
            where.add(str(err))
    if where.problems:
        raise ConfigErrors(where.problems)
    access = ServerAccess(**values)
    for problem in identity_problems(access):
        where.add(problem)
    if where.problems:
        raise ConfigErrors(where.problems)
    return access
