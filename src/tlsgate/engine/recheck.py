"""Re-checking open connections after a reload: ``Origin`` (what the set-up learnt) and ``recheck``.

``Setup`` keeps an ``Origin`` per relay it starts; on reload ``Tunnel.recheck`` asks ``recheck`` whether the new
rules still let each open connection through, from the remembered address and certificates (or, where the
handshake did not look, from the socket).
"""

from __future__ import annotations

import ssl
from typing import NamedTuple

from tlsgate.engine.peer import NO_CLIENT_ADDRESS
from tlsgate.engine.relay import Relay
from tlsgate.engine.runtime import Runtime
from tlsgate.policy.chain import verified_chain
from tlsgate.policy.decision import Decision


class Origin(NamedTuple):
    """What a relay's set-up learnt about its peers, kept for ``Tunnel.recheck``: references to values the
    handshake already built (the leaf's DER, the verified chain), never copies, and nothing the relay reads.
    A tuple: one is built per connection, and a tuple is the cheapest thing to build.

    ``peer_ip`` is the address the rules matched (a trusted PROXY header's source, else accept()'s); ``leaf`` and
    ``chain`` are the client's certificate and verified chain in server mode, ``target_leaf`` the target's
    certificate on a TLS hop. None where the handshake did not look (no rule asked): the re-check then asks the
    socket.
    """

    peer_ip: str
    identity: str
    leaf: bytes | None
    chain: tuple[bytes, ...] | None
    target_leaf: bytes | None
    # The route by server name the connection took ("" on a tunnel without routes): the re-check uses that
    # route's rules in the new runtime, and closes the connection if the route is gone.
    route: str = ""


def recheck(relay: Relay, origin: Origin | None, runtime: Runtime) -> Decision | None:
    """The refusal ``runtime``'s rules give the open ``relay`` now, or None when it may carry on."""
    if origin is not None and origin.route:
        # A routed connection answers to its route's rules in the new runtime; a route that is gone closes it.
        routes = runtime.routes
        route = routes.by_name.get(origin.route) if routes is not None else None
        if route is None:
            return Decision(False, "route", f"route {origin.route!r} was removed")
        runtime = route.runtime
    policy = runtime.policy
    peer_ip = origin.peer_ip if origin is not None else ""
    if policy.addresses.active:
        # No address (unix peer, PROXY LOCAL) fails closed, as it does at accept.
        decision = policy.check_address(peer_ip) if peer_ip else NO_CLIENT_ADDRESS
        if not decision.allowed:
            return decision
    client = relay.client
    if policy.identity is not None and isinstance(client, ssl.SSLSocket):
        leaf = origin.leaf if origin is not None else None
        leaf = leaf or _peer_certificate(client)
        chain = origin.chain if origin is not None else None
        if leaf and policy.revocation.active and chain is None:
            chain = _chain_of(client, leaf)
        decision, _ = policy.check_peer(leaf, chain=chain or ())
        if not decision.allowed:
            return decision
    rules, target = runtime.target_identity, relay.target
    if rules is not None and isinstance(target, ssl.SSLSocket):
        target_leaf = origin.target_leaf if origin is not None else None
        decision = rules.check_certificate(target_leaf or _peer_certificate(target))
        if not decision.allowed:
            return decision
    return None


def _peer_certificate(tls: ssl.SSLSocket) -> bytes | None:
    """The peer's leaf, asked of the socket when the handshake had no rule that read it."""
    try:
        return tls.getpeercert(binary_form=True)
    except (OSError, ValueError):  # a socket whose peer has gone: getpeercert asks getpeername first
        sslobj = getattr(tls, "_sslobj", None)
        return sslobj.getpeercert(True) if sslobj is not None else None


def _chain_of(tls: ssl.SSLSocket, leaf: bytes) -> tuple[bytes, ...]:
    try:
        return verified_chain(tls, leaf)
    except (OSError, ValueError):
        return (leaf,)
