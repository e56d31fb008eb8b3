"""Every tlsgate setting, declared once: the command-line flags and the TOML keys are both read through this table.

One ``Setting`` says everything the rest of the program needs to know about a knob: its canonical name (the
TOML key, ``allow_cn``, spelled ``allow-cn`` in files as well), the flag that sets it (``--allow-cn``) and any
hidden ghostunnel spellings, whether it belongs to the whole process or to one tunnel and in which modes a
tunnel takes it, its kind (which picks the converter in ``settings.config`` and the click type in ``tlsgate.cli``),
its default, its help section and help text, whether its value is a secret (never quoted back in an error), and
the environment variable that stands in for it (ghostunnel's ``KEYSTORE_PATH`` and friends).

From the table: ``tlsgate.cli`` generates the click options of ``server`` and ``client`` and groups their help in
sections; ``tlsgate.settings.config`` knows the keys, converts each value and checks the files and networks it names;
``tlsgate.settings.file`` knows which keys go under ``[process]``. Adding a flag is one entry here plus the code
where it takes effect. The rules that involve several settings live in one function, ``config.cross_checks``.

The shape follows mitmproxy's ``optmanager`` (options declared once, every source read through the declarations)
and black's ``read_pyproject_toml`` (a file feeds the same names the flags have, so a key and a flag cannot drift).
This module is pure data, so that it can be imported by everything without import cycles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ENV_FLAGS",
    "SECTIONS",
    "SETTINGS",
    "Kind",
    "Setting",
    "process_settings",
    "setting",
    "tunnel_settings",
]

# What a value is: picks the converter (tlsgate.settings.config) and the click type (tlsgate.cli).
Kind = Literal[
    "address",  # HOST:PORT, unix:PATH, systemd:NAME -> addresses.Address
    "file",  # one readable file path, checked at start
    "files",  # repeatable file paths
    "bundle",  # a Rego bundle: file, directory or .tar.gz
    "secret",  # pass:, env:VAR, file:PATH or the password itself -> bytes; never shown
    "text",  # one string
    "texts",  # repeatable strings
    "networks",  # repeatable CIDRs
    "ips",  # repeatable IP addresses (IP SANs), kept in canonical form
    "flag",  # true/false
    "duration",  # 10s, 5m, 0 -> seconds
    "count",  # a whole number within [low, high]
    "alpn",  # comma-separated on the command line, a list in a file
    "server_name",  # a host name or IP checked by a TLS hop
    "choice",  # one of choices
    "choices",  # repeatable, each one of choices
    "tls_version",  # ghostunnel's TLS1.2 / TLS1.3
    "cipher_suites",  # ghostunnel's AES,CHACHA: comma-separated on the command line, a list in a file
]
Scope = Literal["process", "server", "client", "both"]

# Help sections, in the order --help shows them.
SECTIONS = ("listening", "certificates", "access rules", "timeouts", "upstream", "operations")


@dataclass(frozen=True)
class Setting:
    """One knob of tlsgate, as the command line, the TOML file and the typed config all see it."""

    name: str
    kind: Kind
    section: str
    help: str
    scope: Scope = "both"
    metavar: str | None = None
    # Default shown in --help; tunnel defaults themselves live in config.TunnelConfig/Timeouts, process ones in
    # process_options.ProcessOptions, so that the library API and the CLI cannot disagree.
    default: object = None
    # Other flag spellings accepted and not shown in --help (ghostunnel's older names).
    aliases: tuple[str, ...] = ()
    env: str | None = None
    secret: bool = False
    required: bool = False
    low: int = 0
    high: int = 0
    choices: tuple[str, ...] = ()
    # Help text per mode where the same flag means something mode-specific (server: clients; client: the server).
    help_by_mode: Mapping[str, str] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def repeatable(self) -> bool:
        return self.kind in ("files", "texts", "networks", "ips", "choices")

    def takes(self, mode: str) -> bool:
        """Whether the ``mode`` command has this flag (process settings: every command)."""
        return self.scope in ("process", "both", mode)

    def help_for(self, mode: str) -> str:
        text = (self.help_by_mode or {}).get(mode, self.help)
        return f"{text} [env {self.env}]" if self.env else text


def _duration(name: str, text: str, section: str = "timeouts", scope: Scope = "both") -> Setting:
    return Setting(name, "duration", section, text, scope=scope, metavar="DURATION")


_LISTENING = (
    Setting(
        "listen",
        "address",
        "listening",
        "Address to listen on: HOST:PORT, unix:PATH or systemd:NAME.",
        metavar="ADDR",
        required=True,
    ),
    Setting(
        "target", "address", "upstream", "Address to forward to: HOST:PORT or unix:PATH.", metavar="ADDR", required=True
    ),
    Setting(
        "unsafe_listen",
        "flag",
        "listening",
        "",
        help_by_mode={
            "server": "Needed only with --disable-authentication when --listen is not a loopback address or unix "
            "socket (anyone who can reach it gets through); with client certificates required, any address works.",
            "client": "Needed when --listen is not a loopback address or unix socket: the plaintext side would be "
            "open to other machines.",
        },
    ),
    Setting(
        "alpn", "alpn", "listening", "ALPN protocols to offer, comma-separated (e.g. h2,http/1.1).", metavar="LIST"
    ),
    Setting(
        "max_concurrent_conns",
        "count",
        "listening",
        "Open connections at most; more wait in the backlog.",
        low=0,
        high=10_000_000,
        metavar="INTEGER",
    ),
    Setting(
        "allow_from",
        "networks",
        "listening",
        "",
        metavar="CIDR",
        help_by_mode={
            "server": "Accept connections only from this network; checked before the handshake (repeatable)",
            "client": "Accept local clients only from this network.",
        },
    ),
    Setting(
        "deny_from",
        "networks",
        "listening",
        "",
        metavar="CIDR",
        help_by_mode={
            "server": "Refuse connections from this network; deny wins over allow (repeatable)",
            "client": "Refuse local clients from this network.",
        },
    ),
    Setting(
        "accept_proxy_from",
        "networks",
        "listening",
        "Trust PROXY headers from this network ('unix': from every peer of a unix: --listen).",
        scope="server",
        metavar="CIDR",
    ),
)

_CERTIFICATES = (
    Setting(
        "keystore",
        "file",
        "certificates",
        "PEM bundle with cert and key, or PKCS#12.",
        metavar="FILE",
        env="KEYSTORE_PATH",
    ),
    Setting(
        "cert", "files", "certificates", "Certificate chain (PEM). Repeat for SNI.", metavar="FILE", env="CERT_PATH"
    ),
    Setting(
        "key", "files", "certificates", "Private key (PEM) for the --cert before it.", metavar="FILE", env="KEY_PATH"
    ),
    Setting(
        "storepass",
        "secret",
        "certificates",
        "Keystore password; env:VAR or file:PATH keep it out of ps.",
        metavar="PASS",
        env="KEYSTORE_PASS",
        secret=True,
    ),
    Setting(
        "key_pass",
        "secret",
        "certificates",
        "Passphrase of an encrypted --key (env:VAR, file:PATH).",
        metavar="PASS",
        secret=True,
    ),
    Setting(
        "session_tickets",
        "choice",
        "certificates",
        "TLS session tickets: one key for all workers and reloads, OpenSSL's own per context, or none [shared].",
        choices=("shared", "per-context", "off"),
    ),
    Setting(
        "cacert",
        "file",
        "certificates",
        "",
        metavar="FILE",
        env="CACERT_PATH",
        help_by_mode={
            "server": "CA bundle that client certificates must chain to.",
            "client": "CA bundle the server's certificate must chain to [system store].",
        },
    ),
    Setting(
        "disable_authentication",
        "flag",
        "certificates",
        "",
        help_by_mode={
            "server": "Do not ask clients for a certificate.",
            "client": "Present no client certificate to the server.",
        },
    ),
)

_ACCESS = (
    Setting(
        "allow_all", "flag", "access rules", "Allow any client with a certificate signed by --cacert.", scope="server"
    ),
    Setting(
        "allow_cn",
        "texts",
        "access rules",
        "Allow clients whose certificate has this Common Name (repeatable)",
        scope="server",
        metavar="CN",
    ),
    Setting(
        "allow_ou",
        "texts",
        "access rules",
        "Allow clients whose certificate has this Organizational Unit (repeatable)",
        scope="server",
        metavar="OU",
    ),
    Setting(
        "allow_dns",
        "texts",
        "access rules",
        "Allow clients whose certificate has this DNS SAN (repeatable)",
        scope="server",
        metavar="NAME",
        aliases=("--allow-dns-san",),
    ),
    Setting(
        "allow_ip",
        "ips",
        "access rules",
        "Allow clients whose certificate has this IP SAN (repeatable)",
        scope="server",
        metavar="IP",
        aliases=("--allow-ip-san",),
    ),
    Setting(
        "allow_uri",
        "texts",
        "access rules",
        "Allow clients with this URI SAN; '*' matches one path segment (repeatable)",
        scope="server",
        metavar="URI",
        aliases=("--allow-uri-san",),
    ),
    Setting(
        "allow_spki_sha256",
        "texts",
        "access rules",
        "Allow the client key with this SPKI SHA-256 (hex or base64) (repeatable)",
        scope="server",
        metavar="HASH",
    ),
    Setting(
        "allow_policy",
        "bundle",
        "access rules",
        "Rego policy: a .rego file, bundle dir or .tar.gz (opa).",
        scope="server",
        metavar="BUNDLE",
    ),
    Setting(
        "allow_query",
        "text",
        "access rules",
        "Rego query that must be true, e.g. data.tlsgate.allow.",
        scope="server",
        metavar="QUERY",
    ),
    Setting(
        "crl",
        "files",
        "access rules",
        "Refuse client certificates revoked by this CRL (PEM or DER) (repeatable)",
        scope="server",
        metavar="FILE",
    ),
    _duration(
        "crl_max_age",
        "Refuse to start or reload with a --crl issued longer ago than this [0: no limit].",
        section="access rules",
        scope="server",
    ),
    Setting(
        "override_server_name",
        "server_name",
        "access rules",
        "Verify the server as NAME (and send it as SNI).",
        scope="client",
        metavar="NAME",
    ),
    Setting(
        "verify_cn", "texts", "access rules", "Server certificate must have this CN.", scope="client", metavar="CN"
    ),
    Setting(
        "verify_ou", "texts", "access rules", "Server certificate must have this OU.", scope="client", metavar="OU"
    ),
    Setting(
        "verify_dns",
        "texts",
        "access rules",
        "Server certificate must have this DNS SAN.",
        scope="client",
        metavar="NAME",
        aliases=("--verify-dns-san",),
    ),
    Setting(
        "verify_ip",
        "ips",
        "access rules",
        "Server certificate must have this IP SAN.",
        scope="client",
        metavar="IP",
        aliases=("--verify-ip-san",),
    ),
    Setting(
        "verify_uri",
        "texts",
        "access rules",
        "Server certificate must have this URI SAN.",
        scope="client",
        metavar="URI",
        aliases=("--verify-uri-san",),
    ),
    Setting(
        "verify_spki_sha256",
        "texts",
        "access rules",
        "Pin the server's key (SPKI SHA-256).",
        scope="client",
        metavar="HASH",
    ),
    Setting(
        "verify_policy",
        "bundle",
        "access rules",
        "Rego policy the server's certificate must pass (opa).",
        scope="client",
        metavar="BUNDLE",
    ),
    Setting(
        "verify_query",
        "text",
        "access rules",
        "Rego query that must be true, e.g. data.tlsgate.allow.",
        scope="client",
        metavar="QUERY",
    ),
)

# ghostunnel's names for --max-tls-version (Go's crypto/tls has no older version worth capping at).
TLS_VERSIONS = ("TLS1.2", "TLS1.3")
# ghostunnel's --cipher-suites names, as OpenSSL TLS 1.2 cipher lists in ghostunnel's order (ECDSA before RSA,
# 128-bit before 256-bit). The UNSAFE-* ones need --allow-unsafe-cipher-suites; ghostunnel adds one only when a
# large provider needs it (UNSAFE-AZURE: Azure Cache for Redis).
CIPHER_SUITES = {
    "AES": "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
    "CHACHA": "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
}
UNSAFE_CIPHER_SUITES = {"UNSAFE-AZURE": "ECDHE-RSA-AES128-SHA256"}

_TLS = (
    Setting(
        "max_tls_version",
        "tls_version",
        "certificates",
        "Highest TLS version to speak: TLS1.2 or TLS1.3 [TLS1.3]. For a peer or middlebox that breaks on 1.3.",
        metavar="VERSION",
        choices=TLS_VERSIONS,
    ),
    Setting(
        "cipher_suites",
        "cipher_suites",
        "certificates",
        "TLS 1.2 cipher suites, comma-separated, in order of preference: AES, CHACHA [AES,CHACHA]. "
        "TLS 1.3 keeps OpenSSL's suites (see docs/usage.md).",
        metavar="LIST",
    ),
    Setting(
        "allow_unsafe_cipher_suites",
        "flag",
        "certificates",
        "Also accept UNSAFE-AZURE (ECDHE-RSA-AES128-SHA256, CBC) in --cipher-suites, for Azure Cache for Redis.",
    ),
)

_TIMEOUTS = (
    _duration("connect_timeout", "Timeout for connecting to the target and its TLS handshake, if any [10s]."),
    _duration("handshake_timeout", "Timeout for a TLS handshake; slow or silent clients are cut [10s]."),
    _duration("close_timeout", "How long a half-closed connection may linger before it is cut [60s]."),
    _duration("idle_timeout", "Cut connections with no bytes either way for this long [0: never]."),
    _duration("max_conn_lifetime", "Cut connections older than this [0: never]."),
    _duration("shutdown_timeout", "On SIGTERM, how long open connections may finish [5m]."),
)

_UPSTREAM = (
    Setting("target_tls", "flag", "upstream", "Re-encrypt: speak TLS to the target, verified.", scope="server"),
    Setting(
        "target_cacert",
        "file",
        "upstream",
        "CA bundle for the target's certificate [system store].",
        scope="server",
        metavar="FILE",
    ),
    Setting(
        "target_server_name",
        "server_name",
        "upstream",
        "Name the target's certificate must have (and SNI).",
        scope="server",
        metavar="NAME",
    ),
    Setting(
        "target_cert",
        "file",
        "upstream",
        "Client certificate to present to a TLS target.",
        scope="server",
        metavar="FILE",
    ),
    Setting("target_key", "file", "upstream", "Key for --target-cert.", scope="server", metavar="FILE"),
    Setting("unsafe_target", "flag", "upstream", "Allow a plaintext target on another machine.", scope="server"),
    Setting("proxy_protocol", "flag", "upstream", "Send a PROXY header to the target.", scope="server"),
    Setting(
        "proxy_protocol_version",
        "count",
        "upstream",
        "PROXY header version [2].",
        scope="server",
        low=1,
        high=2,
        choices=("1", "2"),
    ),
)

_OPERATIONS = (
    _duration(
        "timed_reload",
        "Reload certificates and policies this often, 1s or more [0: only on signals].",
        section="operations",
    ),
    Setting(
        "recheck_on_reload",
        "flag",
        "operations",
        "On reload, close open connections the new rules or CRLs refuse; =false leaves them open [true].",
        metavar="[BOOL]",
        default=True,
    ),
    Setting(
        "status",
        "text",
        "operations",
        "Serve /_status, /_metrics and /metrics on this address.",
        scope="process",
        metavar="ADDR",
    ),
    Setting("metrics_prefix", "text", "operations", "Prefix of metric names.", scope="process", default="tlsgate"),
    # The status port's optional endpoints (ghostunnel's flags; tlsgate.status), each needing --status.
    Setting(
        "enable_shutdown",
        "flag",
        "operations",
        "Serve POST /_shutdown on the --status port: a graceful stop, as SIGTERM.",
        scope="process",
        default=False,
    ),
    Setting(
        "enable_pprof",
        "flag",
        "operations",
        "Serve /debug/pprof/ on the --status port: thread and task stacks, a cProfile window.",
        scope="process",
        default=False,
    ),
    Setting(
        "target_status",
        "text",
        "operations",
        "/_status checks the target with an HTTP(S) GET of this URL (200 = up) [a TCP connect].",
        scope="server",
        metavar="URL",
    ),
    Setting("workers", "count", "operations", "Processes.", scope="process", default=1, low=1, high=256),
    Setting(
        "log_format",
        "choice",
        "operations",
        "Format of log lines.",
        scope="process",
        default="text",
        choices=("text", "json"),
    ),
    Setting(
        "quiet",
        "choices",
        "operations",
        "Silence a class of log lines.",
        scope="process",
        choices=("conns", "conn-errs", "handshake-errs", "all"),
    ),
    Setting(
        "syslog",
        "flag",
        "operations",
        "Log to the local syslog (/dev/log) instead of stderr.",
        scope="process",
        default=False,
    ),
    Setting(
        "loop",
        "choice",
        "operations",
        "Event loop; auto uses uvloop when installed (env TLSGATE_LOOP overrides auto).",
        scope="process",
        default="auto",
        choices=("auto", "uvloop", "asyncio"),
    ),
)

SETTINGS: tuple[Setting, ...] = (*_LISTENING, *_CERTIFICATES, *_TLS, *_ACCESS, *_TIMEOUTS, *_UPSTREAM, *_OPERATIONS)
_BY_NAME = {s.name: s for s in SETTINGS}

# ghostunnel's environment variables (kingpin's Envar), by the setting each one stands in for. As there, a flag on
# the command line wins, and an empty variable counts as unset. They serve images that mount credentials at a path
# given in the environment; `tlsgate run` files do not read them (a file names its paths itself).
ENV_FLAGS = {s.name: s.env for s in SETTINGS if s.env}


def setting(name: str) -> Setting:
    """The setting called ``name`` (canonical form, ``allow_cn``); KeyError for an unknown one."""
    return _BY_NAME[name]


def process_settings() -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.scope == "process")


def tunnel_settings() -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.scope != "process")
