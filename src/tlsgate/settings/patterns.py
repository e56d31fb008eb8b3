"""The values of ``--allow-uri``/``--verify-uri``: ghostunnel-style URI patterns and SPIFFE IDs.

`UriPattern` compiles a pattern (``*`` one path segment, ``**`` the rest) to a regex; a ``spiffe://``
pattern also requires the URI to be a valid SPIFFE ID (`spiffe_id_problem`), so ``*`` and ``**`` cannot
take ``..`` or percent-encoded slashes. The settings converter (``settings.convert``, kind ``uris``) compiles
each pattern once, when the flag or file key is read; `tlsgate.policy.identity` only matches with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tlsgate.errors import ConfigError, shown

__all__ = ["UriPattern", "spiffe_id_problem"]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True, slots=True)
class UriPattern:
    """A ghostunnel-style URI pattern: ``*`` is one whole path segment, ``**`` (last only) any rest of it.

    As in ghostunnel, a trailing slash is optional on both sides (``spiffe://x/a`` matches ``spiffe://x/a/``) and
    ``*`` needs at least one character (``spiffe://x//y`` does not match ``spiffe://x/*/y``). Unlike ghostunnel,
    ``a/**`` does not match ``ab``: it means ``a`` and anything below it.
    """

    text: str
    regex: re.Pattern[str]

    spiffe: bool = False
    """A ``spiffe://`` pattern: it matches only URIs that are valid SPIFFE IDs (see `spiffe_id_problem`)."""

    @classmethod
    def parse(cls, flag: str, text: str) -> UriPattern:
        if not _URI_SCHEME.match(text):
            raise ConfigError(
                f"{flag}: {shown(text)} is not a URI (use a full URI such as spiffe://example.org/service)"
            )
        spiffe = text.lower().startswith(_SPIFFE)
        if spiffe:
            problem = spiffe_id_problem(text, pattern=True)
            if problem is not None:
                raise ConfigError(f"{flag}: {shown(text)} is not a SPIFFE ID pattern: {problem}")
        segments = text.split("/")
        parts: list[str] = []
        for index, segment in enumerate(segments):
            if segment == "**":
                if index != len(segments) - 1:
                    raise ConfigError(f"{flag}: {shown(text)}: '**' may only be the last segment")
                return cls(text, re.compile("/".join(parts) + "(?:/.*)?", re.DOTALL), spiffe)
            if segment == "*":
                parts.append("[^/]+")
            elif "*" in segment:
                raise ConfigError(
                    f"{flag}: {text!r}: '*' must be a whole path segment (like spiffe://example.org/*/api)"
                )
            else:
                parts.append(re.escape(segment))
        return cls(text, re.compile("/".join(parts) + "/?"), spiffe)

    def matches(self, uri: str) -> bool:
        if self.regex.fullmatch(uri) is None:
            return False
        # `*` and `**` would otherwise take ".." or "%2F" as path text: spiffe://x/ns/** must not admit
        # spiffe://x/ns/../admin, which a consumer that normalises the path reads as spiffe://x/admin.
        return not self.spiffe or spiffe_id_problem(uri) is None


_SPIFFE = "spiffe://"
_SPIFFE_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SPIFFE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def spiffe_id_problem(uri: str, *, pattern: bool = False) -> str | None:
    """Why ``uri`` is not a SPIFFE ID, or None if it is one (the SPIFFE-ID specification, section 2).

    A SPIFFE ID is ``spiffe://`` + a lowercase trust domain + path segments of letters, digits, ``.``, ``-``
    and ``_``: no empty segment, no ``.`` or ``..`` segment, no percent-encoding, query or fragment. A single
    trailing ``/`` is tolerated, as ghostunnel's patterns tolerate it. With ``pattern``, ``*`` may stand for
    the trust domain or a segment and ``**`` for the last segment (`UriPattern` checks where they stand).
    """
    if not uri.startswith(_SPIFFE):
        return "the scheme must be spiffe:// in lowercase"
    domain, slash, path = uri[len(_SPIFFE) :].partition("/")
    # In a pattern, a segment with a `*` is left to `UriPattern.parse`, whose message says where `*` may stand.
    if not (pattern and "*" in domain) and not _SPIFFE_TRUST_DOMAIN.fullmatch(domain):
        return f"the trust domain {_shorten(domain, 40)!r} must be lowercase letters, digits, '.', '-', '_'"
    segments = path.split("/") if slash else []
    if segments and segments[-1] == "":
        segments.pop()
    for segment in segments:
        if pattern and "*" in segment:
            continue
        if segment in ("", ".", ".."):
            return f"path segment {segment!r} is not allowed (no empty, '.' or '..' segments)"
        if "%" in segment:
            return "percent-encoding is not allowed in a SPIFFE ID"
        if not _SPIFFE_SEGMENT.fullmatch(segment):
            return f"path segment {_shorten(segment, 40)!r} may only hold letters, digits, '.', '-', '_'"
    return None
