"""One listener and its connections: the ``Tunnel`` accepts, counts, reloads, re-checks and drains.

Each accepted connection gets a ``setup.Setup`` (address rules, PROXY header, handshake, identity rules,
connect); a set-up that passes hands its sockets to a ``relay.Relay``. The tunnel keeps both sets, the counters
(``stats.Stats``), the per-relay ``recheck.Origin`` for re-checking open connections on reload, the idle,
lifetime and half-close sweep, and on uvloop the epoll watch that sees resets libuv stops polling for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from tlsgate import logs
from tlsgate.engine.peer import peer_of, pending_error, reset, static_target
from tlsgate.engine.recheck import Origin, recheck
from tlsgate.engine.relay import Relay
from tlsgate.engine.routing import Route, route_field
from tlsgate.engine.runtime import Runtime
from tlsgate.engine.setup import Setup
from tlsgate.engine.setupcore import SetupCore
from tlsgate.engine.sockets import bind_listeners
from tlsgate.engine.stats import Stats
from tlsgate.policy.decision import Decision
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import Timeouts, TunnelConfig
from tlsgate.tls import internals

_ACCEPT_BATCH = 64
_BUFFER_SIZE = 64 * 1024
_RESOLVE_TTL = 30.0
# After EMFILE/ENFILE, pause accepting this long: retrying at once would spin on the same error.
_FD_EXHAUSTED_PAUSE = 0.5


class Tunnel:
    def __init__(self, cfg: TunnelConfig, runtime: Runtime, *, reuse_port: bool = False) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.reuse_port = reuse_port
        self.stats = Stats()
        self.relays: set[Relay] = set()
        # Each open relay's peers, for re-checking them on reload (see recheck).
        self.origins: dict[Relay, Origin] = {}
        self.setups: set[SetupCore] = set()
        self.listeners: list[socket.socket] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.accepting = False
        self.draining = False
        self._idle = asyncio.Event()
        self.view = memoryview(bytearray(_BUFFER_SIZE))
        self._sweeper: asyncio.TimerHandle | None = None
        # uvloop only: an epoll set of every relayed socket, watched for errors alone (see _watch_errors).
        self._uvloop = False
        self._error_watch: select.epoll | None = None
        self._error_watch_failed = False
        self._watched: dict[int, Relay] = {}
        # Looked-up target addresses and when they expire, per target (routes by server name have their own).
        self._resolved: dict[Address, tuple[float, list[tuple[int, Any]]]] = {}
        # What connect() dials: the target, or with --proxy the proxy (the target's name goes to the proxy).
        self._dial = cfg.target if cfg.proxy is None else Address(host=cfg.proxy.host, port=cfg.proxy.port)
        # A unix path or an IP literal needs no lookup: work it out once, not per connection.
        self._static_target = static_target(self._dial)
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

    def reload(self, runtime: Runtime, cfg: TunnelConfig | None = None) -> None:
        """New connections use ``runtime``; established ones keep what they started with (see ``recheck``).

        ``cfg``: a config that differs from the running one in its routes alone, applied in place (see
        ``process.supervisor``): the listener and every open connection stay."""
        if cfg is not None:
            self.cfg, self._static_target = cfg, static_target(cfg.target)
            self._resolved.clear()
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
                decision = recheck(relay, origin, runtime)
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
                    **route_field(origin.route if origin is not None else ""),
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
        peer_ip, peer = peer_of(addr)
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
        setup = Setup(self, runtime, sock, addr, peer_ip, peer)
        self.setups.add(setup)
        setup.step(setup.begin)

    def _accept_crashed(self, err: Exception, sock: socket.socket, addr: Any) -> None:
        """The guard of ``_accept`` for one connection: cut it (and its set-up, if one began), keep accepting."""
        self.internal_error("accept", err, peer_of(addr)[1])
        fd = sock.fileno()
        for setup in [s for s in self.setups if s.client_fd == fd]:
            setup.cut(f"internal error: {type(err).__name__}")
        if sock.fileno() >= 0:
            reset(sock)

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
        reset(sock)

    # -- bookkeeping called by Setup and Relay --------------------------------------------------------------

    def setup_done(self, setup: SetupCore) -> None:
        self.setups.discard(setup)
        self._maybe_idle()

    def relay_started(self, relay: Relay, origin: Origin | None = None) -> None:
        self.relays.add(relay)
        if origin is not None:
            self.origins[relay] = origin
            if origin.route:
                self.stats.route_event(origin.route, "established")
        self.stats.established += 1
        if self._uvloop and not self._error_watch_failed:
            self._watch_errors(relay)

    def relay_closed(self, relay: Relay, peer: str, identity: str, target: str, route: str = "") -> None:
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
            **route_field(route),
        )  # fmt: skip
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        limit = self.cfg.max_concurrent_conns
        if limit and not self.accepting and self.active < limit:
            self._resume_accepting()
        if not self.active:
            self._idle.set()

    def resolve(
        self, callback: Callable[[list[tuple[int, Any]] | str | Exception], None], route: Route | None = None
    ) -> None:
        """Target addresses for connect() (the proxy's, with --proxy); cached for a short while, looked up off the
        loop thread.

        ``callback`` gets the addresses, a reason string when the name does not resolve, or the exception of a
        bug; it must not raise (``Setup`` passes a guarded step). ``route``: the route by server name the
        connection took, whose target is meant rather than the tunnel's.
        """
        target, static = self._dial, self._static_target
        if route is not None and route.cfg.target != self.cfg.target:
            target = route.cfg.target
            static = static_target(target)
        if static is not None:
            callback(static)
            return
        now = time.monotonic()
        cached = self._resolved.get(target)
        if cached is not None and cached[0] > now:
            callback(cached[1])
            return
        assert self.loop is not None
        lookup = self.loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)

        def done(future: asyncio.Future[list[Any]]) -> None:
            try:
                infos = future.result()
                addrs = [(info[0], info[4]) for info in infos]
                self._resolved[target] = (time.monotonic() + _RESOLVE_TTL, addrs)
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
        if self._error_watch_failed and pending_error(relay):
            return
        if t.max_conn_lifetime and now - relay.started >= t.max_conn_lifetime:
            relay.abort("max connection lifetime")
        elif t.close and relay.half_closed_at and now - relay.half_closed_at >= t.close:
            relay.abort(f"close timeout ({relay.end})")
