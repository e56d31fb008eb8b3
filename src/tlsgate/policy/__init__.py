"""Who may connect, and why not: address rules, identity rules and revocation, as plain values in and out.

The package is sans-IO. It never reads or writes a socket: callers hand it a source address string or the DER
bytes of a peer certificate (and, for tests and ``policy check``, the time), and get back a `Decision` that
says whether the peer may go on, which rule decided (`Decision.rule`, a short id for logs and metrics) and why
(`Decision.reason`, a sentence for a person). Only loading CRL files and Rego bundles reads the disk, once, at
start-up or reload; `verified_chain` reads a property of a finished handshake from a live socket, no I/O.

A server checks in this order, stopping at the first refusal:

1. the source address (`Policy.check_address`, rules in `networks`), at accept, before any TLS byte is read;
2. the certificate chain, by OpenSSL during the handshake (`chain.verify_client_chain` reproduces it for
   ``policy check``);
3. the peer certificate (`Policy.check_peer`): present and readable (`peer`), within its validity period, not
   revoked by a CRL nor any CA of its verified chain (`crl`), and matching at least one identity rule
   (`identity`, the Rego policy in `rego`).

Rules come in parsed and checked by ``tlsgate.settings`` (networks, IP addresses, key pins as 32 bytes, URI
patterns: ``settings.values``, ``settings.patterns``; which flags go together: ``settings.access``); nothing
here parses a setting's text or re-checks the combinations. `build_policy` takes a ``ServerAccess``.

Identity rules are OR'd with each other, like ghostunnel's ``--allow-*`` flags; the address rules and the
identity rules are AND'd: a client must pass both.

Modules, lowest first: `decision` (the `Decision` value and how reasons word names, dates and lists) ·
`peer` (`PeerIdentity`: what we read from a certificate) · `networks` (``--allow-from``/``--deny-from``) ·
`identity` (`IdentityRules`: ``--allow-*``/``--verify-*``) · `crl`
(`RevocationList`) · `chain` (the verified chain of a connection; chain verification for ``policy check``) ·
`policy` (`Policy`, which puts them together, and `build_policy`, from checked settings) · `rego` and
`rego_input` (the optional OPA policy and the input document it sees, loaded only when a policy is given).

A newcomer reads `policy` first (it is short and calls everything else in order), then `identity`.
"""

from tlsgate.policy.chain import verified_chain as verified_chain
from tlsgate.policy.chain import verify_chain as verify_chain
from tlsgate.policy.chain import verify_client_chain as verify_client_chain
from tlsgate.policy.crl import CrlSource as CrlSource
from tlsgate.policy.crl import RevocationList as RevocationList
from tlsgate.policy.decision import Decision as Decision
from tlsgate.policy.identity import IdentityRules as IdentityRules
from tlsgate.policy.networks import AddressRules as AddressRules
from tlsgate.policy.peer import PeerIdentity as PeerIdentity
from tlsgate.policy.peer import check_validity as check_validity
from tlsgate.policy.policy import Policy as Policy
from tlsgate.policy.policy import build_policy as build_policy

__all__ = [
    "AddressRules",
    "CrlSource",
    "Decision",
    "IdentityRules",
    "PeerIdentity",
    "Policy",
    "RevocationList",
    "build_policy",
    "check_validity",
    "verified_chain",
    "verify_chain",
    "verify_client_chain",
]
