"""Small facts about one connection's sockets, shared by the tunnel, the set-up and the re-check.

Who the peer is (``peer_of``), whether a socket is already dead (``pending_error``), where the target is when
no lookup is needed (``static_target``), the two ends and TLS facts a PROXY header we send carries
(``proxy_endpoints``, ``session_tlvs``), and how a refused connection is closed (``reset``: with a RST).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from typing import Any

from tlsgate.engine.relay import Relay
from tlsgate.engine.runtime import captured_sni
from tlsgate.engine.sockets import host_port
from tlsgate.policy.decision import Decision
from tlsgate.policy.peer import PeerIdentity
from tlsgate.settings.addresses import Address

# A unix peer, or a PROXY header without addresses (LOCAL, UNKNOWN, AF_UNIX), leaves nothing to match the
# --allow-from/--deny-from rules against: fail closed rather than let the rules go unapplied.
NO_CLIENT_ADDRESS = Decision(
    False, "address", "no client IP address to check --allow-from/--deny-from against (unix peer or PROXY LOCAL)"
)
# tcp_info.tcpi_state of a socket the kernel has finished with (linux/tcp_states.h): after a reset, a timeout,
# or both ends' FINs; a relay that is still open has not closed it, so its peer is gone.
_TCP_CLOSE = 7


def pending_error(relay: Relay) -> bool:
    """Abort ``relay`` if one of its sockets is dead (reset, timed out) without the relay having been told.

    The socket's pending error (SO_ERROR) is not enough: the first system call that meets it takes it away.
    A client that resets right after its Finished has its reset taken by OpenSSL's write of the session
    tickets inside the handshake, which still succeeds; the relay then starts on a socket that libuv has
    stopped polling, with no error left to find. So for TCP we ask for the state (one getsockopt as before):
    TCP_CLOSE on a socket we have not closed means the peer is gone for good, whichever call saw why.
    """
    for sock, side in ((relay.client, "client"), (relay.target, "target")):
        try:
            try:
                dead = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
            except OSError:  # not TCP (a unix socket target): its pending error is all there is to ask
                dead = True
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if dead else 0
        except OSError:  # closed meanwhile
            continue
        if err or (dead and sock.family != socket.AF_UNIX):
            reason = os.strerror(err).lower() if err else "connection reset (its error already taken)"
            relay.abort(f"{side} read: {reason}")
            return True
    return False


def static_target(target: Address) -> list[tuple[int, Any]] | None:
    if target.is_unix:
        return [(socket.AF_UNIX, target.path)]
    try:
        ip = ipaddress.ip_address(target.host)
    except ValueError:
        return None
    return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (target.host, target.port))]


def _sni_of(sock: ssl.SSLSocket) -> str | None:
    return captured_sni(sock)


def proxy_endpoints(header: Any, accepted: Any, sock: socket.socket) -> tuple[Any, Any]:
    """Source and destination of the PROXY header we send: the connection's own ends, as accept() saw them.

    A header from a trusted load balancer that carried addresses describes the real connection, so its two
    ends go on together (one family, one story). Otherwise the source is ``accepted`` and the destination the
    address the client reached; getsockname() still answers after a reset, unlike getpeername().
    """
    if header is not None and header.source is not None and header.destination is not None:
        return header.source, header.destination
    try:
        local = sock.getsockname()
    except OSError:
        local = None
    return accepted, local


def session_tlvs(sock: socket.socket, mode: str) -> list[tuple[int, bytes]]:
    """The PROXY v2 TLVs ``mode`` (ghostunnel's --proxy-protocol-mode) sends: none for ``conn``; the client's TLS
    session (ALPN, SNI, version, cipher) for ``tls``; that and the client certificate (its flags, its CN and
    its DER) for ``tls-full``. None for a plaintext client (client mode)."""
    from tlsgate.engine import proxyencode

    if mode == "conn" or not isinstance(sock, ssl.SSLSocket):
        return []
    full = mode == "tls-full"
    der = sock.getpeercert(binary_form=True)
    client_cn = None
    if der and full:
        # The policy parsed this certificate already (cached). Its CN is the one the policy matched: the last CN
        # attribute, as Go's Subject.CommonName that ghostunnel sends. Without one, no other name stands in.
        client_cn = PeerIdentity.from_der(der).common_name
    cipher = sock.cipher()
    return proxyencode.tls_tlvs(
        version=sock.version(),
        sni=_sni_of(sock),
        client_cn=client_cn,
        cipher=cipher[0] if cipher else None,
        # A certificate only reaches us verified: the context requires one or asks for none at all.
        verified=bool(der),
        has_client_cert=bool(der),
        alpn=sock.selected_alpn_protocol(),
        client_cert=der if full else None,
        certificate_details=full,
    )


def peer_of(addr: Any) -> tuple[str, str]:
    if isinstance(addr, tuple):
        return addr[0], host_port(addr[0], addr[1])
    return "", "unix"


def reset(sock: socket.socket) -> None:
    """Close so the peer gets a RST: nothing half-done looks like a clean end."""
    try:
        if sock.fileno() >= 0 and not isinstance(sock, ssl.SSLSocket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()
