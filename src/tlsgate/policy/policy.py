"""The whole access policy of a tunnel: `Policy`, and `build_policy`, which makes one from the server flags.

`Policy` holds the `AddressRules`, the `IdentityRules` (None under ``--disable-authentication``) and the
`RevocationList`, built once per (re)load and then only read. `Policy.check_address` runs at accept;
`Policy.check_peer` after the handshake, in order: certificate present and readable, within its dates, not
revoked, allowed by an identity rule; under ``--allow-spki-pin`` only present, readable and pinned. It never
raises (an error is a refusal). `build_policy` makes one from
checked settings (``tlsgate.settings.access.ServerAccess``: the rules on which flags go together are applied
there, once). Read this module first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from tlsgate.errors import CertificateError
from tlsgate.policy.crl import RevocationList
from tlsgate.policy.decision import Decision, utc
from tlsgate.policy.identity import IdentityRules
from tlsgate.policy.networks import AddressRules
from tlsgate.policy.peer import PeerIdentity, check_validity
from tlsgate.settings.access import ServerAccess

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
        if self.identity.pinned:
            # Out-of-band key pinning, as ghostunnel's: the key is the whole authentication. Dates and CRLs belong
            # to a CA's chain of trust, which a pinned key does not use (--crl beside pins is refused).
            return self.identity.check(peer, leaf_der), peer
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


def build_policy(access: ServerAccess, *, ca_certs: Sequence[x509.Certificate] = ()) -> Policy:
    """The server-mode policy of checked access settings: a ``TunnelConfig``'s (``cfg.access``) or, from raw
    flag values, ``tlsgate.settings.config.server_access``'s, which applies ghostunnel's rules on which flags go
    together, in the words of the command line. Reads the CRL files (``ca_certs`` find the CA that signed each)
    and the Rego policy; ConfigError or CertificateError names a file that cannot be used."""
    rego = None
    if access.allow_policy is not None and access.allow_query is not None:
        from tlsgate.policy.rego import load_policy

        rego = load_policy(access.allow_policy, access.allow_query, flag_prefix="allow")
    identity = (
        None
        if access.disable_authentication
        else IdentityRules(
            allow_all=access.allow_all,
            cn=access.allow_cn,
            ou=access.allow_ou,
            dns=access.allow_dns,
            uri=access.allow_uri,
            spki_sha256=access.allow_spki_sha256,
            ip=access.allow_ip,
            rego=rego,
            spki_pins=access.allow_spki_pin,
        )
    )
    addresses = AddressRules(access.allow_from, access.deny_from)
    return Policy(addresses, identity, RevocationList.load(access.crl, ca_certs))
