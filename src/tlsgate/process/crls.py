"""Whether the CRLs a tunnel loaded are current: a warning for a stale one, a refusal past ``--crl-max-age``.

A CRL says when it was issued (``lastUpdate``) and when the next one is due (``nextUpdate``). Past
``nextUpdate`` the list may be missing revocations made since; tlsgate keeps using it (refusing every client
because the CA's cron job failed is an outage), but says so at start, at every reload, in ``check-config`` and
in ``policy check``. ``--crl-max-age`` is the hard limit: a CRL issued longer ago than that stops a start and
fails a reload (the running policy stays), so a dead CRL pipeline is noticed before it matters.

The first three functions take plain values; the last two are what start-up and reload call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from tlsgate import logs
from tlsgate.engine.runtime import Runtime
from tlsgate.policy.crl import CrlSource
from tlsgate.settings.config import ConfigErrors, TunnelConfig
from tlsgate.settings.durations import format_duration

__all__ = ["check_runtime_crls", "crl_problems", "crl_warning", "log_overdue_crls", "overdue_crls"]


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def overdue_crls(sources: Iterable[CrlSource], now: datetime | None = None) -> list[CrlSource]:
    """The CRLs whose ``nextUpdate`` has passed (a CRL without one is never overdue)."""
    now = now or datetime.now(UTC)
    return [s for s in sources if s.next_update is not None and s.next_update < now]


def crl_warning(source: CrlSource) -> str:
    """One line for an overdue CRL, naming the file and the date it was due."""
    assert source.next_update is not None
    return f"CRL {source.path} is past its next update ({_when(source.next_update)}): publish a new one"


def crl_problems(sources: Iterable[CrlSource], max_age: float, now: datetime | None = None) -> list[str]:
    """One message per CRL issued more than ``max_age`` seconds before ``now``; none when ``max_age`` is 0."""
    if max_age <= 0:
        return []
    now = now or datetime.now(UTC)
    limit = timedelta(seconds=max_age)
    return [
        f"--crl {s.path}: issued {_when(s.last_update)}, longer ago than --crl-max-age {format_duration(max_age)}; "
        "publish a new CRL"
        for s in sources
        if now - s.last_update > limit
    ]


def check_runtime_crls(cfg: TunnelConfig, runtime: Runtime, now: datetime | None = None) -> list[CrlSource]:
    """What start-up, reload and check-config do with a freshly built runtime: ConfigErrors when a CRL is older
    than ``cfg.crl_max_age``, else the overdue CRLs to warn of."""
    sources = runtime.policy.revocation.sources
    problems = crl_problems(sources, cfg.crl_max_age, now)
    if problems:
        raise ConfigErrors(problems)
    return overdue_crls(sources, now)


def log_overdue_crls(label: str, overdue: Iterable[CrlSource]) -> None:
    """One warning line per overdue CRL, with the file and the date in fields a collector can match on."""
    for source in overdue:
        assert source.next_update is not None
        logs.event(
            "CRL is past its next update: publish a new one", logging.WARNING,
            tunnel=label, crl=source.path, next_update=_when(source.next_update),
        )  # fmt: skip
