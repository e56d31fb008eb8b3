#!/usr/bin/env python3
"""CPU per new TLS connection, A/B: source trees of tlsgate (git revisions) and haproxy, interleaved round by round.

The headline run (run.py) measures four phases per proxy; a change to the connection set-up path only moves one
of them, by a few percent, which is less than the drift of a shared machine over a run. This script measures only
that phase, `wrk -H 'Connection: close'` (a full TLS 1.3 handshake plus one relayed request per connection), for
every variant in turn, several rounds, each in a fresh process, and prints per-round figures and the median as a
ratio to haproxy. Revisions are extracted with `git archive` and run with PYTHONPATH, so the installed venv
supplies the dependencies and only tlsgate's own code differs.

    .venv/bin/python bench/newconn_ab.py                      # working tree vs HEAD vs haproxy, uvloop
    .venv/bin/python bench/newconn_ab.py --rev 1913413 --rev HEAD --loop asyncio --rounds 7
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl


def extract(rev: str, into: Path) -> Path:
    """src/tlsgate of ``rev`` under ``into``; returns the directory to put on PYTHONPATH."""
    dest = into / rev.replace("/", "_")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "src/tlsgate"], cwd=bl.REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def tlsgate_argv(pythonpath: Path | None, loop: str) -> list[str]:
    python = str(bl.REPO / ".venv" / "bin" / "python")
    env = ["env", f"TLSGATE_LOOP={loop}"] + ([f"PYTHONPATH={pythonpath}"] if pythonpath else [])
    return [*env, python, "-m", "tlsgate", "server", "--listen", "127.0.0.1:{port}", "--target", "{target}"]


def one(wd: bl.Workdir, name: str, argv: Callable[[int], list[str]], secs: int, conns: int) -> tuple[float, float]:
    """(CPU µs per connection, connections/s) of one fresh proxy process under one wrk run."""
    port = bl.free_port()
    p = wd.spawn(name, argv(port), bl.PROXY_CPU, port)
    try:
        time.sleep(0.3)  # let start-up CPU settle out of the window
        c0 = bl.cpu_seconds(p.pid)
        cmd = ["taskset", "-c", bl.LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{secs}s", "-H", "Connection: close"]
        out = subprocess.run([*cmd, f"https://127.0.0.1:{port}/small.txt"], capture_output=True, text=True).stdout
        c1 = bl.cpu_seconds(p.pid)
    finally:
        bl.stop_group(p)
        wd.started.remove(p)
    done = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not done or not rate:
        raise RuntimeError(f"{name}: wrk printed no result:\n{out}")
    return 1e6 * (c1 - c0) / max(int(done.group(1)), 1), float(rate.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", default=[], help="git revision to measure (repeatable; default HEAD)")
    ap.add_argument("--no-worktree", action="store_true", help="leave out the working tree's src/")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--conns", type=int, default=20, help="wrk connections (default 20, as run.py)")
    args = ap.parse_args()
    bl.ensure_tools(["haproxy", "nginx", "wrk", "openssl", "taskset"])

    with bl.workdir("tlsgate-ab-") as wd, tempfile.TemporaryDirectory(prefix="tlsgate-ab-src-") as srcs:
        target = f"127.0.0.1:{bl.start_nginx(wd, {'small.txt': 3})}"
        tls = ["--cert", "{cert}", "--key", "{key}", "--disable-authentication"]
        templates = {rev: tlsgate_argv(extract(rev, Path(srcs)), args.loop) + tls for rev in args.rev or ["HEAD"]}
        if not args.no_worktree:
            templates["worktree"] = tlsgate_argv(None, args.loop) + tls
        variants: dict[str, Callable[[int], list[str]]] = {"haproxy": lambda port: bl.haproxy_argv(wd, port, target)}
        for name, words in templates.items():
            variants[name] = lambda port, words=words: bl.fill(bl.template(words), wd, port, target)  # type: ignore[misc]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, argv in variants.items():
                cpu_rate = one(wd, name, argv, args.secs, args.conns)
                results[name].append(cpu_rate)
                bl.log(f"round {r + 1}/{args.rounds} {name:12s} {cpu_rate[0]:6.1f} µs/conn {cpu_rate[1]:8.0f} conn/s")

    ref = statistics.median(c for c, _ in results["haproxy"])
    print(f"\nCPU per new connection ({args.loop}), median of {args.rounds} interleaved rounds, wrk -c{args.conns}:\n")
    print("| variant | CPU µs/conn | vs haproxy | conn/s | rounds (µs/conn) |")
    print("|---|---:|---:|---:|---|")
    for name, rows in results.items():
        cpu = statistics.median(c for c, _ in rows)
        rate = statistics.median(x for _, x in rows)
        each = ", ".join(f"{c:.0f}" for c, _ in rows)
        print(f"| {name} | {cpu:.0f} | {cpu / ref:.2f}x | {rate:,.0f} | {each} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
