"""Typed, validated settings for one tunnel, built once from CLI flags or a TOML table.

Both sources are a mapping whose keys are the flag names (``allow-cn`` or ``allow_cn``), so every flag has a
config-file key of the same name and one validator serves both. Validation collects every problem before
failing, because an operator fixing a config file wants the whole list, not one error per run.
Files are only checked here (exists, readable); they are parsed by ``runtime.build_runtime``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from tlsgate.errors import ConfigError, shown
from tlsgate.settings.addresses import Address, parse_address, valid_host
from tlsgate.settings.durations import parse_duration
from tlsgate.settings.setting import Setting
from tlsgate.settings.table import (
    CIPHER_SUITES,
    SETTINGS,
    TLS_VERSIONS,
    UNSAFE_CIPHER_SUITES,
    process_settings,
    setting,
)

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
    # Access control (server mode), names as in tlsgate.policy.build_policy.
    allow_all: bool = False
    allow_cn: tuple[str, ...] = ()
    allow_ou: tuple[str, ...] = ()
    allow_dns: tuple[str, ...] = ()
    allow_ip: tuple[str, ...] = ()
    allow_uri: tuple[str, ...] = ()
    allow_spki_sha256: tuple[str, ...] = ()
    allow_from: tuple[str, ...] = ()
    deny_from: tuple[str, ...] = ()
    crl: tuple[str, ...] = ()
    allow_policy: str | None = None
    allow_query: str | None = None
    # Client mode: who the server must be.
    verify_cn: tuple[str, ...] = ()
    verify_ou: tuple[str, ...] = ()
    verify_dns: tuple[str, ...] = ()
    verify_ip: tuple[str, ...] = ()
    verify_uri: tuple[str, ...] = ()
    verify_spki_sha256: tuple[str, ...] = ()
    verify_policy: str | None = None
    verify_query: str | None = None
    override_server_name: str | None = None
    # Server mode re-encryption to a TLS upstream.
    target_tls: bool = False
    target_cacert: str | None = None
    target_server_name: str | None = None
    target_cert: str | None = None
    target_key: str | None = None
    alpn: tuple[str, ...] = ()
    # Server mode: "shared" (one derived key per process tree), "per-context" (OpenSSL's own), "off".
    session_tickets: str = "shared"
    unsafe_target: bool = False
    unsafe_listen: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_concurrent_conns: int = 0
    proxy_protocol: bool = False
    proxy_protocol_version: int = 2
    accept_proxy_from: tuple[str, ...] = ()
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

    @property
    def label(self) -> str:
        """How logs name this tunnel: its config name, or its listen address."""
        return self.name or str(self.listen)

    @property
    def proxy_from_unix(self) -> bool:
        """``--accept-proxy-from unix``: every peer of this unix-socket listener must start with a PROXY header.

        A unix peer has no IP address to list, and whoever may open the socket is decided by its file
        permissions, so the listener trusts its peers as a whole, never a CIDR.
        """
        return any(is_unix_source(value) for value in self.accept_proxy_from)

    @property
    def proxy_source_networks(self) -> tuple[str, ...]:
        """The CIDR entries of ``--accept-proxy-from``: the TCP peers whose PROXY headers are trusted."""
        return tuple(value for value in self.accept_proxy_from if not is_unix_source(value))


def is_unix_source(value: str) -> bool:
    """Whether an ``--accept-proxy-from`` entry is the word ``unix`` rather than a network."""
    return value.strip().lower() == "unix"


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
# Shortest --timed-reload: each reload re-reads every file and rebuilds every context, so "1ns" would spin.
MIN_TIMED_RELOAD = 1.0
# A string longer than this is a mistake (PATH_MAX is 4096; names and rules are far shorter), and quoting it
# back in full would bury the error message.
MAX_VALUE_LENGTH = 4096
# RFC 7301: each protocol name is 1-255 bytes, and the whole list goes in a 16-bit length.
_ALPN_MAX_NAME, _ALPN_MAX_LIST = 255, 65535
# AF_UNIX addresses are at most 108 bytes including the terminating NUL (Linux sun_path).
_MAX_UNIX_PATH = 107

# Prometheus metric names: anything else in the prefix would make /metrics unparseable for the scraper.
_METRIC_PREFIX = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def shown_path(path: str) -> str:
    """A file path as typed when it prints as one short line, else quoted with escapes (see ``shown``)."""
    return path if path.isprintable() and len(path) <= 200 else shown(path)


def _kind_of(value: object) -> str:
    """What a value is, without what it says: for secret-bearing keys."""
    names = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def check_metrics_prefix(text: str) -> str:
    """``--metrics-prefix``/``metrics-prefix``: a Prometheus metric name, or ConfigError."""
    if not _METRIC_PREFIX.fullmatch(text):
        raise ConfigError(f"--metrics-prefix: {shown(text)} is not a metric name (letters, digits, _ and :)")
    return text


def normalise_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def target_status_problems(url: str) -> list[str]:
    """``--target-status``: an ``http://`` or ``https://`` URL with a host (ghostunnel's rule, plus the host,
    which is the Host header and, for https, the name the target's certificate must have)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return [f"--target-status {shown(url)}: should start with http:// or https://"]
    if not url.isascii() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        # The URL becomes a request line and a Host header: a space or line break would forge another one.
        return [f"--target-status {shown(url)}: spaces, control and non-ASCII characters must be percent-encoded"]
    host = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    if not host:
        return [f"--target-status {shown(url)}: give a URL with a host, such as http://localhost:8080/health"]
    return []


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


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


def _plain_text(text: str, key: str) -> str:
    """Every string value passes here: no NUL (no path, name or rule can hold one, and OpenSSL and the OS stop
    at it or refuse it later, with a traceback), and not so long that the error quoting it is unreadable."""
    if len(text) > MAX_VALUE_LENGTH:
        raise ConfigError(f"{flag(key)}: {shown(text)} is {len(text)} characters long (at most {MAX_VALUE_LENGTH})")
    if "\0" in text:
        raise ConfigError(f"{flag(key)}: {shown(text)} contains a NUL character")
    return text


def _as_tuple(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_plain_text(value, key),)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(_plain_text(v, key) for v in value)
    raise ConfigError(f"{flag(key)}: expected a string or a list of strings, got {shown(value)}")


def _as_bool(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{flag(key)}: expected true or false, got {shown(value)}")


def _as_str(value: object, key: str) -> str | None:
    if value is None or value == "":
        return None  # an empty string means "not given", as an absent flag
    if isinstance(value, str):
        return _plain_text(value, key)
    raise ConfigError(f"{flag(key)}: expected a string, got {shown(value)}")


def _as_int(value: object, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{flag(key)}: expected a whole number, got {shown(value)}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{flag(key)}: expected a whole number, got {shown(value)}") from None
    if not low <= number <= high:
        raise ConfigError(f"{flag(key)}: {shown(number)} out of range ({low}-{high})")
    return number


def _as_duration(value: object, key: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(_plain_text(value, key), name=flag(key))
    else:
        raise ConfigError(f"{flag(key)}: expected a duration like 10s, got {shown(value)}")
    # TOML has inf, and "999...9s" overflows to inf: a timer that never fires is "0" (no limit), said plainly.
    if not math.isfinite(seconds):
        raise ConfigError(f"{flag(key)}: {shown(value)} is not a finite duration (0 means no limit)")
    if key == "timed_reload" and 0 < seconds < MIN_TIMED_RELOAD:
        raise ConfigError(
            f"{flag(key)}: {shown(value)} is too short: reload at most once a second (at least 1s, or 0 for never)"
        )
    return seconds


def _as_alpn(value: object, key: str) -> tuple[str, ...]:
    """ALPN protocol names as OpenSSL takes them: ASCII, 1-255 bytes each (Python raises SSLError otherwise)."""
    names = _as_tuple(value, key)
    for name in names:
        if not name:
            raise ConfigError(f"{flag(key)}: an empty protocol name (each name is 1-255 characters)")
        if not (name.isascii() and name.isprintable()):
            raise ConfigError(f"{flag(key)}: {shown(name)} is not printable ASCII (protocol names like h2, http/1.1)")
        if len(name) > _ALPN_MAX_NAME:
            raise ConfigError(f"{flag(key)}: a protocol name of {len(name)} characters (at most {_ALPN_MAX_NAME})")
    if sum(len(name) + 1 for name in names) > _ALPN_MAX_LIST:
        raise ConfigError(f"{flag(key)}: the protocol list is longer than TLS allows ({_ALPN_MAX_LIST} bytes)")
    return names


def _as_server_name(value: object, key: str) -> str | None:
    """A name the TLS hop sends as SNI and checks the certificate against; ``ssl`` encodes it with IDNA only
    when it connects, so an unencodable name would fail every connection instead of the start."""
    name = _as_str(value, key)
    if name is None:
        return None
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    try:
        name.encode("idna")
        if not valid_host(name):
            raise UnicodeError(name)
    except UnicodeError:
        raise ConfigError(f"{flag(key)}: {shown(name)} is not a host name (labels of 1-63 characters)") from None
    return name


def _as_address(value: object, key: str) -> Address:
    address = parse_address(_as_str(value, key) or "", name=flag(key), activated=key == "listen")
    return check_socket_path(address, flag(key))


def check_socket_path(address: Address, name: str) -> Address:
    """A ``unix:`` path the kernel can bind: no NUL, and short enough for ``sun_path`` (bind would raise)."""
    if not address.is_unix:
        return address
    if "\0" in address.path:
        raise ConfigError(f"{name}: unix:{shown_path(address.path)} contains a NUL character")
    size = len(os.fsencode(address.path))
    if size > _MAX_UNIX_PATH:
        raise ConfigError(
            f"{name}: the unix socket path is {size} bytes long, more than the kernel takes ({_MAX_UNIX_PATH})"
        )
    return address


def _check_file(path: str | None, key: str) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise ConfigError(f"{flag(key)}: {shown_path(path)}: no such file")
    if os.path.isdir(path):
        raise ConfigError(f"{flag(key)}: {shown_path(path)}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{flag(key)}: {shown_path(path)}: permission denied")


def _check_cidrs(values: Sequence[str], key: str) -> None:
    for value in values:
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"{flag(key)}: {shown(value)} is not a network (use CIDR like 10.0.0.0/8)") from None


def _secret(value: object, key: str) -> bytes | None:
    # Never quote the value back: a password typed in the wrong form is still the password.
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{flag(key)}: expected a string (env:VAR, file:PATH or the password), got {_kind_of(value)}")
    if len(value) > MAX_VALUE_LENGTH:
        raise ConfigError(f"{flag(key)}: the value is {len(value)} characters long (at most {MAX_VALUE_LENGTH})")
    if "\0" in value:
        raise ConfigError(f"{flag(key)}: the value contains a NUL character")
    if value.startswith(("env:", "file:")) and not value.isprintable():
        # resolve_secret names the variable or the file in its errors; a newline there would split the line.
        raise ConfigError(f"{flag(key)}: {shown(value)}: a variable name or path with control characters")
    from tlsgate.settings.secrets import resolve_secret

    return resolve_secret(value, flag=flag(key))


def _as_choice(value: object, key: str) -> str | None:
    """One of the setting's choices (``--session-tickets shared``); click checks the flag, this the file key."""
    choices = setting(key).choices
    text = _as_str(value, key)
    if text not in choices:
        raise ConfigError(f"{flag(key)}: expected one of {', '.join(choices)}, got {shown(text)}")
    return text


def _as_ips(value: object, key: str) -> tuple[str, ...]:
    """IP SANs to match: each one address, in canonical form (``::1``), so a rule compares like the SAN does."""
    out = []
    for text in _as_tuple(value, key):
        try:
            out.append(str(ipaddress.ip_address(text.strip())))
        except ValueError:
            raise ConfigError(f"{flag(key)}: {shown(text)} is not an IP address (an IP SAN is one address)") from None
    return tuple(out)


def _as_tls_version(value: object, key: str) -> str | None:
    text = _as_str(value, key)
    if text is not None and text not in TLS_VERSIONS:
        raise ConfigError(f"{flag(key)}: {shown(text)} is not a TLS version we speak (TLS1.2 or TLS1.3)")
    return text


def _as_cipher_suites(value: object, key: str) -> tuple[str, ...]:
    """``AES,CHACHA`` (or a TOML list): ghostunnel's names, each once; whether UNSAFE-* is allowed is a cross-check."""
    items = value.split(",") if isinstance(value, str) else value
    names = tuple(name.strip().upper() for name in _as_tuple(items, key))
    known = (*CIPHER_SUITES, *UNSAFE_CIPHER_SUITES)
    for name in names:
        if name not in known:
            raise ConfigError(f"{flag(key)}: {shown(name)} is not a cipher suite option (AES, CHACHA)")
    if not names:
        raise ConfigError(f"{flag(key)}: an empty list (give AES, CHACHA or both)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag(key)}: {', '.join(names)} names a suite twice")
    return names


def _as_count(value: object, key: str) -> int:
    entry = setting(key)
    return _as_int(value, key, entry.low, entry.high)


# The converter of each kind of tunnel setting (see tlsgate.settings.Kind); process settings have theirs in
# tlsgate.settings.file, and click converts them on the command line.
_CONVERTERS: dict[str, Callable[[object, str], Any]] = {
    "address": _as_address,
    "file": _as_str,
    "files": _as_tuple,
    "bundle": _as_str,
    "secret": _secret,
    "text": _as_str,
    "texts": _as_tuple,
    "networks": _as_tuple,
    "ips": _as_ips,
    "flag": _as_bool,
    "duration": _as_duration,
    "count": _as_count,
    "alpn": _as_alpn,
    "server_name": _as_server_name,
    "choice": _as_choice,
    "tls_version": _as_tls_version,
    "cipher_suites": _as_cipher_suites,
}


def _convert(key: str, value: object) -> Any:
    """One setting's value in its typed form; ConfigError names the flag and the expected form."""
    return _CONVERTERS[setting(key).kind](value, key)


def _check_paths(entry: Setting, value: Any) -> None:
    """The files a setting names exist and are readable; networks parse (the table's kind says which)."""
    if entry.kind == "file":
        _check_file(value, entry.name)
    elif entry.kind == "files":
        for path in value:
            _check_file(path, entry.name)
    elif entry.kind == "bundle" and value is not None and not os.path.exists(value):
        # A bundle may be a directory; its contents are read (and compiled) by runtime.build_runtime.
        raise ConfigError(f"{flag(entry.name)}: {value}: no such file or directory")
    elif entry.kind == "networks":
        # --accept-proxy-from also takes the word "unix" (a unix listener's peers); the rest are networks.
        unix_word = entry.name == "accept_proxy_from"
        _check_cidrs([v for v in value if not (unix_word and is_unix_source(v))], entry.name)


def tunnel_config(
    mode: str, options: Mapping[str, Any], *, name: str = "", require_client_identity: bool = False
) -> TunnelConfig:
    """Validate ``options`` (flag-named keys) into a TunnelConfig, or raise ConfigErrors with every problem.

    ``require_client_identity``: the command line and files pass True to apply ghostunnel's rule that a client
    names its certificate or says --disable-authentication; the library API lets a bare client (plain TLS) be.
    """
    where = _Collector(f"tunnel {name!r}: " if name else "")
    opts = {normalise_key(k): v for k, v in options.items()}
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
            converted = _convert(key, value)
        except ConfigError as err:
            where.add(str(err))
            continue
        if key in _TIMEOUT_KEYS:
            timeouts[_TIMEOUT_KEYS[key]] = converted
        else:
            values[key] = converted

    for key in ("listen", "target"):
        if key not in values and key not in opts:
            where.add(f"{flag(key)} is required")
    # Files first, then bundles and networks, each in the table's order: the order of the messages is stable.
    for kind in ("file", "files", "bundle", "networks"):
        for entry in SETTINGS:
            if entry.kind == kind and entry.name in values:
                where.run(partial(_check_paths, entry, values[entry.name]))
    if where.problems:
        raise ConfigErrors(where.problems)

    cfg = TunnelConfig(mode=mode, name=name, timeouts=Timeouts(**timeouts), **values)  # type: ignore[arg-type]
    for problem in cross_checks(cfg, require_client_identity=require_client_identity):
        where.add(problem)
    if where.problems:
        raise ConfigErrors(where.problems)
    return cfg


def cross_checks(cfg: TunnelConfig, *, require_client_identity: bool = False) -> list[str]:
    """Every rule that involves several settings, for flags and files alike, worded with the flags' names.

    ghostunnel's safety checks for unsafe listen/target are here, and its refusals of contradicting flags;
    ``configfile.key_names`` rewords the messages for a file. One message per broken rule, so the user sees
    what to change. (``policy.build_policy`` keeps its own guard for callers of the library API.)
    """
    problems: list[str] = []
    values = any((cfg.allow_cn, cfg.allow_ou, cfg.allow_dns, cfg.allow_ip, cfg.allow_uri, cfg.allow_spki_sha256))
    rego = cfg.allow_policy is not None or cfg.allow_query is not None
    identity = cfg.allow_all or values or rego
    has_pem = bool(cfg.cert or cfg.key)
    if cfg.keystore and has_pem:
        problems.append("give either --keystore or --cert/--key, not both")
    if len(cfg.cert) != len(cfg.key):
        problems.append(f"--cert given {len(cfg.cert)} time(s) but --key {len(cfg.key)}: they go in pairs")
    if cfg.mode == "server":
        if not cfg.keystore and not has_pem:
            problems.append("server mode needs a certificate: --cert and --key, or --keystore")
        # The same rules, in the same words, as policy.build_policy (which guards the library API).
        given = [
            flag(key)
            for key in ("allow_cn", "allow_ou", "allow_dns", "allow_ip", "allow_uri", "allow_spki_sha256")
            if getattr(cfg, key)
        ]
        if cfg.disable_authentication:
            if cfg.allow_all or given:
                problems.append(
                    f"--disable-authentication contradicts {'--allow-all' if cfg.allow_all else given[0]}: "
                    "without client certificates it cannot match"
                )
            if cfg.allow_policy is not None:
                problems.append("--disable-authentication contradicts --allow-policy: no client certificate to check")
            if cfg.crl:
                problems.append("--disable-authentication contradicts --crl: no client certificate is asked to revoke")
        elif not identity:
            problems.append(
                "server mode needs one of --allow-all, --allow-cn, --allow-ou, --allow-dns, --allow-ip, --allow-uri, "
                "--allow-spki-sha256, --allow-policy/--allow-query, or --disable-authentication"
            )
        if rego and (cfg.allow_policy is None or cfg.allow_query is None):
            problems.append("--allow-policy and --allow-query go together: give both, or neither")
        if rego and (cfg.allow_all or values):
            problems.append(
                f"--allow-policy/--allow-query and {'--allow-all' if cfg.allow_all else given[0]} are mutually "
                "exclusive (as in ghostunnel: put every rule in the policy)"
            )
        if cfg.allow_all and given:
            problems.append(
                f"--allow-all and {given[0]} are mutually exclusive (--allow-all already allows every client)"
            )
        if not cfg.disable_authentication and not cfg.cacert:
            problems.append("client certificates are verified against --cacert; give it (or --disable-authentication)")
        if cfg.disable_authentication and not cfg.listen.is_loopback and not cfg.unsafe_listen:
            problems.append(
                f"--listen {cfg.listen} is reachable from other machines and no client certificate is required; "
                "add --unsafe-listen if that is what you want"
            )
        if not cfg.target_tls and not cfg.target.is_loopback and not cfg.unsafe_target:
            problems.append(
                f"--target {cfg.target} is not on this machine and the hop is plaintext; use --target-tls, "
                "or add --unsafe-target if the network in between is trusted"
            )
        if cfg.target_status is not None:
            problems += target_status_problems(cfg.target_status)
        verify = any(
            (cfg.verify_cn, cfg.verify_ou, cfg.verify_dns, cfg.verify_ip, cfg.verify_uri, cfg.verify_spki_sha256)
        )
        if verify or cfg.verify_policy or cfg.verify_query:
            problems.append("--verify-* flags are for client mode; server mode uses --allow-*")
    else:
        if identity or cfg.crl or cfg.crl_max_age:
            problems.append("--allow-*/--crl flags are for server mode; client mode uses --verify-*")
        has_certificate = bool(cfg.keystore or cfg.cert or cfg.key)
        # ghostunnel's client mode needs a certificate unless told not to present one, and refuses both at once: a
        # certificate silently presented after --disable-authentication would be a surprise. We follow it.
        if cfg.disable_authentication and has_certificate:
            problems.append("--disable-authentication presents no certificate: drop --keystore/--cert/--key")
        if require_client_identity and not cfg.disable_authentication and not has_certificate:
            problems.append(
                "client mode needs a certificate: --cert and --key, or --keystore, or --disable-authentication"
            )
        if (cfg.verify_policy is None) != (cfg.verify_query is None):
            # ghostunnel silently ignores one without the other, which would leave the server unchecked.
            problems.append("--verify-policy and --verify-query go together: give both, or neither")
        if not cfg.listen.is_loopback and not cfg.unsafe_listen:
            problems.append(
                f"--listen {cfg.listen} exposes a plaintext port to other machines; add --unsafe-listen if intended"
            )
        if cfg.target.is_unix and not cfg.override_server_name:
            problems.append("a unix: target in client mode needs --override-server-name to verify the server")
    unsafe = [name for name in cfg.cipher_suites if name in UNSAFE_CIPHER_SUITES]
    if unsafe and not cfg.allow_unsafe_cipher_suites:
        # ghostunnel says "invalid cipher suite option" without the flag; we say which flag unlocks it.
        problems.append(f"--cipher-suites {unsafe[0]} is unsafe (CBC): add --allow-unsafe-cipher-suites to use it")
    if cfg.timeouts.connect == 0:
        # ghostunnel refuses it too: a target that never answers would hold the connection, and its slot, forever.
        problems.append("--connect-timeout must not be 0 (a target that never answers would be waited for forever)")
    if cfg.target_tls and cfg.mode == "client":
        problems.append("--target-tls is for server mode; client mode always speaks TLS to the target")
    if (cfg.target_cert is None) != (cfg.target_key is None):
        problems.append("--target-cert and --target-key go together")
    if (cfg.target_cacert or cfg.target_server_name or cfg.target_cert) and not cfg.target_tls:
        problems.append("--target-cacert/--target-server-name/--target-cert need --target-tls")
    if cfg.accept_proxy_from and cfg.mode != "server":
        problems.append("--accept-proxy-from is for server mode")
    if cfg.crl_max_age and not cfg.crl and cfg.mode == "server":
        problems.append("--crl-max-age limits the age of --crl files: give --crl too")
    problems += _unix_listener_checks(cfg)
    return problems


def _unix_listener_checks(cfg: TunnelConfig) -> list[str]:
    """Address rules never silently go unapplied: a unix peer has no IP address for them to match.

    On a unix listener they are allowed only with ``--accept-proxy-from unix``, where they apply to the client
    address each PROXY header carries (a header without one is refused).
    """
    problems: list[str] = []
    if cfg.listen.is_activated:
        return problems  # a systemd: socket's family is known only once we hold it: Server.start checks it
    if not cfg.listen.is_unix:
        if cfg.proxy_from_unix:
            problems.append(f"--accept-proxy-from unix is for a unix: --listen; {cfg.listen} takes CIDRs")
        return problems
    for network in cfg.proxy_source_networks:
        problems.append(
            f"--accept-proxy-from {network}: peers of a unix: listener have no IP address; "
            "use --accept-proxy-from unix to require a PROXY header from them"
        )
    if (cfg.allow_from or cfg.deny_from) and not cfg.proxy_from_unix:
        hint = (
            "; add --accept-proxy-from unix to apply them to the client address in a PROXY header"
            if cfg.mode == "server"
            else ""
        )
        problems.append(
            f"--allow-from/--deny-from cannot apply to --listen {cfg.listen}: its peers have no IP address "
            f"(remove them{hint})"
        )
    return problems
