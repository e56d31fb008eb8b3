"""Pieces every click command shares: the group class that turns TlsgateError and click's usage errors into one
line and exit 2, and the click options generated from the settings table (``tlsgate.settings``)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

import click

from tlsgate import logs
from tlsgate.errors import TlsgateError
from tlsgate.settings.setting import SECTIONS, Setting
from tlsgate.settings.table import SETTINGS

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit code 2, never a traceback."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        # Lines logged before the failure (a tunnel already listening) go out first, so the error reads last.
        logs.flush_logs(wait=1.0)
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
        except click.UsageError as err:
            raise _one_line(err) from None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as err:
            raise _one_line(err) from None


def _one_line(err: click.UsageError) -> UserError:
    """click's usage block and ``Error:`` line as our one line: ``tlsgate: error: No such option: --lisen
    (Possible options: --listen); see tlsgate server --help``. A script's log then holds the problem, not a page."""
    where = err.ctx.command_path if err.ctx is not None else "tlsgate"
    return UserError(f"{err.format_message().rstrip('.')}; see {where} --help")


def stack_options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several click options as one decorator, applied in the order written."""

    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


class SettingOption(click.Option):
    """A click option generated from a ``tlsgate.settings.Setting``: it knows its help section, and keeps its
    hidden aliases (older ghostunnel spellings) out of ``--help`` while still accepting them."""

    def __init__(self, *args: Any, section: str = "", visible: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section
        self.visible = visible

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown, self.opts = self.opts, [o for o in self.opts if not self.visible or o in self.visible]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def _option(entry: Setting, mode: str) -> Callable[[F], F]:
    """The click option of one setting. Tunnel values stay as typed (strings), so that ``config.tunnel_config``
    converts flags and file keys with the same code; process values use click's types, as they have no file
    counterpart on the flag path."""
    kwargs: dict[str, Any] = {
        "cls": SettingOption,
        "section": entry.section,
        "visible": (entry.flag,),
        "help": entry.help_for(mode),
        "required": entry.required,
    }
    if entry.metavar:
        kwargs["metavar"] = entry.metavar
    if entry.kind == "flag" and entry.default is True:
        # On unless said otherwise: --NAME=false turns it off. Absent stays None, so the default of
        # config.TunnelConfig (or a file's key) decides, as for every other tunnel setting.
        kwargs.update(is_flag=False, flag_value=True, type=click.BOOL, default=None)
    elif entry.kind == "flag":
        kwargs.update(is_flag=True, default=entry.default)
    elif entry.repeatable:
        kwargs["multiple"] = True
    if entry.choices:
        kwargs["type"] = click.Choice(entry.choices)
    elif entry.scope == "process" and entry.kind == "count":
        kwargs["type"] = click.IntRange(entry.low, entry.high)
    if entry.scope == "process" and entry.default is not None and entry.kind != "flag":
        kwargs.update(default=entry.default, show_default=True)
    return click.option(entry.flag, *entry.aliases, entry.name, **kwargs)


def setting_options(mode: str, names: Collection[str] | None = None) -> Callable[[F], F]:
    """Every setting the ``mode`` command takes (or only ``names``), as click options in the table's order."""
    return stack_options(*(_option(s, mode) for s in SETTINGS if s.takes(mode) and (names is None or s.name in names)))


class SettingsCommand(click.Command):
    """A command whose ``--help`` lists its options in the sections of the settings table."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {name: [] for name in (*SECTIONS, "other")}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections[getattr(param, "section", "") or "other"].append(record)
        for name, records in sections.items():
            if records:
                with formatter.section(name.capitalize() if name != "other" else "Other options"):
                    formatter.write_dl(records)


# The identity and address rules of the access-control layer, with ghostunnel's names where they exist.
# The keyword arguments they produce match tlsgate.settings.config.server_access (which build_policy takes).
access_options = setting_options(
    "server",
    (
        "allow_all",
        "allow_cn",
        "allow_ou",
        "allow_dns",
        "allow_ip",
        "allow_uri",
        "allow_spki_sha256",
        "allow_spki_pin",
        "allow_policy",
        "allow_query",
        "allow_from",
        "deny_from",
        "crl",
    ),
)
