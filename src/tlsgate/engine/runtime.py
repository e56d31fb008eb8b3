"""What a tunnel needs at run time, built from its config by reading files: TLS contexts and the policy.

Built at start-up (an error here is a one-line exit 2) and again on every reload (an error keeps the running
runtime and is logged). Connections keep the objects they started with, so swapping a Runtime never
disturbs an established connection.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from tlsgate import logs
from tlsgate.engine import postgres
from tlsgate.errors import CertificateError, ConfigError
from tlsgate.pki.names import EKU_NAMES
from tlsgate.policy.identity import IdentityRules
from tlsgate.policy.networks import AddressRules
from tlsgate.policy.policy import Policy, build_policy
from tlsgate.settings.config import TunnelConfig
from tlsgate.settings.table import CIPHER_SUITES, UNSAFE_CIPHER_SUITES
from tlsgate.tls import contexts as tlsctx
from tlsgate.tls import internals

if TYPE_CHECKING:
    from tlsgate.engine.routing import RouteTable
    from tlsgate.policy.rego import RegoPolicy


@dataclass(frozen=True)
class Runtime:
    # Server mode: the context clients handshake with. Client mode: None (clients speak plaintext to us).
    accept_ctx: ssl.SSLContext | None
    # Client mode, or server mode with --target-tls: the context for the TLS hop to the target.
    target_ctx: ssl.SSLContext | None
    # The name the target's certificate must carry (and the SNI we send).
    target_server_name: str | None
    policy: Policy
    # Identity rules for the target's certificate (client mode --verify-*); None checks the hostname only.
    target_identity: IdentityRules | None
    # Sources allowed to put a PROXY header in front of their connection.
    proxy_sources: AddressRules
    cert_not_after: float = 0.0
    loaded_at: float = field(default_factory=time.time)
    # Routes by server name (engine.routing); None for a tunnel without routes, which then pays nothing for them.
    routes: RouteTable | None = None


def build_runtime(cfg: TunnelConfig) -> Runtime:
    accept_ctx = target_ctx = None
    not_after = 0.0
    if cfg.mode == "server":
        pairs: list[tuple[str | None, str | None]] = list(zip(cfg.cert, cfg.key, strict=True)) or [(None, None)]
        materials = [
            tlsctx.load_key_material(
                cert=cert, key=key, keystore=cfg.keystore, storepass=cfg.storepass, key_pass=cfg.key_pass
            )
            for cert, key in pairs
        ]
        for (cert, _), material in zip(pairs, materials, strict=True):
            check_own_usage(material, "server", _flag_label(cert, cfg.keystore))
        pinned = bool(cfg.allow_spki_pin)
        # Under --allow-spki-pin no CA takes part (ghostunnel: --cacert "has no effect"), and no CRL can (refused).
        ca_certs = tlsctx.load_certificates(cfg.cacert, "--cacert") if cfg.cacert and not pinned else []
        policy = build_policy(cfg.access, ca_certs=ca_certs)
        if pinned and cfg.cacert:
            logs.event(
                "--cacert is not used under --allow-spki-pin: clients are authenticated by their key pin alone",
                logging.WARNING,
            )
        contexts = [
            tlsctx.server_context(
                material,
                client_ca=None if pinned else cfg.cacert,
                require_client_cert=not cfg.disable_authentication,
                alpn=_protocol_alpn(cfg.alpn, cfg.protocol),
                crl=cfg.crl,
                session_tickets=cfg.session_tickets,
                pins=policy.identity.pins.canonical() if policy.identity is not None else (),
            )
            for material in materials
        ]
        _cap_tls_version(cfg, contexts)
        accept_ctx = contexts[0]
        if len(contexts) > 1:
            by_name: dict[str, ssl.SSLContext] = {}
            for material, ctx in zip(materials, contexts, strict=True):
                for name in _dns_names(material):
                    by_name.setdefault(name, ctx)
            tlsctx.add_sni_certificates(accept_ctx, by_name)
        if cfg.proxy_mode in ("tls", "tls-full"):
            capture_sni(accept_ctx)
        not_after = min(m.leaf.not_valid_after_utc.timestamp() for m in materials)
        if policy.identity is not None:
            for ctx in contexts:
                installed = internals.install_peer_check(
                    ctx, _client_check(policy), wants_chain=policy.revocation.active, alone=pinned
                )
                if pinned and not installed:
                    raise ConfigError(_needs_verify_path("--allow-spki-pin"))
        target_identity = None
        if cfg.target_tls:
            client_material = None
            if cfg.target_cert and cfg.target_key:
                client_material = tlsctx.load_key_material(cert=cfg.target_cert, key=cfg.target_key)
                check_own_usage(client_material, "client", f"--target-cert {cfg.target_cert}")
            target_ctx = tlsctx.client_context(
                cafile=cfg.target_cacert,
                material=client_material,
                alpn=_protocol_alpn(cfg.alpn, cfg.target_protocol),
                what="--target-cacert",
            )
        server_name = cfg.target_server_name or (cfg.target.host or None)
    else:
        material = None
        if cfg.keystore or cfg.cert:
            material = tlsctx.load_key_material(
                cert=cfg.cert[0] if cfg.cert else None,
                key=cfg.key[0] if cfg.key else None,
                keystore=cfg.keystore,
                storepass=cfg.storepass,
                key_pass=cfg.key_pass,
            )
            check_own_usage(material, "client", _flag_label(cfg.cert[0] if cfg.cert else None, cfg.keystore))
            not_after = material.leaf.not_valid_after_utc.timestamp()
        target_ctx = tlsctx.client_context(
            cafile=cfg.cacert,
            material=material,
            alpn=_protocol_alpn(cfg.alpn, cfg.target_protocol),
            pinned=bool(cfg.verify_spki_pin),
        )
        policy = Policy(AddressRules(cfg.allow_from, cfg.deny_from), identity=None)
        target_identity = IdentityRules(
            cn=cfg.verify_cn,
            ou=cfg.verify_ou,
            dns=cfg.verify_dns,
            ip=cfg.verify_ip,
            uri=cfg.verify_uri,
            spki_sha256=cfg.verify_spki_sha256,
            spki_pins=cfg.verify_spki_pin,
            flag_prefix="verify",
            rego=_rego(cfg.verify_policy, cfg.verify_query, "verify"),
        )
        if not target_identity.active:
            target_identity = None
        else:
            pinned = target_identity.pinned
            installed = internals.install_peer_check(
                target_ctx, _target_check(target_identity), wants_chain=False, alone=pinned
            )
            if pinned and not installed:
                raise ConfigError(_needs_verify_path("--verify-spki-pin"))
        server_name = cfg.override_server_name or (cfg.target.host or None)
    _cap_tls_version(cfg, [target_ctx] if target_ctx is not None else [])
    runtime = Runtime(
        accept_ctx=accept_ctx,
        target_ctx=target_ctx,
        target_server_name=server_name,
        policy=policy,
        target_identity=target_identity,
        proxy_sources=AddressRules(allow_from=cfg.proxy_source_networks),
        cert_not_after=not_after,
    )
    if not cfg.route:
        return runtime
    from tlsgate.engine.routing import build_route_table

    table = build_route_table(cfg, runtime)
    # The first certificate to expire, of every route: the one an operator must renew first.
    expiries = [r.runtime.cert_not_after for r in table if r.runtime.cert_not_after] + [not_after]
    return replace(runtime, routes=table, cert_not_after=min(expiries))


def _protocol_alpn(alpn: tuple[str, ...], protocol: str | None) -> tuple[str, ...]:
    """``--alpn`` plus the protocol's own ALPN name: PostgreSQL 17 requires ``postgresql`` on a direct TLS
    connection and libpq 17 offers it on every one, so a ``--protocol postgres`` listener must be able to select
    it, and tlsgate offers it to a PostgreSQL target as libpq does."""
    if protocol == "postgres" and postgres.ALPN not in alpn:
        return (*alpn, postgres.ALPN)
    return alpn


def _needs_verify_path(flag: str) -> str:
    """The refusal of a pin flag where the verify path is off: a pinned context would refuse every self-signed
    peer (OpenSSL's verdict stands), and no public-API fallback is as safe (see docs/access-control.md)."""
    why = internals.why_off("verify") or "it could not be installed on the TLS context"
    return (
        f"{flag} needs the in-handshake verify callback, which is off here ({why}): "
        "without it tlsgate cannot accept a peer by its key pin alone, and will not accept unverified peers"
    )


def _cap_tls_version(cfg: TunnelConfig, contexts: list[ssl.SSLContext]) -> None:
    """``--max-tls-version TLS1.2`` and ``--cipher-suites``: every TLS context of the tunnel (accepting, SNI,
    and towards the target). Python's ssl sets TLS 1.2 suites only; TLS 1.3 keeps OpenSSL's three AEADs, as Go
    (and so ghostunnel) keeps its own: both are AEAD with forward secrecy."""
    ciphers = ":".join({**CIPHER_SUITES, **UNSAFE_CIPHER_SUITES}[name] for name in cfg.cipher_suites)
    for ctx in contexts:
        if cfg.max_tls_version == "TLS1.2":
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if ciphers:
            ctx.set_ciphers(ciphers)


def _rego(path: str | None, query: str | None, flag_prefix: str) -> RegoPolicy | None:
    """The compiled policy, read afresh on every (re)load: a failed reload keeps the running runtime and policy."""
    if path is None or query is None:
        return None
    from tlsgate.policy.rego import load_policy

    return load_policy(path, query, flag_prefix=flag_prefix)


def _client_check(policy: Policy) -> internals.PeerCheck:
    """Server mode: the client's certificate against the whole policy, during the handshake (see internals)."""

    def check(leaf: bytes, chain: tuple[bytes, ...]) -> internals.Refusal | None:
        decision, identity = policy.check_peer(leaf, chain=chain)
        if decision.allowed:
            return None
        return internals.Refusal(decision.rule, decision.reason, identity.describe() if identity else "")

    return check


def _target_check(rules: IdentityRules) -> internals.PeerCheck:
    """Client mode: the target's certificate against the ``--verify-*`` rules, during the handshake."""

    def check(leaf: bytes, _chain: tuple[bytes, ...]) -> internals.Refusal | None:
        decision = rules.check_certificate(leaf)
        return None if decision.allowed else internals.Refusal(decision.rule, decision.reason)

    return check


def _dns_names(material: tlsctx.KeyMaterial) -> list[str]:
    from cryptography import x509

    try:
        san = material.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name) for name in san.get_values_for_type(x509.DNSName)]


# -- does our own certificate fit the role we present it in? -------------------------------------------------------

_PURPOSE = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


def _flag_label(cert: str | None, keystore: str | None) -> str:
    return f"--cert {cert}" if cert else f"--keystore {keystore}"


def usage_verdict(leaf: x509.Certificate, role: str) -> tuple[str, str] | None:
    """Whether peers will accept ``leaf`` as a TLS ``role`` ("server" or "client") certificate, by its EKU.

    Returns None when it fits, else ``(severity, reason)`` with severity ``refuse`` or ``warn``. The extended key
    usage extension, when present, lists the roles a certificate may play; absent, it may play any. OpenSSL
    (curl, Python, tlsgate) then refuses a server certificate without ``serverAuth`` -- even one with
    ``anyExtendedKeyUsage``, which Go accepts -- and a client certificate without ``clientAuth``.

    Only a server certificate without either is refused: it fails every handshake (clients abort with
    "unsupported certificate purpose", our log says "sslv3 alert unsupported certificate"). With only
    ``anyExtendedKeyUsage`` it still works for Go clients, so that is a warning. A client certificate is a warning
    too: it is sent only to servers that ask, and a server that does not check its purpose accepts it.
    """
    try:
        usages = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None
    purpose = _PURPOSE[role]
    if purpose in usages:
        return None
    listed = ", ".join(_name(oid) for oid in usages)
    wanted = _name(purpose)
    if role == "server" and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        return "refuse", f"certificate is not for TLS servers (extended key usage: {listed}; {wanted} needed)"
    return "warn", f"certificate lacks {wanted} (extended key usage: {listed}): OpenSSL-based peers refuse it"


def check_own_usage(material: tlsctx.KeyMaterial, role: str, label: str) -> None:
    """Refuse (CertificateError: one line, exit 2) or log a warning per `usage_verdict` for our own certificate."""
    verdict = usage_verdict(material.leaf, role)
    if verdict is None:
        return
    severity, reason = verdict
    if severity == "refuse":
        # No flag names in the hint: check-config rewrites them into config-file keys.
        hint = "; use a server certificate, such as `tlsgate certs issue` makes by default"
        raise CertificateError(f"{label}: {reason}{hint}")
    logs.event(f"{label}: {reason}", logging.WARNING)


def _name(oid: ObjectIdentifier) -> str:
    return EKU_NAMES.get(oid, oid.dotted_string)


_SNI_ATTRIBUTE = "tlsgate_sni"


def capture_sni(ctx: ssl.SSLContext) -> None:
    """Remember on each connection the server name its client asked for; ``captured_sni`` reads it back.

    A server-side ``SSLSocket`` cannot tell its SNI afterwards (``server_hostname`` is the client side's), and
    ``--proxy-protocol-mode tls`` (and ``tls-full``) sends it to the target as ``PP2_TYPE_AUTHORITY``, so the
    context's SNI callback keeps it. Only those modes install it, since it is a Python call in every handshake.
    A callback already there (several certificates, picked by name) still runs, after ours.
    """
    chosen = ctx.sni_callback

    def remember(sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext) -> int | None:
        setattr(sslobj, _SNI_ATTRIBUTE, server_name)
        # typeshed types the callback narrower than the ssl module calls it (SSLSocket owners, None names).
        return chosen(sslobj, server_name, context) if chosen is not None else None  # type: ignore[arg-type]

    ctx.sni_callback = remember


def captured_sni(sock: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The SNI of a connection accepted on a context prepared by ``capture_sni``; None if the client sent none."""
    name = getattr(sock, _SNI_ATTRIBUTE, None)
    return name if isinstance(name, str) and name else None
