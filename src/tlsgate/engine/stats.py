"""What a tunnel counts: ``Stats``, read by the status port (/_status, /_metrics, /metrics) and by tests.

The tunnel, its set-ups and its relays increment plain fields on the hot path; status turns them into
Prometheus and ghostunnel JSON. Nothing here does I/O or logs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
    # --target-http-headers: connections cut for bytes that are not an HTTP/1.x request we may pass on.
    http_refused: int = 0
    # Open connections a reload's re-check closed, by the rule that no longer lets them through.
    rechecked_closed: dict[str, int] = field(default_factory=dict)
    # Routes by server name: route -> {"established": n, "refused": n}; empty for a tunnel without routes.
    route_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def refuse(self, rule: str) -> None:
        self.refused[rule] = self.refused.get(rule, 0) + 1

    def route_event(self, route: str, event: str) -> None:
        counts = self.route_counts.setdefault(route, {})
        counts[event] = counts.get(event, 0) + 1
