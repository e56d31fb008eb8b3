"""``tlsgate dev``: https://localhost in front of a development server. The commands parse; `tlsgate.dev` works.

\b
tlsgate dev --to 3000                      # https://localhost:8443/ -> localhost:3000
tlsgate dev --to 5173 --name myapp.localhost --listen localhost:9443
tlsgate dev trust                          # browsers and tools trust the local CA from now on
tlsgate dev untrust                        # ... and no longer
tlsgate dev --ca-path                      # where the local CA lives
"""

from __future__ import annotations

import click

from tlsgate import logs
from tlsgate.cli.support import TlsgateGroup
from tlsgate.dev.ca import ca_root, dev_ca_warning, ensure_dev_ca
from tlsgate.dev.front import DEFAULT_LISTEN, DevFront, DevSettings
from tlsgate.dev.stores import StoreResult, TrustStores, trust_exit_code, untrust_exit_code
from tlsgate.dev.stores import trust as install_ca
from tlsgate.dev.stores import untrust as remove_ca
from tlsgate.errors import CertificateError, ConfigError
from tlsgate.pki.ca import CertificateAuthority
from tlsgate.process.lifecycle import choose_loop


@click.group(cls=TlsgateGroup, invoke_without_command=True)
@click.option("--to", "target", metavar="PORT|HOST:PORT|unix:PATH", help="Where the dev server listens.")
@click.option(
    "--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT", help="Where the https front listens."
)
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="NAME",
    help="Another name for the certificate, like myapp.localhost or *.myapp.localhost (repeatable); local names "
    "only: localhost, 127.0.0.0/8, ::1 and names under .localhost, .test, .local, .internal, .home.arpa.",
)
@click.option("--ca-path", is_flag=True, help="Print the directory of the local CA and exit.")
@click.option("-v", "--verbose", is_flag=True, help="Log every connection, not only the failed ones.")
@click.pass_context
def dev(
    ctx: click.Context, target: str | None, listen: str, names: tuple[str, ...], ca_path: bool, verbose: bool
) -> None:
    """Serve https://localhost with a certificate from a local CA, forwarding to a dev server (--to).

    The CA is made on first use in the directory `--ca-path` prints (env TLSGATE_CAROOT moves it);
    `tlsgate dev trust` makes browsers accept it. The front keeps running while the dev server is down.

    \b
    tlsgate dev --to 3000                      # https://localhost:8443/ -> localhost:3000
    tlsgate dev --to 5173 --name myapp.localhost
    tlsgate dev trust | untrust
    """
    if ctx.invoked_subcommand is not None:
        if target is not None or names or ca_path:
            raise ConfigError(
                f"--to, --name and --ca-path go with `tlsgate dev`, not `tlsgate dev {ctx.invoked_subcommand}`"
            )
        return
    if ca_path:
        click.echo(str(ca_root()))
        return
    if target is None:
        raise ConfigError("--to is required: the dev server's port (3000), HOST:PORT or unix:PATH")
    settings = DevSettings.from_flags(to=target, listen=listen, names=names)
    front = DevFront(settings, click.echo)
    logs.setup_logging("text", () if verbose else ("conns",))

    async def main() -> int:
        return await front.serve()

    raise SystemExit(int(choose_loop()(main())))


def _existing_ca() -> CertificateAuthority:
    directory = ca_root()
    if not CertificateAuthority.exists(directory):
        raise CertificateError(
            f"no local CA in {directory} yet; `tlsgate dev --to PORT` or `tlsgate dev trust` makes it"
        )
    return CertificateAuthority.load(directory)


def _report(results: list[StoreResult]) -> None:
    for result in results:
        for line in result.lines():
            click.echo(line)


@dev.command()
def trust() -> None:
    """Install the local CA where browsers and tools look (system store, Chromium and Firefox NSS databases).

    Each store says installed, already present, skipped (why) or failed (why); what needs root or another
    OS's tool is printed as the command to run. Exit status 0 when at least one store has the CA.

    \b
    Examples:
      tlsgate dev trust && tlsgate dev --to 3000
    """
    ca, created = ensure_dev_ca(ca_root())
    if created:
        click.echo(f"created a local CA in {ca.directory}")
    if (warning := dev_ca_warning(ca)) is not None:
        click.echo(f"warning: {warning}", err=True)
    results = install_ca(ca.cert_path, TrustStores.discover())
    _report(results)
    raise SystemExit(trust_exit_code(results))


@dev.command()
def untrust() -> None:
    """Remove the local CA from the stores `tlsgate dev trust` installs it in (the CA files stay).

    \b
    Examples:
      tlsgate dev untrust
    """
    ca = _existing_ca()
    results = remove_ca(ca.cert_path, TrustStores.discover())
    _report(results)
    raise SystemExit(untrust_exit_code(results))


__all__ = ["dev"]
