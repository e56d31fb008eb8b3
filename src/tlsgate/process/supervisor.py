"""Runs tunnels in one event loop and owns the process: signals, reload, graceful drain, choice of loop.

SIGTERM/SIGINT: stop accepting, let open connections finish for up to --shutdown-timeout, then cut the rest; a
second signal cuts at once. The exit code is 0 when every connection finished, 1 when some had to be cut (as
ghostunnel exits 1 when its shutdown timeout fires), so a supervisor can tell a clean stop from a forced one.
SIGHUP/SIGUSR1 (and --timed-reload): rebuild certificates and policies from disk; a reload that fails keeps what
is running and logs why. With a config file, SIGHUP also re-reads
the file: changed tunnels are replaced, unchanged ones keep their connections, added and removed ones start
and stop. The signal handlers, timers and stop state are ``tlsgate.process.lifecycle``'s, shared with the
``--workers`` parent; this module says what stop, reload and drain mean for tunnels in this process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

from tlsgate import logs
from tlsgate.engine.runtime import Runtime, build_runtime
from tlsgate.engine.tunnel import Tunnel
from tlsgate.errors import StartupError, TlsgateError, shown
from tlsgate.process import systemd
from tlsgate.process.check import checked_runtimes
from tlsgate.process.crls import check_runtime_crls, log_overdue_crls
from tlsgate.process.lifecycle import (
    EXIT_CONNECTIONS_CUT,
    Lifecycle,
    choose_loop,
    prepare_process,
    tunnel_key,
    watchdog,
)
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import TunnelConfig

# Defined in settings since the layout split; re-exported so `from tlsgate.process.supervisor import` keeps working.
from tlsgate.settings.process_options import ProcessOptions as ProcessOptions
from tlsgate.tls import internals


class Server:
    """The tunnels of one process in one event loop: start-up, reload, graceful drain.

    ``serve()`` runs it as ``tlsgate server`` does (signals, systemd, until a stop signal). As a library::

        async with Server(configs, ProcessOptions()) as server:
            ...  # every tunnel listens (server.tunnels), the status port is up

    entering raises the start-up error (`StartupError`, `ConfigError`) with nothing left listening; leaving stops
    the server and waits for the drain (``exit_code`` then holds what ``serve()`` would have returned).
    """

    # Whether start() logs overdue CRLs; a --workers worker leaves that to the parent, which says it once.
    announce_overdue_crls = True
    # The one start-up line naming the private paths in use (tlsgate.tls.internals); a --workers parent logs it.
    announces_internals = True

    def __init__(
        self,
        configs: Sequence[TunnelConfig],
        options: ProcessOptions | None = None,
        *,
        load_configs: Callable[[], list[TunnelConfig]] | None = None,
        runtimes: Sequence[Runtime] | None = None,
    ) -> None:
        self.options = options or ProcessOptions()
        self.configs = list(configs)
        # Runtimes already built from ``configs`` (one each, in order) by a check such as `process.check`; start()
        # uses them instead of reading every certificate, key and policy again.
        self._built = list(runtimes) if runtimes is not None else None
        if self._built is not None and len(self._built) != len(self.configs):
            raise ValueError("runtimes: expected one per config")
        self.load_configs = load_configs
        self.tunnels: dict[str, Tunnel] = {}
        # Tunnels a reload removed or replaced, by the key they ran under, while their open connections drain:
        # status and metrics keep counting those connections (as retiring) until the last one ends.
        self.retired: dict[Tunnel, str] = {}
        self.started = asyncio.Event()
        self.lifecycle = Lifecycle()
        self.exit_code: int | None = None
        self._stop = asyncio.Event()
        self._cut_by_signal = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closing: asyncio.Future[int] | None = None
        self.status_server: Any = None

    # -- start / stop ----------------------------------------------------------------------------------------

    def start(self, listeners: dict[str, list[socket.socket]] | None = None) -> None:
        """Build every runtime first (so a bad file fails before anything listens), then start listening."""
        self._loop = asyncio.get_running_loop()
        built, self._built = self._built, None
        runtimes = (
            list(zip(self.configs, built, strict=True))
            if built is not None
            else [(cfg, build_runtime(cfg)) for cfg in self.configs]
        )
        # --crl-max-age refuses here, with the other start-up errors, before any port is bound.
        overdue = [(cfg, check_runtime_crls(cfg, runtime)) for cfg, runtime in runtimes]
        reuse_port = self.options.workers > 1
        started: list[Tunnel] = []
        try:
            for cfg, runtime in runtimes:
                tunnel = Tunnel(cfg, runtime, reuse_port=reuse_port)
                try:
                    tunnel.start(self._loop, (listeners or {}).get(tunnel_key(cfg)))
                    _check_socket_family(tunnel)
                except StartupError as err:
                    # With many tunnels from one file, "--listen :8443: address in use" must say whose it is.
                    if not cfg.name:
                        raise
                    raise StartupError(f"tunnel {shown(cfg.name)}: {err}") from None
                started.append(tunnel)
                self.tunnels[tunnel_key(cfg)] = tunnel
        except BaseException:
            for tunnel in started:
                tunnel.stop_listening()
            raise
        for tunnel in started:
            # ghostunnel says "using proxy URL" at start; we name it too, never with its credentials.
            via: dict[str, Any] = {} if tunnel.cfg.proxy is None else {"proxy": tunnel.cfg.proxy.shown}
            logs.event(
                "listening", tunnel=tunnel.label, mode=tunnel.cfg.mode, listen=",".join(tunnel.addresses),
                target=tunnel.cfg.target_label, **via,
            )  # fmt: skip
        if self.announce_overdue_crls:
            for cfg, crls in overdue:
                log_overdue_crls(cfg.label, crls)
        if self.announces_internals:
            internals.log_startup()
        self.lifecycle.install_signals(self._loop, lambda _: self.stop(), lambda _: self.reload())
        self.lifecycle.schedule_timed_reload(self._loop, lambda: self.configs, self.reload)
        self.lifecycle.flush_logs_periodically(self._loop)
        self.started.set()

    async def serve(self, ready: Callable[[Server], Awaitable[None] | None] | None = None) -> int:
        with watchdog(asyncio.get_running_loop()) as notifier:
            return await self._serve(ready, notifier)

    def describe(self, state: str) -> str:
        """A one-line state for ``systemctl status``: ``listening | server proxying :8443 => 127.0.0.1:8080``."""
        tunnels = [
            (t.cfg.mode, ",".join(t.addresses) or str(t.cfg.listen), t.cfg.target_label) for t in self.tunnels.values()
        ]
        return f"{state} | {systemd.describe(tunnels)}"

    async def _serve(self, ready: Callable[[Server], Awaitable[None] | None] | None, notifier: systemd.Notifier) -> int:
        await self._open()
        if ready is not None:
            result = ready(self)
            if asyncio.iscoroutine(result):
                await result
        notifier.ready(self.describe("listening"))
        await self._stop.wait()
        return await self._close()

    async def __aenter__(self) -> Server:
        await self._open()
        # The drain starts as soon as anything calls stop() (a signal, POST /_shutdown, the caller), as under serve().
        self._closing = asyncio.ensure_future(self._close_when_stopped())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self.stopping:
            self.stop()
        assert self._closing is not None
        await self._closing

    async def _close_when_stopped(self) -> int:
        await self._stop.wait()
        return await self._close()

    async def _open(self) -> None:
        """Start the tunnels and the status port; on a start-up error, raise it with nothing left listening."""
        from tlsgate.settings.status import check_status_setting, exposed_status_warning
        from tlsgate.status.http import start_status_server

        # A --status that cannot work fails with the other settings, before a tunnel binds or says "listening".
        status = check_status_setting(self.options.status, self.configs) if self.options.status else None
        self.start()
        try:
            if self.options.status and status is not None:
                exposed_status_warning(status, self.options.status)
                self.status_server = await start_status_server(self, self.options.status)
        except BaseException:
            # The tunnels already listen: close them, and let go of the signal handlers and timers that point at us.
            for tunnel in self.tunnels.values():
                tunnel.stop_listening()
            self.lifecycle.close()
            raise

    async def _close(self) -> int:
        """Drain (after `stop`); the exit code: 0, or `EXIT_CONNECTIONS_CUT` when connections had to be cut."""
        cut = await self._drain()
        self.exit_code = EXIT_CONNECTIONS_CUT if cut else 0
        return self.exit_code

    @property
    def stopping(self) -> bool:
        return self.lifecycle.stopping

    def stop(self) -> None:
        """First call: graceful drain. Second call: cut every connection now."""
        if not self.lifecycle.begin_stop():
            logs.event("second stop signal: closing all connections now", logging.WARNING)
            for tunnel in [*self.tunnels.values(), *self.retired]:
                self._cut_by_signal += tunnel.abort_all("shutdown")
            return
        open_connections = sum(t.active for t in [*self.tunnels.values(), *self.retired])
        logs.event("shutting down", open=open_connections)
        systemd.notifier().stopping(f"stopping | draining {open_connections} connections")
        self._stop.set()

    async def _drain(self) -> int:
        """Drain every tunnel; how many connections had to be cut (by the timeout or a second signal)."""
        self.lifecycle.cancel("reload")
        if self.status_server is not None:
            self.status_server.close()
        tunnels = [*self.tunnels.values(), *self.retired]
        timed_out = sum(await asyncio.gather(*(t.drain(t.cfg.timeouts.shutdown) for t in tunnels)))
        if timed_out:
            logs.event(
                "shutdown timeout expired; cut the connections still open", logging.WARNING, cut=timed_out,
                exit=EXIT_CONNECTIONS_CUT,
            )  # fmt: skip
        cut = timed_out + self._cut_by_signal
        logs.event("stopped", cut=cut)
        logs.flush_logs()
        self.lifecycle.close()
        return cut

    # -- reload ----------------------------------------------------------------------------------------------

    def _remove_signals(self) -> None:
        """Give the stop and reload signals back (a caller that ran `start` alone, without `serve`)."""
        self.lifecycle.remove_signals()

    def reload(self) -> bool:
        """Re-read certificates, CA bundles, CRLs and policies (and the config file, when there is one)."""
        if self.stopping:
            return False
        notifier = systemd.notifier()
        notifier.reloading(self.describe("reloading"))
        ok = self._reload_file() if self.load_configs is not None else self._reload_tunnels()
        notifier.ready(self.describe("listening" if ok else "listening, last reload failed (see the log)"))
        return ok

    def _reload_tunnels(self) -> bool:
        ok = True
        for tunnel in self.tunnels.values():
            try:
                runtime = build_runtime(tunnel.cfg)
                overdue = check_runtime_crls(tunnel.cfg, runtime)
            except TlsgateError as err:
                ok = False
                tunnel.stats.reload_errors += 1
                logs.event(
                    "reload failed, keeping the running certificates and policy", logging.ERROR,
                    tunnel=tunnel.label, error=str(err),
                )  # fmt: skip
                continue
            tunnel.reload(runtime)
            if tunnel.cfg.recheck_on_reload:
                tunnel.recheck(runtime)
            log_overdue_crls(tunnel.label, overdue)
            logs.event("reloaded", tunnel=tunnel.label)
        return ok

    def _reload_file(self) -> bool:
        assert self.load_configs is not None and self._loop is not None
        try:
            configs = self.load_configs()
            # A `load_tunnels` reload already built every runtime while checking the file: apply those.
            built = checked_runtimes(configs)
            pairs = zip(configs, built, strict=True) if built is not None else ((cfg, None) for cfg in configs)
            wanted: dict[str, TunnelConfig] = {}
            runtimes: dict[str, Runtime] = {}
            for cfg, runtime in pairs:
                key = tunnel_key(cfg)
                wanted[key] = cfg
                runtimes[key] = runtime if runtime is not None else build_runtime(cfg)
            overdue = {key: check_runtime_crls(wanted[key], runtime) for key, runtime in runtimes.items()}
        except TlsgateError as err:
            for line in str(err).splitlines():
                logs.event("reload failed, keeping the running tunnels", logging.ERROR, error=line)
            for tunnel in self.tunnels.values():
                tunnel.stats.reload_errors += 1  # so tlsgate_reload_errors_total alerts in file mode too
            return False
        # Every tunnel that leaves or changes gives up its bound sockets first, and a successor on the same address
        # takes them over: no moment where the port is closed, and a renamed tunnel (or two that swap ports) does
        # not fail to bind a port that is still ours. Port 0 is a different port per tunnel: only the successor
        # under the same name gets it.
        leaving = {
            key: t
            for key, t in self.tunnels.items()
            if wanted.get(key) != t.cfg and not _routes_only(t.cfg, wanted.get(key))
        }
        spare = {_socket_key(key, t.cfg.listen): t.hand_over_listeners() for key, t in leaving.items()}
        ok = True
        for key, cfg in wanted.items():
            current = self.tunnels.get(key)
            if current is not None and key not in leaving:
                # Unchanged, or changed in its routes only: reloaded in place, open connections kept.
                current.reload(runtimes[key], cfg if cfg != current.cfg else None)
                if cfg.recheck_on_reload:
                    current.recheck(runtimes[key])
                continue
            listeners = spare.pop(_socket_key(key, cfg.listen), None)
            try:
                tunnel = Tunnel(cfg, runtimes[key], reuse_port=self.options.workers > 1)
                tunnel.start(self._loop, listeners)
            except TlsgateError as err:
                ok = False
                logs.event("tunnel failed to start", logging.ERROR, tunnel=cfg.label, error=str(err))
                if listeners is not None:
                    spare[_socket_key(key, cfg.listen)] = listeners
                continue
            self.tunnels[key] = tunnel
            logs.event("listening", tunnel=cfg.label, listen=",".join(tunnel.addresses), target=cfg.target_label)
        for key, old in leaving.items():
            own = spare.pop(_socket_key(key, old.cfg.listen), None)
            if self.tunnels.get(key) is old and key in wanted and own is not None:
                old.take_back_listeners(own)  # its replacement failed to start: it keeps serving as it was
                continue
            if self.tunnels.get(key) is old:
                del self.tunnels[key]
            # Sockets nobody took over are still this tunnel's to close; closed now, the port is free at once.
            old.listeners = own or []
            old.stop_listening()
            self._retire(key, old, "changed" if key in wanted else "removed")
        for old, key in list(self.retired.items()):
            if key in wanted and wanted[key].recheck_on_reload:
                # A replaced tunnel's connections drain under its old config, but not past the new rules (this
                # reload's or a later one's): a changed allow list closes what it no longer allows.
                old.recheck(runtimes[key])
        self.configs = list(configs)  # the tunnels alone: the runtimes that came with them are the tunnels' now
        for key, crls in overdue.items():
            log_overdue_crls(wanted[key].label, crls)
        logs.event("reloaded", tunnels=len(self.tunnels))
        return ok

    def _retire(self, key: str, tunnel: Tunnel, why: str) -> None:
        """A tunnel that left the config: no new connections; open ones finish within its shutdown timeout.

        It stays in ``retired`` until the drain ends, so its connections are counted until they really end.
        """
        logs.event("tunnel retired", tunnel=tunnel.label, why=why, open=tunnel.active)
        self.retired[tunnel] = key
        task = asyncio.ensure_future(tunnel.drain(tunnel.cfg.timeouts.shutdown))
        self._background.add(task)

        def forget(_: asyncio.Future[int]) -> None:
            self._background.discard(task)
            self.retired.pop(tunnel, None)

        task.add_done_callback(forget)


def _routes_only(old: TunnelConfig, new: TunnelConfig | None) -> bool:
    """Whether ``new`` differs from ``old`` in its routes by server name (and default target) alone: such a
    tunnel is reloaded in place, so the connections of its unchanged routes are never cut. A tunnel without
    routes on either side is replaced on any change, as before."""
    if new is None or not (old.route or new.route):
        return False
    return replace(new, route=old.route, target=old.target, route_default=old.route_default) == old


def _check_socket_family(tunnel: Tunnel) -> None:
    """The unix-listener rules of config.py, once a ``systemd:NAME`` socket shows which family it really is.

    Address rules on a unix socket would match nothing; ``--accept-proxy-from unix`` on a TCP one would trust
    nobody. Either is refused at start, as the same settings on a ``unix:`` or TCP ``--listen`` are.
    """
    cfg = tunnel.cfg
    if not cfg.listen.is_activated:
        return
    unix = any(sock.family == socket.AF_UNIX for sock in tunnel.listeners)
    problem = ""
    if unix and (cfg.allow_from or cfg.deny_from) and not cfg.proxy_from_unix:
        problem = "is a unix socket and its peers have no IP address for --allow-from/--deny-from"
    elif unix and cfg.proxy_source_networks:
        problem = "is a unix socket: its peers have no IP address for --accept-proxy-from CIDRs (use 'unix')"
    elif not unix and cfg.proxy_from_unix:
        problem = "is not a unix socket: --accept-proxy-from unix is for a unix socket"
    if problem:
        tunnel.stop_listening()
        raise StartupError(f"--listen {cfg.listen} {problem}")


def _socket_key(key: str, listen: Address) -> tuple[str, Address]:
    """Which tunnel may take over sockets bound for ``listen``: any on the same address, except for port 0."""
    return (key if listen.port == 0 and not (listen.is_unix or listen.is_activated) else "", listen)


def run_server(configs: Sequence[TunnelConfig], options: ProcessOptions, **kwargs: Any) -> int:
    """Blocking entry point for the CLI."""
    prepare_process(configs, options)
    runner = choose_loop(options.loop)

    async def main() -> int:
        return await Server(configs, options, **kwargs).serve()

    return int(runner(main()))
