"""One converter per kind of setting: a raw value (click's string, or a TOML value) to its typed form, or ConfigError.

``convert(key, value)`` picks the converter by the table's kind of ``key`` (``settings.setting.Kind``); each one
refuses with a one-line message naming the flag and the form it expected, and never quotes a secret back.
``check_paths`` then checks what a converted value names: files exist and are readable.

Access-rule values come out parsed (``settings.values``: networks, IP addresses, key pins; ``settings.patterns``:
URI patterns), so ``tlsgate.policy`` takes them as they are and a bad value is refused here, in one wording,
whether it came from a flag, a file key or a library caller (``settings.access.server_access``).
``settings.config.tunnel_config`` calls both for every key; process settings have their converters in
``settings.file`` (a file) and in click (the command line).

Also the small helpers every message of the package uses: ``flag`` (``allow_cn`` as ``--allow-cn``) and
``shown_path``.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from tlsgate.errors import ConfigError, shown
from tlsgate.settings.addresses import Address, parse_address, valid_host
from tlsgate.settings.durations import parse_duration
from tlsgate.settings.patterns import UriPattern
from tlsgate.settings.pins import KeyPin
from tlsgate.settings.proxyurl import ProxyURL, parse_proxy_url
from tlsgate.settings.setting import Setting
from tlsgate.settings.table import CIPHER_SUITES, TLS_VERSIONS, UNSAFE_CIPHER_SUITES, setting
from tlsgate.settings.values import (
    UNIX_SOURCE,
    IPAddress,
    Network,
    ProxySource,
    SpkiPin,
    parse_ip,
    parse_network,
    parse_spki_sha256,
)

__all__ = [
    "MAX_VALUE_LENGTH",
    "MIN_TIMED_RELOAD",
    "check_paths",
    "check_socket_path",
    "convert",
    "flag",
    "is_unix_source",
    "shown_path",
]


def is_unix_source(value: str) -> bool:
    """Whether an ``--accept-proxy-from`` entry, as typed, is the word ``unix`` rather than a network."""
    return value.strip().lower() == UNIX_SOURCE


# Shortest --timed-reload: each reload re-reads every file and rebuilds every context, so "1ns" would spin.
MIN_TIMED_RELOAD = 1.0


# A string longer than this is a mistake (PATH_MAX is 4096; names and rules are far shorter), and quoting it
# back in full would bury the error message.
MAX_VALUE_LENGTH = 4096


# RFC 7301: each protocol name is 1-255 bytes, and the whole list goes in a 16-bit length.
_ALPN_MAX_NAME, _ALPN_MAX_LIST = 255, 65535


# AF_UNIX addresses are at most 108 bytes including the terminating NUL (Linux sun_path).
_MAX_UNIX_PATH = 107


def shown_path(path: str) -> str:
    """A file path as typed when it prints as one short line, else quoted with escapes (see ``shown``)."""
    return path if path.isprintable() and len(path) <= 200 else shown(path)


def _kind_of(value: object) -> str:
    """What a value is, without what it says: for secret-bearing keys."""
    names = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


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


def _as_ips(value: object, key: str) -> tuple[IPAddress, ...]:
    """IP SANs to match: each one address, compared as an address, so ``::1`` and ``0::1`` are one rule."""
    return tuple(parse_ip(flag(key), text) for text in _as_tuple(value, key))


def _as_names(value: object, key: str) -> tuple[str, ...]:
    """CN, OU and DNS rules: never empty (ghostunnel would compare "" with the CN of a certificate that has none,
    and so allow every client without a CN)."""
    names = _as_tuple(value, key)
    for name in names:
        if not name.strip():
            raise ConfigError(f"{flag(key)}: empty value")
    return names


def _as_uris(value: object, key: str) -> tuple[UriPattern, ...]:
    """URI SAN rules, each compiled once into a `UriPattern` (exact URIs too: the policy sets them apart)."""
    return tuple(UriPattern.parse(flag(key), text) for text in _as_names(value, key))


def _as_pins(value: object, key: str) -> tuple[SpkiPin, ...]:
    return tuple(parse_spki_sha256(flag(key), text) for text in _as_tuple(value, key))


def _as_key_pins(value: object, key: str) -> tuple[KeyPin, ...]:
    """ghostunnel's ``--allow-spki-pin``/``--verify-spki-pin``: ``sha256:<base64>`` and friends, as it parses them."""
    return tuple(KeyPin.parse(flag(key), text) for text in _as_tuple(value, key))


def _as_networks(value: object, key: str) -> tuple[Network, ...]:
    return tuple(parse_network(flag(key), text) for text in _as_tuple(value, key))


def _as_proxy_sources(value: object, key: str) -> tuple[ProxySource, ...]:
    """``--accept-proxy-from``: networks, or the word ``unix`` (every peer of a unix listener)."""
    return tuple(
        UNIX_SOURCE if is_unix_source(text) else parse_network(flag(key), text) for text in _as_tuple(value, key)
    )


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


def _as_proxy_url(value: object, key: str) -> ProxyURL:
    if not isinstance(value, str):
        raise ConfigError(f"{flag(key)}: expected a URL such as http://proxy:8080 or socks5://proxy:1080")
    return parse_proxy_url(value, flag(key))


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
    "names": _as_names,
    "uris": _as_uris,
    "pins": _as_pins,
    "key_pins": _as_key_pins,
    "networks": _as_networks,
    "proxy_sources": _as_proxy_sources,
    "ips": _as_ips,
    "flag": _as_bool,
    "duration": _as_duration,
    "count": _as_count,
    "alpn": _as_alpn,
    "server_name": _as_server_name,
    "choice": _as_choice,
    "tls_version": _as_tls_version,
    "cipher_suites": _as_cipher_suites,
    "proxy_url": _as_proxy_url,
}


def convert(key: str, value: object) -> Any:
    """One setting's value in its typed form; ConfigError names the flag and the expected form."""
    return _CONVERTERS[setting(key).kind](value, key)


def check_paths(entry: Setting, value: Any) -> None:
    """The files a setting names exist and are readable (the table's kind says which)."""
    if entry.kind == "file":
        _check_file(value, entry.name)
    elif entry.kind == "files":
        for path in value:
            _check_file(path, entry.name)
    elif entry.kind == "bundle" and value is not None and not os.path.exists(value):
        # A bundle may be a directory; its contents are read (and compiled) by runtime.build_runtime.
        raise ConfigError(f"{flag(entry.name)}: {value}: no such file or directory")
