"""The answer every check gives (`Decision`), and the few helpers that word its reasons the same way everywhere.

A `Decision` is a plain value: ``allowed``, a short stable ``rule`` id (a metric label) and a ``reason`` for the
person reading the log. The helpers format what reasons quote: a time (`when`, always UTC), a distinguished name
(`readable_name`), a list cut after a few items (`listing`), any text cut to a length (`shorten`, because a
peer chooses what its certificate says and a log line must stay one short line).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check: may the peer go on, which rule decided, and a sentence saying why.

    ``rule`` is a short stable id ("deny-from", "allow-cn", "crl", "expired", ...) fit for a metric label;
    ``reason`` is for the person reading the log and names the value that matched or failed.
    """

    allowed: bool
    rule: str
    reason: str


def utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def readable_name(name: x509.Name) -> str:
    """A distinguished name for people: RFC 4514, or a placeholder for the empty name."""
    return name.rfc4514_string() or "(empty name)"


def listing(values: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(values[:limit])
    return shown if len(values) <= limit else f"{shown}, +{len(values) - limit} more"


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
