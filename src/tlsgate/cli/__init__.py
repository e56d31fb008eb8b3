"""The ``tlsgate`` command: click parses, ``config`` validates, the supervisor runs. Nothing else lives here.

Flags follow ghostunnel's names and meanings where they overlap, so switching is a change of program name.
Every TlsgateError becomes one line on stderr and exit code 2 (see cli_support.TlsgateGroup).
"""

from __future__ import annotations

import os
import re
from typing import Any

import click

from tlsgate import __version__
from tlsgate.cli.support import SettingsCommand, TlsgateGroup, UserError, setting_options
from tlsgate.errors import ConfigError, TlsgateError
from tlsgate.process.supervisor import ProcessOptions, run_server
from tlsgate.settings.config import TunnelConfig, check_metrics_prefix, tunnel_config
from tlsgate.settings.status import check_status_setting, status_option_problems
from tlsgate.settings.table import ENV_FLAGS as ENV_FLAGS  # re-exported: ghostunnel parity tests read it here
from tlsgate.settings.table import process_settings

_PROCESS_FLAGS = tuple(s.name for s in process_settings())


def _from_environment(kwargs: dict[str, Any]) -> dict[str, str]:
    """Fill the flags not given on the command line from ENV_FLAGS; returns ``{flag: variable}`` for those filled."""
    used: dict[str, str] = {}
    for name, variable in ENV_FLAGS.items():
        value = os.environ.get(variable, "")
        if not value or kwargs.get(name) not in (None, ()):
            continue
        if name in ("cert", "key"):
            kwargs[name] = (value,)  # one path, spaces and all: ghostunnel's --cert and --key name one file each
        elif name == "storepass":
            kwargs[name] = "pass:" + value  # the password itself, as in ghostunnel: no env:/file: indirection
        else:
            kwargs[name] = value
        used[name] = variable
    return used


def _name_variables(message: str, used: dict[str, str]) -> str:
    """Say which of the flags a message names came from the environment, one line at a time.

    ``give either --keystore or --cert/--key, not both [--keystore from KEYSTORE_PATH]``: without it, a user who
    typed only --cert/--key would look for a --keystore that is not on their command line.
    """
    lines = []
    for line in message.splitlines():
        named = [f"--{name} from {var}" for name, var in used.items() if re.search(rf"--{name}(?![\w-])", line)]
        lines.append(f"{line} [{', '.join(named)}]" if named else line)
    return "\n".join(lines)


def _run(mode: str, kwargs: dict[str, Any], used: dict[str, str]) -> None:
    process = ProcessOptions(**{k: kwargs.pop(k) for k in _PROCESS_FLAGS})
    if kwargs.get("alpn"):
        kwargs["alpn"] = tuple(p.strip() for p in kwargs["alpn"].split(",") if p.strip())
    try:
        cfg = tunnel_config(mode, _given(kwargs), require_client_identity=True)
        # The process flags are judged with the tunnel's, before anything starts (the file path does the same).
        check_metrics_prefix(process.metrics_prefix)
        if process.status:
            check_status_setting(process.status, [cfg])
        for problem in status_option_problems(process):
            raise ConfigError(problem)
        code = _start(cfg, process)
    except TlsgateError as err:
        if not used:
            raise
        raise UserError(_name_variables(str(err), used)) from None
    raise SystemExit(code)


def _given(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Only the flags the user gave, so the defaults live in one place (config.Timeouts, TunnelConfig)."""
    return {k: v for k, v in kwargs.items() if v is not None and v != () and v is not False}


def _start(cfg: TunnelConfig, process: ProcessOptions) -> int:
    if process.workers > 1:
        from tlsgate.process.workers import run_workers

        return run_workers([cfg], process)
    return run_server([cfg], process)


@click.group(cls=TlsgateGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tlsgate")
def cli() -> None:
    """tlsgate: a TLS tunnel with access policies (ghostunnel-compatible flags)."""


_SERVER_EXAMPLES = """
Examples:

\b
  # Mutual TLS in front of a local Redis; only certificates with OU=eng get in:
  tlsgate server --listen 0.0.0.0:6380 --target localhost:6379 \\
      --cert server.pem --key server.key --cacert ca.pem --allow-ou eng

\b
  # Re-encrypt to a TLS upstream, accepting two named services, with a status port:
  tlsgate server --listen :8443 --target db.internal:5432 --target-tls \\
      --keystore server.p12 --storepass env:STOREPASS --cacert ca.pem \\
      --allow-cn billing --allow-cn reports --status 127.0.0.1:9000
"""

_CLIENT_EXAMPLES = """
Examples:

\b
  # A local plaintext port for an app, forwarded over mutual TLS to a remote server:
  tlsgate client --listen 127.0.0.1:6379 --target redis.example.com:6380 \\
      --cert client.pem --key client.key --cacert ca.pem --verify-dns redis.example.com

\b
  # Plain TLS (no client certificate) to a server reached by IP, checked by name and pinned key:
  tlsgate client --listen unix:/run/app/db.sock --target 10.0.0.5:5432 --disable-authentication \\
      --override-server-name db.example.com --verify-spki-sha256 \\
      9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
"""


@cli.command(cls=SettingsCommand, epilog=_SERVER_EXAMPLES)
@setting_options("server")
def server(**kwargs: Any) -> None:
    """Accept TLS (mutual TLS by default) and forward plaintext to --target."""
    _run("server", kwargs, _from_environment(kwargs))


@cli.command(cls=SettingsCommand, epilog=_CLIENT_EXAMPLES)
@setting_options("client")
def client(**kwargs: Any) -> None:
    """Accept plaintext and forward it over TLS (mutual TLS when a certificate is given) to --target."""
    _run("client", kwargs, _from_environment(kwargs))


@cli.command()
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="Where the TLS front listens.")
@click.option("--backend-port", type=int, default=0, help="Port of the demo HTTP backend [any free port].")
@click.option("--certs-dir", default="certs/demo", show_default=True, help="Where the demo CA and cert are kept.")
def demo(listen: str, backend_port: int, certs_dir: str) -> None:
    """Start a demo HTTP backend behind a TLS front and print how to reach it (what `make run` does).

    \b
    Examples:
      tlsgate demo                           # https://localhost:8443/; prints the curl line to try it
      tlsgate demo --listen 127.0.0.1:9443   # 8443 taken (with make: make run LISTEN=127.0.0.1:9443)
    """
    from tlsgate.dev.demo import run_demo

    raise SystemExit(run_demo(listen=listen, backend_port=backend_port, certs_dir=certs_dir))


def _register_subcommands() -> None:
    from tlsgate.cli.certs import certs
    from tlsgate.cli.dev import dev
    from tlsgate.cli.extras import completion, man
    from tlsgate.cli.policy import policy
    from tlsgate.cli.run import check_config, run

    for command in (certs, check_config, completion, dev, man, policy, run):
        cli.add_command(command)


_register_subcommands()


def main() -> None:
    _open_standard_descriptors()
    cli(prog_name="tlsgate")


def _open_standard_descriptors() -> None:
    """Put /dev/null on any of descriptors 0-2 that the caller left closed (``tlsgate ... 2>&-``).

    Otherwise the next descriptor opened takes that number: the event loop's epoll, which libuv refuses to close
    (uvloop aborts at exit), or a client's socket, which log lines would then be written into.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
