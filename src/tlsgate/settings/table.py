"""The settings table: every flag of ``tlsgate server`` / ``client`` and every TOML key, declared once, in help order.

``SETTINGS`` lists them section by section (listening, certificates, access rules, timeouts, upstream,
operations; the access rules are in ``settings.table_access``), ``setting(name)`` finds one by its canonical
name, and ``ENV_FLAGS`` maps the ghostunnel environment variables. Also here: the TLS version and cipher-suite
names the certificates section accepts, which the engine turns into OpenSSL settings. Pure data, so that it can
be imported by everything without import cycles.
"""

from __future__ import annotations

from tlsgate.settings.setting import Setting, duration_setting
from tlsgate.settings.table_access import ACCESS_RULES

__all__ = [
    "CIPHER_SUITES",
    "ENV_FLAGS",
    "SETTINGS",
    "TLS_VERSIONS",
    "UNSAFE_CIPHER_SUITES",
    "process_settings",
    "setting",
    "tunnel_settings",
]

_LISTENING = (
    Setting(
        "listen",
        "address",
        "listening",
        "Address to listen on: HOST:PORT, unix:PATH or systemd:NAME.",
        metavar="ADDR",
        required=True,
    ),
    # Required unless --route gives the targets (config.tunnel_config says so in one line, as for a file).
    Setting(
        "target",
        "address",
        "upstream",
        "Address to forward to: HOST:PORT or unix:PATH; with --route, where names no route claims go.",
        metavar="ADDR",
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
        "protocol",
        "choice",
        "listening",
        "Let clients start TLS their protocol's way: postgres (SSLRequest, or PostgreSQL 17's direct TLS).",
        scope="server",
        metavar="NAME",
        choices=("postgres",),
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
        "proxy_sources",
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
    duration_setting("connect_timeout", "Timeout for connecting to the target and its TLS handshake, if any [10s]."),
    duration_setting("handshake_timeout", "Timeout for a TLS handshake; slow or silent clients are cut [10s]."),
    duration_setting("close_timeout", "How long a half-closed connection may linger before it is cut [60s]."),
    duration_setting("idle_timeout", "Cut connections with no bytes either way for this long [0: never]."),
    duration_setting("max_conn_lifetime", "Cut connections older than this [0: never]."),
    duration_setting("shutdown_timeout", "On SIGTERM, how long open connections may finish [5m]."),
)

_UPSTREAM = (
    Setting(
        "proxy",
        "proxy_url",
        "upstream",
        "Reach the target through this HTTP CONNECT or SOCKS5 proxy: http://[USER:PASS@]HOST[:8080] or "
        "socks5://[USER:PASS@]HOST[:1080].",
        scope="client",
        metavar="URL",
        aliases=("--connect-proxy",),
        secret=True,
    ),
    Setting("target_tls", "flag", "upstream", "Re-encrypt: speak TLS to the target, verified.", scope="server"),
    Setting(
        "target_protocol",
        "choice",
        "upstream",
        "Ask the target for TLS its protocol's way first: postgres (SSLRequest; server mode needs --target-tls).",
        metavar="NAME",
        choices=("postgres",),
    ),
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
    Setting(
        "route",
        "texts",
        "upstream",
        "Send clients asking for NAME (SNI) to HOST:PORT; repeatable; per-route rules: docs/routes.md.",
        scope="server",
        metavar="NAME[,NAME...]=ADDR",
    ),
    Setting(
        "proxy_protocol",
        "flag",
        "upstream",
        "Send a PROXY header with the addresses only (= --proxy-protocol-mode conn).",
        scope="server",
    ),
    Setting(
        "proxy_protocol_mode",
        "choice",
        "upstream",
        "Send a PROXY v2 header: addresses (conn), + ALPN/SNI/TLS version (tls), + client certificate (tls-full).",
        scope="server",
        metavar="MODE",
        choices=("conn", "tls", "tls-full"),
    ),
    Setting(
        "target_http_headers",
        "flag",
        "upstream",
        "HTTP/1.x target: set X-Forwarded-Client-Cert/-For/-Proto on every request, dropping the client's.",
        scope="server",
    ),
    Setting(
        "target_http_cert",
        "flag",
        "upstream",
        "With --target-http-headers: also the client's PEM in X-Forwarded-Client-Cert (Cert=).",
        scope="server",
    ),
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
    duration_setting(
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

SETTINGS: tuple[Setting, ...] = (
    *_LISTENING,
    *_CERTIFICATES,
    *_TLS,
    *ACCESS_RULES,
    *_TIMEOUTS,
    *_UPSTREAM,
    *_OPERATIONS,
)
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
