"""What one tlsgate setting is: the ``Setting`` type the table (``settings.table``) is made of.

One ``Setting`` says everything the rest of the program needs to know about a knob: its canonical name (the
TOML key, ``allow_cn``, spelled ``allow-cn`` in files as well), the flag that sets it (``--allow-cn``) and any
hidden ghostunnel spellings, whether it belongs to the whole process or to one tunnel and in which modes a
tunnel takes it, its kind (which picks the converter in ``settings.convert`` and the click type in
``tlsgate.cli``), its default, its help section and help text, whether its value is a secret (never quoted back
in an error), and the environment variable that stands in for it (ghostunnel's ``KEYSTORE_PATH`` and friends).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["SECTIONS", "Kind", "Scope", "Setting", "duration_setting"]

# What a value is: picks the converter (tlsgate.settings.convert) and the click type (tlsgate.cli).
Kind = Literal[
    "address",  # HOST:PORT, unix:PATH, systemd:NAME -> addresses.Address
    "file",  # one readable file path, checked at start
    "files",  # repeatable file paths
    "bundle",  # a Rego bundle: file, directory or .tar.gz
    "secret",  # pass:, env:VAR, file:PATH or the password itself -> bytes; never shown
    "text",  # one string
    "texts",  # repeatable strings
    "names",  # repeatable non-empty strings (CN, OU, DNS rules): an empty one would match a certificate without
    "uris",  # repeatable URI patterns -> patterns.UriPattern, compiled once
    "pins",  # repeatable SHA-256 key pins, hex or base64 -> values.SpkiPin (32 bytes)
    "key_pins",  # repeatable ghostunnel pins, sha256|sha384|sha512:<base64> -> pins.KeyPin
    "networks",  # repeatable CIDRs -> values.Network
    "proxy_sources",  # repeatable CIDRs or the word unix -> values.ProxySource
    "ips",  # repeatable IP addresses (IP SANs) -> values.IPAddress
    "flag",  # true/false
    "duration",  # 10s, 5m, 0 -> seconds
    "count",  # a whole number within [low, high]
    "alpn",  # comma-separated on the command line, a list in a file
    "server_name",  # a host name or IP checked by a TLS hop
    "choice",  # one of choices
    "choices",  # repeatable, each one of choices
    "tls_version",  # ghostunnel's TLS1.2 / TLS1.3
    "cipher_suites",  # ghostunnel's AES,CHACHA: comma-separated on the command line, a list in a file
    "proxy_url",  # client --proxy: http:// or socks5:// URL -> proxyurl.ProxyURL; its userinfo is never shown
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
        return self.kind in (
            "files",
            "texts",
            "names",
            "uris",
            "pins",
            "key_pins",
            "networks",
            "proxy_sources",
            "ips",
            "choices",
        )

    def takes(self, mode: str) -> bool:
        """Whether the ``mode`` command has this flag (process settings: every command)."""
        return self.scope in ("process", "both", mode)

    def help_for(self, mode: str) -> str:
        text = (self.help_by_mode or {}).get(mode, self.help)
        return f"{text} [env {self.env}]" if self.env else text


def duration_setting(name: str, text: str, section: str = "timeouts", scope: Scope = "both") -> Setting:
    return Setting(name, "duration", section, text, scope=scope, metavar="DURATION")
