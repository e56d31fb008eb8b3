"""Telling the developer when the target of ``tlsgate dev`` is not listening yet, without repeating itself.

`TargetWatch` is sans-IO: it is fed probe results and monotonic times and answers with the line to show, if
any, so its timing is tested without clocks. `probe_target` makes one connection attempt; `watch_target`
loops the two until the target answers, handing the lines to the ``say`` callback of the front.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from tlsgate.settings.addresses import Address


class TargetWatch:
    """What to tell the developer about a target that does not answer yet; sans-IO, fed with probe results.

    The first failed probe says so at once. While the target stays down, reminders come at growing gaps
    (``first_reminder``, then twice that, up to ``max_gap``) so a terminal left open for an hour shows a
    handful of lines, not thousands. The first success after a failure says so once and ends the watch:
    from then on the tunnel's own log reports any connection the target refuses.
    """

    def __init__(self, target: str, *, first_reminder: float = 30.0, max_gap: float = 600.0) -> None:
        self.target = target
        self.first_reminder = first_reminder
        self.max_gap = max_gap
        self.done = False
        self._down_since: float | None = None
        self._gap = first_reminder
        self._next_reminder = 0.0

    def observe(self, up: bool, now: float) -> str | None:
        """Record one probe at monotonic time ``now``; returns the line to show, if any."""
        if self.done:
            return None
        if up:
            self.done = True
            if self._down_since is None:
                return None
            return f"{self.target} answers now; requests go through"
        if self._down_since is None:
            self._down_since = now
            self._next_reminder = now + self._gap
            return f"nothing listens on {self.target} yet; tlsgate keeps going and will connect when it does"
        if now < self._next_reminder:
            return None
        waited = _span(now - self._down_since)
        self._gap = min(self._gap * 2, self.max_gap)
        self._next_reminder = now + self._gap
        return f"still nothing listens on {self.target} (waiting {waited}); start it and reload the page"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{round(seconds)}s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds / 3600)} h"


async def probe_target(target: Address, timeout: float = 2.0) -> bool:
    """True when something accepts a connection at ``target`` (every address a host name has is tried)."""
    try:
        async with asyncio.timeout(timeout):
            if target.is_unix:
                _, writer = await asyncio.open_unix_connection(target.path)
            else:
                _, writer = await asyncio.open_connection(target.host, target.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def watch_target(
    target: Address, say: Callable[[str], None], *, interval: float = 1.0, watch: TargetWatch | None = None
) -> None:
    """Probe ``target`` every ``interval`` seconds until it answers, passing `TargetWatch`'s lines to ``say``."""
    watch = watch or TargetWatch(str(target))
    loop = asyncio.get_running_loop()
    while not watch.done:
        message = watch.observe(await probe_target(target, timeout=max(interval, 1.0)), loop.time())
        if message:
            say(message)
        if not watch.done:
            await asyncio.sleep(interval)
