"""``tlsgate certs``: a small local CA on the command line. The commands parse; `tlsgate.pki` does the work.

Every password flag accepts ``env:VAR``, ``file:PATH`` or ``pass:TEXT`` as well as the password itself
(see `tlsgate.settings.secrets`), so secrets can stay out of ``ps`` and shell history.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.hazmat.primitives.serialization import Encoding

from tlsgate.cli.support import TlsgateGroup
from tlsgate.errors import ConfigError, shown
from tlsgate.pki.ca import (
    CA_CERT_FILE,
    CA_STATE_FILE,
    DEFAULT_CA_DAYS,
    DEFAULT_CA_NAME,
    DEFAULT_CRL_DAYS,
    DEFAULT_LEAF_DAYS,
    REVOCATION_REASONS,
    CertificateAuthority,
)
from tlsgate.pki.files import refuse_existing, write_public_file
from tlsgate.pki.issued import IssuedCert
from tlsgate.pki.names import default_basename, parse_serial
from tlsgate.pki.show import describe_file
from tlsgate.settings.secrets import resolve_secret
from tlsgate.tls.x509 import key_description, load_certificates, parse_crls

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_OUT_DIR = Path("certs")
DEFAULT_CA_DIR = DEFAULT_OUT_DIR / "ca"

_PASSWORD_FORMS = "PASS, env:VAR, file:PATH or pass:TEXT"
_DIR = click.Path(file_okay=False, path_type=Path)


def _secret(value: str | None, flag: str) -> bytes | None:
    return None if value is None else resolve_secret(value, flag=flag)


def _ca_dir_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--ca",
        "ca_dir",
        type=_DIR,
        default=DEFAULT_CA_DIR,
        show_default=True,
        metavar="DIR",
        help=help_text,
    )


_ca_pass_option = click.option(
    "--ca-pass", metavar="SECRET", help=f"Password of the CA key, if it is encrypted ({_PASSWORD_FORMS})."
)
_force_option = click.option("--force", is_flag=True, help="Replace files that already exist.")


@click.group(cls=TlsgateGroup)
def certs() -> None:
    """Make a local CA, issue server and client certificates, revoke them, and inspect certificate files.

    \b
    tlsgate certs ca                          # certs/ca/ca.pem + ca.key
    tlsgate certs issue --name localhost      # certs/localhost.pem, .key, -chain.pem
    tlsgate certs issue --name alice --client --p12 --storepass env:P12_PASS
    tlsgate certs revoke certs/alice.pem --reason keyCompromise
    tlsgate certs crl --out certs/crl.pem --force
    tlsgate certs show certs/localhost-chain.pem
    """


@certs.command("ca")
@click.option(
    "--out", "out_dir", type=_DIR, default=DEFAULT_CA_DIR, show_default=True, metavar="DIR", help="CA directory."
)
@click.option("--name", default=DEFAULT_CA_NAME, show_default=True, help="Common Name of the CA.")
@click.option(
    "--rsa",
    "rsa_bits",
    type=click.Choice(["2048", "3072", "4096"]),
    help="Use an RSA key of this size instead of ECDSA P-256.",
)
@click.option(
    "--days", type=click.IntRange(min=1), default=DEFAULT_CA_DAYS, show_default=True, help="Validity in days."
)
@click.option("--key-pass", metavar="SECRET", help=f"Encrypt ca.key with this password ({_PASSWORD_FORMS}).")
@_force_option
def ca_command(out_dir: Path, name: str, rsa_bits: str | None, days: int, key_pass: str | None, force: bool) -> None:
    """Create a CA: ca.pem (share it: peers trust it via --cacert), ca.key (secret, 0600) and ca.json (records).

    \b
    Examples:
      tlsgate certs ca                                     # certs/ca/, ECDSA P-256, 10 years
      tlsgate certs ca --name "Acme internal CA" --key-pass env:CA_PASS
    """
    replaced = _replaced_ca(out_dir) if force else None
    ca = CertificateAuthority.create(
        out_dir,
        name=name,
        rsa_bits=int(rsa_bits) if rsa_bits else None,
        days=days,
        key_password=_secret(key_pass, "--key-pass"),
        force=force,
    )
    until = ca.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    click.echo(f"created CA {ca.name!r} ({key_description(ca.certificate.public_key())}, valid until {until})")
    click.echo(f"  {ca.cert_path}  CA certificate: give it to servers and clients as --cacert")
    click.echo(f"  {ca.key_path}  CA private key: keep it secret, never commit it")
    click.echo(f"  {ca.state_path}  record of issued and revoked serials")
    if replaced is not None:
        # After the files are replaced, not before: a CA that could not be created has invalidated nothing.
        click.echo(
            f"tlsgate: warning: replaced the CA in {out_dir}: every certificate the old CA issued ({replaced}) stops "
            "being trusted by peers given the new ca.pem; reissue them and hand the new ca.pem to every peer",
            err=True,
        )


def _replaced_ca(out_dir: Path) -> str | None:
    """What `certs ca --force` is about to orphan: ``"3 recorded in ca.json"``, or None when there is no CA yet.

    Read leniently from ca.json (no key, no password needed): the count is for the warning only, and a CA whose
    record is unreadable still gets the warning, worded without a number.
    """
    if not (out_dir / CA_CERT_FILE).exists():
        return None
    try:
        count = len(json.loads((out_dir / CA_STATE_FILE).read_text(encoding="utf-8"))["issued"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CA_STATE_FILE} unreadable"
    return f"{count} recorded in {CA_STATE_FILE}"


@certs.command("issue")
@_ca_dir_option("Directory of the CA that signs.")
@click.option("--name", required=True, help="Common Name; also the DNS or IP SAN when no --dns/--ip is given.")
@click.option("--dns", multiple=True, metavar="NAME", help="DNS SAN, e.g. example.com or *.example.com (repeatable).")
@click.option("--ip", "ips", multiple=True, metavar="ADDR", help="IP SAN, e.g. 127.0.0.1 or ::1 (repeatable).")
@click.option(
    "--uri", "uris", multiple=True, metavar="URI", help="URI SAN, e.g. spiffe://example.org/svc (repeatable)."
)
@click.option("--ou", "ous", multiple=True, metavar="OU", help="Organizational Unit in the subject (repeatable).")
@click.option("--server", is_flag=True, help="For a TLS server (serverAuth). The default when --client is absent.")
@click.option("--client", is_flag=True, help="For a TLS client (clientAuth). With --server: for both.")
@click.option(
    "--days", type=click.IntRange(min=1), default=DEFAULT_LEAF_DAYS, show_default=True, help="Validity in days."
)
@click.option(
    "--rsa",
    "rsa_bits",
    type=click.Choice(["2048", "3072", "4096"]),
    help="Use an RSA key of this size instead of ECDSA P-256.",
)
@click.option(
    "--out", "out_dir", type=_DIR, default=DEFAULT_OUT_DIR, show_default=True, metavar="DIR", help="Output folder."
)
@click.option("--p12", is_flag=True, help="Also write NAME.p12, a PKCS#12 keystore with key, certificate and CA.")
@click.option(
    "--storepass", metavar="SECRET", help=f"Encrypt NAME.p12 with this password; implies --p12 ({_PASSWORD_FORMS})."
)
@click.option("--key-pass", metavar="SECRET", help=f"Encrypt NAME.key with this password ({_PASSWORD_FORMS}).")
@_ca_pass_option
@_force_option
def issue_command(
    ca_dir: Path,
    name: str,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    uris: tuple[str, ...],
    ous: tuple[str, ...],
    server: bool,
    client: bool,
    days: int,
    rsa_bits: str | None,
    out_dir: Path,
    p12: bool,
    storepass: str | None,
    key_pass: str | None,
    ca_pass: str | None,
    force: bool,
) -> None:
    """Issue a certificate: NAME.pem, NAME.key (0600), NAME-chain.pem (for --cert) and, with --p12, NAME.p12.

    \b
    Examples:
      tlsgate certs issue --name localhost                 # DNS:localhost, IP:127.0.0.1, IP:::1
      tlsgate certs issue --name alice --client --ou eng   # a client certificate for --allow-ou eng
    """
    # Resolve every secret before the CA records a serial, so a typo in a flag leaves no trace behind.
    key_password = _secret(key_pass, "--key-pass")
    p12_password = _secret(storepass, "--storepass")
    want_p12 = p12 or storepass is not None
    refuse_existing(IssuedCert.file_paths(out_dir, default_basename(name), p12=want_p12).values(), force=force)
    ca = CertificateAuthority.load(ca_dir, key_password=_secret(ca_pass, "--ca-pass"))
    if name.lower() == "localhost" and not dns and not ips:
        # Clients reach "localhost" by address too (curl https://127.0.0.1, browsers on ::1); like mkcert's
        # users, a local certificate names both loopback addresses, or every such client fails to verify.
        dns, ips = ("localhost",), ("127.0.0.1", "::1")
    leaf = ca.issue(
        name,
        dns=dns,
        ips=ips,
        uris=uris,
        ous=ous,
        server=server or not client,
        client=client,
        days=days,
        rsa_bits=int(rsa_bits) if rsa_bits else None,
    )
    paths = leaf.write(out_dir, key_password=key_password, p12_password=p12_password, p12=want_p12, force=force)
    roles = " and ".join(r for r, wanted in (("server", server or not client), ("client", client)) if wanted)
    until = leaf.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    click.echo(f"issued {roles} certificate {name!r} (serial {leaf.serial:x}, valid until {until})")
    notes = {
        "cert": "certificate",
        "key": "private key: keep it secret" + (" (encrypted)" if key_password else ""),
        "chain": "certificate + CA: use as --cert",
        "p12": "PKCS#12 keystore: use as --keystore" + ("" if p12_password else " (NOT encrypted)"),
    }
    for role, path in paths.items():
        click.echo(f"  {path}  {notes[role]}")


@certs.command("revoke")
@_ca_dir_option("Directory of the CA that issued the certificate.")
@click.argument("target", metavar="SERIAL|CERTFILE")
@click.option("--reason", type=click.Choice(REVOCATION_REASONS), help="RFC 5280 reason code, e.g. keyCompromise.")
@_ca_pass_option
def revoke_command(ca_dir: Path, target: str, reason: str | None, ca_pass: str | None) -> None:
    """Revoke a certificate, given as its file or its hex serial (as `certs show` prints it).

    The revocation is recorded in the CA directory; run `tlsgate certs crl` to publish it.

    \b
    Examples:
      tlsgate certs revoke certs/alice.pem --reason keyCompromise && tlsgate certs crl
    """
    ca = CertificateAuthority.load(ca_dir, key_password=_secret(ca_pass, "--ca-pass"))
    target_path = Path(target)
    if target_path.exists():
        revocation, new = ca.revoke(load_certificates(target_path)[0], reason=reason)
    else:
        try:
            serial = parse_serial(target)
        except ConfigError:
            raise ConfigError(f"{shown(target)}: neither a certificate file nor a hex serial number") from None
        revocation, new = ca.revoke(serial, reason=reason)
    when = revocation.revoked_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    why = f" ({revocation.reason.value})" if revocation.reason else ""
    if new:
        click.echo(f"revoked serial {revocation.serial:x}{why}; publish it with `tlsgate certs crl --ca {ca_dir}`")
    else:
        click.echo(f"serial {revocation.serial:x} was already revoked on {when}{why}")


@certs.command("crl")
@_ca_dir_option("Directory of the CA that signs the CRL.")
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Where to write the CRL. Default: certs/crl.pem (certs/crl.der with --der).",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=DEFAULT_CRL_DAYS,
    show_default=True,
    help="Days until next update: make a new CRL before then.",
)
@click.option("--der", is_flag=True, help="Write DER instead of PEM.")
@_ca_pass_option
@_force_option
def crl_command(ca_dir: Path, out_file: Path | None, days: int, der: bool, ca_pass: str | None, force: bool) -> None:
    """Sign a CRL listing every revoked certificate; servers read it with --crl FILE.

    \b
    Examples:
      tlsgate certs crl                                    # certs/crl.pem, replaced on every run
      tlsgate certs crl --out /etc/tlsgate/crl.pem --days 7
    """
    out = out_file or DEFAULT_OUT_DIR / ("crl.der" if der else "crl.pem")
    ca = CertificateAuthority.load(ca_dir, key_password=_secret(ca_pass, "--ca-pass"))
    # A CRL is derived output: publishing again after a revocation must just work, so an earlier CRL of this CA
    # is replaced without --force. Anything else at that path (a key, another CA's list) is refused first, so a
    # refused run does not use up a CRL number.
    replace = force or _is_crl_of(out, ca)
    refuse_existing([out], force=replace)
    crl = ca.build_crl(days=days)
    write_public_file(out, crl.public_bytes(Encoding.DER if der else Encoding.PEM), force=replace)
    count = sum(1 for _ in crl)
    next_update = crl.next_update_utc.strftime("%Y-%m-%d %H:%M:%S UTC") if crl.next_update_utc else "never"
    click.echo(f"wrote {out}: {count} revoked, next update {next_update}")


def _is_crl_of(path: Path, ca: CertificateAuthority) -> bool:
    """Whether ``path`` holds a CRL issued by ``ca`` (PEM or DER), i.e. an earlier `certs crl` output."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    try:
        crl = parse_crls(data)[0]
    except ValueError:
        return False
    return crl.issuer == ca.certificate.subject


@certs.command("show")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE...")
@click.option(
    "--storepass",
    "--key-pass",
    "password",
    metavar="SECRET",
    help=f"Password of a PKCS#12 file or an encrypted key ({_PASSWORD_FORMS}).",
)
def show_command(files: tuple[Path, ...], password: str | None) -> None:
    """Describe certificates (PEM, DER, chains), PKCS#12 keystores, private keys and CRLs.

    \b
    Examples:
      tlsgate certs show certs/localhost-chain.pem certs/crl.pem
    """
    secret = _secret(password, "--storepass")
    click.echo("\n\n".join(describe_file(path, password=secret) for path in files))
