"""A server's access settings as one value, `ServerAccess`, and ghostunnel's rules on which of them go together.

`ServerAccess` is what ``tlsgate.policy.build_policy`` takes: every value already parsed (networks, IP
addresses, key pins, URI patterns, see ``settings.values``). It comes from a checked ``TunnelConfig``
(``TunnelConfig.access``), or, for a library caller or ``tlsgate policy check``, from
``settings.config.server_access``, which converts raw flag values with the same converters and refuses with the
same messages as the command line and a file. `identity_problems` holds the rules on the identity flags (one
message each); ``settings.checks.cross_checks`` applies them for ``tunnel_config``, so there is one copy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from tlsgate.settings.convert import flag
from tlsgate.settings.patterns import UriPattern
from tlsgate.settings.pins import KeyPin
from tlsgate.settings.values import IPAddress, Network, SpkiPin

if TYPE_CHECKING:
    from tlsgate.settings.config import TunnelConfig

__all__ = ["IDENTITY_VALUE_KEYS", "ServerAccess", "identity_problems", "pin_problem"]

# The identity rules that take values, in the order messages name them.
IDENTITY_VALUE_KEYS = ("allow_cn", "allow_ou", "allow_dns", "allow_ip", "allow_uri", "allow_spki_sha256")


@dataclass(frozen=True)
class ServerAccess:
    """Who may connect to a server tunnel: identity rules, address rules and CRLs, parsed and checked together.

    Field names are the flags' (``allow_cn`` is ``--allow-cn``). Make one with ``settings.config.server_access``
    (raw values) or take ``TunnelConfig.access``; building it by hand skips the checks.
    """

    allow_all: bool = False
    allow_cn: tuple[str, ...] = ()
    allow_ou: tuple[str, ...] = ()
    allow_dns: tuple[str, ...] = ()
    allow_ip: tuple[IPAddress, ...] = ()
    allow_uri: tuple[UriPattern, ...] = ()
    allow_spki_sha256: tuple[SpkiPin, ...] = ()
    # ghostunnel's pin-only authentication: the pins are the whole identity rule (no CA, no dates, no CRL).
    allow_spki_pin: tuple[KeyPin, ...] = ()
    allow_from: tuple[Network, ...] = ()
    deny_from: tuple[Network, ...] = ()
    crl: tuple[str, ...] = ()
    allow_policy: str | None = None
    allow_query: str | None = None
    disable_authentication: bool = False

    @classmethod
    def of(cls, cfg: TunnelConfig) -> ServerAccess:
        """The access settings of a checked tunnel config (its fields of the same names)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def identity_problems(access: ServerAccess) -> list[str]:
    """ghostunnel's rules on the identity flags of a server, one message per broken rule, worded with the flags.

    A server needs one identity rule or ``--disable-authentication``; ``--disable-authentication`` excludes every
    rule (and ``--crl``: no certificate is asked to revoke); ``--allow-policy``/``--allow-query`` go together and,
    as in ghostunnel, exclude the other identity flags (the policy is the whole rule); ``--allow-all`` excludes
    the value rules (it already allows every client).
    """
    problems: list[str] = []
    given = [flag(key) for key in IDENTITY_VALUE_KEYS if getattr(access, key)]
    rego = access.allow_policy is not None or access.allow_query is not None
    first = "--allow-all" if access.allow_all else given[0] if given else ""
    if access.disable_authentication:
        if first:
            problems.append(
                f"--disable-authentication contradicts {first}: without client certificates it cannot match"
            )
        if access.allow_policy is not None:
            problems.append("--disable-authentication contradicts --allow-policy: no client certificate to check")
        if access.crl:
            problems.append("--disable-authentication contradicts --crl: no client certificate is asked to revoke")
    elif not (first or rego or access.allow_spki_pin):
        problems.append(
            "server mode needs one of --allow-all, --allow-cn, --allow-ou, --allow-dns, --allow-ip, --allow-uri, "
            "--allow-spki-sha256, --allow-spki-pin, --allow-policy/--allow-query, or --disable-authentication"
        )
    if access.allow_spki_pin:
        others = [*given, *(["--allow-all"] if access.allow_all else []), *(["--allow-policy"] if rego else [])]
        problem = pin_problem(others, disable_authentication=access.disable_authentication, crl=bool(access.crl))
        if problem:
            problems.append(problem)
    if rego and (access.allow_policy is None or access.allow_query is None):
        problems.append("--allow-policy and --allow-query go together: give both, or neither")
    if rego and first:
        problems.append(
            f"--allow-policy/--allow-query and {first} are mutually exclusive (as in ghostunnel: "
            "put every rule in the policy)"
        )
    if access.allow_all and given:
        problems.append(f"--allow-all and {given[0]} are mutually exclusive (--allow-all already allows every client)")
    return problems


def pin_problem(others: list[str], *, disable_authentication: bool = False, crl: bool = False) -> str | None:
    """Why ``--allow-spki-pin`` cannot go with the other server flags given (``others``, their names), or None.

    ghostunnel refuses every other access flag beside a pin (the pin is the whole authentication); ``--crl`` is
    tlsgate's, and has nothing to revoke with when no CA is consulted.
    """
    if disable_authentication:
        return "--disable-authentication contradicts --allow-spki-pin: without client certificates no key can match"
    if others:
        return (
            f"--allow-spki-pin and {others[0]} are mutually exclusive: a pinned key authenticates the client alone "
            "(as in ghostunnel); to pin a key on top of the CA chain, use --allow-spki-sha256"
        )
    if crl:
        return (
            "--allow-spki-pin and --crl are mutually exclusive: a pinned client is not checked against a CA, so a "
            "CRL cannot revoke it; remove its pin instead"
        )
    return None
