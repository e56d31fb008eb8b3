"""The machinery under every set-up step: ``SetupPhase``, and ``SetupCore`` with the connection's state.

``SetupCore`` holds what a connection carries from accept to relay (sockets, peer, certificates, timer) and the
tools the steps in ``setup.Setup`` use: one readiness registration at a time (``_want``/``_unwant``), one deadline
(``_arm``), the guard every callback goes through (``step``), and the ways a set-up ends badly (``abort``,
``_refuse``, and the failure reports of the two handshakes and the target). Read ``setup.py`` first: its
docstring draws the phases.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tlsgate import logs
from tlsgate.engine.peer import reset
from tlsgate.engine.recheck import Origin
from tlsgate.engine.relay import Relay, release_sockets
from tlsgate.engine.routing import Route, chosen_route, route_field, route_refusal
from tlsgate.engine.runtime import Runtime
from tlsgate.engine.starttls import Opening
from tlsgate.policy.decision import Decision
from tlsgate.tls import internals
from tlsgate.tls.contexts import describe_handshake_error

if TYPE_CHECKING:
    from tlsgate.engine.tunnel import Tunnel


class SetupPhase(enum.Enum):
    """Where a connection's set-up is (the diagram is in ``setup.py``). Only ``RESOLVING`` and ``DONE`` decide
    anything; the others say where a set-up stands, for a reader and a debugger."""

    ACCEPTED = "accepted"
    PROXY_HEADER = "proxy header"
    OPENING = "opening"
    CLIENT_HANDSHAKE = "client handshake"
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    PROXY_HANDSHAKE = "proxy handshake"
    TARGET_OPENING = "target opening"
    TARGET_HANDSHAKE = "target handshake"
    DONE = "done"


# Module-level aliases for the phases the per-connection path reads or writes: on CPython 3.11 ``SetupPhase.DONE``
# goes through the enum metaclass and costs several times a global lookup, a few times per connection.
ACCEPTED, DONE = SetupPhase.ACCEPTED, SetupPhase.DONE


class SetupCore:
    """One connection from accept until its relay starts (or it is refused): its state and the step machinery."""

    __slots__ = (
        "_waiting",
        "addrs",
        "chain",
        "client",
        "client_fd",
        "connect_armed",
        "direct_tls",
        "forward",
        "identity",
        "leaf",
        "loop",
        "opening",
        "peer",
        "peer_addr",
        "peer_ip",
        "phase",
        "proxy_header",
        "proxy_seen",
        "route",
        "rt",
        "started",
        "target",
        "target_leaf",
        "timer",
        "tunnel",
        "via",
        "via_out",
    )

    # --proxy only: the handshake with the proxy (engine.viaproxy) and the bytes of it the socket has not taken
    # yet. Set by Setup._via_start, never read before: left unset otherwise, so a tunnel without --proxy pays
    # no store for them per connection.
    via: Any
    via_out: bytes

    def __init__(self, tunnel: Tunnel, rt: Runtime, sock: socket.socket, addr: Any, peer_ip: str, peer: str) -> None:
        assert tunnel.loop is not None
        self.tunnel = tunnel
        self.loop = tunnel.loop
        self.rt = rt
        self.client: socket.socket = sock
        self.client_fd = sock.fileno()
        self.peer_ip, self.peer = peer_ip, peer
        # The client's address as accept() gave it: a reset client's socket can no longer tell us.
        self.peer_addr = addr
        self.target: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._waiting: tuple[int, bool, Callable[[], None]] | None = None
        self.identity = ""
        # The peers' certificates as the handshakes' checks read them, kept for Tunnel.recheck.
        self.leaf: bytes | None = None
        self.chain: tuple[bytes, ...] | None = None
        self.target_leaf: bytes | None = None
        self.addrs: list[tuple[int, Any]] = []
        self.proxy_header: Any = None
        self.proxy_seen = b""  # bytes of a PROXY header taken off the socket so far
        # Whether the timer holds the connect deadline: not a phase, since a loopback connect never arms it and
        # the client's handshake deadline then stays armed through the connect.
        self.connect_armed = False
        self.started = time.monotonic()
        self.phase = ACCEPTED
        # A STARTTLS-style opening (tlsgate.engine.postgres) under way: --protocol, or the application's side
        # of --target-protocol in client mode.
        self.opening: Opening | None = None
        self.direct_tls = False  # the client sent its ClientHello without a PostgreSQL request first
        self.forward = b""  # bytes the opening took from the application that the target must get first
        # The route by server name the handshake picked (tunnels with routes only); self.rt is then its runtime.
        self.route: Route | None = None

    @property
    def done(self) -> bool:
        """True once the set-up has ended: its relay started, or it was refused or cut."""
        return self.phase is DONE

    # -- machinery ---------------------------------------------------------------------------------------------

    def _want(self, fd: int, readable: bool, callback: Callable[[], None]) -> None:
        waiting = self._waiting
        if waiting is not None:
            if waiting == (fd, readable, callback):
                return  # a handshake that needs another flight: already registered
            if waiting[:2] != (fd, readable):
                self._unwant()
        if readable:
            self.loop.add_reader(fd, self.step, callback)
        else:
            self.loop.add_writer(fd, self.step, callback)
        self._waiting = (fd, readable, callback)

    def _unwant(self) -> None:
        if self._waiting is not None:
            fd, readable, _ = self._waiting
            if readable:
                self.loop.remove_reader(fd)
            else:
                self.loop.remove_writer(fd)
            self._waiting = None

    def _arm(self, seconds: float, what: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(seconds, self.step, self.abort, what) if seconds > 0 else None

    def _target_handshake_limit(self) -> float:
        """What is left of --connect-timeout: as in ghostunnel, one deadline covers the connect (and a --proxy's
        answer) and the target's TLS handshake (a target that accepts and then never answers TLS is a dead target).
        With no connect limit (0, library use only: the flag refuses it) the handshake timeout applies, so the wait
        is never endless."""
        timeouts = self.tunnel.cfg.timeouts
        if timeouts.connect <= 0:
            return timeouts.handshake
        if self.connect_armed and self.timer is not None:
            # At least a millisecond: 0 would mean "no timer" to _arm.
            return max(self.timer.when() - self.loop.time(), 0.001)
        return timeouts.connect

    def _end(self) -> None:
        self.phase = DONE
        self._unwant()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tunnel.setup_done(self)

    def step(self, step: Callable[..., None], *args: Any) -> None:
        """Run one step of the set-up: the guard every callback of a set-up goes through (readiness, timers,
        the name lookup, the first step from accept).

        A step that raises is a bug: the connection is cut with "internal error: <type>" and the tunnel counts
        and logs it, instead of the exception reaching the event loop and the client waiting for a timeout.
        A wrapper frame costs nothing that matters here: a few steps per connection, beside a TLS handshake.
        """
        try:
            step(*args)
        except Exception as err:
            self.tunnel.internal_error(step.__name__.lstrip("_"), err, self.peer)
            self.cut(f"internal error: {type(err).__name__}")

    def cut(self, reason: str) -> None:
        """``abort`` that cannot fail: if abort itself breaks, still unregister and close what is ours."""
        try:
            self.abort(reason)
        except Exception:
            self.phase = DONE
            release_sockets(self.loop, (self.client, self.target))
            with contextlib.suppress(Exception):
                self.tunnel.setup_done(self)

    def abort(self, reason: str) -> None:
        """Give up on this connection: timeout, shutdown, or a failure already logged by the caller."""
        if self.phase is DONE:
            return
        if reason.endswith("timeout"):
            stats = self.tunnel.stats
            stats.handshake_errors += reason.startswith("handshake")
            stats.handshake_timeouts += reason == "handshake timeout"
            stats.connect_timeouts += reason in ("connect timeout", "target handshake timeout")
            logs.event(
                "setup failed", category="handshake-errs", tunnel=self.tunnel.label, peer=self.peer,
                reason=reason,
            )  # fmt: skip
        self._end()
        reset(self.client)
        if self.target is not None:
            reset(self.target)

    def _refuse(self, decision: Decision) -> None:
        stats = self.tunnel.stats
        stats.refuse(decision.rule)
        route = self._route_name()
        if route:
            stats.route_event(route, "refused")
        logs.event(
            "refused", category="conn-errs", tunnel=self.tunnel.label, peer=self.peer,
            identity=self.identity, rule=decision.rule, reason=decision.reason, **route_field(route),
        )  # fmt: skip
        self.abort("refused")

    def _route_name(self) -> str:
        """The route by server name this connection took, also while its handshake is under way (the SNI
        callback has picked it by then); "" on a tunnel without routes."""
        route = self.route
        if route is None and self.rt.routes is not None and isinstance(self.client, ssl.SSLSocket):
            route = chosen_route(self.client)
        return route.name if route is not None else ""

    def _target_address(self) -> str:
        return str(self.route.cfg.target if self.route is not None else self.tunnel.cfg.target)

    def _advance_handshake(self, tls: ssl.SSLSocket, retry: Callable[[], None], side: str) -> bool:
        """One step of a non-blocking handshake; True once it is complete."""
        try:
            internals.do_handshake(tls)
        except ssl.SSLWantReadError:
            self._want(tls.fileno(), True, retry)
            return False
        except ssl.SSLWantWriteError:
            self._want(tls.fileno(), False, retry)
            return False
        except ssl.SSLCertVerificationError as err:
            refusal = internals.take_refusal(tls.fileno()) if err.verify_code in internals.REFUSAL_CODES else None
            if refusal is None:
                self._handshake_failed(err, side)
            elif side == "client":
                # Refused inside the handshake (tlsgate.tls.internals, path "verify"): a failed handshake, like the
                # refusals OpenSSL makes itself, with the rule and reason of the post-handshake check.
                self.tunnel.stats.handshake_errors += 1
                self.identity = refusal.identity
                self._refuse(Decision(False, refusal.rule, refusal.reason))
            else:
                self._target_refused(Decision(False, refusal.rule, refusal.reason))
            return False
        except (ssl.SSLError, OSError) as err:
            self._handshake_failed(err, side)
            return False
        # The reader stays registered: the next step either waits on another socket (which replaces it) or
        # starts the relay, which only swaps the callback. On uvloop every deregister/register pair costs
        # about seven system calls (libuv re-checks and re-adds the descriptor), so we avoid the pair.
        if side == "client" and self.rt.routes is not None:
            return self._take_route(tls)
        return True

    def _take_route(self, tls: ssl.SSLSocket) -> bool:
        """Routes by server name: from here on the connection answers to the route the SNI callback picked (its
        rules, target and TLS hop: its runtime). False, refused, if it picked none: the callback refuses instead,
        so that would be a bug, and fails closed."""
        route = chosen_route(tls)
        if route is None:
            self._refuse(Decision(False, "route", "no route was picked during the handshake"))
            return False
        self.route, self.rt = route, route.runtime
        return True

    def _resolve(self, then: Callable[[list[tuple[int, Any]] | str | Exception], None]) -> None:
        """Look the target up, the route's when the connection took one; ``then`` gets the answer."""
        if self.route is None:
            self.tunnel.resolve(then)  # one argument: tests hold the step by replacing Tunnel.resolve
        else:
            self.tunnel.resolve(then, self.route)

    def _relay_closed(self) -> Callable[[Relay], None]:
        """What the relay calls when it ends: the tunnel's bookkeeping, with this connection's names."""
        tunnel, peer, identity, route = self.tunnel, self.peer, self.identity, self.route
        target = str(route.cfg.target if route is not None else tunnel.cfg.target)
        name = route.name if route is not None else ""
        return lambda relay: tunnel.relay_closed(relay, peer, identity, target, name)

    def _origin(self) -> Origin:
        """What the re-check on reload needs of this connection (see ``recheck.Origin``)."""
        route = self.route.name if self.route is not None else ""
        return Origin(self.peer_ip, self.identity, self.leaf, self.chain, self.target_leaf, route)

    def _handshake_failed(self, err: BaseException, side: str) -> None:
        if side == "client" and self.rt.routes is not None and isinstance(self.client, ssl.SSLSocket):
            refusal = route_refusal(self.client, err)
            if refusal is not None:  # no route for the client's server name: refused by the SNI callback
                self.tunnel.stats.handshake_errors += 1
                self._refuse(Decision(False, "route", refusal))
                return
        rule, reason = describe_handshake_error(err, side)
        if side == "client":
            self.tunnel.stats.handshake_errors += 1
            if rule != "handshake":
                self.tunnel.stats.refuse(rule)
        else:
            self.tunnel.stats.target_errors += 1
        logs.event(
            "refused" if rule != "handshake" and side == "client" else "handshake failed",
            category="handshake-errs", tunnel=self.tunnel.label, peer=self.peer, side=side, rule=rule,
            reason=reason, **route_field(self._route_name()),
        )  # fmt: skip
        self.abort("handshake failed")

    def _target_failed(self, reason: str) -> None:
        self.tunnel.stats.target_errors += 1
        cfg = self.tunnel.cfg
        # With --proxy the failure may be the proxy's: name it, never with its userinfo (ProxyURL.shown).
        via: dict[str, Any] = {} if cfg.proxy is None else {"proxy": cfg.proxy.shown}
        logs.event(
            "target unreachable", logging.WARNING, category="conn-errs", tunnel=self.tunnel.label,
            peer=self.peer, identity=self.identity, target=self._target_address(), reason=reason,
            **route_field(self._route_name()), **via,
        )  # fmt: skip
        self.abort("target unreachable")

    def _target_refused(self, decision: Decision) -> None:
        self.tunnel.stats.target_errors += 1
        logs.event(
            "target refused", logging.WARNING, category="conn-errs", tunnel=self.tunnel.label,
            peer=self.peer, target=self._target_address(), rule=decision.rule, reason=decision.reason,
            **route_field(self._route_name()),
        )  # fmt: skip
        self.abort("target identity")
