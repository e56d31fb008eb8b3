"""Go-style durations (``500ms``, ``10s``, ``1m30s``, ``1h``), the form ghostunnel users already write."""

from __future__ import annotations

import re

from tlsgate.errors import ConfigError, shown

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str, *, name: str = "duration") -> float:
    """Return seconds for a Go-style duration; ``0`` (bare) means zero, i.e. "no limit" for timeouts."""
    value = text.strip()
    if value == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(value):
        raise ConfigError(f"{name}: {shown(text)} is not a duration (use forms like 500ms, 10s, 5m, 1h30m)")
    return total


def format_duration(seconds: float) -> str:
    """A Go-style spelling of ``seconds`` that ``parse_duration`` reads back (six significant digits)."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        for unit, size in (("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
            if seconds >= size or unit == "ns":
                return _plain(seconds / size) + unit
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if minutes:
        out += f"{int(minutes)}m"
    if secs or not out:
        out += _plain(secs) + "s"
    return out


def _plain(number: float) -> str:
    """Six significant digits without an exponent, which Go-style durations cannot carry."""
    text = f"{number:.6g}"
    if "e" in text:
        text = f"{number:.9f}".rstrip("0").rstrip(".") or "0"
    return text
