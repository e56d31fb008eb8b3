"""What the status port measures: a ``TunnelView`` per tunnel, a ``Snapshot`` per request, and their sources.

A ``StatusSource`` answers ``snapshot()``: ``ServerSource`` reads this process's tunnels; with ``--workers`` the
parent sums what every worker reports (``merge_views``). A ``TunnelView`` is plain data, so it crosses a process
boundary as JSON (``to_json``/``from_json``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from tlsgate import logs
from tlsgate.engine.stats import Stats
from tlsgate.engine.tunnel import Tunnel
from tlsgate.settings.config import TunnelConfig
from tlsgate.settings.status import status_certificate_config

if TYPE_CHECKING:
    from tlsgate.process.supervisor import Server

# Every plain number in Stats is a counter to report (handshake_errors, bytes_in, ...), looked up by name so a
# counter added to Stats shows up here without a second list to keep in step.
COUNTER_FIELDS = tuple(f.name for f in fields(Stats) if f.type in ("int", "float"))


@dataclass
class TunnelView:
    """One tunnel as the status endpoints see it: counters summed over every worker that runs it."""

    key: str
    label: str
    mode: str
    listen: list[str]
    target: str
    open: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    # Open connections a reload's re-check closed, by rule (tunnel.Stats.rechecked_closed).
    rechecked_closed: dict[str, int] = field(default_factory=dict)
    # Routes by server name: route -> {"established": n, "refused": n, "open": n}; empty for a tunnel without.
    routes: dict[str, dict[str, int]] = field(default_factory=dict)
    # Routes by server name: route -> its target ("default": the tunnel's own), for /_status; empty without.
    route_targets: dict[str, str] = field(default_factory=dict)
    # Handshakes per latency bucket (not cumulative); empty unless tunnel.Stats keeps them.
    handshake_buckets: list[int] = field(default_factory=list)
    # Recent durations in seconds ("handshake", "lifetime"), for ghostunnel's timers; every worker's, joined.
    samples: dict[str, list[float]] = field(default_factory=dict)
    last_reload: float = 0.0
    cert_not_after: float = 0.0
    # A tunnel a reload removed or replaced, still relaying the connections it had: reported apart from its
    # successor (same key) until the last of them ends, so no open connection drops out of the numbers.
    retiring: bool = False
    # --target-status: the URL /_status GETs over a connection to the target ("" = a TCP connect is enough),
    # and the CA bundle an https:// one is verified with ("" = the system store).
    target_status: str = ""
    target_status_cafile: str = ""
    # Client --proxy as logs show it (scheme://host:port, never the credentials): /_status checks the proxy.
    proxy: str = ""

    @property
    def state(self) -> str:
        return "retiring" if self.retiring else "active"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TunnelView:
        return cls(**doc)

    def add(self, other: TunnelView) -> None:
        """Fold another worker's view of the same tunnel into this one."""
        self.open += other.open
        for name, value in other.counters.items():
            self.counters[name] = self.counters.get(name, 0) + value
        for rule, count in other.refused.items():
            self.refused[rule] = self.refused.get(rule, 0) + count
        for rule, count in other.rechecked_closed.items():
            self.rechecked_closed[rule] = self.rechecked_closed.get(rule, 0) + count
        for route, counts in other.routes.items():
            mine = self.routes.setdefault(route, {})
            for name, count in counts.items():
                mine[name] = mine.get(name, 0) + count
        if len(other.handshake_buckets) > len(self.handshake_buckets):
            self.handshake_buckets += [0] * (len(other.handshake_buckets) - len(self.handshake_buckets))
        for i, count in enumerate(other.handshake_buckets):
            self.handshake_buckets[i] += count
        for name, values in other.samples.items():
            self.samples[name] = self.samples.get(name, []) + values
        self.last_reload = max(self.last_reload, other.last_reload)
        expiries = [t for t in (self.cert_not_after, other.cert_not_after) if t > 0]
        self.cert_not_after = min(expiries, default=0.0)
        self.listen = self.listen or other.listen


def view_of(key: str, tunnel: Tunnel, *, retiring: bool = False) -> TunnelView:
    stats = tunnel.stats
    counters: dict[str, float] = {name: getattr(stats, name) for name in COUNTER_FIELDS}
    # Bytes of open connections count too, so a long transfer shows as it happens rather than in one jump at its
    # end. A relay adds its bytes to Stats in the same callback that drops it from tunnel.relays: no double count.
    counters["bytes_in"] += sum(relay.bytes_in for relay in tunnel.relays)
    counters["bytes_out"] += sum(relay.bytes_out for relay in tunnel.relays)
    return TunnelView(
        key=key,
        label=tunnel.label,
        mode=tunnel.cfg.mode,
        listen=tunnel.addresses,
        target=tunnel.cfg.target_label,
        proxy=tunnel.cfg.proxy.shown if tunnel.cfg.proxy is not None else "",
        open=tunnel.active,
        counters=counters,
        refused=dict(stats.refused),
        rechecked_closed=dict(stats.rechecked_closed),
        routes=_route_counts(tunnel),
        route_targets=_route_targets(tunnel),
        handshake_buckets=list(stats.handshake_buckets),
        samples={"handshake": list(stats.handshake_samples), "lifetime": list(stats.lifetime_samples)},
        last_reload=tunnel.last_reload,
        cert_not_after=tunnel.runtime.cert_not_after,
        retiring=retiring,
        target_status=tunnel.cfg.target_status or "",
        target_status_cafile=tunnel.cfg.target_cacert or "",
    )


def _route_counts(tunnel: Tunnel) -> dict[str, dict[str, int]]:
    """Per route: connections relayed and refused (tunnel.Stats.route_counts) and open now (by each relay's origin)."""
    counts = {route: dict(events) for route, events in tunnel.stats.route_counts.items()}
    if counts or tunnel.runtime.routes is not None:
        for route in counts.values():
            route["open"] = 0
        for origin in tunnel.origins.values():
            if origin.route:
                route_counts = counts.setdefault(origin.route, {"open": 0})
                route_counts["open"] = route_counts.get("open", 0) + 1
    return counts


def _route_targets(tunnel: Tunnel) -> dict[str, str]:
    routes = tunnel.runtime.routes
    return {route.name: str(route.cfg.target) for route in routes} if routes is not None else {}


def views_of(server: Server) -> list[TunnelView]:
    """The running tunnels, then those a reload retired that still have connections draining."""
    views = [view_of(key, tunnel) for key, tunnel in server.tunnels.items()]
    views += [view_of(key, tunnel, retiring=True) for tunnel, key in server.retired.items()]
    return views


def merge_views(groups: Iterable[Iterable[TunnelView]]) -> list[TunnelView]:
    """Sum views of the same tunnel (same key and state) from several workers; first-seen order is kept."""
    merged: dict[tuple[str, bool], TunnelView] = {}
    for group in groups:
        for view in group:
            have = merged.get((view.key, view.retiring))
            if have is None:
                merged[view.key, view.retiring] = copy.deepcopy(view)
            else:
                have.add(view)
    return list(merged.values())


@dataclass
class Snapshot:
    """Everything one status request reports."""

    tunnels: list[TunnelView]
    # ghostunnel's message: "initializing", "listening", "draining"; with --workers also "no worker running".
    state: str
    # Process-wide counters that belong to no tunnel (log lines dropped, worker restarts, workers running).
    process: dict[str, float] = field(default_factory=dict)
    # --workers: one entry per worker process (index, pid, ready, restarts); None in a single process.
    workers: list[dict[str, Any]] | None = None


class StatusSource(Protocol):
    async def snapshot(self) -> Snapshot: ...

    def certificate(self) -> tuple[TunnelConfig, object] | None:
        """The tunnel whose certificate HTTPS status serves, and a token that changes whenever it is reloaded."""


class ServerSource:
    """The tunnels of this process."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def snapshot(self) -> Snapshot:
        server = self.server
        if server.stopping:
            state = "draining"
        elif server.started.is_set():
            state = "listening"
        else:
            state = "initializing"
        return Snapshot(views_of(server), state, {"log_lines_dropped": logs.STATE.dropped_lines})

    def certificate(self) -> tuple[TunnelConfig, object] | None:
        tunnels = list(self.server.tunnels.values())
        chosen = status_certificate_config([tunnel.cfg for tunnel in tunnels])
        for tunnel in tunnels:
            if tunnel.cfg is chosen:
                return tunnel.cfg, tunnel.runtime
        return None
