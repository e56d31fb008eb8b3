"""The per-connection set-up: from accept until the relay starts, or the connection is refused.

``Setup`` is a small callback state machine rather than a coroutine per connection: a Task costs more than
the handshake bookkeeping it would replace, and this path runs for every new connection. Nothing is sent to
the target before the client passed every rule; a refused client never causes a connection to the target.
The steps are here, in the order they run; the state they share and the machinery (readiness, deadline,
guard, abort) are in ``setupcore``. Where a set-up stands is one field, ``phase`` (a ``SetupPhase``)::

    accept -> ACCEPTED --(trusted PROXY source)--> PROXY_HEADER ---------+
                 |                                                     |  address rules
                 +--(TLS listener)---> [OPENING] --> CLIENT_HANDSHAKE <-+  (TLS listener)
                 |                                        |  identity rules
                 +--(plain listener)-> [OPENING] --> RESOLVING  (also from PROXY_HEADER, plain listener)
                                                          |  addresses (of the --proxy, if any): at once when
                                                          v  cached or a literal
                                                      CONNECTING --(--proxy)--> PROXY_HANDSHAKE
                                                          |                              |
                                                          +--(TLS target)--> [TARGET_OPENING]
                                                          |                              |
                                                          |                        TARGET_HANDSHAKE
                                                          |                              |  --verify-* rules
                                                          +--(relay started)--> DONE <---+

    any phase --(refused, failed, timed out, shut down: abort)--> DONE

``OPENING`` and ``TARGET_OPENING`` happen only with ``--protocol postgres`` and ``--target-protocol postgres``:
PostgreSQL's SSLRequest answered, or sent, before the TLS handshake (``tlsgate.engine.postgres``; on a plain
listener, client mode, the application's own requests are answered). Only two phases decide anything: a
lookup that answers after the set-up ended finds ``DONE`` and does nothing, and ``_connect`` knows the lookup
is still out while the phase is ``RESOLVING``. ``abort`` on a ``DONE`` set-up is a no-op, so a late timer or a
second shutdown cannot close anything twice.
"""

from __future__ import annotations

import bisect
import errno
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from tlsgate import logs
from tlsgate.engine import postgres, starttls
from tlsgate.engine.peer import NO_CLIENT_ADDRESS, proxy_endpoints, session_tlvs
from tlsgate.engine.proxywire import ProxyProtocolError
from tlsgate.engine.relay import Relay
from tlsgate.engine.setupcore import DONE, SetupPhase
from tlsgate.engine.setupvia import ViaProxySteps
from tlsgate.engine.sockets import host_port
from tlsgate.engine.stats import HANDSHAKE_BUCKETS
from tlsgate.errors import TlsgateError
from tlsgate.policy.chain import verified_chain
from tlsgate.policy.decision import Decision

# The phases as globals: on CPython 3.11 each ``SetupPhase.X`` goes through the enum metaclass (see setupcore).
_PROXY_HEADER = SetupPhase.PROXY_HEADER
_CLIENT_HANDSHAKE = SetupPhase.CLIENT_HANDSHAKE
_OPENING = SetupPhase.OPENING
_TARGET_OPENING = SetupPhase.TARGET_OPENING
_RESOLVING = SetupPhase.RESOLVING
_CONNECTING = SetupPhase.CONNECTING
_TARGET_HANDSHAKE = SetupPhase.TARGET_HANDSHAKE
_PROXY_HANDSHAKE = SetupPhase.PROXY_HANDSHAKE


class Setup(ViaProxySteps):
    """The steps of one connection's set-up, in the order they run (see the module docstring)."""

    __slots__ = ()

    def begin(self) -> None:
        cfg, sources = self.tunnel.cfg, self.rt.proxy_sources
        # A unix peer has no address to match; --accept-proxy-from unix trusts every peer of this socket.
        trusted = sources.active and sources.check(self.peer_ip).allowed if self.peer_ip else cfg.proxy_from_unix
        if trusted:
            self.phase = _PROXY_HEADER
            self._arm(cfg.timeouts.handshake, "handshake timeout")
            self._read_proxy_header()
            return
        # _on_accepted has checked TCP peers unless PROXY sources are set; a unix peer is checked here, and with
        # address rules it fails closed, since it has no address (config refuses that combination anyway).
        if (sources.active or not self.peer_ip) and not self._address_allowed():
            return
        self._after_proxy_header()

    def _address_allowed(self) -> bool:
        policy = self.rt.policy
        if not policy.addresses.active:
            return True
        decision = policy.check_address(self.peer_ip) if self.peer_ip else NO_CLIENT_ADDRESS
        if not decision.allowed:
            self._refuse(decision)
        return decision.allowed

    def _read_proxy_header(self) -> None:
        """Take exactly the PROXY header off the socket, however it is split, and not one byte more.

        The bytes after it are the ClientHello, which OpenSSL must read from the socket itself, so we peek and
        then consume only header bytes. A partial header is consumed too (every byte of it belongs to the
        header: ``parse`` answers "incomplete" only then) and kept in ``proxy_seen``: peeked bytes left queued
        would keep the socket readable, and waiting for more would spin. ``parse`` refuses as soon as the bytes
        cannot fit the bound, so ``proxy_seen`` stays under ``MAX_HEADER``. A partial header is followed by another
        peek at once: uvloop stops polling a reset socket once its reader ran; waiting would hold it to the deadline.
        """
        from tlsgate.engine import proxyproto

        while True:
            seen = self.proxy_seen
            try:
                data = self.client.recv(proxyproto.MAX_HEADER - len(seen), socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                self._want(self.client_fd, True, self._read_proxy_header)  # the same registration: no system call
                return
            except OSError:
                data = b""
            if not data:
                self.abort("client gone")
                return
            try:
                header = proxyproto.parse(seen + data)
            except ProxyProtocolError as err:
                self.tunnel.stats.proxy_header_errors += 1
                self._refuse(Decision(False, "proxy-protocol", f"bad PROXY header: {err}"))
                return
            wanted = len(data) if header is None else header.length - len(seen)
            try:
                taken = self.client.recv(wanted)
            except OSError:
                taken = b""
            if len(taken) != wanted:  # the kernel just showed us these bytes; anything else is a vanished peer
                self.abort("client gone")
                return
            if header is not None:
                break
            self.proxy_seen = seen + taken
        self._unwant()
        self.proxy_seen = b""
        self.proxy_header = header
        if header.source is not None:
            self.peer_ip = header.source[0]
            self.peer = f"{host_port(header.source[0], header.source[1])} via {self.peer}"
        if self._address_allowed():
            self._after_proxy_header()

    def _after_proxy_header(self) -> None:
        cfg = self.tunnel.cfg
        if self.rt.accept_ctx is None:
            if cfg.target_protocol == "postgres":
                self._begin_opening(postgres.AppOpening())
                return
            self._connect()
            return
        if cfg.protocol == "postgres":
            self._begin_opening(postgres.ServerOpening())
            return
        self._client_tls()

    def _begin_opening(self, opening: starttls.Opening) -> None:
        self.phase, self.opening = _OPENING, opening
        if self.timer is None:  # the handshake deadline covers the opening too: a client that stalls is cut
            self._arm(self.tunnel.cfg.timeouts.handshake, "handshake timeout")
        self._read_opening()

    def _read_opening(self) -> None:
        """One step of the client's opening: answer what it sent, then wait, refuse, start TLS or connect."""
        assert self.opening is not None
        while True:
            try:
                step = starttls.advance(self.client, self.opening)
            except BlockingIOError:
                self._want(self.client_fd, True, self._read_opening)  # the same registration: no system call
                return
            if step is None or step.then != "read":
                break  # after a "read" step (it took bytes), peek again at once, as _read_proxy_header does
        if step is None:
            self.abort("client gone")
        elif step.then == "refuse":
            self._refuse_opening(step)
        elif step.then == "tls":
            self.opening, self.direct_tls = None, step.direct
            self._client_tls()
        else:  # "relay": the application's StartupMessage is next; it goes to the target once TLS is up
            self.opening, self.forward = None, step.forward
            self._connect()

    def _refuse_opening(self, step: postgres.Step) -> None:
        if not step.reply:
            self._refuse(Decision(False, "postgres", step.reason))
            return
        self.tunnel.stats.refuse("postgres")
        logs.event(
            "refused", category="conn-errs", tunnel=self.tunnel.label, peer=self.peer, rule="postgres",
            reason=step.reason,
        )  # fmt: skip
        # A close, not a reset: the client must read the ErrorResponse it was just sent, and show it.
        self._end()
        self.client.close()

    def _client_tls(self) -> None:
        cfg, rt = self.tunnel.cfg, self.rt
        assert rt.accept_ctx is not None
        try:
            self.client = rt.accept_ctx.wrap_socket(self.client, server_side=True, do_handshake_on_connect=False)
        except OSError as err:
            self.abort(f"client gone ({err})")
            return
        self.phase = _CLIENT_HANDSHAKE
        if self.timer is None:  # a PROXY header came first: its deadline, set at accept, covers the handshake too
            self._arm(cfg.timeouts.handshake, "handshake timeout")
        self._client_handshake()

    def _client_handshake(self) -> None:
        tls: ssl.SSLSocket = self.client  # type: ignore[assignment]
        if not self._advance_handshake(tls, self._client_handshake, "client"):
            return
        stats = self.tunnel.stats
        stats.handshakes += 1
        elapsed = time.monotonic() - self.started
        stats.handshake_seconds_total += elapsed
        stats.handshake_samples.append(elapsed)
        bucket = bisect.bisect_left(HANDSHAKE_BUCKETS, elapsed)
        if bucket < len(HANDSHAKE_BUCKETS):
            stats.handshake_buckets[bucket] += 1
        policy = self.rt.policy
        if policy.identity is not None:
            leaf = tls.getpeercert(binary_form=True)
            chain = verified_chain(tls, leaf) if leaf and policy.revocation.active else ()
            self.leaf, self.chain = leaf, chain or None
            decision, identity = policy.check_peer(leaf, chain=chain)
            if identity is not None:
                self.identity = identity.describe()
            if not decision.allowed:
                self._refuse(decision)
                return
        if self.direct_tls and tls.selected_alpn_protocol() != postgres.ALPN:
            # PostgreSQL 17 refuses the same: without the ALPN name, the ClientHello may be meant for any protocol.
            reason = f"direct TLS without ALPN {postgres.ALPN!r} (PostgreSQL clients send it; or use an SSLRequest)"
            self._refuse(Decision(False, "postgres", reason))
            return
        self._connect()

    def _connect(self) -> None:
        self.phase = _RESOLVING
        self._resolve(self._on_resolved)
        if self.phase is _RESOLVING:
            # A name lookup runs off the loop; until it is back the client must not wake a finished step.
            self._unwant()
            self._arm_connect()

    def _arm_connect(self) -> None:
        # Armed only when we actually wait: a loopback target is connected before any timer could fire, and a
        # timer set and cancelled per connection is measurable. One deadline covers every address tried.
        if not self.connect_armed:
            self.connect_armed = True
            self._arm(self.tunnel.cfg.timeouts.connect, "connect timeout")

    def _on_resolved(self, result: list[tuple[int, Any]] | str | Exception) -> None:
        self.step(self._resolved, result)

    def _resolved(self, result: list[tuple[int, Any]] | str | Exception) -> None:
        if self.phase is DONE:
            return
        self.phase = _CONNECTING
        if isinstance(result, Exception):
            raise result  # a bug in the lookup's callback: reported and cut by step(), as the caller's own
        if isinstance(result, str):
            self._target_failed(result)
            return
        self.addrs = list(result)
        self._connect_next("")

    def _connect_next(self, last_error: str) -> None:
        if not self.addrs:
            self._target_failed(last_error or "no address")
            return
        family, sockaddr = self.addrs.pop(0)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as failure:  # EMFILE/ENFILE: fail this connection cleanly; the listener pauses on its own
            self._target_failed(f"cannot open a socket: {failure.strerror or failure}")
            return
        sock.setblocking(False)
        if family in (socket.AF_INET, socket.AF_INET6):  # not socket.AF_UNIX: Windows has none
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.target = sock
        err = sock.connect_ex(sockaddr)
        if err == 0:
            self._connected()
        elif err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            if _established(sock):
                # Loopback and same-host targets are connected by the time connect() returns: skip a loop
                # round trip and a writer registration.
                self._connected()
            else:
                self._arm_connect()
                self._want(sock.fileno(), False, self._connect_ready)
        else:
            sock.close()
            self.target = None
            self._connect_next(os.strerror(err))

    def _connect_ready(self) -> None:
        assert self.target is not None
        self._unwant()
        err = self.target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.target.close()
            self.target = None
            self._connect_next(os.strerror(err))
            return
        self._connected()

    def _connected(self) -> None:
        if self.tunnel.cfg.proxy is not None and self.phase is not _PROXY_HANDSHAKE:
            self._via_start()
            return
        if self.rt.target_ctx is None:
            self._start_relay()
            return
        if self.tunnel.cfg.target_protocol == "postgres":
            self._request_target_tls()
            return
        self._target_tls()

    def _request_target_tls(self) -> None:
        assert self.target is not None
        failure = starttls.request_tls(self.target)
        if failure:
            self._target_failed(failure)
            return
        self.phase = _TARGET_OPENING
        # One deadline (--connect-timeout) covers the connect, the request and the TLS handshake.
        self._arm(self._target_handshake_limit(), "target handshake timeout")
        self.connect_armed = True
        self._target_answered()

    def _target_answered(self) -> None:
        assert self.target is not None
        try:
            reason = starttls.target_answer(self.target)
        except BlockingIOError:
            self._want(self.target.fileno(), True, self._target_answered)
            return
        if reason:
            self._target_refused(Decision(False, "postgres", reason))
            return
        self._target_tls()

    def _target_tls(self) -> None:
        rt = self.rt
        assert self.target is not None and rt.target_ctx is not None
        try:
            self.target = rt.target_ctx.wrap_socket(
                self.target, server_hostname=rt.target_server_name, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as err:
            self._target_failed(f"TLS to target: {err}")
            return
        self.phase = _TARGET_HANDSHAKE
        self._arm(self._target_handshake_limit(), "target handshake timeout")
        self._target_handshake()

    def _target_handshake(self) -> None:
        tls: ssl.SSLSocket = self.target  # type: ignore[assignment]
        if not self._advance_handshake(tls, self._target_handshake, "target"):
            return
        rules = self.rt.target_identity
        if rules is not None:
            # The second line: the verify callback (tls.internals) refused during the handshake already, when on.
            self.target_leaf = tls.getpeercert(binary_form=True)
            decision = rules.check_certificate(self.target_leaf)
            if not decision.allowed:
                self._target_refused(decision)
                return
        self._start_relay()

    def _start_relay(self) -> None:
        tunnel, cfg = self.tunnel, self.tunnel.cfg
        assert self.target is not None
        if cfg.proxy_mode is not None and not self._send_proxy_header(cfg.proxy_mode):
            return
        if self.forward and not self._send_forward():
            return
        peer, closed = self.peer, self._relay_closed()
        if cfg.target_http_headers:
            relay: Relay | None = self._http_relay(closed)
            if relay is None:
                return
        else:
            relay = Relay(
                self.loop,
                self.client,
                self.target,
                tunnel.view,
                closed,
                started=self.started,
                peer=peer,
                on_error=tunnel.internal_error,
            )
        if self._waiting is not None and self._waiting[1]:
            self._waiting = None  # a reader the relay wants too: Relay.start() only swaps its callback
        self._end()
        try:
            tunnel.relay_started(relay, self._origin())
            relay.start()
        except Exception as err:  # the set-up has ended: the sockets are the relay's now, and so is the cut
            relay.internal_error("start", err)

    def _http_relay(self, on_close: Callable[[Relay], None]) -> Relay | None:
        """The relay for --target-http-headers, with this client's identity headers worked out once."""
        from tlsgate.engine.httprelay import HttpRelay
        from tlsgate.engine.xfcc import identity_headers

        client, cfg = self.client, self.tunnel.cfg
        assert self.target is not None
        tls = isinstance(client, ssl.SSLSocket)
        try:
            leaf = self.leaf or (client.getpeercert(binary_form=True) if tls else None)  # type: ignore[attr-defined]
            added = identity_headers(leaf=leaf, client_ip=self.peer_ip, tls=tls, with_cert=cfg.target_http_cert)
        except OSError as err:  # the client left: getpeercert asks getpeername first
            self.abort(f"client gone ({err})")
            return None
        except ValueError as err:
            # OpenSSL accepted the certificate, cryptography cannot read it: no header can describe it.
            self._refuse(Decision(False, "http", f"client certificate unreadable for X-Forwarded-Client-Cert: {err}"))
            return None
        return HttpRelay(
            self.loop,
            client,
            self.target,
            self.tunnel.view,
            on_close,
            started=self.started,
            added=added,
            peer=self.peer,
            on_error=self.tunnel.internal_error,
            stats=self.tunnel.stats,
        )

    def _send_proxy_header(self, mode: str) -> bool:
        """Tell the target who the client is, from what the connection itself showed, never a display string.

        The source is the address accept() returned (behind a trusted load balancer: the client its header
        named), because a client that reset right after sending leaves a socket that no longer knows its peer.
        ``mode`` (--proxy-protocol-mode) picks the TLVs (``peer.session_tlvs``), whose CN and SNI are sent whole.
        """
        from tlsgate.engine import proxyencode

        assert self.target is not None
        src, dst = proxy_endpoints(self.proxy_header, self.peer_addr, self.client)
        try:
            if self.tunnel.cfg.proxy_protocol_version == 1:
                header = proxyencode.encode_v1(src, dst)
            else:
                header = proxyencode.encode_v2(src, dst, tlvs=session_tlvs(self.client, mode))
        except OSError as err:
            self.abort(f"client gone ({err})")
            return False
        except (ValueError, TlsgateError) as err:
            self._target_failed(f"cannot build the PROXY header: {err}")
            return False
        try:
            sent = self.target.send(header)
        except OSError as err:
            self._target_failed(f"sending PROXY header: {err}")
            return False
        if sent != len(header):
            self._target_failed("target did not take the PROXY header at once")
            return False
        return True

    def _send_forward(self) -> bool:
        """Hand the target the bytes the opening took from the application (its StartupMessage's header)."""
        assert self.target is not None
        try:
            sent = self.target.send(self.forward)
        except OSError as err:  # ssl.SSLError included
            self._target_failed(f"sending the StartupMessage: {err}")
            return False
        if sent != len(self.forward):
            self._target_failed("target did not take the StartupMessage at once")
            return False
        return True


def _established(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: the handshake with the target is still under way
        return False
    return True
