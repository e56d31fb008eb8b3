"""``tlsgate policy check``: would the server let this client in, and if not, which rule says no?

What an operator runs when a client reports "I cannot connect". It takes the same access flags as
``tlsgate server`` and the client's certificate, runs every check the server runs, in the server's order, and
prints the verdict first, then each step, then the certificate's names next to the allowed ones.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tlsgate.cli.support import TlsgateGroup, access_options
from tlsgate.errors import CertificateError, ConfigError, shown
from tlsgate.policy.chain import verify_client_chain
from tlsgate.policy.decision import Decision
from tlsgate.policy.peer import PeerIdentity, check_validity
from tlsgate.policy.policy import Policy, build_policy
from tlsgate.process.crls import crl_warning, overdue_crls
from tlsgate.settings.access import ServerAccess
from tlsgate.settings.config import server_access
from tlsgate.settings.pins import KeyPin, PinSet
from tlsgate.tls.x509 import parse_certificates


@click.group(cls=TlsgateGroup)
def policy() -> None:
    """Check access-control rules without starting a tunnel."""


@dataclass(frozen=True)
class Step:
    """One check as ``policy check`` shows it: a Decision, or None with a note when it could not run."""

    name: str
    decision: Decision | None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.decision is not None and not self.decision.allowed


@policy.command("check")
@click.option(
    "--cert",
    "cert_path",
    metavar="FILE",
    help="The client's certificate: PEM (leaf first, then any intermediates) or DER.",
)
@click.option("--from", "source", metavar="IP", help="The address the client connects from.")
@click.option("--cacert", metavar="FILE", help="The CA bundle the server verifies clients with (PEM).")
@click.option("--disable-authentication", is_flag=True, help="Check as a server that asks for no client certificate.")
@click.option(
    "--at", "at", metavar="TIME", help="Check as of this UTC time (ISO 8601, e.g. 2026-07-01) instead of now."
)
@access_options
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    help="Take the access rules from this config file's server tunnel (and route, with --sni) instead of flags.",
)
@click.option(
    "--tunnel", "tunnel_name", metavar="NAME", help="With --config: the tunnel to check (default: the only one)."
)
@click.option(
    "--sni", metavar="NAME", help="With --config: the server name the client asks for; checks that route's rules."
)
@click.option(
    "--show-input", is_flag=True, help="Also print the input document an --allow-policy query is evaluated on."
)
@click.pass_context
def check(
    ctx: click.Context,
    /,
    cert_path: str | None,
    source: str | None,
    cacert: str | None,
    disable_authentication: bool,
    at: str | None,
    config_path: str | None,
    tunnel_name: str | None,
    sni: str | None,
    show_input: bool,
    **access: Any,
) -> None:
    """Would a server with these access flags accept this client? Prints ALLOW or DENY and why.

    Exit status: 0 ALLOW, 1 DENY, 2 bad input.

    \b
    Examples:
      tlsgate policy check --cert alice.pem --from 10.1.2.3 --cacert ca.pem \\
          --allow-ou eng --allow-from 10.0.0.0/8 --crl crl.pem
      tlsgate policy check --config tlsgate.toml --sni api.example.com --cert alice.pem
    """
    now = _parse_time(at)
    route_line, settings = "", None
    if config_path is not None or tunnel_name is not None or sni is not None:
        settings, cacert, route_line = _rules_from_config(
            config_path, tunnel_name, sni, access, cacert, disable_authentication
        )
        if settings is None:  # the name picks no route and the tunnel has no default: refused before any rule
            click.echo(f"DENY\nrule:   route\nreason: {route_line}")
            ctx.exit(1)
    if source is not None:
        _check_ip(source)
    chain = _load_certificates("--cert", cert_path) if cert_path else []
    ca_certs = _load_certificates("--cacert", cacert) if cacert else []
    if settings is None:
        settings = server_access(**access, disable_authentication=disable_authentication)
    rules = build_policy(settings, ca_certs=ca_certs)

    leaf = chain[0] if chain else None
    leaf_der = leaf.public_bytes(serialization.Encoding.DER) if leaf is not None else None
    steps, verified = _steps(rules, source, leaf, chain[1:], ca_certs, now, cacert_given=cacert is not None)
    # The server's own function decides the peer part, so this command cannot drift from what it enforces.
    peer_decision, peer = rules.check_peer(leaf_der, chain=_ders(verified), now=now)
    decision = next((s.decision for s in steps[:2] if s.failed and s.decision is not None), peer_decision)

    click.echo("ALLOW" if decision.allowed else "DENY")
    click.echo(f"rule:   {decision.rule}")
    click.echo(f"reason: {decision.reason}")
    if route_line:
        click.echo(f"route:  {route_line}")
    click.echo("")
    click.echo("checks, in the server's order:")
    for step in steps:
        click.echo(_format_step(step))
    if peer is not None and leaf is not None:
        click.echo("")
        _echo_certificate(cert_path or "", leaf, chain[1:], peer)
        if any(step.name == "identity" and step.failed for step in steps):
            click.echo("")
            _echo_identity_comparison(rules, peer)
    if show_input and leaf_der is not None:
        from tlsgate.policy.rego_input import peer_input_json

        click.echo("")
        click.echo("input of the policy (as ghostunnel gives it):")
        click.echo(peer_input_json(leaf_der))
    for crl in overdue_crls(rules.revocation.sources, now):
        click.echo(f"warning: {crl_warning(crl)}")
    hints = _hints(decision, rules, peer, leaf, ca_certs, _ders(verified))
    pinned = rules.identity is not None and rules.identity.pinned
    if decision.allowed and leaf is not None and rules.identity is not None and not ca_certs and not pinned:
        hints.append("the chain was not checked (no --cacert): the TLS handshake may still refuse this certificate")
    if hints:
        click.echo("")
        for hint in hints:
            click.echo(f"hint: {hint}")
    if not decision.allowed:
        ctx.exit(1)


def _rules_from_config(
    config_path: str | None,
    tunnel_name: str | None,
    sni: str | None,
    access: dict[str, Any],
    cacert: str | None,
    disable_authentication: bool,
) -> tuple[ServerAccess | None, str | None, str]:
    """The access settings and CA bundle of a config file's tunnel, or of the route that ``sni`` picks there,
    and a line saying which route that is (no settings: the name is refused before any rule runs, and the line
    says why). Flags that set rules too are refused: the answer would be about neither the file nor the flags."""
    from tlsgate.settings.file import read_config_file
    from tlsgate.settings.routes import DEFAULT_ROUTE, NameTable

    if config_path is None:
        raise ConfigError("--sni and --tunnel need --config FILE: routes are configured in a file")
    given = [name for name, value in access.items() if value not in (None, (), [], False)]
    if given or disable_authentication:
        flag = "--" + (given[0] if given else "disable_authentication").replace("_", "-")
        raise ConfigError(f"--config takes the rules from the file: drop {flag}")
    loaded = read_config_file(config_path)
    if loaded.problems:
        raise ConfigError(f"--config {config_path}: {loaded.problems[0]}")
    servers = [cfg for cfg in loaded.tunnels if cfg.mode == "server"]
    if tunnel_name is not None:
        servers = [cfg for cfg in servers if cfg.name == tunnel_name]
        if not servers:
            raise ConfigError(f"--tunnel {shown(tunnel_name)}: no server tunnel of that name in {config_path}")
    if len(servers) != 1:
        names = ", ".join(cfg.name for cfg in servers) or "none"
        raise ConfigError(f"--config {config_path}: give --tunnel NAME, one of the server tunnels ({names})")
    cfg, line = servers[0], ""
    if sni is not None:
        table = NameTable((name, route) for route in cfg.route for name in route.server_names)
        route = table.match(sni)
        if route is not None:
            cfg, line = route.cfg, route.name
        elif cfg.route_default:
            line = f"{DEFAULT_ROUTE} (no route claims {sni})"
        else:
            return None, None, f"no route for server name {sni!r}, and the tunnel has no default target"
    return cfg.access, cacert or cfg.cacert, line


def _steps(
    rules: Policy,
    source: str | None,
    leaf: x509.Certificate | None,
    intermediates: Sequence[x509.Certificate],
    ca_certs: Sequence[x509.Certificate],
    now: datetime,
    *,
    cacert_given: bool,
) -> tuple[list[Step], tuple[x509.Certificate, ...]]:
    """Every check, each run even after an earlier one failed: the operator may have two problems, not one.

    Also returns the chain to check for revocation, leaf first: the verified one when the chain was checked,
    else the leaf and the intermediates as given (the server checks the chain it verified; the best we can do).
    """
    steps = []
    if source is not None:
        steps.append(Step("address", rules.check_address(source)))
    elif rules.addresses.active:
        steps.append(Step("address", None, f"not checked: give --from IP ({rules.addresses.summary()})"))
    else:
        steps.append(Step("address", rules.check_address("")))

    if rules.identity is None:
        note = "client certificates are not asked for (--disable-authentication)"
        steps.append(Step("chain", None, note))
        steps.append(Step("identity", rules.check_peer(None)[0]))
        return steps, ()
    if leaf is None:
        steps.append(Step("chain", None, "no certificate given (--cert FILE)"))
        steps.append(Step("certificate", rules.check_peer(None)[0]))
        return steps, ()

    chain: tuple[x509.Certificate, ...] = (leaf, *intermediates)
    if rules.identity.pinned:
        return _pinned_steps(steps, rules, leaf), chain
    if cacert_given:
        decision, verified = verify_client_chain(leaf, intermediates, ca_certs, now=now)
        steps.append(Step("chain", decision))
        chain = verified or chain
    else:
        steps.append(Step("chain", None, "not checked: give --cacert FILE to check it as the TLS handshake does"))
    try:
        peer = PeerIdentity.from_certificate(leaf)
    except CertificateError as err:
        steps.append(Step("certificate", Decision(False, "bad-cert", f"client {err}")))
        return steps, chain
    steps.append(Step("validity", check_validity(peer, now=now, role="client")))
    if rules.revocation.active:
        revoked = rules.revocation.check(peer) or rules.revocation.check_chain(_ders(chain))
        if revoked is None:
            checked = "the leaf only" if len(chain) == 1 else f"all {len(chain)} certificates of the chain"
            revoked = Decision(True, "crl", f"not in {rules.revocation.summary()} (checked {checked})")
        steps.append(Step("revocation", revoked))
    else:
        steps.append(Step("revocation", None, "no --crl given"))
    steps.append(Step("identity", rules.identity.check(peer, leaf.public_bytes(serialization.Encoding.DER))))
    return steps, chain


def _pinned_steps(steps: list[Step], rules: Policy, leaf: x509.Certificate) -> list[Step]:
    """``--allow-spki-pin``: the server looks at the key and nothing else, so the other steps say they do not run."""
    alone = "not checked: --allow-spki-pin authenticates by the pin alone"
    steps.append(Step("chain", None, f"{alone} (no CA, as in ghostunnel)"))
    try:
        peer = PeerIdentity.from_certificate(leaf)
    except CertificateError as err:
        steps.append(Step("certificate", Decision(False, "bad-cert", f"client {err}")))
        return steps
    steps.append(Step("validity", None, f"{alone} (dates: {_when(peer.not_before)} to {_when(peer.not_after)})"))
    assert rules.identity is not None
    steps.append(Step("identity", rules.identity.check(peer)))
    return steps


def _ders(chain: Sequence[x509.Certificate]) -> tuple[bytes, ...]:
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)


def _format_step(step: Step) -> str:
    if step.decision is None:
        return f"  skip  {step.name:<11} {step.note}"
    mark = "ok  " if step.decision.allowed else "FAIL"
    return f"  {mark}  {step.name:<11} {step.decision.reason}"


def _echo_certificate(
    path: str, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], peer: PeerIdentity
) -> None:
    rows = [
        ("subject", leaf.subject.rfc4514_string() or "(empty)"),
        ("issuer", peer.issuer or "(empty)"),
        ("serial", f"{peer.serial:#x}"),
        ("valid", f"{_when(peer.not_before)} to {_when(peer.not_after)}"),
        ("CN", _common_name(peer)),
        ("OU", _values(peer.organizational_units)),
        ("DNS SAN", _values(peer.dns_names)),
        ("URI SAN", _values(peer.uris)),
        ("IP SAN", _values(peer.ip_addresses)),
        ("SPKI sha256", peer.spki_sha256),
        ("SPKI pin", str(KeyPin.of(peer.spki_der)) if peer.spki_der else "-"),
    ]
    if intermediates:
        rows.append(("also in file", "; ".join(c.subject.rfc4514_string() for c in intermediates)))
    click.echo(f"certificate {path}:")
    for label, value in rows:
        click.echo(f"  {label:<12} {value}")


def _hints(
    decision: Decision,
    rules: Policy,
    peer: PeerIdentity | None,
    leaf: x509.Certificate | None,
    ca_certs: Sequence[x509.Certificate],
    chain: Sequence[bytes],
) -> list[str]:
    """What to do next, for the refusals people actually meet."""
    rule = decision.rule
    if rule in ("allow-from", "deny-from", "address"):
        return [
            "the server closes such connections at accept, before the TLS handshake: the client sees the "
            "connection reset or closed, not a TLS alert"
        ]
    if rule == "untrusted" and leaf is not None and any(ca.subject == leaf.issuer for ca in ca_certs):
        return ["the TLS handshake refuses this certificate for the reason above; issue one that meets it"]
    if rule == "untrusted" and leaf is not None:
        bundle = "; ".join(ca.subject.rfc4514_string() for ca in ca_certs) or "nothing"
        return [
            f"the TLS handshake fails: the certificate was issued by {leaf.issuer.rfc4514_string()}, "
            f"--cacert holds {bundle}",
            "if an intermediate CA issued it, the client must send it: put it after the leaf in --cert",
        ]
    if rule in ("expired", "not-yet-valid"):
        return ["the TLS handshake fails on this certificate; issue a new one (tlsgate certs issue)"]
    if rule == "crl" and peer is not None:
        source = rules.revocation.revoked_by(peer)
        if source is None and (source := rules.revocation.chain_revoked_by(chain)) is not None:
            return [f"a CA of the chain is revoked by {source}: every certificate it issued is refused"]
        return [f"revoked by {source or 'a --crl file'}; issue the client a new certificate (tlsgate certs issue)"]
    if rule == "bad-cert":
        return ["the server refuses a certificate it cannot parse, even from a trusted CA; issue a new one"]
    if rule == "no-client-cert":
        return [
            "the client must present a certificate, e.g. curl --cert FILE --key FILE, "
            "openssl s_client -cert FILE -key FILE, or tlsgate client --cert FILE --key FILE"
        ]
    if rule == "identity":
        return ["add a rule that matches (see above), or issue the client a certificate with an allowed name"]
    if rule == "spki-pin" and peer is not None and peer.spki_der:
        return [
            f"this key is not pinned: --allow-spki-pin {KeyPin.of(peer.spki_der)} lets it in (a pin names the key, "
            "so it stays valid when the certificate is renewed with the same key)"
        ]
    return []


def _echo_identity_comparison(rules: Policy, peer: PeerIdentity) -> None:
    """The allowed values beside the certificate's own, so the mismatch is seen at a glance."""
    identity = rules.identity
    assert identity is not None
    rows = [
        (flag, _values(allowed), f"{label}: {_values(actual)}")
        for flag, allowed, label, actual in (
            ("--allow-cn", identity.cn, "CN", () if peer.common_name is None else (peer.common_name,)),
            ("--allow-ou", identity.ou, "OU", peer.organizational_units),
            ("--allow-dns", identity.dns, "DNS SAN", peer.dns_names),
            ("--allow-uri", identity.uri, "URI SAN", peer.uris),
            ("--allow-spki-sha256", identity.spki_sha256, "SPKI sha256", (peer.spki_sha256,)),
            ("--allow-spki-pin", identity.pins.canonical(), "SPKI pin", _own_pins(identity.pins, peer)),
        )
        if allowed
    ]
    if not rows:
        return
    click.echo("identity rules (any one must match) vs this certificate:")
    flag_width = max(len(row[0]) for row in rows)
    allowed_width = min(max(len(row[1]) for row in rows), 60)
    for flag, allowed, actual in rows:
        click.echo(f"  {flag:<{flag_width}}  {allowed:<{allowed_width}}  certificate {actual}")


def _own_pins(pins: PinSet, peer: PeerIdentity) -> tuple[str, ...]:
    """The certificate's key pinned with each algorithm the rules use, to set beside them."""
    algorithms = dict.fromkeys(pin.algorithm for pin in pins.pins)
    return tuple(str(KeyPin.of(peer.spki_der, algorithm)) for algorithm in algorithms) if peer.spki_der else ()


def _load_certificates(flag: str, path: str) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CertificateError(f"{flag}: cannot read {path}: {err.strerror or err}") from None
    try:
        return parse_certificates(data, path)
    except CertificateError:
        # Worded for this command, whose errors lead with the flag; the reading is tls/x509.py's.
        raise CertificateError(
            f"{flag}: {path} holds no certificate (expected PEM 'CERTIFICATE' blocks or DER)"
        ) from None


def _check_ip(source: str) -> None:
    try:
        ipaddress.ip_address(source.partition("%")[0])
    except ValueError:
        raise ConfigError(f"--from: {shown(source)} is not an IP address (like 10.1.2.3 or 2001:db8::7)") from None


def _parse_time(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--at: {shown(text)} is not a time (use ISO 8601 like 2026-07-01 or 2026-07-01T12:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _common_name(peer: PeerIdentity) -> str:
    if peer.common_name is None:
        return "-"
    if not peer.other_common_names:
        return peer.common_name
    ignored = ", ".join(peer.other_common_names)
    return f"{peer.common_name} (the last CN counts, as in ghostunnel; ignored: {ignored})"


def _values(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "-"


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"
