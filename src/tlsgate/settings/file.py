"""TOML files for ``tlsgate run``: many tunnels in one process, with the same keys as the command-line flags.

A file has up to three kinds of table::

    [process]        # optional: the whole process (status, metrics-prefix, workers, log-format, quiet, loop, syslog)
    [defaults]       # optional: any tunnel key; every tunnel starts from these and overrides what it sets
    [[tunnel]]       # one per tunnel: name (unique), mode ("server" or "client"), then flags as keys

Keys are the flag names without the leading dashes (``allow-cn`` or ``allow_cn``); a flag that may be repeated
takes a string or a list of strings. Relative paths (certificates, keys, CRLs, ``unix:`` sockets, ``file:``
passwords) are relative to the directory of the file, not to wherever tlsgate was started: a config and its
``certs/`` folder move together, and a reload reads the same files the start did.

Every problem is collected before anything fails (syntax, unknown keys, wrong types, missing files, duplicate
names and listen addresses) and raised as one ConfigErrors, one line per problem, each naming the tunnel and
the key. Files are only checked for existence here; ``tlsgate.process.check`` parses them (run, check-config
and reloads do), because parsing needs the engine and this package sits below it.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tlsgate.errors import ConfigError, shown
from tlsgate.logs import QUIET_CHOICES
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import (
    KNOWN_KEYS,
    PROCESS_KEYS,
    SECRET_KEYS,
    ConfigErrors,
    TunnelConfig,
    check_metrics_prefix,
    normalise_key,
    tunnel_config,
)
from tlsgate.settings.convert import shown_path
from tlsgate.settings.describe import describe_tunnel
from tlsgate.settings.listens import check_listen
from tlsgate.settings.process_options import ProcessOptions
from tlsgate.settings.routes import resolve_route_paths
from tlsgate.settings.status import check_status_setting, parse_status_address, status_option_problems
from tlsgate.settings.table import SETTINGS, setting

__all__ = [
    "ConfigFile",
    "describe_tunnel",
    "key_names",
    "load_config_file",
    "read_config_file",
]

_SECTIONS = ("process", "defaults", "tunnel")
_TUNNEL_KEYS = frozenset(KNOWN_KEYS - PROCESS_KEYS) | {"mode"}
_PATH_KEYS = frozenset(s.name for s in SETTINGS if s.kind in ("file", "files"))
_LOG_FORMATS = setting("log_format").choices
_LOOPS = setting("loop").choices
_MAX_WORKERS = setting("workers").high
# Tunnel names appear in every log line and metric label of the tunnel.
_MAX_NAME = 200
_TOML_WHERE = re.compile(r"(?P<what>.*) \((?:at line (?P<line>\d+), column (?P<column>\d+)|at end of document)\)")
_FLAG = re.compile(r"(?<![\w-])--(?=[a-z])")


@dataclass
class ConfigFile:
    """What one read of a file gave: the tunnels and process settings that validated, and every problem."""

    path: str
    tunnels: list[TunnelConfig] = field(default_factory=list)
    process: ProcessOptions = field(default_factory=ProcessOptions)
    problems: list[str] = field(default_factory=list)


def load_config_file(path: str) -> tuple[list[TunnelConfig], ProcessOptions]:
    """The tunnels and process settings of the TOML file at ``path``; ConfigErrors lists every problem."""
    result = read_config_file(path)
    if result.problems:
        raise ConfigErrors(result.problems)
    return result.tunnels, result.process


def read_config_file(path: str) -> ConfigFile:
    """Read and validate ``path`` without raising: problems are returned next to what did validate."""
    result = ConfigFile(path)
    document = _parse(path, result.problems)
    if document is None:
        return result
    base = os.path.dirname(os.path.abspath(path))
    problems = result.problems
    for key in document:
        if key not in _SECTIONS:
            problems.append(f"{shown_path(path)}: unknown top-level key {shown(key)}{_top_level_hint(key)}")
    process = _section(document, "process", problems)
    defaults = _section(document, "defaults", problems)
    tables = _tunnel_tables(document, path, problems)
    result.process = _process_options(process, os.path.abspath(path), problems)
    result.tunnels = _tunnels(tables, _defaults(defaults, problems), base, problems)
    if result.process.status and result.tunnels and len(result.tunnels) == len(tables):
        try:
            check_status_setting(result.process.status, result.tunnels)
        except ConfigError as err:
            problems.append(f"process: {key_names(str(err))}")
    problems += [f"process: {key_names(problem)}" for problem in status_option_problems(result.process)]
    return result


def key_names(message: str) -> str:
    """A flag-worded message in the words of the file: ``--listen: ...`` becomes ``listen: ...``."""
    return _FLAG.sub("", message)


# -- the document -----------------------------------------------------------------------------------------------


def _parse(path: str, problems: list[str]) -> dict[str, Any] | None:
    shown_as = shown_path(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
        return tomllib.loads(data.decode())
    except FileNotFoundError:
        problems.append(f"{shown_as}: no such file")
    except IsADirectoryError:
        problems.append(f"{shown_as}: is a directory, expected a TOML file")
    except PermissionError:
        problems.append(f"{shown_as}: permission denied")
    except OSError as err:
        problems.append(f"{shown_as}: cannot read ({err.strerror or err})")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        problems.append(f"{shown_as}: line {line}: not UTF-8 text; TOML files are UTF-8")
    except tomllib.TOMLDecodeError as err:
        problems.append(f"{shown_as}: {_toml_problem(str(err))}")
    except RecursionError:
        # tomllib reads nested arrays and inline tables by recursion: [[[[... 2,000 deep exhausts the stack.
        problems.append(f"{shown_as}: arrays or inline tables nested too deeply")
    except ValueError as err:
        if "null byte" in str(err):  # open() refuses a path with a NUL in it
            problems.append(f"{shown_as}: not a valid file path")
        else:
            # tomllib lets int() refuse a number of over 4300 digits (CPython's guard against slow conversion).
            problems.append(f"{shown_as}: a number is too long (at most 4300 digits)")
    return None


def _toml_problem(message: str) -> str:
    """tomllib's ``Invalid value (at line 7, column 5)`` as ``line 7, column 5: invalid value``."""
    match = _TOML_WHERE.fullmatch(message)
    if match is None:
        return message
    what = match["what"][:1].lower() + match["what"][1:]
    if match["line"] is None:
        return f"at the end of the file: {what}"
    return f"line {match['line']}, column {match['column']}: {what}"


def _top_level_hint(key: str) -> str:
    canonical = normalise_key(key)
    if canonical in PROCESS_KEYS:
        return " (a process setting: put it under [process])"
    if canonical in _TUNNEL_KEYS or canonical == "name":
        return " (a tunnel setting: put it under a [[tunnel]], or [defaults] for every tunnel)"
    return _suggest(key, ["[process]", "[defaults]", "[[tunnel]]"], spelled=lambda s: s.strip("[]")) or (
        "; a file has [process], [defaults] and [[tunnel]] tables"
    )


def _section(document: Mapping[str, Any], name: str, problems: list[str]) -> Mapping[str, Any]:
    value = document.get(name, {})
    if isinstance(value, Mapping):
        return value
    problems.append(f"{name}: expected a table [{name}], got {_kind(value)}")
    return {}


def _tunnel_tables(document: Mapping[str, Any], path: str, problems: list[str]) -> list[Mapping[str, Any]]:
    value = document.get("tunnel")
    if value is None:
        problems.append(f"{shown_path(path)}: no [[tunnel]] tables: nothing to run")
        return []
    if isinstance(value, Mapping):
        # [tunnel] instead of [[tunnel]]: TOML reads one table, and a second [tunnel] would be a syntax error.
        problems.append("tunnel: write [[tunnel]] (double brackets) for each tunnel, not [tunnel]")
        return []
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        problems.append(f"tunnel: expected [[tunnel]] tables, got {_kind(value)}")
        return []
    if not value:
        problems.append(f"{shown_path(path)}: no [[tunnel]] tables: nothing to run")
    return value


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return shown(value)


def _suggest(key: str, candidates: Iterable[str], *, spelled: Callable[[str], str] = str) -> str:
    if len(key) > 100:
        return ""  # no flag is that long, and difflib's cost grows with the length
    names = {spelled(c): c for c in candidates}
    close = difflib.get_close_matches(key.replace("_", "-"), list(names), n=1, cutoff=0.7)
    return f" (did you mean {names[close[0]]}?)" if close else ""


def _entries(table: Mapping[str, Any], where: str, problems: list[str]) -> dict[str, tuple[str, Any]]:
    """Keys in their canonical form (``allow_cn``), each with how the file spelled it, for messages."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in table.items():
        canonical = normalise_key(key)
        if canonical in out:
            problems.append(f"{where}: {shown(out[canonical][0])} and {shown(key)} are the same key: give it once")
            continue
        out[canonical] = (key, value)
    return out


# -- [process] --------------------------------------------------------------------------------------------------


def _process_options(table: Mapping[str, Any], config_path: str, problems: list[str]) -> ProcessOptions:
    base = os.path.dirname(config_path)
    values: dict[str, Any] = {}
    for canonical, (spelled, value) in _entries(table, "process", problems).items():
        if canonical not in PROCESS_KEYS:
            problems.append(f"process: {_unknown(canonical, spelled, PROCESS_KEYS)}")
            continue
        try:
            values[canonical] = _PROCESS_VALUES[canonical](value, base)
        except ConfigError as err:
            problems.append(f"process: {key_names(str(err))}")
    return ProcessOptions(config_path=config_path, **values)


def _status(value: object, base: str) -> str:
    text = _string(value, "status")
    if text.startswith("unix:"):
        text = "unix:" + _beside(base, text[len("unix:") :])
    parse_status_address(text)
    return text


def _metrics_prefix(value: object, base: str) -> str:
    return check_metrics_prefix(_string(value, "metrics-prefix"))


def _workers(value: object, base: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"workers: expected a whole number, got {shown(value)}")
    if not 1 <= value <= _MAX_WORKERS:
        raise ConfigError(f"workers: {value} out of range (1-{_MAX_WORKERS})")
    return value


def _choice(key: str, choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def check(value: object, base: str) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {shown(value)}")
        return str(value)

    return check


def _quiet(value: object, base: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"quiet: expected a string or a list of strings, got {shown(value)}")
    wrong = [v for v in items if v not in QUIET_CHOICES]
    if wrong:
        raise ConfigError(f"quiet: {shown(wrong[0])} is not one of {', '.join(map(repr, QUIET_CHOICES))}")
    return tuple(items)


def _string(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {shown(value)}")
    return value.strip()


_PROCESS_VALUES: dict[str, Callable[[object, str], Any]] = {
    "status": _status,
    "metrics_prefix": _metrics_prefix,
    "workers": _workers,
    "log_format": _choice("log-format", _LOG_FORMATS),
    "quiet": _quiet,
    "loop": _choice("loop", _LOOPS),
    "syslog": lambda value, base: _syslog(value),
    "enable_shutdown": lambda value, base: _flag(value, "enable-shutdown"),
    "enable_pprof": lambda value, base: _flag(value, "enable-pprof"),
}


def _syslog(value: object) -> bool:
    return _flag(value, "syslog")


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
    return value


# -- [defaults] and [[tunnel]] ----------------------------------------------------------------------------------


def _unknown(canonical: str, spelled: str, allowed: Iterable[str]) -> str:
    if canonical in PROCESS_KEYS:
        return f"{shown(spelled)} is a process setting: put it under [process]"
    if canonical in _TUNNEL_KEYS or canonical == "name":
        return f"{shown(spelled)} is a tunnel setting: put it under a [[tunnel]], or [defaults] for every tunnel"
    return f"unknown key {shown(spelled)}" + _suggest(
        spelled, [repr(k.replace("_", "-")) for k in allowed], spelled=lambda s: s.strip("'")
    )


def _key_problem(canonical: str, spelled: str) -> str | None:
    """Why ``spelled`` cannot be a tunnel key, or None when it can."""
    if canonical in _TUNNEL_KEYS:
        return None
    return _unknown(canonical, spelled, _TUNNEL_KEYS)


def _defaults(table: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for canonical, (spelled, value) in _entries(table, "defaults", problems).items():
        if canonical in ("name", "route"):
            problems.append(f"defaults: {canonical} cannot have a default: each [[tunnel]] needs its own")
            continue
        problem = _key_problem(canonical, spelled)
        if problem is not None:
            problems.append(f"defaults: {problem}")
            continue
        out[canonical] = value
    return out


@dataclass
class _Seen:
    """Tunnel names and listen addresses met so far, to report duplicates."""

    names: dict[str, int] = field(default_factory=dict)
    listens: list[tuple[str, Address]] = field(default_factory=list)


def _tunnels(
    tables: list[Mapping[str, Any]], defaults: Mapping[str, Any], base: str, problems: list[str]
) -> list[TunnelConfig]:
    seen = _Seen()
    tunnels: list[TunnelConfig] = []
    for index, table in enumerate(tables, start=1):
        cfg = _tunnel(index, table, defaults, base, problems, seen)
        if cfg is not None:
            tunnels.append(cfg)
    return tunnels


def _tunnel(
    index: int, table: Mapping[str, Any], defaults: Mapping[str, Any], base: str, problems: list[str], seen: _Seen
) -> TunnelConfig | None:
    name, label = _name(index, table, problems, seen)
    before = len(problems)
    options = dict(defaults)
    for canonical, (spelled, value) in _entries(table, label, problems).items():
        if canonical == "name":
            continue
        problem = _key_problem(canonical, spelled)
        if problem is not None:
            problems.append(f"{label}: {problem}")
            continue
        options[canonical] = value
    options = _resolve_paths(options, base)
    options["route"] = resolve_route_paths(options.get("route"), lambda route: _resolve_paths(route, base))
    check_listen(label, options.get("listen"), problems, seen.listens)
    mode = options.pop("mode", None)
    if mode is None:
        problems.append(f'{label}: mode is required: "server" or "client"')
        return None
    if mode not in ("server", "client"):
        problems.append(f'{label}: mode: expected "server" or "client", got {shown(mode)}')
        return None
    if isinstance(options.get("alpn"), str):
        # The flag takes a comma-separated list; the key takes that too, or a TOML list.
        options["alpn"] = [p.strip() for p in options["alpn"].split(",") if p.strip()]
    try:
        cfg = tunnel_config(mode, options, require_client_identity=True)
    except ConfigErrors as err:
        problems.extend(f"{label}: {key_names(p)}" for p in err.problems)
        return None
    if name is None or len(problems) > before:
        return None
    return replace(cfg, name=name)


def _name(index: int, table: Mapping[str, Any], problems: list[str], seen: _Seen) -> tuple[str | None, str]:
    """The tunnel's name if it is valid and unique, and how messages call the tunnel."""
    value = table.get("name")
    label = f"tunnel #{index}"
    if value is None:
        problems.append(f"{label}: name is required (logs, status and reloads know a tunnel by its name)")
        return None, label
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        problems.append(f"{label}: name: expected a non-empty string on one line, got {shown(value)}")
        return None, label
    if len(value) > _MAX_NAME:
        problems.append(f"{label}: name: {len(value)} characters long (at most {_MAX_NAME}), got {shown(value)}")
        return None, label
    if value in seen.names:
        label = f"tunnel {value!r} (#{index})"
        problems.append(f"{label}: tunnel #{seen.names[value]} has the same name; names must be unique")
        return None, label
    seen.names[value] = index
    return value, f"tunnel {value!r}"


def _resolve_paths(options: Mapping[str, Any], base: str) -> dict[str, Any]:
    """Relative paths made relative to the config file's directory; values of the wrong type are left alone."""
    out = dict(options)
    for key in _PATH_KEYS & out.keys():
        value = out[key]
        if isinstance(value, str):
            out[key] = _beside(base, value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = [_beside(base, v) for v in value]
    for key in ("listen", "target"):
        value = out.get(key)
        if isinstance(value, str) and value.strip().startswith("unix:"):
            out[key] = "unix:" + _beside(base, value.strip()[len("unix:") :])
    for key in SECRET_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value.startswith("file:"):
            out[key] = "file:" + _beside(base, value[len("file:") :])
    return out


def _beside(base: str, path: str) -> str:
    if not path:
        return path  # empty means "not given"; the validator says so where it matters
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
