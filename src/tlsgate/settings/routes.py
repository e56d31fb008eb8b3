"""Routes by server name (SNI): which names a route claims, and which route a client's server name picks.

A server tunnel with routes has one listener and several destinations. The client names the host it wants in
the TLS ClientHello (the SNI extension, RFC 6066); the route that claims that name supplies the certificate,
the access rules and the target. This module is the sans-IO half of that: it normalises the names a config
gives (``normalise_route_name``), parses the command line's ``--route 'NAME[,NAME...]=HOST:PORT'``
(``parse_route_flag``) and matches a handshake's server name against a table of routes (``NameTable``).
No sockets, no TLS: every rule here is tested with plain strings.

How names are compared, and why:

* DNS names are case-insensitive and a trailing dot names the same host (``API.Example.com.`` is
  ``api.example.com``), so both sides are lowered and stripped before they meet.
* International names travel as A-labels (``xn--bcher-kva.example``): that is what curl, browsers and
  OpenSSL put in the ClientHello, and CPython hands the SNI callback the A-label as it came. A config may
  spell a name in Unicode (``bücher.example``); it is converted once, at load time, with Python's IDNA codec.
  That codec follows IDNA 2003, which maps four characters (``ß``, ``ς``, ZWJ, ZWNJ) differently from the
  IDNA 2008 that curl's libidn2 uses, so a name holding one of them is refused with a request for its A-label
  instead of being silently matched against the wrong host.
* ``*.example.com`` claims exactly one more label, as a wildcard certificate does (RFC 6125 6.4.3):
  ``a.example.com`` but neither ``example.com`` nor ``a.b.example.com``. An exact name wins over a wildcard.
* IP addresses are not server names: RFC 6066 forbids a literal IP in SNI and clients do not send one for an
  IP URL. A route cannot claim one, and a ClientHello that carries one anyway matches no route (it goes where
  names no route claims go).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tlsgate.errors import ConfigError, shown

if TYPE_CHECKING:
    from tlsgate.settings.config import TunnelConfig

__all__ = [
    "DEFAULT_ROUTE",
    "ROUTE_KEYS",
    "NameTable",
    "RouteConfig",
    "build_routes",
    "normalise_route_name",
    "parse_route_flag",
    "sni_lookup_key",
]

#: The name of the route that takes clients whose server name no route claims: the tunnel's own --target.
DEFAULT_ROUTE = "default"

# Characters IDNA 2003 (Python's codec) and IDNA 2008 (libidn2: curl, most resolvers) encode differently.
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")
_MAX_NAME = 253
_MAX_LABEL = 63

_T = TypeVar("_T")


def normalise_route_name(text: object, key: str = "server-names") -> str:
    """``text`` as the ClientHello would carry it: lower-case A-labels, no trailing dot; ``*.`` kept in front.

    Raises ConfigError (one line, naming ``key`` and the value) for anything a client could never send.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{key}: expected a host name, got {shown(text)}")
    name = text.strip().rstrip(".")
    wildcard = name.startswith("*.")
    host = name[2:] if wildcard else name
    if not host:
        raise ConfigError(f"{key}: expected a host name, got {shown(text)}")
    if "*" in host:
        raise ConfigError(
            f"{key}: {shown(text)}: a wildcard is '*.' followed by a domain ('*.example.com'), and nothing else"
        )
    if _is_ip(host):
        raise ConfigError(
            f"{key}: {shown(text)} is an IP address; clients send host names only in SNI (RFC 6066), "
            "so route it with the tunnel's own target"
        )
    if any(char in _IDNA_DEVIATIONS for char in host):
        raise ConfigError(
            f"{key}: {shown(text)}: IDNA 2003 and 2008 encode this name differently; write its A-label (xn--...)"
        )
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ConfigError(f"{key}: {shown(text)} is not a valid host name") from None
    labels = ascii_host.split(".")
    if len(ascii_host) > _MAX_NAME or any(not label or len(label) > _MAX_LABEL or not _ldh(label) for label in labels):
        raise ConfigError(f"{key}: {shown(text)} is not a valid host name (letters, digits and '-' per label)")
    if labels[-1].isdigit():
        # ClientHellos are matched on this too (sni_lookup_key): an all-digit last label is an IP's, never a TLD's.
        raise ConfigError(f"{key}: {shown(text)} is not a host name: its last label is all digits, like an IP address")
    if wildcard and len(labels) < 2:
        raise ConfigError(f"{key}: {shown(text)}: a wildcard needs a domain of two labels at least ('*.example.com')")
    return ("*." if wildcard else "") + ascii_host


def sni_lookup_key(server_name: str | None) -> str | None:
    """The form a handshake's server name is looked up in: lower case, no trailing dot; None when unusable.

    Cheap on purpose: it runs once per handshake. A name that is not ASCII (CPython passes A-labels, so this
    only happens through the library API) or that is an IP literal matches nothing.
    """
    if not server_name:
        return None
    name = server_name.rstrip(".").lower()
    # An IP literal has a colon (IPv6) or an all-digit last label (IPv4), which no DNS name has (RFC 3696 2): a
    # cheap test, where ipaddress.ip_address raises and formats two exceptions for every real host name.
    if not name.isascii() or ":" in name or name.rpartition(".")[2].isdigit():
        return None
    return name


def parse_route_flag(value: str) -> tuple[tuple[str, ...], str]:
    """``--route 'api.example.com,*.api.example.com=127.0.0.1:8080'`` -> (server names, target text).

    The target is returned as written: the tunnel's address parser checks it, as it checks --target.
    """
    names_text, sep, target = value.partition("=")
    if not sep or not names_text.strip() or not target.strip():
        raise ConfigError(
            f"--route: expected NAME[,NAME...]=HOST:PORT (e.g. 'api.example.com=127.0.0.1:8080'), got {shown(value)}"
        )
    names = tuple(normalise_route_name(part, "--route") for part in names_text.split(","))
    return names, target.strip()


class NameTable(Generic[_T]):
    """Server names (as ``normalise_route_name`` gives them) -> a value; ``match`` answers for a handshake.

    Two dict look-ups at most per handshake: the exact name, then the wildcard of its parent domain.
    """

    __slots__ = ("_exact", "_wildcard")

    def __init__(self, entries: Iterable[tuple[str, _T]]) -> None:
        self._exact: dict[str, _T] = {}
        self._wildcard: dict[str, _T] = {}
        for name, value in entries:
            table, key = (self._wildcard, name[2:]) if name.startswith("*.") else (self._exact, name)
            if key in table:
                raise ConfigError(f"server name {name!r} is claimed by two routes")
            table[key] = value

    def match(self, server_name: str | None) -> _T | None:
        """The value for ``server_name`` (raw from the handshake), or None when no entry claims it."""
        name = sni_lookup_key(server_name)
        if name is None:
            return None
        found = self._exact.get(name)
        if found is None and self._wildcard:
            # One label only: the wildcard of "a.b.example.com" is looked up under "b.example.com".
            _, dot, parent = name.partition(".")
            if dot and parent:
                found = self._wildcard.get(parent)
        return found


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _ldh(label: str) -> bool:
    """Letters, digits and hyphens, not at either end (RFC 1123); '_' too, which real DNS names carry."""
    return all(c.isalnum() or c in "-_" for c in label) and label[0] != "-" and label[-1] != "-"


# -- routes as configured -----------------------------------------------------------------------------------------

# What a route may set. Each group is taken whole: a route that sets any key of a group replaces the tunnel's
# whole group, so a route's rules are never a mix of its own and the tunnel's that nobody wrote down.
_IDENTITY_KEYS = (
    "allow_all",
    "allow_cn",
    "allow_ou",
    "allow_dns",
    "allow_ip",
    "allow_uri",
    "allow_spki_sha256",
    "allow_policy",
    "allow_query",
)
_CERTIFICATE_KEYS = ("cert", "key", "keystore", "storepass", "key_pass")
_TARGET_TLS_KEYS = ("target_tls", "target_cacert", "target_server_name", "target_cert", "target_key", "unsafe_target")
_GROUPS = (_IDENTITY_KEYS, _CERTIFICATE_KEYS, _TARGET_TLS_KEYS)
#: Keys a ``[[tunnel.route]]`` table takes, besides ``name`` and ``server-names``.
ROUTE_KEYS = frozenset(("target", *_IDENTITY_KEYS, *_CERTIFICATE_KEYS, *_TARGET_TLS_KEYS))
# Why the other tunnel keys stay the tunnel's: said once, in the error a misplaced key gets.
_SHARED_WHY = {
    "cacert": "clients are verified against one CA bundle per listener (a session resumed on another route "
    "is not verified again)",
    "disable_authentication": "OpenSSL asks for a client certificate before the server name is known",
    "crl": "revocation lists apply to the listener's CA bundle",
    "allow_spki_pin": "pin-only authentication skips the CA, and a session resumed under another name is not "
    "verified again",
}


@dataclass(frozen=True)
class RouteConfig:
    """One route: the server names it claims and the tunnel it amounts to.

    ``cfg`` is the tunnel's settings with the route's own over them (group by group, see ``ROUTE_KEYS``),
    validated as a tunnel of its own, so every rule a tunnel obeys (a certificate, an access rule, a safe
    target) holds for each route too. The default route (the tunnel's own ``--target``) is not one of these:
    it is the tunnel's config itself.
    """

    name: str
    server_names: tuple[str, ...]
    cfg: TunnelConfig


def build_routes(
    mode: str, tunnel_options: Mapping[str, Any], value: object
) -> tuple[tuple[RouteConfig, ...], list[str]]:
    """Routes from ``--route`` values (strings) or ``[[tunnel.route]]`` tables, and every problem found.

    ``tunnel_options`` are the tunnel's own options (flag-named keys, canonical form), which each route starts
    from. Problems are one line each, naming the route.
    """
    from tlsgate.settings.config import ConfigErrors, tunnel_config

    if value is None or value == [] or value == ():
        return (), []
    if mode != "server":
        return (), ["--route is for server mode: a client tunnel has one target"]
    items = [value] if isinstance(value, str | Mapping) else value
    if not isinstance(items, Sequence):
        return (), [f"route: expected [[tunnel.route]] tables or NAME=HOST:PORT strings, got {shown(value)}"]
    if tunnel_options.get("allow_spki_pin"):
        # Pin-only clients are not verified against the CA; resumed under another route's name, such a session
        # would meet that route's CA-based rules with a certificate nobody verified.
        return (), ["route: routes cannot be combined with allow-spki-pin (pin-only authentication)"]
    base = {k: v for k, v in tunnel_options.items() if k not in ("route", "target", "name", "mode")}
    problems: list[str] = []
    routes: list[RouteConfig] = []
    route_names: set[str] = set()
    claimed: dict[str, str] = {}  # server name -> the route claiming it
    for index, item in enumerate(items, start=1):
        try:
            name, names, own = _route_entry(index, item)
        except ConfigError as err:
            problems.append(str(err))
            continue
        label = f"route {name!r}"
        if name == DEFAULT_ROUTE:
            problems.append(f"{label}: the name {DEFAULT_ROUTE!r} is the tunnel's own target; choose another")
            continue
        if name in route_names:
            problems.append(f"{label}: two routes have this name; names must be unique")
            continue
        route_names.add(name)
        clash = next((n for n in names if n in claimed), None)
        if clash is not None:
            problems.append(f"{label}: server name {clash!r} is claimed by route {claimed[clash]!r} too")
            continue
        claimed.update(dict.fromkeys(names, name))
        options = dict(base)
        for group in _GROUPS:
            if any(key in own for key in group):
                for key in group:
                    options.pop(key, None)
        options.update(own)
        try:
            cfg = tunnel_config(mode, options, require_client_identity=True)
        except ConfigErrors as err:
            problems.extend(f"{label}: {problem}" for problem in err.problems)
            continue
        routes.append(RouteConfig(name, names, cfg))
    return tuple(routes), problems


def _route_entry(index: int, item: object) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """(name, server names, the route's own options) of one ``--route`` string or ``[[tunnel.route]]`` table."""
    if isinstance(item, str):
        names, target = parse_route_flag(item)
        return names[0], names, {"target": target}
    if not isinstance(item, Mapping):
        raise ConfigError(f"route #{index}: expected a [[tunnel.route]] table, got {shown(item)}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip() or not name.isprintable() or len(name) > 200:
        raise ConfigError(f"route #{index}: name is required: a short string on one line (logs and metrics use it)")
    label = f"route {name!r}"
    raw_names = item.get("server-names", item.get("server_names"))
    if isinstance(raw_names, str):
        raw_names = [raw_names]
    if not isinstance(raw_names, list) or not raw_names:
        raise ConfigError(f"{label}: server-names is required: the host names this route serves, as a list")
    try:
        names = tuple(dict.fromkeys(normalise_route_name(n) for n in raw_names))
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None
    own: dict[str, Any] = {}
    for spelled, value in item.items():
        key = spelled.strip().replace("-", "_")
        if key in ("name", "server_names"):
            continue
        if key not in ROUTE_KEYS:
            why = _SHARED_WHY.get(key)
            hint = f": it is the tunnel's for every route ({why})" if why else ""
            if not why:
                hint = f" (a route takes: server-names, {', '.join(sorted(k.replace('_', '-') for k in ROUTE_KEYS))})"
            raise ConfigError(f"{label}: {shown(spelled)} cannot be set per route{hint}")
        own[key] = value
    if "target" not in own:
        raise ConfigError(f"{label}: target is required: where this route's clients go (HOST:PORT or unix:PATH)")
    return name, names, own


def resolve_route_paths(value: object, resolve: Callable[[dict[str, Any]], dict[str, Any]]) -> object:
    """``[[tunnel.route]]`` tables with their paths made relative to the config file by ``resolve``, as the
    tunnel's own are; anything else (``--route`` strings, a wrong type the validator reports) as it is."""
    if not isinstance(value, list):
        return value
    return [
        resolve({key.strip().replace("-", "_"): v for key, v in item.items()}) if isinstance(item, Mapping) else item
        for item in value
    ]


def describe_routes(cfg: TunnelConfig, line: str, describe: Callable[[TunnelConfig], str]) -> str:
    """check-config's line for a tunnel (``line``, from ``describe``) with its routes after it."""
    if cfg.route and not cfg.route_default:
        line = line.replace(f" -> {cfg.target}", " -> (names no route claims: refused)", 1)
    for route in cfg.route:
        described = describe(route.cfg).split(" -> ", 1)[1]
        line += f"; route {route.name}: {', '.join(route.server_names)} -> {described}"
    return line
