"""``--workers N``: N processes serve the same tunnels; a small parent starts, restarts and speaks for them.

Ports. Every worker binds its own listening sockets with SO_REUSEPORT, so the kernel spreads new connections
over the workers' accept queues and no two processes wake up for the same connection. Before any worker starts,
the parent reserves each TCP listen address (``tlsgate.process.ports``: port 0 becomes a real port, a port in use
fails before anything starts, the port stays ours while a worker restarts). A unix socket
cannot be shared that way, so the parent creates it once and every worker inherits the same listening socket.
A socket systemd passed (``systemd:NAME``) is shared the same way: the parent takes it and every worker accepts
from that one socket (one accept queue, so no SO_REUSEPORT spreading; the workers take turns as they are free).
The parent also keeps systemd's variables to itself (``tlsgate.process.systemd``): it alone says READY=1 (once every
worker is ready), RELOADING=1 and STOPPING=1, and feeds the watchdog from its own event loop.

Workers. Each is a fresh interpreter (``python -P -c ...``), not a fork: the parent runs an event loop and may
run threads, neither of which survives a fork cleanly. ``tlsgate.process.worker`` is its side: the plan it
receives over a socketpair, its ``ready`` line and its answers to ``stats``. End of file on the socketpair tells
the parent that a worker died. Workers run in their own session so a terminal's Ctrl-C reaches only the parent,
which passes each signal on exactly once.

Session tickets. The parent's ticket secret (`tlsgate.tls.tickets`) travels in the pickled message, so every worker,
and every restarted one, issues and accepts the same tickets: a returning client resumes whichever worker the
kernel hands it to.

Signals. SIGTERM/SIGINT go to every worker, which drains as a single process would; a second one cuts. SIGHUP
and SIGUSR1 go to every worker that is up; one still starting gets it when it reports ready, so a reload is never
lost. A worker that dies while tlsgate is not shutting down is restarted after a back-off that doubles on each
quick failure (0.1 s up to 30 s), so a crash loop costs little CPU; one that fails before any worker ever came up
stops the whole start, with its exit code, because the next attempt would fail the same way.

Status. The parent serves ``--status`` itself. For each request it asks every worker for its counters (one
second at most; a worker that does not answer in time counts with its last answer) and adds them up. A dead
worker's last answer stays in the totals, so counters never go backwards when a worker is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tlsgate import logs
from tlsgate.engine.runtime import Runtime, build_runtime
from tlsgate.engine.sockets import bind_listeners
from tlsgate.errors import TlsgateError
from tlsgate.process import platforms, systemd
from tlsgate.process.crls import check_runtime_crls, log_overdue_crls
from tlsgate.process.lifecycle import Lifecycle, prepare_process, tunnel_key, watchdog
from tlsgate.process.ports import apply_listen_map, reserve
from tlsgate.process.supervisor import ProcessOptions
from tlsgate.process.worker import EXIT_CUT, WorkerPlan
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import TunnelConfig
from tlsgate.settings.status import (
    StatusAddress,
    check_status_setting,
    exposed_status_warning,
    status_certificate_config,
)
from tlsgate.status.http import StatusServer, serve_status
from tlsgate.status.model import Snapshot, TunnelView, merge_views
from tlsgate.tls import internals, tickets

_WORKER_CODE = "from tlsgate.process.worker import worker_main; worker_main()"
# A worker's answer to "stats" must come this fast, or status uses its previous answer.
_STATS_TIMEOUT = 1.0
# Restart back-off: the first restart waits this long, each quick failure doubles it, up to the cap.
_RESTART_FIRST = 0.1
_RESTART_MAX = 30.0
# A worker that ran this long before dying was not crash-looping: its next restart waits _RESTART_FIRST again.
_STABLE_AFTER = 10.0
# After SIGTERM, workers get their --shutdown-timeout plus this long before they are killed.
_KILL_GRACE = 10.0
# Stats replies carry every tunnel's counters; a generous line limit, far above any real config.
_LINE_LIMIT = 16 * 1024 * 1024
# platforms.signals: the module must import where SIGHUP is missing, so check_startup can say what is.
_RELOAD_SIGNALS = platforms.signals(platforms.RELOAD_SIGNALS)


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting a worker after ``failures`` quick failures in a row (1 or more)."""
    return min(_RESTART_MAX, _RESTART_FIRST * 2.0 ** max(0, failures - 1))


def run_workers(
    configs: Sequence[TunnelConfig],
    options: ProcessOptions,
    *,
    load_configs: Callable[[], list[TunnelConfig]] | None = None,
    runtimes: Sequence[Runtime] | None = None,
) -> int:
    """Blocking entry point for ``--workers N`` (N > 1). ``load_configs`` must pickle (a module-level function).

    ``runtimes``, one per config when a check already built them, spare the parent building them again.
    """
    prepare_process(configs, options)  # before any worker starts: they must not see LISTEN_* or NOTIFY_SOCKET
    # The parent relays no traffic, so it runs plain asyncio whatever --loop says; the workers honour --loop.
    return asyncio.run(_Pool(configs, options, load_configs, runtimes).run())


# -- the parent ----------------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    ready: bool = False
    # A reload signal that arrived while this worker was starting, delivered once it is ready.
    reload_pending: signal.Signals | None = None
    restarts: int = 0
    quick_failures: int = 0
    exit_code: int | None = None
    last_views: list[TunnelView] = field(default_factory=list)
    last_process: dict[str, float] = field(default_factory=dict)
    pending: dict[int, asyncio.Future[None]] = field(default_factory=dict)


class _Pool:
    def __init__(
        self,
        configs: Sequence[TunnelConfig],
        options: ProcessOptions,
        load_configs: Callable[[], list[TunnelConfig]] | None,
        runtimes: Sequence[Runtime] | None = None,
    ) -> None:
        self.configs = list(configs)
        self._built = list(runtimes) if runtimes is not None else None
        self.options = options
        self.load_configs = load_configs
        self.workers = [_Worker(i) for i in range(options.workers)]
        self.lifecycle = Lifecycle()
        self.status: StatusServer | None = None
        self._stopped = asyncio.Event()
        self._reservations: list[socket.socket] = []
        self._unix_listeners: dict[str, socket.socket] = {}
        self._listen_map: dict[Address, Address] = {}
        # Counters of workers that died, folded in so totals never go backwards (see the module docstring).
        self._retired: dict[str, TunnelView] = {}
        self._restarts = 0
        self._retired_dropped_lines = 0.0
        self._ever_ready = False
        self._all_ready_logged = False
        self._startup_failure: int | None = None
        self._killed = False
        self._cert_token = object()
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._status_address: StatusAddress | None = None

    # -- start and stop ----------------------------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        # Read every certificate and policy once here, so a bad file is a one-line exit 2, not N dying workers.
        built, self._built = self._built, None
        runtimes = built if built is not None else [build_runtime(cfg) for cfg in self.configs]
        overdue = [(cfg, check_runtime_crls(cfg, runtime)) for cfg, runtime in zip(self.configs, runtimes, strict=True)]
        del runtimes, built  # the workers build their own; the parent only needed them for this check
        self._status_address = check_status_setting(self.options.status, self.configs) if self.options.status else None
        for cfg, crls in overdue:
            log_overdue_crls(cfg.label, crls)
        with watchdog(self._loop):
            return await self._run()

    def describe(self, state: str) -> str:
        """A one-line state for ``systemctl status``."""
        tunnels = [(cfg.mode, str(cfg.listen), str(cfg.target)) for cfg in self.configs]
        return f"{state} | {systemd.describe(tunnels, len(self.workers))}"

    async def _run(self) -> int:
        try:
            self._bind()
            if self.options.status and self._status_address is not None:
                exposed_status_warning(self._status_address, self.options.status)
                shutdown = self.stop if self.options.enable_shutdown else None
                self.status = await serve_status(
                    self.options.status,
                    self,
                    prefix=self.options.metrics_prefix,
                    shutdown=shutdown,
                    pprof=self.options.enable_pprof,
                )
        except BaseException:
            self._release()
            raise
        loop = self._loop
        assert loop is not None
        self.lifecycle.install_signals(loop, self.stop, self.reload)
        # Workers keep their own --timed-reload; the parent only refreshes the status port's certificate.
        self.lifecycle.schedule_timed_reload(loop, lambda: self.configs, self._refresh_certificate)
        self.lifecycle.flush_logs_periodically(loop)
        internals.log_startup()
        if not tickets.available():
            logs.event(
                "session tickets cannot be shared here; a returning client resumes only on the worker it first met",
                logging.WARNING,
            )
        logs.event("starting workers", workers=len(self.workers))
        try:
            await asyncio.gather(*(self._keep_running(w) for w in self.workers))
        finally:
            self._release()
            if self.status is not None:
                self.status.close()
            self.lifecycle.close()
        code = self._exit_code()
        logs.flush_logs()
        return code

    def _exit_code(self) -> int:
        if self._startup_failure is not None:
            return self._startup_failure
        failed = [w for w in self.workers if w.exit_code not in (0, None, EXIT_CUT, -signal.SIGTERM, -signal.SIGINT)]
        for w in failed:
            logs.event("worker did not stop cleanly", logging.ERROR, worker=w.index, exit=_describe(w.exit_code))
        # A worker that cut connections said so itself ("shutdown timeout expired"); the process exits as one would.
        cut = any(w.exit_code == EXIT_CUT for w in self.workers)
        code = 1 if failed or cut or self._killed else 0
        logs.event("stopped", workers=len(self.workers), exit=code)
        return code

    def _bind(self) -> None:
        """Reserve every TCP listen address (port 0 becomes a real port); create unix listeners to hand down."""
        for cfg in self.configs:
            if cfg.listen.is_unix or cfg.listen.is_activated:
                (sock,) = bind_listeners(cfg.listen)
                self._unix_listeners[tunnel_key(cfg)] = sock
                continue
            reserved, concrete = reserve(cfg.listen)
            self._reservations += reserved
            if concrete != cfg.listen:
                self._listen_map[cfg.listen] = concrete
        self.configs = apply_listen_map(self.configs, self._listen_map)

    def _release(self) -> None:
        for sock in self._reservations:
            sock.close()
        self._reservations = []
        for sock in self._unix_listeners.values():
            sock.close()  # the workers keep their own copies; the path goes when the last of them drains
        self._unix_listeners = {}

    @property
    def stopping(self) -> bool:
        return self.lifecycle.stopping

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """First call: every worker drains. Second call: every worker cuts its connections now."""
        if not self.lifecycle.begin_stop():
            logs.event("second stop signal: workers close all connections now", logging.WARNING)
            self._signal_all(sig)
            return
        logs.event("shutting down", workers=sum(w.proc is not None and w.exit_code is None for w in self.workers))
        systemd.notifier().stopping(f"stopping | {len(self.workers)} workers draining")
        if self.status is not None:
            self.status.close()
        # Our copies must not keep a port (or a unix socket) accepting into a queue no worker reads any more.
        self._release()
        self._stopped.set()
        self._signal_all(sig)
        limits = [cfg.timeouts.shutdown for cfg in self.configs]
        if self._loop is not None and limits and all(limit > 0 for limit in limits):
            self.lifecycle.call_later("kill", self._loop, max(limits) + _KILL_GRACE, self._kill_all)

    def _kill_all(self) -> None:
        logs.event("workers did not finish draining in time; killing them", logging.ERROR)
        self._killed = True
        self._signal_all(signal.SIGKILL)

    def _signal_all(self, sig: signal.Signals) -> None:
        for w in self.workers:
            _send(w, sig)

    def reload(self, sig: signal.Signals | None = None) -> None:
        # None, not signal.SIGHUP, as the default: the class must be definable where SIGHUP does not exist.
        sig = sig or _RELOAD_SIGNALS[0]
        if self.stopping:
            return
        self._cert_token = object()  # the status port rebuilds its certificate on its next handshake
        if self.load_configs is not None:
            try:
                self.configs = apply_listen_map(self.load_configs(), self._listen_map)
            except TlsgateError as err:
                # Each worker re-reads the file too, and logs the same problem; this copy is for restarts only.
                logs.event("config reload failed in the parent", logging.ERROR, error=str(err).splitlines()[0])
        logs.event("reloading workers", signal=sig.name)
        # Before every worker came up, READY=1 is still to come from _on_message: a reload must not say it early.
        notifier = systemd.notifier() if self._all_ready_logged else systemd.Notifier()
        notifier.reloading(self.describe("reloading"))
        for w in self.workers:
            if w.ready:
                _send(w, sig)
            elif w.proc is not None:
                w.reload_pending = sig
        # Each worker reloads on its own and logs the outcome; the parent's part, passing the signal on, is done.
        notifier.ready(self.describe("listening"))

    def _refresh_certificate(self) -> None:
        self._cert_token = object()  # the status port rebuilds its certificate on its next handshake

    # -- one worker slot ---------------------------------------------------------------------------------------

    async def _keep_running(self, w: _Worker) -> None:
        while not self.stopping:
            started = time.monotonic()
            code = await self._run_once(w)
            if self.stopping:
                return
            if not self._ever_ready:
                # Nothing came up yet: a bad file or a taken port would fail every attempt the same way.
                logs.event("worker failed to start; stopping", logging.ERROR, worker=w.index, exit=_describe(code))
                self._startup_failure = code if code > 0 else 1
                self.stop()
                return
            w.quick_failures = 1 if time.monotonic() - started >= _STABLE_AFTER else w.quick_failures + 1
            delay = restart_delay(w.quick_failures)
            w.restarts += 1
            self._restarts += 1
            logs.event(
                "worker died; restarting", logging.ERROR, worker=w.index, exit=_describe(code),
                restart_in=f"{delay:.1f}s",
            )  # fmt: skip
            systemd.notifier().status(
                self.describe(f"listening, worker {w.index} died ({_describe(code)}); restarting")
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay)

    async def _run_once(self, w: _Worker) -> int:
        """Start the worker, follow its messages until its end of the socketpair closes; its exit code."""
        parent_end, child_end = socket.socketpair()
        plan = WorkerPlan(
            index=w.index,
            configs=self.configs,
            options=dataclasses.replace(self.options, status=None),
            unix_fds={key: sock.fileno() for key, sock in self._unix_listeners.items()},
            listen_map=self._listen_map,
            load_configs=self.load_configs,
            ticket_key=tickets.process_key(),
        )
        try:
            payload = pickle.dumps(plan)
            with child_end:
                w.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-P", "-c", _WORKER_CODE, str(child_end.fileno()),
                    stdin=subprocess.DEVNULL,
                    pass_fds=[child_end.fileno(), *plan.unix_fds.values()],
                    start_new_session=True,
                )  # fmt: skip
        except (OSError, pickle.PicklingError) as err:
            parent_end.close()
            logs.event("cannot start a worker", logging.ERROR, worker=w.index, error=str(err))
            return 1
        w.exit_code = None
        reader, w.writer = await asyncio.open_unix_connection(sock=parent_end, limit=_LINE_LIMIT)
        w.writer.write(len(payload).to_bytes(8, "big") + payload)
        if self.stopping:
            _send(w, signal.SIGTERM)
        try:
            while line := await reader.readline():
                self._on_message(w, line)
        except ConnectionError:
            pass  # it died with our messages unread: the same news as end of file
        except (OSError, ValueError) as err:
            logs.event("lost contact with a worker", logging.ERROR, worker=w.index, error=str(err))
            _send(w, signal.SIGKILL)
        code = await w.proc.wait()
        w.exit_code = code
        self._forget(w)
        return code

    def _on_message(self, w: _Worker, line: bytes) -> None:
        message = json.loads(line)
        if message.get("ready"):
            w.ready = True
            self._ever_ready = True
            assert w.proc is not None
            logs.event("worker ready", worker=w.index, pid=w.proc.pid)
            if w.reload_pending is not None:
                _send(w, w.reload_pending)
                w.reload_pending = None
            if not self._all_ready_logged and all(x.ready for x in self.workers):
                self._all_ready_logged = True
                listen = ",".join(str(cfg.listen) for cfg in self.configs)
                logs.event("workers ready", workers=len(self.workers), listen=listen)
                systemd.notifier().ready(self.describe("listening"))
            return
        if "tunnels" in message:
            w.last_views = [TunnelView.from_json(doc) for doc in message["tunnels"]]
            w.last_process = message.get("process", {})
            waiter = w.pending.pop(message.get("id"), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _forget(self, w: _Worker) -> None:
        """The worker is gone: keep its counters (not its gauges) and drop everything that pointed at it."""
        for view in w.last_views:
            if view.retiring:
                continue  # its connections died with the worker, as they would have at the end of the drain
            view.open = 0
            view.last_reload = 0.0
            view.cert_not_after = 0.0
            have = self._retired.get(view.key)
            if have is None:
                self._retired[view.key] = view
            else:
                have.add(view)
        self._retired_dropped_lines += w.last_process.get("log_lines_dropped", 0)
        w.last_views, w.last_process = [], {}
        w.ready = False
        w.reload_pending = None
        if w.writer is not None:
            w.writer.close()
            w.writer = None
        for waiter in w.pending.values():
            if not waiter.done():
                waiter.set_result(None)
        w.pending.clear()

    # -- the status source -------------------------------------------------------------------------------------

    async def _ask(self, w: _Worker) -> None:
        if not w.ready or w.writer is None:
            return
        assert self._loop is not None
        self._next_id += 1
        waiter: asyncio.Future[None] = self._loop.create_future()
        w.pending[self._next_id] = waiter
        w.writer.write(json.dumps({"op": "stats", "id": self._next_id}).encode() + b"\n")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, _STATS_TIMEOUT)
        w.pending.pop(self._next_id, None)

    async def snapshot(self) -> Snapshot:
        await asyncio.gather(*(self._ask(w) for w in self.workers))
        live = merge_views(w.last_views for w in self.workers if w.ready)
        for view in live:
            if not view.retiring and view.key in self._retired:
                view.add(self._retired[view.key])
        ready = sum(w.ready for w in self.workers)
        if self.stopping:
            state = "draining"
        elif ready:
            state = "listening"
        elif self._ever_ready:
            state = "no worker running"
        else:
            state = "initializing"
        dropped = logs.STATE.dropped_lines + self._retired_dropped_lines
        dropped += sum(w.last_process.get("log_lines_dropped", 0) for w in self.workers)
        workers = [
            {
                "index": w.index,
                "pid": w.proc.pid if w.proc is not None and w.exit_code is None else None,
                "ready": w.ready,
                "restarts": w.restarts,
            }
            for w in self.workers
        ]
        process = {"workers": ready, "worker_restarts": self._restarts, "log_lines_dropped": dropped}
        return Snapshot(live, state, process, workers)

    def certificate(self) -> tuple[TunnelConfig, object] | None:
        cfg = status_certificate_config(self.configs)
        return None if cfg is None else (cfg, self._cert_token)


def _send(w: _Worker, sig: signal.Signals) -> None:
    # Not Process.send_signal: it polls first, and a poll that reaps a worker that just died steals its exit
    # status from asyncio's child watcher (which then reports 255). os.kill only signals. Between the watcher
    # reaping a worker and exit_code being set lies one loop iteration: far too short for the pid to be reused.
    if w.proc is not None and w.exit_code is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.proc.pid, sig)


def _describe(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
