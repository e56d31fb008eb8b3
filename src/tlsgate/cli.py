"""The ``tlsgate`` command: click parses, ``config`` validates, the supervisor runs. Nothing else lives here.

Flags follow ghostunnel's names and meanings where they overlap, so switching is a change of program name.
Every TlsgateError becomes one line on stderr and exit code 2 (see cli_support.TlsgateGroup).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tlsgate import __version__
from tlsgate.cli_support import TlsgateGroup, UserError, access_options, stack_options
from tlsgate.config import TunnelConfig, check_metrics_prefix, tunnel_config
from tlsgate.errors import TlsgateError
from tlsgate.logs import QUIET_CHOICES
from tlsgate.status import check_status_setting
from tlsgate.supervisor import ProcessOptions, run_server

F = TypeVar("F", bound=Callable[..., Any])


def _duration(flag: str, help_text: str) -> Callable[[F], F]:
    return click.option(flag, metavar="DURATION", help=help_text)


_common = stack_options(
    click.option(
        "--listen", required=True, metavar="ADDR", help="Address to listen on: HOST:PORT, unix:PATH or systemd:NAME."
    ),
    click.option("--target", required=True, metavar="ADDR", help="Address to forward to: HOST:PORT or unix:PATH."),
    click.option("--keystore", metavar="FILE", help="PEM bundle with cert and key, or PKCS#12 [env KEYSTORE_PATH]."),
    click.option(
        "--cert", multiple=True, metavar="FILE", help="Certificate chain (PEM) [env CERT_PATH]. Repeat for SNI."
    ),
    click.option(
        "--key", multiple=True, metavar="FILE", help="Private key (PEM) for the --cert before it [env KEY_PATH]."
    ),
    click.option(
        "--storepass",
        metavar="PASS",
        help="Keystore password; env:VAR or file:PATH keep it out of ps [env KEYSTORE_PASS].",
    ),
    click.option("--key-pass", metavar="PASS", help="Passphrase of an encrypted --key (env:VAR, file:PATH)."),
    click.option("--alpn", metavar="LIST", help="ALPN protocols to offer, comma-separated (e.g. h2,http/1.1)."),
    click.option(
        "--session-tickets",
        type=click.Choice(["shared", "per-context", "off"]),
        help="TLS session tickets: one key for all workers and reloads, OpenSSL's own per context, or none [shared].",
    ),
    click.option("--unsafe-listen", is_flag=True, default=None, help="Allow listening on a non-loopback address."),
    _duration("--connect-timeout", "Timeout for connecting to the target [10s]."),
    _duration("--handshake-timeout", "Timeout for a TLS handshake; slow or silent clients are cut [10s]."),
    _duration("--close-timeout", "How long a half-closed connection may linger before it is cut [60s]."),
    _duration("--idle-timeout", "Cut connections with no bytes either way for this long [0: never]."),
    _duration("--max-conn-lifetime", "Cut connections older than this [0: never]."),
    _duration("--shutdown-timeout", "On SIGTERM, how long open connections may finish [5m]."),
    _duration("--timed-reload", "Reload certificates and policies this often, 1s or more [0: only on signals]."),
    click.option("--max-concurrent-conns", type=int, help="Open connections at most; more wait in the backlog."),
    click.option("--status", metavar="ADDR", help="Serve /_status, /_metrics and /metrics on this address."),
    click.option("--metrics-prefix", default="tlsgate", show_default=True, help="Prefix of metric names."),
    click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True, help="Processes."),
    click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True),
    click.option("--quiet", multiple=True, type=click.Choice(QUIET_CHOICES), help="Silence a class of log lines."),
    click.option("--syslog", is_flag=True, default=False, help="Log to the local syslog (/dev/log) instead of stderr."),
    click.option(
        "--loop",
        type=click.Choice(["auto", "uvloop", "asyncio"]),
        default="auto",
        show_default=True,
        help="Event loop; auto uses uvloop when installed (env TLSGATE_LOOP overrides auto).",
    ),
)

_PROCESS_FLAGS = ("status", "metrics_prefix", "workers", "log_format", "quiet", "loop", "syslog")

# ghostunnel's environment variables (kingpin's Envar), by the flag each one stands in for. As there, a flag on the
# command line wins, and an empty variable counts as unset. They serve images that mount credentials at a path
# given in the environment; `tlsgate run` files do not read them (a file names its paths itself).
ENV_FLAGS = {
    "keystore": "KEYSTORE_PATH",
    "cert": "CERT_PATH",
    "key": "KEY_PATH",
    "storepass": "KEYSTORE_PASS",
    "cacert": "CACERT_PATH",
}


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
        cfg = tunnel_config(mode, _given(kwargs))
        # The process flags are judged with the tunnel's, before anything starts (the file path does the same).
        check_metrics_prefix(process.metrics_prefix)
        if process.status:
            check_status_setting(process.status, [cfg])
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
        from tlsgate.workers import run_workers

        return run_workers([cfg], process)
    return run_server([cfg], process)


@click.group(cls=TlsgateGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tlsgate")
def cli() -> None:
    """tlsgate: a TLS tunnel with access policies (ghostunnel-compatible flags)."""


@cli.command()
@_common
@click.option("--cacert", metavar="FILE", help="CA bundle that client certificates must chain to [env CACERT_PATH].")
@click.option("--disable-authentication", is_flag=True, default=None, help="Do not ask clients for a certificate.")
@access_options
@click.option("--target-tls", is_flag=True, default=None, help="Re-encrypt: speak TLS to the target, verified.")
@click.option("--target-cacert", metavar="FILE", help="CA bundle for the target's certificate [system store].")
@click.option("--target-server-name", metavar="NAME", help="Name the target's certificate must have (and SNI).")
@click.option("--target-cert", metavar="FILE", help="Client certificate to present to a TLS target.")
@click.option("--target-key", metavar="FILE", help="Key for --target-cert.")
@click.option("--unsafe-target", is_flag=True, default=None, help="Allow a plaintext target on another machine.")
@click.option("--proxy-protocol", is_flag=True, default=None, help="Send a PROXY header to the target.")
@click.option("--proxy-protocol-version", type=click.Choice(["1", "2"]), help="PROXY header version [2].")
@click.option(
    "--accept-proxy-from",
    multiple=True,
    metavar="CIDR",
    help="Trust PROXY headers from this network ('unix': from every peer of a unix: --listen).",
)
@_duration("--crl-max-age", "Refuse to start or reload with a --crl issued longer ago than this [0: no limit].")
def server(**kwargs: Any) -> None:
    """Accept TLS (mutual TLS by default) and forward plaintext to --target."""
    _run("server", kwargs, _from_environment(kwargs))


@cli.command()
@_common
@click.option(
    "--cacert", metavar="FILE", help="CA bundle the server's certificate must chain to [system store; env CACERT_PATH]."
)
@click.option(
    "--disable-authentication", is_flag=True, default=None, help="Present no client certificate to the server."
)
@click.option("--override-server-name", metavar="NAME", help="Verify the server as NAME (and send it as SNI).")
@click.option("--verify-cn", multiple=True, metavar="CN", help="Server certificate must have this CN.")
@click.option("--verify-ou", multiple=True, metavar="OU", help="Server certificate must have this OU.")
@click.option("--verify-dns", multiple=True, metavar="NAME", help="Server certificate must have this DNS SAN.")
@click.option("--verify-uri", multiple=True, metavar="URI", help="Server certificate must have this URI SAN.")
@click.option("--verify-spki-sha256", multiple=True, metavar="HASH", help="Pin the server's key (SPKI SHA-256).")
@click.option("--verify-policy", metavar="BUNDLE", help="Rego policy the server's certificate must pass (opa).")
@click.option("--verify-query", metavar="QUERY", help="Rego query that must be true, e.g. data.tlsgate.allow.")
@click.option("--allow-from", multiple=True, metavar="CIDR", help="Accept local clients only from this network.")
@click.option("--deny-from", multiple=True, metavar="CIDR", help="Refuse local clients from this network.")
def client(**kwargs: Any) -> None:
    """Accept plaintext and forward it over TLS (mutual TLS when a certificate is given) to --target."""
    used = _from_environment(kwargs)
    has_certificate = kwargs.get("keystore") or kwargs.get("cert") or kwargs.get("key")
    # ghostunnel's client mode needs a certificate unless told not to present one, and refuses both at once: a
    # certificate silently presented after --disable-authentication would be a surprise. We follow it.
    if kwargs.pop("disable_authentication", None):
        if has_certificate:
            raise click.UsageError(
                _name_variables("--disable-authentication presents no certificate: drop --keystore/--cert/--key", used)
            )
    elif not has_certificate:
        raise click.UsageError("client mode needs --keystore or --cert/--key, or --disable-authentication")
    _run("client", kwargs, used)


@cli.command()
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="Where the TLS front listens.")
@click.option("--backend-port", type=int, default=0, help="Port of the demo HTTP backend [any free port].")
@click.option("--certs-dir", default="certs/demo", show_default=True, help="Where the demo CA and cert are kept.")
def demo(listen: str, backend_port: int, certs_dir: str) -> None:
    """Start a demo HTTP backend behind a TLS front and print how to reach it (what `make run` does)."""
    from tlsgate.demo import run_demo

    raise SystemExit(run_demo(listen=listen, backend_port=backend_port, certs_dir=certs_dir))


def _register_subcommands() -> None:
    from tlsgate.cli_certs import certs
    from tlsgate.cli_dev import dev
    from tlsgate.cli_extras import completion, man
    from tlsgate.cli_policy import policy
    from tlsgate.cli_run import check_config, run

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
