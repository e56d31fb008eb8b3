#!/usr/bin/env python3
"""New connections per second with `--workers 1` and `--workers 2`, and what a 2-core machine can show of it.

Load: `wrk -H 'Connection: close'` on a 3-byte file, so every request is a full TLS 1.3 handshake (ECDSA P-256)
plus one relayed request, exactly peerbench's new-connection phase. Each configuration runs in a fresh proxy
process; rounds are interleaved and the table shows the median. Two layouts:

  pinned   proxy on CPU 0, nginx and wrk on CPU 1 (as bench/run.py). Two workers then share one core: this shows
           what a second process costs, not what it gains.
  shared   proxy, nginx and wrk all free to use CPUs 0 and 1. Two workers can run in parallel, but the load
           generator and the backend need the same two cores, so conn/s is bounded by the machine as a whole.

For each run: conn/s (wrk), proxy CPU µs per connection (whole process tree, schedstat ns), the load side's
(wrk + nginx) CPU µs per connection, how busy the machine was, how the connections' CPU split between workers,
and `capacity` = workers x 1e6 / (proxy CPU µs per connection): the conn/s the proxy would reach with one
whole core per worker and the load elsewhere. Its ratio between 2 and 1 workers is the scaling a machine with
spare cores for the load would show; it equals 2.0 when a second worker costs nothing per connection.

haproxy with nbthread 1 and 2 runs in the same layouts as a yardstick for what the machine allows.

    .venv/bin/python bench/workers_scaling.py                 # ~3 minutes
    .venv/bin/python bench/workers_scaling.py --secs 5 --rounds 1 --no-haproxy
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

BOTH = "0,1"


@dataclass(frozen=True)
class Config:
    name: str  # e.g. "tlsgate w2"
    proxy: str  # tlsgate or haproxy
    n: int  # workers (tlsgate) or threads (haproxy)
    layout: str  # pinned or shared

    @property
    def proxy_cpus(self) -> str:
        return bl.PROXY_CPU if self.layout == "pinned" else BOTH

    @property
    def load_cpus(self) -> str:
        return bl.LOAD_CPU if self.layout == "pinned" else BOTH


def per_process_ns(pid: int) -> dict[int, float]:
    """On-CPU seconds of each process in the tree (all its threads, from schedstat)."""
    out: dict[int, float] = {}
    for p in bl.proc_tree(pid):
        ns = 0
        with contextlib.suppress(OSError):
            for t in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    ns += int(Path(f"/proc/{p}/task/{t}/schedstat").read_text().split()[0])
        out[p] = ns / 1e9
    return out


def machine_busy() -> tuple[int, int]:
    """(busy jiffies, total jiffies) over all CPUs from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def pin_tree(pid: int, cpus: str) -> None:
    mask = {int(c) for c in cpus.split(",")}
    for p in bl.proc_tree(pid):
        with contextlib.suppress(OSError):
            for t in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(t), mask)


def argv_for(c: Config, wd: bl.Workdir, port: int, backend: str) -> list[str]:
    if c.proxy == "haproxy":
        return bl.haproxy_argv(wd, port, backend, threads=c.n)
    return [*bl.proxy_argv("tlsgate", wd, port, backend), "--workers", str(c.n)]


def run(c: Config, wd: bl.Workdir, backend: str, nginx_pid: int, secs: int, conns: int) -> dict[str, Any]:
    pin_tree(nginx_pid, c.load_cpus)
    port = bl.free_port()
    proc = wd.spawn(c.name.replace(" ", "-"), argv_for(c, wd, port, backend), c.proxy_cpus, port)
    try:
        time.sleep(1.5 if c.n > 1 else 0.5)  # every worker listening
        threads, conns = (1, conns) if c.layout == "pinned" else (2, 2 * conns)
        url = f"https://127.0.0.1:{port}/small.txt"
        warm = ["taskset", "-c", c.load_cpus, "wrk", f"-t{threads}", f"-c{conns}", "-d1s", "-H", "Connection: close"]
        subprocess.run([*warm, url], capture_output=True, check=False)
        cmd = ["taskset", "-c", c.load_cpus, "wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s"]
        cmd += ["-H", "Connection: close", url]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        p0, n0, m0 = per_process_ns(proc.pid), bl.cpu_seconds_ns(nginx_pid), machine_busy()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout  # wrk, reaped: in RUSAGE
        p1, n1, m1 = per_process_ns(proc.pid), bl.cpu_seconds_ns(nginx_pid), machine_busy()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        w_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    finally:
        bl.stop_group(proc)
    m = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise RuntimeError(f"wrk output not understood: {out[-500:]}")
    reqs = int(m.group(1))
    errs = re.search(r"Socket errors: (.*)", out)
    delta = {p: p1.get(p, 0.0) - p0.get(p, 0.0) for p in p1}
    proxy_cpu = sum(delta.values())
    workers = sorted((v for p, v in delta.items() if p != proc.pid), reverse=True)
    if c.proxy == "haproxy" or c.n == 1:
        workers = []
    shares = [round(v / proxy_cpu, 3) for v in workers] if proxy_cpu > 0 and c.n > 1 and c.proxy != "haproxy" else []
    cpu_us = 1e6 * proxy_cpu / max(1, reqs)
    return {
        "conn_per_s": float(rps.group(1)),
        "requests": reqs,
        "socket_errors": errs.group(1) if errs else "",
        "proxy_cpu_us_per_conn": cpu_us,
        "load_cpu_us_per_conn": 1e6 * (w_cpu + n1 - n0) / max(1, reqs),
        "proxy_cores_busy": proxy_cpu / secs,
        "machine_busy": (m1[0] - m0[0]) / max(1, m1[1] - m0[1]),
        "worker_shares": shares,
        "parent_cpu_us_per_conn": 1e6 * delta.get(proc.pid, 0.0) / max(1, reqs) if workers else 0.0,
        "capacity_conn_per_s": c.n * 1e6 / cpu_us if cpu_us > 0 else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secs", type=int, default=8, help="seconds of wrk per run (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; the table shows the median (default 2)")
    ap.add_argument("--conns", type=int, default=20, help="wrk connections (pinned; shared: 2 threads, twice)")
    ap.add_argument("--only-layout", choices=["pinned", "shared"], help="run one layout only")
    ap.add_argument("--no-haproxy", action="store_true", help="skip the haproxy nbthread 1/2 yardstick")
    ap.add_argument("--json", type=Path, help="raw results (default bench/results/workers-<time>.json)")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        bl.log("workers_scaling: needs at least 2 cores")
        return 2
    ok, why = bl.tlsgate_ready()
    if not ok:
        bl.log(f"workers_scaling: {why}")
        return 2
    bl.ensure_tools(["nginx", "wrk", "openssl", "taskset", *([] if args.no_haproxy else ["haproxy"])])
    bl.raise_fd_limit(20000)
    configs = [Config(f"tlsgate w{n} {lay}", "tlsgate", n, lay) for lay in ("pinned", "shared") for n in (1, 2)]
    if not args.no_haproxy:
        configs += [Config("haproxy t1 pinned", "haproxy", 1, "pinned")]
        configs += [Config(f"haproxy t{n} shared", "haproxy", n, "shared") for n in (1, 2)]
    if args.only_layout:
        configs = [c for c in configs if c.layout == args.only_layout]
    load0 = os.getloadavg()
    results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    loads: list[float] = []
    with bl.workdir("tlsgate-workers-") as wd:
        backend = f"127.0.0.1:{bl.start_nginx(wd, {'small.txt': 0})}"
        (wd.path / "www" / "small.txt").write_text("ok\n")
        nginx_pid = wd.started[0].pid
        for rnd in range(1, args.rounds + 1):
            for c in configs:
                loads.append(os.getloadavg()[0])
                r = run(c, wd, backend, nginx_pid, args.secs, args.conns)
                results[c.name].append(r)
                bl.log(
                    f"round {rnd} {c.name:20} {r['conn_per_s']:7.0f} conn/s  proxy {r['proxy_cpu_us_per_conn']:5.0f}"
                    f" us/conn  load {r['load_cpu_us_per_conn']:5.0f} us/conn  machine {100 * r['machine_busy']:3.0f}%"
                    f"  split {r['worker_shares']} parent {r['parent_cpu_us_per_conn']:.1f} us/conn"
                    f"  errors '{r['socket_errors']}'"
                )

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    print(
        f"### --workers scaling, new connections (wrk Connection: close) — {stamp}, {args.secs} s runs, median of "
        f"{args.rounds}, wrk -c{args.conns} (pinned) / -t2 -c{2 * args.conns} (shared); "
        f"load average at start {load0[0]:.2f}, up to {max(loads):.2f} before a run\n"
    )
    print(
        "| config | proxy CPUs | load CPUs | conn/s | vs 1 | proxy CPU µs/conn | of which parent | load CPU µs/conn "
        "| machine busy | worker split | capacity conn/s | vs 1 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for c in configs:
        base = next((b.name for b in configs if (b.proxy, b.layout, b.n) == (c.proxy, c.layout, 1)), c.name)
        split = "/".join(f"{100 * s:.0f}" for s in statistics_shares(results[c.name])) or "-"
        print(
            f"| {c.name} | {c.proxy_cpus} | {c.load_cpus} | {med(c.name, 'conn_per_s'):,.0f} "
            f"| {med(c.name, 'conn_per_s') / med(base, 'conn_per_s'):.2f}x "
            f"| {med(c.name, 'proxy_cpu_us_per_conn'):.0f} | {med(c.name, 'parent_cpu_us_per_conn'):.1f} "
            f"| {med(c.name, 'load_cpu_us_per_conn'):.0f} "
            f"| {100 * med(c.name, 'machine_busy'):.0f}% | {split} "
            f"| {med(c.name, 'capacity_conn_per_s'):,.0f} "
            f"| {med(c.name, 'capacity_conn_per_s') / med(base, 'capacity_conn_per_s'):.2f}x |"
        )
    print(
        "\n`vs 1`: against the same proxy and layout with one worker/thread. `capacity` = workers x 1e6 / proxy CPU "
        "µs per connection: conn/s with a whole core per worker and the load elsewhere. `worker split`: share of "
        "the proxy's CPU per worker process (tlsgate's parent is not counted in the split, but is in the CPU)."
    )
    out = args.json or bl.RESULTS / f"workers-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"time": stamp, "loadavg_start": load0, "loadavg_per_run": loads, "secs": args.secs}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\nRaw results: `{bl.shown(out)}`")
    return 0


def statistics_shares(rs: list[dict[str, Any]]) -> list[float]:
    """Median share per worker rank (busiest first) over the rounds."""
    shares = [r["worker_shares"] for r in rs if r["worker_shares"]]
    if not shares:
        return []
    k = min(len(s) for s in shares)
    return [statistics.median(s[i] for s in shares) for i in range(k)]


if __name__ == "__main__":
    sys.exit(main())
