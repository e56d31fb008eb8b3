"""``/_metrics`` (ghostunnel's JSON list) and ``/metrics`` (Prometheus text 0.0.4) from one ``Snapshot``.

Both read the same table, ``_METRICS``: one row per counter with its Prometheus name, its ghostunnel dotted
name and its help text, so the two pages never disagree about what is counted.
"""

from __future__ import annotations

import math
import platform
import re
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tlsgate import __version__
from tlsgate.engine import stats as engine_stats
from tlsgate.status.model import Snapshot, TunnelView
from tlsgate.tls import internals


@dataclass(frozen=True)
class _Metric:
    field: str  # a TunnelView.counters key, or "open"
    kind: str  # Prometheus type: counter or gauge
    prometheus: str  # name after "<prefix>_"
    dotted: str  # ghostunnel-style name after "<prefix>." in /_metrics
    help: str


# fmt: off
_METRICS = (
    _Metric("open", "gauge", "connections_open", "conn.open", "Connections open now, in set-up or relaying."),
    _Metric("accepted", "counter", "connections_accepted_total", "accept.total", "Connections accepted."),
    _Metric("established", "counter", "connections_established_total", "accept.success",
            "Connections that passed every check and were connected to the target."),
    _Metric("closed", "counter", "connections_closed_total", "conn.closed", "Relayed connections that ended."),
    _Metric("handshake_errors", "counter", "handshake_errors_total", "accept.error",
            "Client TLS handshakes that failed or timed out, untrusted and expired certificates included."),
    _Metric("handshake_timeouts", "counter", "handshake_timeouts_total", "accept.timeout",
            "Client TLS handshakes cut by --handshake-timeout (counted in handshake_errors_total too)."),
    _Metric("connect_timeouts", "counter", "connect_timeouts_total", "conn.timeout",
            "Targets that did not connect, or finish their TLS handshake, within --connect-timeout."),
    _Metric("target_errors", "counter", "target_errors_total", "conn.target_error",
            "Connections whose target could not be reached, or failed its TLS handshake or identity check."),
    _Metric("proxy_header_errors", "counter", "proxy_header_errors_total", "accept.proxy_header_error",
            "Connections refused for a malformed PROXY protocol header."),
    _Metric("http_refused", "counter", "http_refused_total", "conn.http_refused",
            "Connections cut by --target-http-headers for what is not an HTTP/1.x request (400, 431, 501, 505)."),
    _Metric("accept_errors", "counter", "accept_errors_total", "accept.os_error",
            "accept() failures, such as running out of file descriptors."),
    _Metric("internal_errors", "counter", "internal_errors_total", "conn.internal_error",
            "Exceptions caught in tlsgate's own connection code (bugs); each cut one connection."),
    _Metric("bytes_in", "counter", "received_bytes_total", "conn.bytes_in", "Bytes from clients to targets."),
    _Metric("bytes_out", "counter", "sent_bytes_total", "conn.bytes_out", "Bytes from targets to clients."),
    _Metric("reloads", "counter", "reloads_total", "reload.total", "Reloads of certificates and policies."),
    _Metric("reload_errors", "counter", "reload_errors_total", "reload.error",
            "Reloads that failed and kept the running certificates and policies."),
)
# fmt: on

# Upper bounds (seconds) of handshake_duration_seconds buckets, used when tunnel.Stats counts handshakes per bucket.
HANDSHAKE_BUCKETS: tuple[float, ...] = getattr(engine_stats, "HANDSHAKE_BUCKETS", ())


def _value(view: TunnelView, name: str) -> float:
    return view.open if name == "open" else view.counters.get(name, 0)


def json_metrics(snapshot: Snapshot, prefix: str) -> list[dict[str, Any]]:
    """ghostunnel's /_metrics: a list of {"metric": name, "value": number}, with the tunnel named per entry."""
    now = int(time.time())
    host = socket.gethostname()
    entries: list[dict[str, Any]] = []

    def add(name: str, value: float, view: TunnelView | None) -> None:
        entry: dict[str, Any] = {"timestamp": now, "metric": f"{prefix}.{name}", "value": value, "hostname": host}
        if view is not None:
            entry["tunnel"] = view.label
            if view.retiring:
                entry["state"] = view.state
        entries.append(entry)

    for view in snapshot.tunnels:
        for metric in _METRICS:
            add(metric.dotted, _value(view, metric.field), view)
        for rule, count in sorted(view.refused.items()):
            add(f"accept.refused.{rule}", count, view)
        for rule, count in sorted(view.rechecked_closed.items()):
            add(f"conn.rechecked_closed.{rule}", count, view)
        for route, counts in sorted(view.routes.items()):
            for event, count in sorted(counts.items()):
                add(f"route.{route}.{event}", count, view)
        add("conn.handshake.count", _value(view, "handshakes"), view)
        add("conn.handshake.seconds", _value(view, "handshake_seconds_total"), view)
        for suffix, value in timer_entries(view.samples.get("handshake", [])):
            add(f"conn.handshake.{suffix}", value, view)
        add("conn.lifetime.count", _value(view, "closed"), view)
        add("conn.lifetime.seconds", _value(view, "lifetime_seconds_total"), view)
        for suffix, value in timer_entries(view.samples.get("lifetime", [])):
            add(f"conn.lifetime.{suffix}", value, view)
        if view.cert_not_after:
            add("cert.not_after", int(view.cert_not_after), view)
    for name, value in sorted(snapshot.process.items()):
        add(f"process.{name}", value, None)
    return entries


TIMER_PERCENTILES = (0.5, 0.75, 0.95, 0.99)


def timer_entries(samples: Sequence[float]) -> list[tuple[str, float]]:
    """ghostunnel's timer entries after ``.count``: min, max, mean and the 50/75/95/99th percentiles of the
    recent samples, in **nanoseconds** as Go's timers report them (0 with no sample, as there).

    Percentiles interpolate as go-metrics' ``SamplePercentiles`` does: position p*(n+1) in the sorted sample.
    """
    # Whole nanoseconds first, as Go's timers hold them, so min/max and the percentiles agree exactly.
    ordered = sorted(round(value * 1e9) for value in samples)
    n = len(ordered)
    if not n:
        return [(name, 0) for name in ("min", "max", "mean", *(_percentile_name(p) for p in TIMER_PERCENTILES))]
    entries: list[tuple[str, float]] = [("min", ordered[0]), ("max", ordered[-1]), ("mean", sum(ordered) / n)]
    for p in TIMER_PERCENTILES:
        pos = p * (n + 1)
        if pos < 1:
            value: float = ordered[0]
        elif pos >= n:
            value = ordered[-1]
        else:
            lower, upper = ordered[int(pos) - 1], ordered[int(pos)]
            value = lower + (pos - math.floor(pos)) * (upper - lower)
        entries.append((_percentile_name(p), value))
    return entries


def _percentile_name(p: float) -> str:
    return f"{round(p * 100)}-percentile"


def prometheus_name(prefix: str) -> str:
    """``prefix`` made a valid Prometheus metric name prefix: anything outside [a-zA-Z0-9_:] becomes ``_``."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", prefix)
    return name if name and not name[0].isdigit() else f"_{name}"


class _Exposition:
    """Prometheus text format 0.0.4: ``# HELP``, ``# TYPE``, then ``name{label="value"} number`` lines."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prometheus_name(prefix)
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> str:
        full = f"{self.prefix}_{name}"
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {full} {escaped}", f"# TYPE {full} {kind}"]
        return full

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        if labels:
            inner = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(view: TunnelView) -> dict[str, str]:
    """A tunnel's series labels. A retiring tunnel adds ``state="retiring"``, so it never collides with its
    successor under the same name, and running tunnels keep the label set dashboards already use."""
    if view.retiring:
        return {"tunnel": view.label, "state": view.state}
    return {"tunnel": view.label}


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def prometheus_text(snapshot: Snapshot, prefix: str) -> str:
    out = _Exposition(prefix)
    tunnels = snapshot.tunnels

    def per_tunnel() -> Iterator[tuple[TunnelView, dict[str, str]]]:
        for view in tunnels:
            yield view, _labels(view)

    for metric in _METRICS:
        name = out.family(metric.prometheus, metric.kind, metric.help)
        for view, labels in per_tunnel():
            out.sample(name, labels, _value(view, metric.field))

    name = out.family("connections_refused_total", "counter", "Connections refused, by the rule that refused them.")
    for view, labels in per_tunnel():
        for rule, count in sorted(view.refused.items()):
            out.sample(name, {**labels, "rule": rule}, count)

    name = out.family(
        "rechecked_closed_total", "counter", "Open connections a reload closed: the new rules or CRLs refuse them."
    )
    for view, labels in per_tunnel():
        for rule, count in sorted(view.rechecked_closed.items()):
            out.sample(name, {**labels, "rule": rule}, count)

    _route_families(out, tunnels)
    _handshake_family(out, tunnels)

    name = out.family(
        "connection_duration_seconds", "summary", "How long relayed connections lasted, from accept to close."
    )
    for view, labels in per_tunnel():
        out.sample(f"{name}_sum", labels, _value(view, "lifetime_seconds_total"))
        out.sample(f"{name}_count", labels, _value(view, "closed"))

    name = out.family("last_reload_timestamp_seconds", "gauge", "When certificates and policies were last loaded.")
    for view, labels in per_tunnel():
        out.sample(name, labels, view.last_reload)

    name = out.family(
        "certificate_expiry_timestamp_seconds", "gauge", "When the certificate this tunnel presents expires."
    )
    for view, labels in per_tunnel():
        if view.cert_not_after:
            out.sample(name, labels, int(view.cert_not_after))

    process_metrics = {
        "log_lines_dropped": ("log_lines_dropped_total", "counter", "Log lines lost to a broken log destination."),
        "workers": ("workers", "gauge", "Worker processes running (--workers)."),
        "worker_restarts": ("worker_restarts_total", "counter", "Worker processes restarted after dying."),
    }
    for key, (metric_name, kind, help_text) in process_metrics.items():
        if key in snapshot.process:
            out.sample(out.family(metric_name, kind, help_text), {}, snapshot.process[key])

    name = out.family("build_info", "gauge", "Always 1; the labels say which tlsgate and Python are running.")
    labels = {"version": __version__, "python": platform.python_version(), "internals": internals.report().label()}
    out.sample(name, labels, 1)
    return out.text()


def _route_families(out: _Exposition, tunnels: list[TunnelView]) -> None:
    """Routes by server name: each tunnel's numbers again, by route (present only on tunnels with routes)."""
    routed = [view for view in tunnels if view.routes]
    if not routed:
        return
    for key, metric, kind, help_text in (
        ("established", "route_connections_total", "counter",
         "Connections that passed the route's rules and were connected to its target, by route."),
        ("refused", "route_refused_total", "counter",
         "Connections a route's rules refused (names no route claims count in connections_refused_total)."),
        ("open", "route_open_connections", "gauge", "Relayed connections open now, by route."),
    ):  # fmt: skip
        name = out.family(metric, kind, help_text)
        for view in routed:
            labels = _labels(view)
            for route, counts in sorted(view.routes.items()):
                out.sample(name, {**labels, "route": route}, counts.get(key, 0))


def _handshake_family(out: _Exposition, tunnels: list[TunnelView]) -> None:
    bounds = HANDSHAKE_BUCKETS
    with_buckets = bool(bounds) and all(len(v.handshake_buckets) >= len(bounds) for v in tunnels)
    help_text = "Time from accept to a completed TLS handshake with the client."
    name = out.family("handshake_duration_seconds", "histogram" if with_buckets else "summary", help_text)
    for view in tunnels:
        labels = _labels(view)
        count = _value(view, "handshakes")
        if with_buckets:
            running = 0
            for bound, in_bucket in zip(bounds, view.handshake_buckets, strict=False):
                running += in_bucket
                out.sample(f"{name}_bucket", {**labels, "le": _number(bound)}, running)
            out.sample(f"{name}_bucket", {**labels, "le": "+Inf"}, count)
        out.sample(f"{name}_sum", labels, _value(view, "handshake_seconds_total"))
        out.sample(f"{name}_count", labels, count)
