"""One ``--workers`` worker: a fresh interpreter that serves the parent's tunnels as a single process would.

The parent (``tlsgate.process.workers``) starts it as ``python -P -c ...`` with its end of a socketpair as
argv[1]. The first message on it is a pickled `WorkerPlan`: the tunnels, the process options, the listening
sockets the parent shares (unix and systemd ones, by fd), the real ports of port-0 addresses and the
session-ticket secret. After that the socketpair carries JSON lines: ``ready`` once this worker listens, and
answers to the parent's ``stats`` requests. End of file means the parent is gone: the worker drains and exits
instead of lingering on the port.

A worker is a `Server` with the inherited sockets; everything else (signals, reload, drain) is the
single-process lifecycle. It exits with `EXIT_CUT`, not 1, when its drain had to cut connections, so the parent
can tell "stopped as told" from "crashed".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tlsgate import logs
from tlsgate.errors import TlsgateError
from tlsgate.process.check import LoadedTunnels, checked_runtimes
from tlsgate.process.lifecycle import EXIT_CONNECTIONS_CUT, choose_loop
from tlsgate.process.ports import apply_listen_map
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import TunnelConfig
from tlsgate.status.model import views_of
from tlsgate.tls import tickets

# A worker's exit code when it stopped as told but had to cut connections at --shutdown-timeout. Not 1, which any
# uncaught error also gives: the parent must not call this worker broken. The parent then exits 1 itself.
EXIT_CUT = 4


@dataclass
class WorkerPlan:
    """What a worker needs, sent to it pickled as its first message."""

    index: int
    configs: list[TunnelConfig]
    options: ProcessOptions
    # Tunnel key -> the fd of the parent's unix or systemd listening socket (fd numbers survive pass_fds unchanged).
    unix_fds: dict[str, int]
    # Port-0 listen addresses -> the concrete address the parent reserved, applied to reloaded configs too.
    listen_map: dict[Address, Address]
    load_configs: Callable[[], list[TunnelConfig]] | None
    # The parent's session-ticket secret: every worker, restarted ones too, encrypts tickets alike (tickets.py).
    ticket_key: bytes


def worker_main() -> None:
    """Entry point of a worker process (``python -P -c ...``; argv[1] is its end of the socketpair)."""
    control = socket.socket(fileno=int(sys.argv[1]))
    plan: WorkerPlan = pickle.loads(_receive(control))
    tickets.set_process_key(plan.ticket_key)  # before any context is built
    logs.setup_logging(plan.options.log_format, plan.options.quiet)
    logs.STATE.tags["worker"] = plan.index  # every line says which worker wrote it
    try:
        code = int(choose_loop(plan.options.loop)(_work(plan, control)))
        if code == EXIT_CONNECTIONS_CUT:
            code = EXIT_CUT
    except TlsgateError as err:
        for line in str(err).splitlines():
            logs.event("worker failed to start", logging.ERROR, error=line)
        code = 2
    raise SystemExit(code)


def _receive(control: socket.socket) -> bytes:
    size = int.from_bytes(_receive_exactly(control, 8), "big")
    return _receive_exactly(control, size)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise SystemExit(1)  # the parent went away before we even started
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _WorkerServer(Server):
    """A Server that starts on the listening sockets the parent handed down (unix listeners)."""

    announce_overdue_crls = False  # the parent said it once at start; each worker still says it on reload
    announces_internals = False  # the parent did

    def __init__(
        self,
        configs: Sequence[TunnelConfig],
        options: ProcessOptions,
        *,
        load_configs: Callable[[], list[TunnelConfig]] | None,
        inherited: dict[str, list[socket.socket]],
    ) -> None:
        super().__init__(configs, options, load_configs=load_configs)
        self.inherited = inherited

    def start(self, listeners: dict[str, list[socket.socket]] | None = None) -> None:
        super().start(listeners if listeners is not None else self.inherited)


async def _work(plan: WorkerPlan, control: socket.socket) -> int:
    inherited: dict[str, list[socket.socket]] = {}
    for key, fd in plan.unix_fds.items():
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        inherited[key] = [sock]
    load = mapped_loader(plan.load_configs, plan.listen_map) if plan.load_configs is not None else None
    server = _WorkerServer(plan.configs, plan.options, load_configs=load, inherited=inherited)
    control.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=control)

    def ready(_: Server) -> None:
        writer.write(b'{"ready": true}\n')

    answering = asyncio.ensure_future(_answer(server, reader, writer))
    try:
        return await server.serve(ready)
    finally:
        answering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answering
        writer.close()


def mapped_loader(
    load: Callable[[], list[TunnelConfig]], listen_map: dict[Address, Address]
) -> Callable[[], list[TunnelConfig]]:
    """A worker's reload: ``load``, with the parent's concrete ports in place of port 0 (`apply_listen_map`).

    The runtimes the check in ``load`` built stay with the mapped tunnels: a runtime does not depend on the
    listen address, and building them again would read every certificate twice per worker and reload.
    """

    def mapped() -> list[TunnelConfig]:
        loaded = load()
        tunnels = apply_listen_map(loaded, listen_map)
        built = checked_runtimes(loaded)
        return LoadedTunnels(tunnels, built) if built is not None else tunnels

    return mapped


async def _answer(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the parent's stats requests; when the parent is gone, drain and exit as on SIGTERM."""
    try:
        while line := await reader.readline():
            request: dict[str, Any] = json.loads(line)
            if request.get("op") == "stats":
                reply = {
                    "id": request.get("id"),
                    "tunnels": [view.to_json() for view in views_of(server)],
                    "process": {"log_lines_dropped": logs.STATE.dropped_lines},
                }
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
    except OSError:
        pass
    if not server.stopping:
        # Nobody will signal or restart this worker any more: finish the open connections and leave the port.
        logs.event("parent process is gone; shutting down", logging.WARNING)
        server.stop()
