"""One listener and its connections: accept -> address policy -> handshake -> identity policy -> connect -> relay.

Set-up is a small callback state machine (``_Setup``) rather than a coroutine per connection: a Task costs more
than the handshake bookkeeping it would replace, and this path runs for every new connection. Nothing is sent
to the target before the client passed every rule; a refused client never causes a connection to the target.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tlsgate import logs
from tlsgate.engine.relay import Relay, release_sockets
from tlsgate.engine.runtime import Runtime, captured_sni
from tlsgate.engine.sockets import bind_listeners, host_port
from tlsgate.errors import TlsgateError
from tlsgate.policy import Decision, PeerIdentity, verified_chain
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import Timeouts, TunnelConfig
from tlsgate.tls import internals
from tlsgate.tls.contexts import describe_handshake_error

_ACCEPT_BATCH = 64
_BUFFER_SIZE = 64 * 1024
_RESOLVE_TTL = 30.0
# After EMFILE/ENFILE, pause accepting this long: retrying at once would spin on the same error.
_FD_EXHAUSTED_PAUSE = 0.5
# A unix peer, or a PROXY header without addresses (LOCAL, UNKNOWN, AF_UNIX), leaves nothing to match the
# --allow-from/--deny-from rules against: fail closed rather than let the rules go unapplied.
_NO_CLIENT_ADDRESS = Decision(
    False, "address", "no client IP address to check --allow-from/--deny-from against (unix peer or PROXY LOCAL)"
)
# tcp_info.tcpi_state of a socket the kernel has finished with (linux/tcp_states.h): after a reset, a timeout,
# or both ends' FINs; a relay that is still open has not closed it, so its peer is gone.
_TCP_CLOSE = 7
# Upper bounds (seconds) of the handshake-latency histogram in /metrics: from a resumed handshake on a LAN to
# a slow client far away. A handshake slower than the last bound counts in ``handshakes`` only (+Inf).
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# How many recent handshake and connection durations ghostunnel-style timers keep for their min/max/mean and
# percentiles (/_metrics): the reservoir size ghostunnel's go-metrics timers use.
TIMER_SAMPLES = 1028


@dataclass
class Stats:
    """Counters for status, metrics and tests. Plain ints: increments sit on the hot path."""

    accepted: int = 0
    established: int = 0
    closed: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    handshake_errors: int = 0
    target_errors: int = 0
    proxy_header_errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    handshake_seconds_total: float = 0.0
    handshakes: int = 0
    lifetime_seconds_total: float = 0.0
    accept_errors: int = 0
    reloads: int = 0
    reload_errors: int = 0
    # Exceptions caught by the guard around the engine's event-loop callbacks: bugs, each cut one connection.
    internal_errors: int = 0
    # Handshakes per HANDSHAKE_BUCKETS bucket (not cumulative: status adds them up for Prometheus).
    handshake_buckets: list[int] = field(default_factory=lambda: [0] * len(HANDSHAKE_BUCKETS))
    # Client handshakes cut by --handshake-timeout (also in handshake_errors): ghostunnel's accept.timeout.
    handshake_timeouts: int = 0
    # Targets that did not connect (or finish their TLS handshake) within --connect-timeout: conn.timeout.
    connect_timeouts: int = 0
    # The last TIMER_SAMPLES durations, in seconds, of client handshakes and of relayed connections.
    handshake_samples: deque[float] = field(default_factory=lambda: deque(maxlen=TIMER_SAMPLES))
    lifetime_samples: deque[float] = field(default_factory=lambda: deque(maxlen=TIMER_SAMPLES))
    # Open connections a reload's re-check closed, by the rule that no longer lets them through.
    rechecked_closed: dict[str, int] = field(default_factory=dict)

    def refuse(self, rule: str) -> None:
        self.refused[rule] = self.refused.get(rule, 0) + 1


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


class Tunnel:
    def __init__(self, cfg: TunnelConfig, runtime: Runtime, *, reuse_port: bool = False) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.reuse_port = reuse_port
        self.stats = Stats()
        self.relays: set[Relay] = set()
        # Each open relay's peers, for re-checking them on reload (see recheck).
        self.origins: dict[Relay, Origin] = {}
        self.setups: set[_Setup] = set()
        self.listeners: list[socket.socket] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.accepting = False
        self.draining = False
        self._idle = asyncio.Event()
        self._view = memoryview(bytearray(_BUFFER_SIZE))
        self._sweeper: asyncio.TimerHandle | None = None
        # uvloop only: an epoll set of every relayed socket, watched for errors alone (see _watch_errors).
        self._uvloop = False
        self._error_watch: select.epoll | None = None
        self._error_watch_failed = False
        self._watched: dict[int, Relay] = {}
        self._resolved: tuple[float, list[tuple[int, Any]]] | None = None
        # A unix path or an IP literal needs no lookup: work it out once, not per connection.
        self._static_target = _static_target(cfg.target)
        self._fd_warned = False
        self.last_reload = time.time()
        self.label = cfg.label

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self.relays) + len(self.setups)

    @property
    def addresses(self) -> list[str]:
        """Where this tunnel listens, with the real port when --listen asked for port 0."""
        out = []
        for sock in self.listeners:
            name = sock.getsockname()
            if isinstance(name, str):
                out.append(f"unix:{name}")
            else:
                out.append(str(Address(host=name[0], port=name[1])))
        return out

    def start(self, loop: asyncio.AbstractEventLoop, listeners: list[socket.socket] | None = None) -> None:
        self.loop = loop
        self.listeners = listeners if listeners is not None else bind_listeners(self.cfg.listen, self.reuse_port)
        # Logs name the tunnel by its config name, else by where it really listens (port 0 resolved).
        self.label = self.cfg.name or ",".join(self.addresses)
        self._uvloop = self._poll_drops_errors
        self._resume_accepting()
        self._schedule_sweep()

    def _resume_accepting(self) -> None:
        if self.accepting or self.draining or self.loop is None:
            return
        self.accepting = True
        try:
            for sock in self.listeners:
                self.loop.add_reader(sock.fileno(), self._accept, sock)
        except Exception as err:  # also a call_later callback (after EMFILE): guarded like every other
            self.internal_error("resume accepting", err, "")

    def _pause_accepting(self) -> None:
        if not self.accepting or self.loop is None:
            return
        self.accepting = False
        for sock in self.listeners:
            self.loop.remove_reader(sock.fileno())

    def stop_listening(self) -> None:
        self._pause_accepting()
        for sock in self.listeners:
            name = sock.getsockname()
            sock.close()
            # A systemd socket's path belongs to its .socket unit (owner, mode): never ours to remove.
            if isinstance(name, str) and name and not name.startswith("\0") and not self.cfg.listen.is_activated:
                with contextlib.suppress(OSError):
                    os.unlink(name)
        self.listeners = []

    def hand_over_listeners(self) -> list[socket.socket]:
        """Give the bound sockets to a replacement tunnel (config reload) without closing the port."""
        self._pause_accepting()
        listeners, self.listeners = self.listeners, []
        return listeners

    def take_back_listeners(self, listeners: list[socket.socket]) -> None:
        self.listeners = listeners
        self._resume_accepting()

    async def drain(self, timeout: float) -> int:
        """Stop accepting, let open connections finish for up to ``timeout`` seconds, then cut the rest.

        Returns how many connections had to be cut.
        """
        self.draining = True
        self.stop_listening()
        if self.active:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout if timeout > 0 else None)
        cut = self.abort_all("shutdown timeout")
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._stop_watching_errors()
        return cut

    def abort_all(self, reason: str) -> int:
        doomed = list(self.relays) + list(self.setups)
        for item in doomed:
            item.abort(reason)
        return len(doomed)

    def reload(self, runtime: Runtime) -> None:
        """New connections use ``runtime``; established ones keep what they started with (see ``recheck``)."""
        self.runtime = runtime
        self.last_reload = time.time()
        self.stats.reloads += 1

    def recheck(self, runtime: Runtime) -> int:
        """Check every open connection's peer again against ``runtime``'s rules; close those no longer allowed.

        A reload that revokes a certificate or removes a rule would otherwise leave every connection made under
        the old rules running for as long as it lasts (ghostunnel#380). The checks are the handshake's own: the
        address rules on the address they matched, ``Policy.check_peer`` on the remembered leaf and verified
        chain (so a CRL that now lists an intermediate counts too), and in client mode the ``--verify-*`` rules
        on the target's certificate. The CA bundle is not re-applied: OpenSSL verified the chain against the
        bundle of its day, and only a new handshake can verify it again.

        Each closed connection gets one WARNING line naming the rule and reason, and counts in
        ``stats.rechecked_closed`` by rule. Returns how many were closed. Never raises: the supervisor calls it
        from a signal handler or a timer.
        """
        closed = 0
        for relay in list(self.relays):
            if relay.closed:
                continue
            origin = self.origins.get(relay)
            try:
                decision = _recheck(relay, origin, runtime)
            except Exception as err:  # a bug: fail closed for this connection, as the handshake would
                relay.internal_error("recheck", err)
                continue
            if decision is None:
                continue
            closed += 1
            try:
                self.stats.rechecked_closed[decision.rule] = self.stats.rechecked_closed.get(decision.rule, 0) + 1
                logs.event(
                    "closed on recheck", logging.WARNING, tunnel=self.label, peer=relay.peer,
                    identity=origin.identity if origin else "", rule=decision.rule, reason=decision.reason,
                )  # fmt: skip
                relay.abort(f"recheck: {decision.rule}")
            except Exception as err:
                relay.internal_error("recheck", err)
        return closed

    # -- accept ----------------------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        limit = self.cfg.max_concurrent_conns
        # socket.accept() converts the listener's family and type to enums for every connection; do it once.
        accept, family = internals.raw_accept(listener), int(listener.family)
        for _ in range(_ACCEPT_BATCH):
            if limit and self.active >= limit:
                # Excess clients wait in the kernel's backlog instead of being refused mid-handshake.
                self._pause_accepting()
                return
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._accept_failed(err)
                return
            self.stats.accepted += 1
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            try:
                self._on_accepted(sock, addr)
            except Exception as err:
                self._accept_crashed(err, sock, addr)

    def _accept_failed(self, err: OSError) -> None:
        self.stats.accept_errors += 1
        if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            if not self._fd_warned:
                logs.event("accept paused", logging.WARNING, tunnel=self.label, reason=os.strerror(err.errno or 0))
                self._fd_warned = True
            self._pause_accepting()
            assert self.loop is not None
            self.loop.call_later(_FD_EXHAUSTED_PAUSE, self._resume_accepting)

    def _on_accepted(self, sock: socket.socket, addr: Any) -> None:
        peer_ip, peer = _peer_of(addr)
        runtime = self.runtime
        if peer_ip and runtime.policy.addresses.active and not runtime.proxy_sources.active:
            decision = runtime.policy.check_address(peer_ip)
            if not decision.allowed:
                self._refuse_early(sock, peer, decision)
                return
        sock.setblocking(False)
        if peer_ip:  # TCP (unix peers have no address); sock.family would build an enum per connection
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._fd_warned:
            self._fd_warned = False
            logs.event("accept resumed", tunnel=self.label)
        setup = _Setup(self, runtime, sock, addr, peer_ip, peer)
        self.setups.add(setup)
        setup.step(setup.begin)

    def _accept_crashed(self, err: Exception, sock: socket.socket, addr: Any) -> None:
        """The guard of ``_accept`` for one connection: cut it (and its set-up, if one began), keep accepting."""
        self.internal_error("accept", err, _peer_of(addr)[1])
        fd = sock.fileno()
        for setup in [s for s in self.setups if s.client_fd == fd]:
            setup.cut(f"internal error: {type(err).__name__}")
        if sock.fileno() >= 0:
            _reset(sock)

    def internal_error(self, where: str, err: Exception, peer: str) -> None:
        """Count and log an exception that one of the engine's event-loop callbacks caught: a bug, never the
        network's fault (those are handled where they happen). The caller then cuts its connection.

        Every callback the engine gives the loop (accept, each set-up step and timer, the name lookup, the
        relay's reads and writes, the sweep) ends in here rather than letting the exception reach the loop,
        which would only print it and leave the connection registered and stuck until a timeout. One line at
        ERROR, whatever --quiet says; the traceback only at DEBUG, since it may show connection data.
        """
        try:
            self.stats.internal_errors += 1
            logs.event(
                "internal error", logging.ERROR, tunnel=self.label, peer=peer, where=where,
                error=type(err).__name__,
            )  # fmt: skip
            logs.LOGGER.debug("internal error in %s", where, exc_info=err)
        except Exception:  # the guard must not raise; the logs already drop what they cannot write
            pass

    def _refuse_early(self, sock: socket.socket, peer: str, decision: Decision) -> None:
        self.stats.refuse(decision.rule)
        logs.event(
            "refused", category="conn-errs", tunnel=self.label, peer=peer, rule=decision.rule,
            reason=decision.reason,
        )  # fmt: skip
        _reset(sock)

    # -- bookkeeping called by _Setup and Relay --------------------------------------------------------------

    def setup_done(self, setup: _Setup) -> None:
        self.setups.discard(setup)
        self._maybe_idle()

    def relay_started(self, relay: Relay, origin: Origin | None = None) -> None:
        self.relays.add(relay)
        if origin is not None:
            self.origins[relay] = origin
        self.stats.established += 1
        if self._uvloop and not self._error_watch_failed:
            self._watch_errors(relay)

    def relay_closed(self, relay: Relay, peer: str, identity: str, target: str) -> None:
        self.relays.discard(relay)
        self.origins.pop(relay, None)
        if self._watched:
            # Closing the sockets took them out of the epoll set; forget them before their numbers are reused.
            self._watched.pop(relay.outbound.src_fd, None)
            self._watched.pop(relay.inbound.src_fd, None)
        stats = self.stats
        stats.closed += 1
        stats.bytes_in += relay.bytes_in
        stats.bytes_out += relay.bytes_out
        duration = time.monotonic() - relay.started
        stats.lifetime_seconds_total += duration
        stats.lifetime_samples.append(duration)
        logs.event(
            "closed", category="conns", tunnel=self.label, peer=peer, identity=identity, target=target,
            bytes_in=relay.bytes_in, bytes_out=relay.bytes_out, duration=f"{duration:.3f}s", end=relay.end,
        )  # fmt: skip
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        limit = self.cfg.max_concurrent_conns
        if limit and not self.accepting and self.active < limit:
            self._resume_accepting()
        if not self.active:
            self._idle.set()

    def resolve(self, callback: Callable[[list[tuple[int, Any]] | str | Exception], None]) -> None:
        """Target addresses for connect(); cached for a short while, looked up off the loop thread.

        ``callback`` gets the addresses, a reason string when the name does not resolve, or the exception of a
        bug; it must not raise (``_Setup`` passes a guarded step).
        """
        target = self.cfg.target
        if self._static_target is not None:
            callback(self._static_target)
            return
        now = time.monotonic()
        if self._resolved and self._resolved[0] > now:
            callback(self._resolved[1])
            return
        assert self.loop is not None
        lookup = self.loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)

        def done(future: asyncio.Future[list[Any]]) -> None:
            try:
                infos = future.result()
                addrs = [(info[0], info[4]) for info in infos]
                self._resolved = (time.monotonic() + _RESOLVE_TTL, addrs)
            except (OSError, UnicodeError) as err:
                callback(f"cannot resolve {target.host}: {err}")
                return
            except asyncio.CancelledError:  # the loop is closing; not an Exception, so caught by name
                callback(f"cannot resolve {target.host}: lookup cancelled")
                return
            except Exception as err:  # a bug, not a lookup failure: the callback's guard reports it
                callback(err)
                return
            callback(addrs)

        asyncio.ensure_future(lookup).add_done_callback(done)

    # -- timeouts --------------------------------------------------------------------------------------------

    @property
    def _poll_drops_errors(self) -> bool:
        # On POLLERR (a peer's reset) libuv stops an add_reader() poll for good; uvloop then runs the reader once.
        # A reader that finds data queued before the reset relays it and waits for more, which never comes: the
        # error would go unseen. _watch_errors() and, failing that, the sweep ask the kernel instead.
        return type(self.loop).__module__.startswith("uvloop")

    def _watch_errors(self, relay: Relay) -> None:
        """On uvloop, learn of a reset on either socket of ``relay`` within one turn of the loop.

        libuv drops a descriptor from its poll set at POLLERR and uvloop calls the reader once; if that read
        returns bytes that arrived before the reset, the relay goes back to waiting on a descriptor nobody polls
        any more, until the sweep asks the kernel. So relayed sockets also go into an epoll set of our own,
        asking for no events: epoll reports EPOLLERR (and EPOLLHUP) regardless, and that set's descriptor is one
        reader on the loop. Cost: one epoll_ctl per socket at relay start; closing a socket removes it. Where
        that fails (not Linux, out of epoll watches), the sweep asks every relay's sockets once per interval.
        """
        assert self.loop is not None
        try:
            watch = self._error_watch
            if watch is None:
                watch = self._error_watch = select.epoll()
                self.loop.add_reader(watch.fileno(), self._on_socket_errors)
            for fd in (relay.outbound.src_fd, relay.inbound.src_fd):
                # No events asked for: epoll reports EPOLLERR and EPOLLHUP anyway. One-shot, so a socket that
                # hangs up cleanly (both FINs) is reported once, not at every turn of the loop.
                watch.register(fd, select.EPOLLONESHOT)
                self._watched[fd] = relay
        except (OSError, AttributeError):  # no epoll, or fs.epoll.max_user_watches reached
            self._error_watch_failed = True
            self._stop_watching_errors()

    def _stop_watching_errors(self) -> None:
        watch, self._error_watch = self._error_watch, None
        self._watched.clear()
        if watch is not None:
            if self.loop is not None and not self.loop.is_closed():
                self.loop.remove_reader(watch.fileno())
            watch.close()

    def _on_socket_errors(self) -> None:
        try:
            watch = self._error_watch
            if watch is None:
                return
            for fd, _ in watch.poll(0):
                relay = self._watched.pop(fd, None)
                if relay is not None and not relay.closed:
                    relay.socket_error(fd)
        except Exception as err:
            self.internal_error("socket errors", err, "")

    def _schedule_sweep(self) -> None:
        t = self.cfg.timeouts
        limits = [x for x in (t.idle, t.max_conn_lifetime, t.close) if x > 0]
        if self.loop is None or not (limits or self._poll_drops_errors):
            return
        interval = max(0.05, min(1.0, min(limits) / 4)) if limits else 1.0
        self._sweeper = self.loop.call_later(interval, self._sweep, interval)

    def _sweep(self, interval: float) -> None:
        """Idle, lifetime and half-close limits (and, on uvloop, unseen resets) in one pass, not a timer each.

        A failure with one relay cuts that relay only; the next pass is scheduled whatever happens, or every
        timeout of the tunnel would silently stop.
        """
        try:
            t = self.cfg.timeouts
            now = time.monotonic()
            for relay in list(self.relays):
                try:
                    self._sweep_one(relay, t, now)
                except Exception as err:
                    relay.internal_error("sweep", err)
        except Exception as err:
            self.internal_error("sweep", err, "")
        finally:
            if self.loop is not None and not self.loop.is_closed():
                self._sweeper = self.loop.call_later(interval, self._sweep, interval)

    def _sweep_one(self, relay: Relay, t: Timeouts, now: float) -> None:
        total = relay.outbound.nbytes + relay.inbound.nbytes
        if total != relay.last_total:
            relay.last_total, relay.last_change = total, now
        elif t.idle and now - relay.last_change >= t.idle:
            relay.abort("idle timeout")
            return
        # Without the epoll watch, every relay, moving or not: an unseen reset then waits one interval, not two.
        if self._error_watch_failed and _pending_error(relay):
            return
        if t.max_conn_lifetime and now - relay.started >= t.max_conn_lifetime:
            relay.abort("max connection lifetime")
        elif t.close and relay.half_closed_at and now - relay.half_closed_at >= t.close:
            relay.abort(f"close timeout ({relay.end})")


class _Setup:
    """One connection from accept until its relay starts (or it is refused)."""

    __slots__ = (
        "_waiting",
        "addrs",
        "chain",
        "client",
        "client_fd",
        "connect_armed",
        "done",
        "identity",
        "leaf",
        "loop",
        "peer",
        "peer_addr",
        "peer_ip",
        "proxy_header",
        "proxy_seen",
        "resolving",
        "rt",
        "started",
        "target",
        "target_leaf",
        "timer",
        "tunnel",
    )

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
        self.resolving = False
        self.connect_armed = False
        self.started = time.monotonic()
        self.done = False

    # -- helpers ---------------------------------------------------------------------------------------------

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

    def _end(self) -> None:
        self.done = True
        self._unwant()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tunnel.setup_done(self)

    def step(self, step: Callable[..., None], *args: Any) -> None:
        """Run one step of the set-up: the guard every callback of ``_Setup`` goes through (readiness, timers,
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
            self.done = True
            release_sockets(self.loop, (self.client, self.target))
            with contextlib.suppress(Exception):
                self.tunnel.setup_done(self)

    def abort(self, reason: str) -> None:
        """Give up on this connection: timeout, shutdown, or a failure already logged by the caller."""
        if self.done:
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
        _reset(self.client)
        if self.target is not None:
            _reset(self.target)

    def _refuse(self, decision: Decision) -> None:
        self.tunnel.stats.refuse(decision.rule)
        logs.event(
            "refused", category="conn-errs", tunnel=self.tunnel.label, peer=self.peer,
            identity=self.identity, rule=decision.rule, reason=decision.reason,
        )  # fmt: skip
        self.abort("refused")

    # -- steps -----------------------------------------------------------------------------------------------

    def begin(self) -> None:
        cfg, sources = self.tunnel.cfg, self.rt.proxy_sources
        # A unix peer has no address to match; --accept-proxy-from unix trusts every peer of this socket.
        trusted = sources.active and sources.check(self.peer_ip).allowed if self.peer_ip else cfg.proxy_from_unix
        if trusted:
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
        decision = policy.check_address(self.peer_ip) if self.peer_ip else _NO_CLIENT_ADDRESS
        if not decision.allowed:
            self._refuse(decision)
        return decision.allowed

    def _read_proxy_header(self) -> None:
        """Take exactly the PROXY header off the socket, however it is split, and not one byte more.

        The bytes after it are the ClientHello, which OpenSSL must read from the socket itself, so we peek and
        then consume only header bytes. A partial header is consumed too (every byte of it belongs to the
        header: ``parse`` answers "incomplete" only then) and kept in ``proxy_seen``: peeked bytes left queued
        would keep the socket readable, and waiting for more would spin. ``parse`` refuses as soon as the bytes
        cannot fit the bound, so ``proxy_seen`` stays under ``MAX_HEADER``.
        """
        from tlsgate.engine import proxyproto

        seen = self.proxy_seen
        try:
            data = self.client.recv(proxyproto.MAX_HEADER - len(seen), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._want(self.client_fd, True, self._read_proxy_header)
            return
        except OSError:
            self.abort("client gone")
            return
        if not data:
            self.abort("client gone")
            return
        try:
            header = proxyproto.parse(seen + data)
        except proxyproto.ProxyProtocolError as err:
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
        if header is None:
            self.proxy_seen = seen + taken
            self._want(self.client_fd, True, self._read_proxy_header)  # the same registration: no system call
            return
        self._unwant()
        self.proxy_seen = b""
        self.proxy_header = header
        if header.source is not None:
            self.peer_ip = header.source[0]
            self.peer = f"{host_port(header.source[0], header.source[1])} via {self.peer}"
        if self._address_allowed():
            self._after_proxy_header()

    def _after_proxy_header(self) -> None:
        cfg, rt = self.tunnel.cfg, self.rt
        if rt.accept_ctx is None:
            self._connect()
            return
        try:
            self.client = rt.accept_ctx.wrap_socket(self.client, server_side=True, do_handshake_on_connect=False)
        except OSError as err:
            self.abort(f"client gone ({err})")
            return
        if self.timer is None:  # a PROXY header came first: its deadline, set at accept, covers the handshake too
            self._arm(cfg.timeouts.handshake, "handshake timeout")
        self._client_handshake()

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
        return True

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
        self._connect()

    def _handshake_failed(self, err: BaseException, side: str) -> None:
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
            reason=reason,
        )  # fmt: skip
        self.abort("handshake failed")

    def _connect(self) -> None:
        self.resolving = True
        self.tunnel.resolve(self._on_resolved)
        if self.resolving:
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
        self.resolving = False
        if self.done:
            return
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

    def _target_failed(self, reason: str) -> None:
        self.tunnel.stats.target_errors += 1
        logs.event(
            "target unreachable", logging.WARNING, category="conn-errs", tunnel=self.tunnel.label,
            peer=self.peer, identity=self.identity, target=str(self.tunnel.cfg.target), reason=reason,
        )  # fmt: skip
        self.abort("target unreachable")

    def _connected(self) -> None:
        rt = self.rt
        if rt.target_ctx is None:
            self._start_relay()
            return
        assert self.target is not None
        try:
            self.target = rt.target_ctx.wrap_socket(
                self.target, server_hostname=rt.target_server_name, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as err:
            self._target_failed(f"TLS to target: {err}")
            return
        self._arm(self._target_handshake_limit(), "target handshake timeout")
        self._target_handshake()

    def _target_handshake_limit(self) -> float:
        """What is left of --connect-timeout: as in ghostunnel, one deadline covers the connect and the target's
        TLS handshake (a target that accepts and then never answers TLS is a dead target). With no connect limit
        (0, library use only: the flag refuses it) the handshake timeout applies, so the wait is never endless."""
        timeouts = self.tunnel.cfg.timeouts
        if timeouts.connect <= 0:
            return timeouts.handshake
        if self.connect_armed and self.timer is not None:
            # At least a millisecond: 0 would mean "no timer" to _arm.
            return max(self.timer.when() - self.loop.time(), 0.001)
        return timeouts.connect

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

    def _target_refused(self, decision: Decision) -> None:
        self.tunnel.stats.target_errors += 1
        logs.event(
            "target refused", logging.WARNING, category="conn-errs", tunnel=self.tunnel.label,
            peer=self.peer, target=str(self.tunnel.cfg.target), rule=decision.rule, reason=decision.reason,
        )  # fmt: skip
        self.abort("target identity")

    def _start_relay(self) -> None:
        tunnel, cfg = self.tunnel, self.tunnel.cfg
        assert self.target is not None
        if cfg.proxy_protocol and not self._send_proxy_header():
            return
        peer, identity, target_name = self.peer, self.identity, str(cfg.target)
        relay = Relay(
            self.loop,
            self.client,
            self.target,
            tunnel._view,
            lambda r: tunnel.relay_closed(r, peer, identity, target_name),
            started=self.started,
            peer=peer,
            on_error=tunnel.internal_error,
        )
        if self._waiting is not None and self._waiting[1]:
            self._waiting = None  # a reader the relay wants too: Relay.start() only swaps its callback
        self._end()
        try:
            tunnel.relay_started(relay, Origin(self.peer_ip, identity, self.leaf, self.chain, self.target_leaf))
            relay.start()
        except Exception as err:  # the set-up has ended: the sockets are the relay's now, and so is the cut
            relay.internal_error("start", err)

    def _send_proxy_header(self) -> bool:
        """Tell the target who the client is, from what the connection itself showed, never a display string.

        The source is the address accept() returned (behind a trusted load balancer: the client its header
        named), because a client that reset right after sending leaves a socket that no longer knows its peer.
        The CN comes from the parsed certificate and the SNI from the handshake, both sent whole.
        """
        from tlsgate.engine import proxyproto

        assert self.target is not None
        src, dst = _proxy_endpoints(self.proxy_header, self.peer_addr, self.client)
        try:
            if self.tunnel.cfg.proxy_protocol_version == 1:
                header = proxyproto.encode_v1(src, dst)
            else:
                header = proxyproto.encode_v2(src, dst, tlvs=_tls_tlvs(self.client))
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


def _recheck(relay: Relay, origin: Origin | None, runtime: Runtime) -> Decision | None:
    """The refusal ``runtime``'s rules give the open ``relay`` now, or None when it may carry on."""
    policy = runtime.policy
    peer_ip = origin.peer_ip if origin is not None else ""
    if policy.addresses.active:
        # No address (unix peer, PROXY LOCAL) fails closed, as it does at accept.
        decision = policy.check_address(peer_ip) if peer_ip else _NO_CLIENT_ADDRESS
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


def _pending_error(relay: Relay) -> bool:
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


def _established(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: the handshake with the target is still under way
        return False
    return True


def _static_target(target: Address) -> list[tuple[int, Any]] | None:
    if target.is_unix:
        return [(socket.AF_UNIX, target.path)]
    try:
        ip = ipaddress.ip_address(target.host)
    except ValueError:
        return None
    return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (target.host, target.port))]


def _sni_of(sock: ssl.SSLSocket) -> str | None:
    return captured_sni(sock)


def _proxy_endpoints(header: Any, accepted: Any, sock: socket.socket) -> tuple[Any, Any]:
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


def _tls_tlvs(sock: socket.socket) -> list[tuple[int, bytes]]:
    """The PROXY v2 TLVs for the client's TLS session; none for a plaintext client (client mode)."""
    from tlsgate.engine import proxyproto

    if not isinstance(sock, ssl.SSLSocket):
        return []
    der = sock.getpeercert(binary_form=True)
    client_cn = None
    if der:
        # The policy parsed this certificate already (cached). Its CN is the one the policy matched: the last CN
        # attribute, as Go's Subject.CommonName that ghostunnel sends. Without one, no other name stands in.
        client_cn = PeerIdentity.from_der(der).common_name
    cipher = sock.cipher()
    return proxyproto.tls_tlvs(
        version=sock.version(),
        sni=_sni_of(sock),
        client_cn=client_cn,
        cipher=cipher[0] if cipher else None,
        # A certificate only reaches us verified: the context requires one or asks for none at all.
        verified=bool(der),
        has_client_cert=bool(der),
        alpn=sock.selected_alpn_protocol(),
    )


def _peer_of(addr: Any) -> tuple[str, str]:
    if isinstance(addr, tuple):
        return addr[0], host_port(addr[0], addr[1])
    return "", "unix"


def _reset(sock: socket.socket) -> None:
    """Close so the peer gets a RST: nothing half-done looks like a clean end."""
    try:
        if sock.fileno() >= 0 and not isinstance(sock, ssl.SSLSocket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()
