"""Client mode ``--proxy URL`` (alias ``--connect-proxy``): which proxy the target is reached through, parsed once.

ghostunnel hands the URL to Go's ``golang.org/x/net/proxy.FromURL`` with an ``http`` dialer registered
(``github.com/wrouesnel/go.connect-proxy-scheme``), so these are its forms, and ours:

* ``http://[user[:password]@]host[:port]``: an HTTP CONNECT proxy, port 8080 by default; credentials go in a
  ``Proxy-Authorization: Basic`` header on the CONNECT request.
* ``socks5://[user[:password]@]host[:port]`` and ``socks5h://...``: a SOCKS5 proxy, port 1080 by default;
  credentials are RFC 1929 username/password authentication. The two spellings mean the same, as in Go: a target
  name is always sent to the proxy to resolve, an IP literal as an address.

Anything else (``socks4://``, a path, a query) is refused here, where ghostunnel fails at start with "unknown
scheme" or at the first connection. ``https://`` (TLS to the proxy, with ghostunnel's newer ``--proxy-cert``,
``--proxy-key`` and ``--proxy-cacert``) is refused as not implemented yet: the target's TLS would then run inside
the proxy's, which the engine's one-``SSLSocket``-per-socket design does not do.

The password is a secret: ``ProxyURL`` never shows it, and every message names the proxy by ``shown``, the URL
without its userinfo.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote_to_bytes, urlsplit

from tlsgate.errors import ConfigError
from tlsgate.settings.addresses import valid_host

__all__ = ["DEFAULT_PORTS", "ProxyURL", "parse_proxy_url"]

# ghostunnel's defaults: 8080 for http (connect-proxy-scheme), 1080 for socks5 (x/net/proxy).
DEFAULT_PORTS = {"http": 8080, "socks5": 1080, "socks5h": 1080}

# RFC 1929: ULEN and PLEN are one byte each.
_SOCKS_CREDENTIAL_MAX = 255


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """A parsed ``--proxy``: ``kind`` is ``"http"`` or ``"socks5"``; ``host`` is bare (no brackets for IPv6)."""

    kind: str
    scheme: str
    host: str
    port: int
    username: bytes | None = field(default=None, repr=False)
    password: bytes | None = field(default=None, repr=False)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

    @property
    def shown(self) -> str:
        """The URL as logs and errors may show it: scheme, host and port, never the userinfo."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        userinfo = ", with credentials" if self.has_credentials else ""
        return f"ProxyURL({self.shown}{userinfo})"


def parse_proxy_url(text: str, flag: str = "--proxy") -> ProxyURL:
    """``text`` as a ``ProxyURL``, or ConfigError with one line that never quotes the userinfo."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{flag}: give a proxy URL: http://HOST[:PORT] or socks5://HOST[:PORT]")
    # What a message may quote: the text without anything before an '@' (the userinfo, if any).
    safe = _without_userinfo(text.strip())
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text.strip()):
        raise ConfigError(f"{flag} {safe!r}: a URL has no spaces or control characters")
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"{flag} {safe!r}: not a URL ({_scrub(str(err), text)})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        why = {
            "https": "TLS to the proxy (ghostunnel's --proxy-cert/--proxy-key/--proxy-cacert) is not implemented yet",
            "socks4": "SOCKS4 is not supported",
            "socks4a": "SOCKS4 is not supported",
        }.get(scheme, "unknown scheme")
        raise ConfigError(f"{flag} {safe!r}: {why}; use http://, socks5:// or socks5h://")
    _check_rest(parts, flag, safe)
    host = parts.hostname or ""
    if not host or not _host_ok(host):
        raise ConfigError(f"{flag} {safe!r}: no valid proxy host")
    if port == 0:
        raise ConfigError(f"{flag} {safe!r}: port 0 is not a proxy's port")
    username = password = None
    if parts.username is not None:
        username = unquote_to_bytes(parts.username)
        password = unquote_to_bytes(parts.password) if parts.password is not None else b""
        _check_credentials(scheme, username, password, flag, safe)
    kind = "http" if scheme == "http" else "socks5"
    return ProxyURL(kind, scheme, host, port or DEFAULT_PORTS[scheme], username, password)


def _check_rest(parts: SplitResult, flag: str, safe: str) -> None:
    if parts.path not in ("", "/"):
        raise ConfigError(f"{flag} {safe!r}: a proxy URL has no path")
    if parts.query or parts.fragment or "?" in parts.netloc:
        raise ConfigError(f"{flag} {safe!r}: a proxy URL has no query or fragment")


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return valid_host(host)
    return True


def _check_credentials(scheme: str, username: bytes, password: bytes, flag: str, safe: str) -> None:
    if not username:
        raise ConfigError(f"{flag} {safe!r}: the user name in the URL is empty")
    if scheme == "http" and b":" in username:
        # RFC 7617: the Basic user-id cannot hold a colon; the proxy would split it in the wrong place.
        raise ConfigError(f"{flag} {safe!r}: the user name holds a ':' (%3A), which Basic authentication cannot carry")
    if scheme != "http" and (len(username) > _SOCKS_CREDENTIAL_MAX or len(password) > _SOCKS_CREDENTIAL_MAX):
        raise ConfigError(f"{flag} {safe!r}: SOCKS5 user name and password are at most 255 bytes each")


def _without_userinfo(text: str) -> str:
    """``text`` with everything up to its last '@' masked: a password with an unencoded '/', '?' or '#' ends the
    URL's authority early for a parser, so only the last '@' surely ends the userinfo."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    shown = f"{scheme}{sep}{rest}"
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _scrub(message: str, text: str) -> str:
    """A parser's message with the user's text removed: it may quote the netloc, userinfo and all."""
    return message.replace(text, "...").split("'")[0].strip() or "unparsable"
