"""``tlsgate run FILE`` and ``tlsgate check-config FILE``: many tunnels from one TOML file (docs/configuration.md).

Both commands check the whole file first, certificates, keys and CRLs parsed included, and report every
problem at once: one ``tlsgate: error:`` line each, exit code 2. ``run`` then serves every tunnel in one
process (or ``workers`` processes); SIGHUP re-reads the file.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import click

from tlsgate.cli.support import UserError
from tlsgate.errors import TlsgateError
from tlsgate.process.check import check_config_file, load_tunnels
from tlsgate.process.supervisor import run_server
from tlsgate.settings.config import TunnelConfig
from tlsgate.settings.file import describe_tunnel

__all__ = ["check_config", "run"]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    # The commands are also used outside a TlsgateGroup (tests, embedding), so they map errors themselves.
    try:
        yield
    except TlsgateError as err:
        raise UserError(str(err)) from None


def summary(configs: list[TunnelConfig]) -> str:
    """``ok: 2 tunnels: redis (server ...), pg (server ...)``."""
    count = f"{len(configs)} tunnel" + ("" if len(configs) == 1 else "s")
    return f"ok: {count}: " + ", ".join(f"{cfg.name} ({describe_tunnel(cfg)})" for cfg in configs)


@click.command("check-config")
@click.argument("file", metavar="FILE")
def check_config(file: str) -> None:
    """Check a config file without starting anything: syntax, keys, values, certificates, keys and CRLs.

    Every problem is reported at once, one `tlsgate: error:` line each, naming the tunnel and the key, with
    exit code 2; a CRL past its next update is a warning. A good file prints one summary line per tunnel and
    exits 0, so `tlsgate check-config FILE && systemctl reload tlsgate` never applies a broken file.
    The keys are the flags of `tlsgate server`/`client` without the dashes (see docs/configuration.md).

    \b
    Example:
      tlsgate check-config /etc/tlsgate/tlsgate.toml
    """
    warnings: list[str] = []
    with _user_errors():
        configs = check_config_file(file, warnings).tunnels
    for line in warnings:
        click.echo(f"tlsgate: warning: {line}", err=True)
    click.echo(summary(configs))


@click.command("run")
@click.argument("file", metavar="FILE")
def run(file: str) -> None:
    """Run every tunnel of a TOML config file in one process; SIGHUP re-reads the file.

    The file has an optional [process] table (status, workers, log-format, quiet, ...), an optional [defaults]
    table every tunnel starts from, and one [[tunnel]] table per tunnel with a name, a mode ("server" or
    "client") and the flags of that command as keys. The whole file is checked first, as check-config does;
    a reload that fails keeps the tunnels running as they were. See docs/configuration.md.

    \b
    Example:
      tlsgate run /etc/tlsgate/tlsgate.toml
    """
    with _user_errors():
        checked = check_config_file(file)
        configs, process = checked.tunnels, checked.process
        # A partial of a module-level function, not a lambda: --workers pickles it for each worker process.
        # The absolute path keeps a reload reading the same file whatever the working directory is by then.
        load = functools.partial(load_tunnels, os.path.abspath(file), process)
        if process.workers > 1:
            from tlsgate.process.workers import run_workers

            code = run_workers(configs, process, load_configs=load, runtimes=checked.runtimes)
        else:
            # The runtimes the check built serve from the start: reading every certificate twice doubled start-up.
            code = run_server(configs, process, load_configs=load, runtimes=checked.runtimes)
    raise SystemExit(code)
