"""Pieces every click command shares: the group class that turns TlsgateError into exit 2, and option sets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from tlsgate.errors import TlsgateError

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit code 2, never a traceback."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        # ConfigErrors carries one problem per line; each gets the prefix, so every line reads on its own.
        for line in self.format_message().splitlines() or [""]:
            click.echo(f"tlsgate: error: {line}", err=True)


class TlsgateGroup(click.Group):
    """A click group whose commands may raise TlsgateError; it becomes a one-line error and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TlsgateError as err:
            raise UserError(str(err)) from None


def stack_options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several click options as one decorator, applied in the order written."""

    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def _many(flag: str, help_text: str, metavar: str) -> Callable[[F], F]:
    return click.option(flag, multiple=True, metavar=metavar, help=help_text + " (repeatable)")


# The identity and address rules of the access-control layer, with ghostunnel's names where they exist.
# The keyword arguments they produce match tlsgate.policy.build_policy.
access_options = stack_options(
    click.option("--allow-all", is_flag=True, help="Allow any client with a certificate signed by --cacert."),
    _many("--allow-cn", "Allow clients whose certificate has this Common Name", "CN"),
    _many("--allow-ou", "Allow clients whose certificate has this Organizational Unit", "OU"),
    _many("--allow-dns", "Allow clients whose certificate has this DNS SAN", "NAME"),
    _many("--allow-uri", "Allow clients with this URI SAN; '*' matches one path segment", "URI"),
    _many("--allow-spki-sha256", "Allow the client key with this SPKI SHA-256 (hex or base64)", "HASH"),
    click.option("--allow-policy", metavar="BUNDLE", help="Rego policy: a .rego file, bundle dir or .tar.gz (opa)."),
    click.option("--allow-query", metavar="QUERY", help="Rego query that must be true, e.g. data.tlsgate.allow."),
    _many("--allow-from", "Accept connections only from this network; checked before the handshake", "CIDR"),
    _many("--deny-from", "Refuse connections from this network; deny wins over allow", "CIDR"),
    _many("--crl", "Refuse client certificates revoked by this CRL (PEM or DER)", "FILE"),
)
