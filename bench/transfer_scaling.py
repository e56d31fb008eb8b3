#!/usr/bin/env python3
"""Proxy CPU time and throughput for 1 KB, 1 MB, 100 MB and 1 GB downloads through tlsgate and haproxy.

nginx (CPU 1) serves sparse files of each size; one curl process (CPU 1) fetches a file REPS times over a single
kept-alive TLS connection through the proxy (CPU 0). For each size we report the proxy tree's CPU time per
transfer and per byte (on-CPU ns from /proc/*/task/*/schedstat, before and after curl), and MB/s as bytes over
curl's summed transfer times. Small sizes are repeated so each cell covers enough work to measure; the total per
cell stays bounded (about 2-3 GB or 20,000 requests).

    .venv/bin/python bench/transfer_scaling.py                  # tlsgate vs haproxy, 3 rounds, median
    .venv/bin/python bench/transfer_scaling.py --quick          # 1 round, fewer repeats
    .venv/bin/python bench/transfer_scaling.py --only tlsgate,tlsgate-asyncio,haproxy,baseline
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

# label, bytes, repeats (full run), repeats (quick run)
SIZES: list[tuple[str, int, int, int]] = [
    ("1 KB", 1024, 20000, 5000),
    ("1 MB", 1 << 20, 2000, 500),
    ("100 MB", 100 << 20, 20, 5),
    ("1 GB", 1 << 30, 3, 1),
]


def fetch(port: int, fname: str, reps: int, timeout: float) -> tuple[int, float, int]:
    """curl fname reps times over one connection; returns (bytes, summed transfer seconds, connections made)."""
    url = f"https://127.0.0.1:{port}/{fname}?r=[1-{reps}]" if reps > 1 else f"https://127.0.0.1:{port}/{fname}"
    cmd = ["taskset", "-c", bl.LOAD_CPU, "curl", "-sk", "-o", "/dev/null", "--max-time", str(int(timeout))]
    cmd += ["-w", "%{http_code} %{size_download} %{time_total} %{num_connects}\\n", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10).stdout
    size, secs, conns = 0, 0.0, 0
    for line in out.splitlines():
        code, b, t, c = line.split()
        if code == "200":
            size += int(b)
        secs += float(t)
        conns += int(c)
    return size, secs, conns


def measure(wd: bl.Workdir, name: str, backend: str, sizes: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    port = bl.free_port()
    proc = wd.spawn(name, bl.proxy_argv(name, wd, port, backend), bl.PROXY_CPU, port)
    rows = []
    try:
        fetch(port, "1m.bin", 3, 30)  # warm-up: page cache, allocator, TLS session machinery
        for label, size, reps in sizes:
            c0 = bl.cpu_seconds_ns(proc.pid)
            got, secs, conns = fetch(port, fname(size), reps, timeout=60 + size * reps / 50e6)
            cpu = bl.cpu_seconds_ns(proc.pid) - c0
            rows.append(
                {
                    "proxy": name,
                    "size": label,
                    "bytes": size,
                    "reps": reps,
                    "complete": got == size * reps,
                    "connections": conns,
                    "cpu_s": cpu,
                    "cpu_us_per_transfer": 1e6 * cpu / reps,
                    "cpu_ns_per_B": 1e9 * cpu / max(got, 1),
                    "MBps": got / secs / 1e6 if secs > 0 else 0.0,
                }
            )
    finally:
        bl.stop_group(proc)
        wd.started.remove(proc)
    return rows


def fname(size: int) -> str:
    return f"{size}.bin"


def median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for cells in zip(*rounds, strict=True):
        med = dict(cells[0])
        for k in ("cpu_s", "cpu_us_per_transfer", "cpu_ns_per_B", "MBps"):
            med[k] = statistics.median(c[k] for c in cells)
        med["complete"] = all(c["complete"] for c in cells)
        out.append(med)
    return out


def table(med: dict[str, list[dict[str, Any]]], names: list[str]) -> str:
    labels = [r["size"] for r in next(iter(med.values()))]
    ref = {r["size"]: r for r in med.get("haproxy", [])}
    head = ["proxy", *(f"{lab} (x{r['reps']:,})" for lab, r in zip(labels, next(iter(med.values())), strict=True))]
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(labels) + "|"]
    for name in names:
        cells = [name]
        for r in med[name]:
            text = f"{r['cpu_us_per_transfer']:,.0f} µs, {r['cpu_ns_per_B']:.2f} ns/B, {r['MBps']:,.0f} MB/s"
            h = ref.get(r["size"])
            if h is not None and name != "haproxy" and h["cpu_ns_per_B"] > 0 and h["MBps"] > 0:
                text += f" (CPU {r['cpu_ns_per_B'] / h['cpu_ns_per_B']:.2f}x, MB/s {r['MBps'] / h['MBps']:.2f}x)"
            if not r["complete"]:
                text += " [incomplete]"
            cells.append(text)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="tlsgate,haproxy", help="tlsgate, tlsgate-asyncio, haproxy, baseline")
    ap.add_argument("--rounds", type=int, help="rounds; the table shows the median (default 3, quick 1)")
    ap.add_argument("--quick", action="store_true", help="1 round, a quarter of the repeats")
    ap.add_argument("--json", type=Path, help="raw results (default bench/results/transfer-<time>.json)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    names = args.only.split(",")
    sizes = [(lab, size, q if args.quick else full) for lab, size, full, q in SIZES]
    sizes = [s for s in sizes if s[2] > 0]
    if any(n.startswith("tlsgate") for n in names):
        ok, why = bl.tlsgate_ready()
        if not ok:
            bl.log(f"transfer_scaling: {why}")
            return 2
    bl.ensure_tools(["nginx", "curl", "openssl", "taskset", *(n for n in names if n == "haproxy")])
    per_round: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    with bl.workdir("tlsgate-xfer-") as wd:
        backend = f"127.0.0.1:{bl.start_nginx(wd, {fname(s): s for _, s, _ in sizes} | {fname(1 << 20): 1 << 20})}"
        for rnd in range(1, rounds + 1):
            for name in names:
                rows = measure(wd, name, backend, sizes)
                per_round[name].append(rows)
                bl.log(
                    f"round {rnd}/{rounds} {name:16} "
                    + "  ".join(f"{r['size']}: {r['cpu_ns_per_B']:.2f} ns/B {r['MBps']:.0f} MB/s" for r in rows)
                )
    med = {n: median_rows(rs) for n, rs in per_round.items()}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.json or bl.RESULTS / f"transfer-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"time": stamp, "median": med, "rounds": per_round}, indent=1) + "\n")
    print(f"### Transfers over one kept-alive TLS connection: proxy CPU per transfer, per byte, and MB/s ({stamp})\n")
    print(f"Median of {rounds} round(s); ratios are to haproxy (CPU lower is better, MB/s higher is better).\n")
    print(table(med, names))
    print(f"\nRaw results: `{bl.shown(out)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
