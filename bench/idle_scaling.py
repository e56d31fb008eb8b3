#!/usr/bin/env python3
"""Memory cost of idle TLS connections: proxy RSS with 1, 100, 1,000 and 10,000 of them held open.

For each proxy and each count N a fresh proxy process is started (pinned to CPU 0) in front of an nginx backend
(CPU 1). This script, pinned to CPU 1 too, opens N TLS connections through it, sends one small GET on each and
reads the reply (so both legs are established and every buffer has been used once), waits a second, and reads the
proxy tree's VmRSS. The cost is RSS(with N idle) - RSS(before), reported in total and per connection.

    .venv/bin/python bench/idle_scaling.py                         # tlsgate and haproxy, 1..10,000
    .venv/bin/python bench/idle_scaling.py --only tlsgate,tlsgate-asyncio,baseline,haproxy --counts 1,1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: localhost\r\n\r\n"


async def open_idle(port: int, n: int, timeout: float) -> tuple[list[asyncio.StreamWriter], int]:
    """Open n TLS connections, one request/response each; returns the open writers and the failure count."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sem = asyncio.Semaphore(200)
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        async with sem:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 30)
            try:
                w.write(REQUEST)
                await w.drain()
                await asyncio.wait_for(r.readuntil(b"ok\n"), 30)
            except BaseException:
                w.close()
                raise
            writers.append(w)

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return writers, sum(isinstance(x, BaseException) for x in results)


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    for w in writers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.wait_closed(), 2)


def max_conns(fd_limit: int) -> int:
    """Relayed connections one proxy process can hold: two fds each, plus headroom for listeners and logs."""
    return (fd_limit - 100) // 2


def measure(wd: bl.Workdir, name: str, backend: str, n: int, timeout: float) -> dict[str, Any]:
    port = bl.free_port()
    argv = bl.proxy_argv(name, wd, port, backend, maxconn=min(n + 1000, max_conns(bl.fd_limit())))
    proc = wd.spawn(f"{name}-{n}", argv, bl.PROXY_CPU, port)
    try:
        time.sleep(0.5)
        rss0 = bl.rss_kib(proc.pid)
        cpu0 = bl.cpu_seconds_ns(proc.pid)
        loop = asyncio.new_event_loop()
        try:
            t0 = time.monotonic()
            writers, failed = loop.run_until_complete(open_idle(port, n, timeout))
            opened_s = time.monotonic() - t0
            time.sleep(1.0)
            rss1 = bl.rss_kib(proc.pid)
            cpu1 = bl.cpu_seconds_ns(proc.pid)
            loop.run_until_complete(close_all(writers))
        finally:
            loop.close()
    finally:
        bl.stop_group(proc)
        wd.started.remove(proc)
    held = len(writers)
    return {
        "proxy": name,
        "conns": n,
        "held": held,
        "failed": failed,
        "rss_before_KiB": rss0,
        "rss_after_KiB": rss1,
        "delta_KiB": rss1 - rss0,
        "KiB_per_conn": (rss1 - rss0) / max(held, 1),
        "setup_cpu_us_per_conn": 1e6 * (cpu1 - cpu0) / max(held, 1),
        "open_s": round(opened_s, 2),
    }


def table(rows: list[dict[str, Any]], names: list[str], counts: list[int]) -> str:
    by = {(r["proxy"], r["asked"]): r for r in rows}
    head = ["proxy", *(f"{n:,} idle" for n in counts)]
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(counts) + "|"]
    for name in names:
        cells = [name]
        for n in counts:
            r = by.get((name, n))
            if r is None:
                cells.append("-")
                continue
            cell = f"{r['KiB_per_conn']:.1f} KiB/conn ({r['rss_after_KiB'] / 1024:.1f} MiB)"
            if r["conns"] != n:
                cell += f" [{r['conns']:,} conns: fd limit]"
            if r["failed"]:
                cell += f" [{r['failed']} failed]"
            cells.append(cell)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="tlsgate,haproxy", help="tlsgate, tlsgate-asyncio, haproxy, baseline")
    ap.add_argument("--counts", default="1,100,1000,10000", help="comma-separated connection counts")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds allowed to open one batch")
    ap.add_argument("--json", type=Path, help="raw results (default bench/results/idle-<time>.json)")
    args = ap.parse_args()
    names = args.only.split(",")
    counts = [int(c) for c in args.counts.split(",")]
    if any(n.startswith("tlsgate") for n in names):
        ok, why = bl.tlsgate_ready()
        if not ok:
            bl.log(f"idle_scaling: {why}")
            return 2
    bl.ensure_tools(["nginx", "openssl", "taskset", *(n for n in names if n == "haproxy")])
    # client + proxy (two fds per connection) + nginx, with room to spare
    limit = bl.raise_fd_limit(2 * max(counts) + 200)
    cap = max_conns(limit)
    capped = {n: min(n, cap) for n in counts}
    for n, c in capped.items():
        if c < n:
            bl.log(f"idle_scaling: the fd limit is {limit} and cannot be raised here; {n} connections -> {c}")
    os.sched_setaffinity(0, {int(bl.LOAD_CPU)})
    rows: list[dict[str, Any]] = []
    with bl.workdir("tlsgate-idle-") as wd:
        backend = f"127.0.0.1:{bl.start_nginx(wd, {'small.txt': 0})}"
        (wd.path / "www" / "small.txt").write_text("ok\n")
        for name in names:
            for n in counts:
                r = measure(wd, name, backend, capped[n], args.timeout)
                r["asked"] = n
                rows.append(r)
                bl.log(
                    f"{name:16} {n:6} idle: rss {r['rss_before_KiB'] / 1024:7.1f} -> {r['rss_after_KiB'] / 1024:7.1f} "
                    f"MiB = {r['KiB_per_conn']:6.1f} KiB/conn (held {r['held']}, failed {r['failed']}, "
                    f"{r['open_s']}s to open)"
                )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.json or bl.RESULTS / f"idle-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"time": stamp, "rows": rows}, indent=1) + "\n")
    print(f"### Idle connections: proxy RSS growth per connection (total RSS in brackets), {stamp}\n")
    print(table(rows, names, counts))
    print(f"\nRaw results: `{bl.shown(out)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
