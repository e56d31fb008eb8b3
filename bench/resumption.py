#!/usr/bin/env python3
"""TLS 1.3 session resumption (tickets): proxy CPU per resumed connection versus per full handshake.

For each proxy a fresh process is started (pinned to CPU 0) in front of an nginx backend (CPU 1). This script,
pinned to CPU 1 too, makes N TLS 1.3 connections through it from a few client threads, each connection sending one
small GET and reading the reply ("ok\\n") before closing. Two sets, alternated round by round:

  full     every connection is a new session: a full handshake (ECDHE + the server's ECDSA P-256 signature)
  resumed  every connection offers the ticket of the same thread's previous connection
           (`ctx.wrap_socket(..., session=previous.session)`): a PSK handshake with ECDHE, no certificate,
           no signature. The ticket arrives after the handshake, so each connection reads its reply first.

Proxy CPU is the on-CPU time of the proxy's process tree from /proc/*/task/*/schedstat (ns resolution) over the
set, divided by the connections made. The resumed set reports its hit rate (`session_reused`); a miss is a full
handshake in disguise, so the CPU figure is only a resumption figure when the hit rate is ~100%.

    .venv/bin/python bench/resumption.py                              # tlsgate and haproxy, 2,000 per set
    .venv/bin/python bench/resumption.py --only tlsgate,tlsgate-w2,haproxy -n 1000 --rounds 5

`tlsgate-w2` is tlsgate with --workers 2: every worker is its own interpreter with its own SSL context, so the
ticket hit rate shows whether a ticket issued by one worker is accepted by the other.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: localhost\r\n\r\n"
PROXIES = ("tlsgate", "tlsgate-asyncio", "tlsgate-w2", "haproxy")


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the client's verification cost is not what we measure
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def one(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool, str]:
    """One connection: handshake (offering `session`), one GET, read the reply; (new session, reused?, version)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(REQUEST)
        got = b""
        while not got.endswith(b"ok\n"):
            chunk = tls.recv(4096)
            if not chunk:
                raise ConnectionError(f"reply cut short: {got[-80:]!r}")
            got += chunk
        # the NewSessionTicket came before the reply, so tls.session now holds a resumable ticket
        return tls.session, tls.session_reused, tls.version() or "?"


def measure(port: int, pid: int, n: int, threads: int, resume: bool) -> dict[str, Any]:
    """n connections from `threads` threads (each chaining its own sessions when `resume`), proxy CPU around them.

    With `resume` each thread first makes one uncounted connection for a ticket to start from; the clock and the
    CPU reading start once every thread has its ticket."""
    ctx = client_context()
    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    reused = [0] * threads
    errors: list[str] = []
    versions: set[str] = set()
    ready = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        session = None
        if resume:
            try:
                session, _, _ = one(ctx, port, None)
            except OSError as e:
                errors.append(f"seed: {e}")
        ready.wait()
        for _ in range(per[i]):
            try:
                new, hit, ver = one(ctx, port, session if resume else None)
            except OSError as e:
                errors.append(str(e))
                continue
            reused[i] += hit
            versions.add(ver)
            if resume and new is not None:
                session = new

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    ready.wait()
    c0 = bl.cpu_seconds_ns(pid)
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    cpu = bl.cpu_seconds_ns(pid) - c0
    made = n - len(errors)
    return {
        "conns": made,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "reused": sum(reused),
        "hit_rate": sum(reused) / max(1, made),
        "versions": sorted(versions),
        "cpu_us_per_conn": 1e6 * cpu / max(1, made),
        "conn_per_s": made / wall,
        "wall_s": wall,
    }


def proxy_argv(name: str, wd: bl.Workdir, port: int, backend: str) -> list[str]:
    if name == "tlsgate-w2":
        return [*bl.proxy_argv("tlsgate", wd, port, backend), "--workers", "2"]
    return bl.proxy_argv(name, wd, port, backend)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="tlsgate,haproxy", help=f"comma-separated, from {','.join(PROXIES)}")
    ap.add_argument("-n", type=int, default=2000, help="connections per set (default 2000)")
    ap.add_argument("--threads", type=int, default=16, help="client threads, each a chain of sessions (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="full/resumed pairs per proxy; median shown (default 3)")
    ap.add_argument("--json", type=Path, help="raw results (default bench/results/resumption-<time>.json)")
    args = ap.parse_args()
    names = args.only.split(",")
    for name in names:
        if name not in PROXIES:
            bl.log(f"resumption: unknown proxy {name!r}; known: {', '.join(PROXIES)}")
            return 2
    if any(n.startswith("tlsgate") for n in names):
        ok, why = bl.tlsgate_ready()
        if not ok:
            bl.log(f"resumption: {why}")
            return 2
    bl.ensure_tools(["nginx", "openssl", "taskset", *(["haproxy"] if "haproxy" in names else [])])
    os.sched_setaffinity(0, {int(bl.LOAD_CPU)})
    load0 = os.getloadavg()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with bl.workdir("tlsgate-resume-") as wd:
        backend = f"127.0.0.1:{bl.start_nginx(wd, {'small.txt': 0})}"
        (wd.path / "www" / "small.txt").write_text("ok\n")
        for name in names:
            port = bl.free_port()
            proc = wd.spawn(name, proxy_argv(name, wd, port, backend), bl.PROXY_CPU, port)
            time.sleep(1.0 if name == "tlsgate-w2" else 0.5)
            measure(port, proc.pid, 200, args.threads, True)  # warm-up: caches, allocator, both paths
            measure(port, proc.pid, 200, args.threads, False)
            res: dict[str, list[dict[str, Any]]] = {"full": [], "resumed": []}
            for rnd in range(1, args.rounds + 1):
                for kind in ("full", "resumed") if rnd % 2 else ("resumed", "full"):
                    r = measure(port, proc.pid, args.n, args.threads, kind == "resumed")
                    res[kind].append(r)
                    bl.log(
                        f"{name:16} round {rnd} {kind:8} {r['cpu_us_per_conn']:7.1f} us/conn  "
                        f"{r['conn_per_s']:6.0f} conn/s  reused {r['reused']}/{r['conns']}  errors {r['errors']}"
                        + (f" ({r['first_error']})" if r["first_error"] else "")
                    )
            bl.stop_group(proc)
            results[name] = res

    def med(name: str, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name][kind])

    ref = "haproxy" if "haproxy" in results else None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    print(
        f"### TLS 1.3 session resumption — {stamp}, {args.n} connections per set, {args.threads} client threads, "
        f"median of {args.rounds}; load average at start {load0[0]:.2f}\n"
    )
    head = "| proxy | full: CPU µs/conn | resumed: CPU µs/conn | resumed / full | resumed hit rate | full conn/s "
    head += "| resumed conn/s |"
    print(head + "\n|---|---:|---:|---:|---:|---:|---:|")
    for name in results:
        full, resd = med(name, "full", "cpu_us_per_conn"), med(name, "resumed", "cpu_us_per_conn")

        def rat(v: float, kind: str, n: str = name) -> str:
            if ref is None or n == ref:
                return ""
            return f" ({v / med(ref, kind, 'cpu_us_per_conn'):.2f}x)"

        hit = min(r["hit_rate"] for r in results[name]["resumed"])
        print(
            f"| {'**' + name + '**' if name.startswith('tlsgate') else name} | {full:.0f}{rat(full, 'full')} "
            f"| {resd:.0f}{rat(resd, 'resumed')} | {resd / full:.2f} | {100 * hit:.1f}% "
            f"| {med(name, 'full', 'conn_per_s'):,.0f} | {med(name, 'resumed', 'conn_per_s'):,.0f} |"
        )
    versions = sorted({v for rs in results.values() for k in rs.values() for r in k for v in r["versions"]})
    print(
        f"\nProtocol: {', '.join(versions)}. Ratios in brackets are to haproxy. Hit rate: the lowest over the rounds "
        "of resumed connections whose `session_reused` was True. conn/s is bounded by the one Python client thread "
        "pool on CPU 1, not by the proxy."
    )
    out = args.json or bl.RESULTS / f"resumption-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"time": stamp, "loadavg_start": load0, "args": vars(args) | {"json": None}, "results": results}, indent=1
        )
        + "\n"
    )
    print(f"\nRaw results: `{bl.shown(out)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
