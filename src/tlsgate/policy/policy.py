"""The whole access policy of a tunnel: `Policy`, and `build_policy`, which makes one from the server flags.

`Policy` holds the `AddressRules`, the `IdentityRules` (None under ``--disable-authentication``) and the
`RevocationList`, built once per (re)load and then only read. `Policy.check_address` runs at accept;
`Policy.check_peer` after the handshake, in order: certificate present and readable, within its dates, not
revoked, allowed by an identity rule; it never raises (an error is a refusal). `build_policy` applies
ghostunnel's rules on which flags go together. Read this module first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509

from tlsgate.errors import CertificateError, ConfigError
from tlsgate.policy.crl import RevocationList
from tlsgate.policy.decision import Decision, utc
from tlsgate.policy.identity import IdentityRules
from tlsgate.policy.networks import AddressRules
from tlsgate.policy.peer import PeerIdentity, check_validity

_NO_AUTHENTICATION = Decision(True, "no-authentication", "--disable-authentication: no client certificate is asked")


@dataclass(frozen=True)
class Policy:
    """Everything that decides whether a peer may connect, built once per (re)load and then only read.

    ``identity`` is None under ``--disable-authentication``: no client certificate is asked for or checked.
    """

    addresses: AddressRules
    identity: IdentityRules | None
    revocation: RevocationList = field(default_factory=RevocationList)

    @property
    def role(self) -> str:
        """Who the peer is, for reasons: the client in server mode (``--allow-*``), else the server."""
        return "server" if self.identity is not None and self.identity.flag_prefix == "verify" else "client"

    def check_address(self, ip: str) -> Decision:
        """At accept, before the handshake."""
        return self.addresses.check(ip)

    def check_peer(
        self, leaf_der: bytes | None, *, chain: Sequence[bytes] = (), now: datetime | None = None
    ) -> tuple[Decision, PeerIdentity | None]:
        """After the handshake: certificate present and readable, in its dates, not revoked (the leaf nor any
        certificate of ``chain``, the verified chain as DER, leaf first), and allowed by an identity rule.

        Returns the decision and the parsed identity (for the log line), None when there is no certificate or
        it cannot be read. Never raises: the engine calls this from an event-loop callback, where an exception
        would fire again each time the socket is readable, so every failure is a refusal (fail closed).
        """
        try:
            return self._check_peer(leaf_der, chain, now)
        except Exception as err:
            # A bug of ours, not the peer's doing; still one refusal and one log line, never a loop.
            return Decision(False, "policy-error", f"internal error checking the certificate: {err!r}"[:200]), None

    def _check_peer(
        self, leaf_der: bytes | None, chain: Sequence[bytes], now: datetime | None
    ) -> tuple[Decision, PeerIdentity | None]:
        if self.identity is None:
            return _NO_AUTHENTICATION, None
        role = self.role
        if not leaf_der:
            return Decision(False, f"no-{role}-cert", f"no {role} certificate"), None
        try:
            peer = PeerIdentity.from_der(leaf_der)
        except CertificateError as err:
            return Decision(False, "bad-cert", f"{role} {err}"), None
        now = utc(now)
        if not peer.not_before <= now <= peer.not_after:
            # Only a refusal pays for formatting dates.
            return check_validity(peer, now=now, role=role), peer
        revoked = self.revocation.check(peer) or self.revocation.check_chain(chain)
        if revoked is not None:
            return revoked, peer
        return self.identity.check(peer, leaf_der), peer

    def summary(self) -> str:
        """One line for the start-up log."""
        identity = "authentication disabled" if self.identity is None else self.identity.summary()
        return f"identity: {identity}; address: {self.addresses.summary()}; revocation: {self.revocation.summary()}"


def build_policy(
    *,
    allow_all: bool = False,
    allow_cn: Iterable[str] = (),
    allow_ou: Iterable[str] = (),
    allow_dns: Iterable[str] = (),
    allow_uri: Iterable[str] = (),
    allow_spki_sha256: Iterable[str] = (),
    allow_ip: Iterable[str] = (),
    allow_from: Iterable[str] = (),
    deny_from: Iterable[str] = (),
    crl: Iterable[str | Path] = (),
    ca_certs: Sequence[x509.Certificate] = (),
    disable_authentication: bool = False,
    allow_policy: str | None = None,
    allow_query: str | None = None,
) -> Policy:
    """The server-mode policy from the ``access_options`` flags, with ghostunnel's rules on which go together.

    As in ghostunnel, ``--allow-policy``/``--allow-query`` go together and exclude every other identity flag
    (``--allow-all``, ``--allow-cn`` ... and ``--disable-authentication``): the policy is the whole rule.
    """
    identity_flags = {
        "--allow-cn": tuple(allow_cn),
        "--allow-ou": tuple(allow_ou),
        "--allow-dns": tuple(allow_dns),
        "--allow-uri": tuple(allow_uri),
        "--allow-spki-sha256": tuple(allow_spki_sha256),
        "--allow-ip": tuple(allow_ip),
    }
    given = [flag for flag, values in identity_flags.items() if values]
    crl_paths = tuple(crl)
    if (allow_policy is None) != (allow_query is None):
        raise ConfigError("--allow-policy and --allow-query go together: give both, or neither")
    if allow_policy is not None:
        if disable_authentication:
            raise ConfigError("--disable-authentication contradicts --allow-policy: no client certificate to check")
        if allow_all or given:
            other = "--allow-all" if allow_all else given[0]
            raise ConfigError(
                f"--allow-policy/--allow-query and {other} are mutually exclusive (as in ghostunnel: "
                "put every rule in the policy)"
            )
    if disable_authentication:
        if allow_all or given:
            flag = "--allow-all" if allow_all else given[0]
            raise ConfigError(
                f"--disable-authentication contradicts {flag}: without client certificates it cannot match"
            )
        if crl_paths:
            raise ConfigError("--disable-authentication contradicts --crl: no client certificate is asked to revoke")
    elif not allow_all and not given and allow_policy is None:
        raise ConfigError(
            "server mode needs --allow-all, --allow-cn, --allow-ou, --allow-dns, --allow-uri, --allow-spki-sha256, "
            "--allow-policy/--allow-query or --disable-authentication"
        )
    if allow_all and given:
        raise ConfigError(
            f"--allow-all and {given[0]} are mutually exclusive (--allow-all already allows every client)"
        )
    addresses = AddressRules.parse(allow_from, deny_from)
    rego = None
    if allow_policy is not None and allow_query is not None:
        from tlsgate.policy.rego import load_policy

        rego = load_policy(allow_policy, allow_query, flag_prefix="allow")
    identity = (
        None
        if disable_authentication
        else IdentityRules.parse(
            allow_all=allow_all,
            cn=identity_flags["--allow-cn"],
            ou=identity_flags["--allow-ou"],
            dns=identity_flags["--allow-dns"],
            uri=identity_flags["--allow-uri"],
            spki_sha256=identity_flags["--allow-spki-sha256"],
            ip=identity_flags["--allow-ip"],
            rego=rego,
        )
    )
    return Policy(addresses, identity, RevocationList.load(crl_paths, ca_certs))
