#!/usr/bin/env python3
"""A bounded soak: does a tlsgate worker's memory level off under a steady mixed load, or does it keep growing?

Issue #13 saw a worker's RSS go from 39.7 to 52.7 MB in ten minutes, in steps that slowed down: allocator
warm-up looks like that, and so does a slow leak. This runs long enough to tell them apart. It starts
`tlsgate server` (`--workers 2` by default) in front of a loopback backend in this process and drives a modest mix
of connections at it for `--duration` (60 min by default), checking every byte that comes back:

* short      (74%): one request of 64 B - 32 KiB echoed back, then close, half with close_notify, half without;
* long        (8%): a few seconds to a minute of requests of 1-64 KiB every 0.1-1 s on one connection;
* idle        (7%): one request, 10-90 s of silence, one more request;
* half-close  (6%): the client sends up to 256 KiB and its close_notify first and reads the echo after it
  (`client`), or the backend sends first and shuts its side before the client answers (`server`);
* abort       (5%): a reset in the middle of a request, or a TCP connection that never starts its handshake.

Every `--interval` seconds it records, for the tlsgate parent and each worker: VmRSS, RssAnon, open file
descriptors and threads, and (from a probe the workers import through `sitecustomize`, `--no-probe` to leave it
out) the interpreter's allocated blocks and live objects: blocks that level off while RSS still climbs point at
the allocator, blocks that keep climbing at live Python objects. `--tracemalloc` also makes every worker diff
tracemalloc snapshots against the first one after the warm-up and log the top growth sites (slow: diagnosis only).

The load stays small (the default 20 connections/s costs the proxy a few % of a core, the client and backend
here about as much again); traffic is on 127.0.0.1 only; new connections stop at the deadline, the ones still open
get their planned lifetimes cut to it, and the run ends by itself. Results go to
`bench/results/soak-STAMP-wN.json` (every sample, every counter) and `.csv` (one row per process per sample);
the summary table on stdout is ready for docs/performance.md. Exit status 1 when a byte came back wrong or a
connection failed in a way its kind does not expect.

    .venv/bin/python bench/soak.py                              # 60 min, --workers 2, 20 conn/s
    .venv/bin/python bench/soak.py --workers 1 --duration 10m --rate 10
    .venv/bin/python bench/soak.py --summarize bench/results/soak-20261129-142030-w2-main.json --every 5m
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import hashlib
import json
import os
import platform
import random
import re
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

from tlsgate.tls import closenotify

KINDS = (
    ("short", 74),
    ("long", 8),
    ("idle", 7),
    ("half-client", 3),
    ("half-server", 3),
    ("abort", 3),
    ("no-handshake", 2),
)
# Errors that a kind causes on purpose; any other error is a failure.
EXPECTED = {"abort": (OSError,), "no-handshake": (OSError,)}
READ_TIMEOUT = 60.0

PROBE = r'''
"""Imported by every tlsgate process of a soak (PYTHONPATH): a daemon thread appends a line of interpreter memory
counters to $TLSGATE_SOAK_PROBE/PID.jsonl every $TLSGATE_SOAK_PROBE_EVERY seconds."""
import gc, json, os, sys, threading, time

def _probe():
    every = float(os.environ.get("TLSGATE_SOAK_PROBE_EVERY", "15"))
    path = os.path.join(os.environ["TLSGATE_SOAK_PROBE"], f"{os.getpid()}.jsonl")
    trace = os.environ.get("TLSGATE_SOAK_TRACEMALLOC") == "1"
    warm = float(os.environ.get("TLSGATE_SOAK_WARMUP", "120"))
    start = time.monotonic()
    first = None
    if trace:
        import tracemalloc
        tracemalloc.start(8)
    while True:
        time.sleep(every)
        row = {"t": time.time(), "pid": os.getpid(), "blocks": sys.getallocatedblocks(),
               "objects": len(gc.get_objects()), "gc": gc.get_count(), "gc_stats": gc.get_stats()}
        if trace:
            snap = tracemalloc.take_snapshot()
            row["traced"] = tracemalloc.get_traced_memory()[0]
            if first is None and time.monotonic() - start >= warm:
                first = snap
            elif first is not None:
                top = snap.compare_to(first, "traceback")[:12]
                row["growth"] = [[s.size_diff, s.count_diff, s.traceback.format()[-6:]] for s in top]
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

if os.environ.get("TLSGATE_SOAK_PROBE"):
    threading.Thread(target=_probe, name="soak-probe", daemon=True).start()
'''


class Stats:
    """Counters shared by the client and backend threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.open = 0

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.c[key] += n

    def fail(self, msg: str) -> None:
        with self.lock:
            self.c["failures"] += 1
            if len(self.failures) < 50:
                self.failures.append(msg)
        bl.log(f"soak: FAILURE {msg}")


def payload(rng: random.Random, lo: int, hi: int) -> bytes:
    return rng.randbytes(rng.randint(lo, hi))


def recv_exactly(tls: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = tls.recv(min(65536, n - len(buf)))
        if not chunk:
            raise EOFError(f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_to_end(tls: ssl.SSLSocket) -> bytes:
    chunks = []
    while True:
        try:
            data = tls.recv(65536)
        except ssl.SSLZeroReturnError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def send_close_notify(tls: ssl.SSLSocket) -> None:
    """Our close_notify, leaving the read side open: tlsgate's own single SSL_shutdown call, because
    ``unwrap()`` reads too and fails when the echo is already arriving (see tlsgate.tls.closenotify)."""
    if closenotify.available():
        closenotify.send_close_notify(tls)
        return
    tls.setblocking(False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.unwrap()
    tls.settimeout(READ_TIMEOUT)


# ---------------------------------------------------------------------------------------------------------------
# backend: 'E' echoes until end of stream, then shuts its side; 'G' + header sends a seeded stream, shuts its side,
# then reads the client's bytes to the end and checks them against the SHA-256 the header carried.

G_HEADER = struct.Struct("!IQI32s")  # down_len, seed, up_len, sha256(up)


class Backend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        super().__init__(("127.0.0.1", 0), BackendHandler)


class BackendHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        stats: Stats = self.server.stats  # type: ignore[attr-defined]
        sock.settimeout(600)
        try:
            mode = sock.recv(1)
            if mode == b"E":
                while data := sock.recv(65536):
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            elif mode == b"G":
                head = b""
                while len(head) < G_HEADER.size:
                    more = sock.recv(G_HEADER.size - len(head))
                    if not more:
                        raise EOFError("short G header")
                    head += more
                down, seed, up_len, digest = G_HEADER.unpack(head)
                sock.sendall(random.Random(seed).randbytes(down))
                sock.shutdown(socket.SHUT_WR)
                h, got = hashlib.sha256(), 0
                while data := sock.recv(65536):
                    h.update(data)
                    got += len(data)
                if got != up_len or h.digest() != digest:
                    stats.fail(f"backend: half-server upload {got} of {up_len} bytes, digest ok={h.digest() == digest}")
                else:
                    stats.add("bytes_checked", got)
            stats.add("backend_ok")
        except OSError:
            stats.add("backend_errors")  # resets from the abort kind, and whatever else; the client decides
        except EOFError:
            stats.add("backend_errors")


# ---------------------------------------------------------------------------------------------------------------
# client


class Client:
    def __init__(self, port: int, stats: Stats, deadline: float, seed: int) -> None:
        self.port, self.stats, self.deadline = port, stats, deadline
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname, self.ctx.verify_mode = False, ssl.CERT_NONE
        self.seed = seed

    def connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=READ_TIMEOUT)
        return self.ctx.wrap_socket(raw)

    def until(self, seconds: float) -> float:
        """A planned lifetime, cut so that nothing outlives the deadline by much."""
        return max(0.0, min(seconds, self.deadline - time.monotonic()))

    def echo(self, tls: ssl.SSLSocket, data: bytes) -> None:
        tls.sendall(data)
        if recv_exactly(tls, len(data)) != data:
            raise ValueError(f"echo of {len(data)} bytes came back different")
        self.stats.add("bytes_checked", 2 * len(data))

    def run(self, kind: str, n: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + n)
        with self.stats.lock:
            self.stats.open += 1
        try:
            getattr(self, "kind_" + kind.replace("-", "_"))(rng)
            self.stats.add(f"ok_{kind}")
        except ValueError as e:
            self.stats.fail(f"{kind}: {e}")
        except Exception as e:
            if isinstance(e, EXPECTED.get(kind, ())):
                self.stats.add(f"ok_{kind}")
            else:
                self.stats.fail(f"{kind}: {type(e).__name__}: {e}")
        finally:
            with self.stats.lock:
                self.stats.open -= 1

    def kind_short(self, rng: random.Random) -> None:
        with self.connect() as tls:
            tls.sendall(b"E")
            self.echo(tls, payload(rng, 64, 32 * 1024))
            if rng.random() < 0.5:
                send_close_notify(tls)
                if recv_to_end(tls):
                    raise ValueError("bytes after the echo")

    def kind_long(self, rng: random.Random) -> None:
        end = time.monotonic() + self.until(rng.uniform(5, 60))
        with self.connect() as tls:
            tls.sendall(b"E")
            while time.monotonic() < end:
                self.echo(tls, payload(rng, 1024, 64 * 1024))
                time.sleep(rng.uniform(0.1, 1.0))

    def kind_idle(self, rng: random.Random) -> None:
        with self.connect() as tls:
            tls.sendall(b"E")
            self.echo(tls, payload(rng, 16, 512))
            time.sleep(self.until(rng.uniform(10, 90)))
            self.echo(tls, payload(rng, 16, 512))

    def kind_half_client(self, rng: random.Random) -> None:
        data = payload(rng, 1, 256 * 1024)
        with self.connect() as tls:
            tls.sendall(b"E" + data)
            send_close_notify(tls)
            if recv_to_end(tls) != data:
                raise ValueError(f"echo of {len(data)} bytes after our close_notify came back different")
            self.stats.add("bytes_checked", 2 * len(data))

    def kind_half_server(self, rng: random.Random) -> None:
        down, seed, up = rng.randint(1, 256 * 1024), rng.getrandbits(63), payload(rng, 1, 64 * 1024)
        with self.connect() as tls:
            tls.sendall(b"G" + G_HEADER.pack(down, seed, len(up), hashlib.sha256(up).digest()))
            got = recv_to_end(tls)  # the backend's stream, then its end of stream as our peer's close_notify
            if got != random.Random(seed).randbytes(down):
                raise ValueError(f"half-server: got {len(got)} of {down} bytes, or different ones")
            self.stats.add("bytes_checked", down)
            tls.sendall(up)  # after the backend shut its side, ours still goes through
            send_close_notify(tls)

    def kind_abort(self, rng: random.Random) -> None:
        tls = self.connect()
        tls.sendall(b"E" + payload(rng, 1, 64 * 1024))
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()  # RST, with the echo unread

    def kind_no_handshake(self, rng: random.Random) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=READ_TIMEOUT)
        if rng.random() < 0.5:
            raw.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello, then nothing
        raw.close()


# ---------------------------------------------------------------------------------------------------------------
# sampling


def status_fields(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM", "Threads"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of this one process (not its children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        f = stat[stat.rindex(")") + 2 :].split()
        return round((int(f[11]) + int(f[12])) / bl.CLK_TCK, 2)
    except (OSError, ValueError, IndexError):
        return -1.0


def last_probe(probe_dir: Path, pid: int) -> dict[str, Any]:
    path = probe_dir / f"{pid}.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return json.loads(lines[-1]) if lines else {}


def sample(parent: int, probe_dir: Path, t0: float) -> list[dict[str, Any]]:
    rows = []
    for pid in bl.proc_tree(parent):
        st = status_fields(pid)
        if not st:
            continue
        pr = last_probe(probe_dir, pid)
        rows.append(
            {
                "t": round(time.monotonic() - t0, 1),
                "pid": pid,
                "role": "parent" if pid == parent else "worker",
                "rss_kib": st.get("VmRSS", 0),
                "anon_kib": st.get("RssAnon", 0),
                "hwm_kib": st.get("VmHWM", 0),
                "threads": st.get("Threads", 0),
                "fds": fd_count(pid),
                "cpu_s": own_cpu_seconds(pid),
                "blocks": pr.get("blocks", ""),
                "objects": pr.get("objects", ""),
            }
        )
    return rows


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|h)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m, 1h)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def summary(samples: list[dict[str, Any]], every: float) -> str:
    """Markdown: one line per `every` seconds, RSS/anon/fds per worker (workers in order of first sight)."""
    workers: list[int] = []
    for r in samples:
        if r["role"] == "worker" and r["pid"] not in workers:
            workers.append(r["pid"])
    if not workers:  # --workers 1: the parent serves the connections itself
        workers = [r["pid"] for r in samples[:1]]
    by_t: dict[float, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for r in samples:
        by_t[r["t"]][r["pid"]] = r
    head = "| t (min) | " + " | ".join(f"w{i} RSS MB (anon) | w{i} fds | w{i} blocks" for i in range(len(workers)))
    lines = [head + " |", "|---:|" + "---:|---:|---:|" * len(workers)]
    next_t = 0.0
    times = sorted(by_t)
    for t in times:
        if t < next_t and t != times[-1]:
            continue
        next_t = t + every
        cells = []
        for pid in workers:
            r = by_t[t].get(pid)
            if r is None:
                cells.append("- | - | -")
            else:
                blocks = f"{r['blocks']:,}" if isinstance(r["blocks"], int) else "-"
                cells.append(f"{r['rss_kib'] / 1024:.1f} ({r['anon_kib'] / 1024:.1f}) | {r['fds']} | {blocks}")
        lines.append(f"| {t / 60:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=parse_duration, default=3600.0, help="load time (90s, 10m, 1h) [60m]")
    ap.add_argument("--workers", type=int, default=2, help="tlsgate --workers [2]")
    ap.add_argument("--rate", type=float, default=20.0, help="new connections per second [20]")
    ap.add_argument("--max-open", type=int, default=300, help="open client connections at most [300]")
    ap.add_argument("--interval", type=parse_duration, default=15.0, help="seconds between samples [15]")
    ap.add_argument("--settle", type=parse_duration, default=30.0, help="quiet time after the load, then sample [30]")
    ap.add_argument("--args", default="", help="more tlsgate server flags, e.g. '--loop asyncio'")
    ap.add_argument("--no-probe", action="store_true", help="no sitecustomize probe in the tlsgate processes")
    ap.add_argument("--tracemalloc", action="store_true", help="workers log tracemalloc growth (slow)")
    ap.add_argument("--tag", default="", help="added to the result file names")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--summarize", metavar="JSON", help="print the table of an earlier run's result file and exit")
    ap.add_argument("--every", type=parse_duration, help="with --summarize: one line per this long [duration/12]")
    args = ap.parse_args()
    if args.summarize:
        try:
            done = json.loads(Path(args.summarize).read_text())
            samples, duration = done["samples"], float(done["args"]["duration"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"soak: cannot read {args.summarize}: {e}", file=sys.stderr)
            return 2
        print(summary(samples, args.every or duration / 12))
        return 0
    if args.rate <= 0 or args.workers < 1 or args.duration <= 0:
        print("soak: --rate, --workers and --duration must be positive", file=sys.stderr)
        return 2
    bl.ensure_tools(["openssl"])
    ok, exe = bl.tlsgate_ready()
    if not ok:
        print(f"soak: {exe}", file=sys.stderr)
        return 2
    bl.raise_fd_limit(4096)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"soak-{stamp}-w{args.workers}{'-' + args.tag if args.tag else ''}"
    bl.RESULTS.mkdir(exist_ok=True)
    stats = Stats()
    samples: list[dict[str, Any]] = []
    with bl.workdir("tlsgate-soak-") as wd:
        probe_dir = wd.path / "probe"
        probe_dir.mkdir()
        (wd.path / "sitecustomize.py").write_text(PROBE)
        backend = Backend(stats)
        threading.Thread(target=backend.serve_forever, name="backend", daemon=True).start()
        target = f"127.0.0.1:{backend.server_address[1]}"
        port = bl.free_port()
        env = dict(os.environ)
        if not args.no_probe:
            env.update(
                PYTHONPATH=str(wd.path),
                TLSGATE_SOAK_PROBE=str(probe_dir),
                TLSGATE_SOAK_PROBE_EVERY=str(args.interval),
            )
            if args.tracemalloc:
                env["TLSGATE_SOAK_TRACEMALLOC"] = "1"
        argv = [exe, "server", "--listen", f"127.0.0.1:{port}", "--target", target, "--cert", str(wd.cert)]
        argv += ["--key", str(wd.key), "--disable-authentication", "--workers", str(args.workers)]
        argv += args.args.split()
        proxy = wd.spawn("tlsgate", argv, f"0-{(os.cpu_count() or 1) - 1}", port, env=env)
        bl.log(
            f"soak: {' '.join(argv[1:])} (pid {proxy.pid}), backend {target}, {args.duration:.0f} s at {args.rate}/s"
        )
        t0 = time.monotonic()
        deadline = t0 + args.duration
        client = Client(port, stats, deadline, args.seed)
        rng = random.Random(args.seed)
        kinds, weights = zip(*KINDS, strict=True)
        next_sample, n = t0, 0
        own_cpu0 = time.process_time()
        proxy_cpu0 = bl.cpu_seconds(proxy.pid)
        gap = 1.0 / args.rate
        next_start = t0
        while (now := time.monotonic()) < deadline:
            if now >= next_sample:
                rows = sample(proxy.pid, probe_dir, t0)
                for r in rows:
                    r["client_open"] = stats.open
                samples.extend(rows)
                next_sample += args.interval
                w = [r for r in rows if r["role"] == "worker"] or rows[:1]
                done = sum(v for k, v in stats.c.items() if k.startswith("ok_"))
                bl.log(
                    f"soak: t={now - t0:6.0f}s open={stats.open:3d} done={done}"
                    f" failures={stats.c['failures']} workers RSS MB "
                    + " ".join(f"{r['rss_kib'] / 1024:.1f}" for r in w)
                    + " fds "
                    + " ".join(str(r["fds"]) for r in w)
                )
                if proxy.poll() is not None:
                    stats.fail(f"tlsgate exited with {proxy.returncode}")
                    break
            if now >= next_start:
                next_start += gap
                if stats.open >= args.max_open:
                    stats.add("skipped_max_open")
                    continue
                kind = rng.choices(kinds, weights)[0]
                n += 1
                threading.Thread(target=client.run, args=(kind, n), daemon=True).start()
                continue
            time.sleep(min(next_start, next_sample, deadline) - now)
        load_end = time.monotonic()
        while stats.open and time.monotonic() < load_end + 2 * READ_TIMEOUT:
            time.sleep(0.2)
        time.sleep(args.settle)
        samples.extend({**r, "client_open": stats.open} for r in sample(proxy.pid, probe_dir, t0))
        own_cpu = time.process_time() - own_cpu0
        proxy_cpu = bl.cpu_seconds(proxy.pid) - proxy_cpu0
        elapsed = time.monotonic() - t0
        backend.shutdown()
        probes = {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in probe_dir.glob("*.jsonl")}
        err_tail = (wd.path / "tlsgate.err").read_text(errors="replace").splitlines()[-20:]
        tracebacks = sum("Traceback" in line for line in (wd.path / "tlsgate.err").open(errors="replace"))
    if tracebacks:
        stats.fail(f"{tracebacks} tracebacks in tlsgate's log")
    result = {
        "command": argv,
        "args": vars(args),
        "started_utc": stamp,
        "elapsed_s": round(elapsed, 1),
        "connections_started": n,
        "counters": dict(stats.c),
        "failures": stats.failures,
        "cpu": {"proxy_s": round(proxy_cpu, 1), "soak_s": round(own_cpu, 1), "elapsed_s": round(elapsed, 1)},
        "machine": {"python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION, "nproc": os.cpu_count()},
        "samples": samples,
        "probes": probes,
        "tlsgate_log_tail": err_tail,
    }
    json_path = bl.RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    csv_path = bl.RESULTS / f"{name}.csv"
    with csv_path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(samples[0]) if samples else ["t"])
        out.writeheader()
        out.writerows(samples)
    print(
        f"\n### Soak: tlsgate --workers {args.workers}, {args.duration / 60:g} min at {args.rate:g} conn/s ({stamp})\n"
    )
    print(summary(samples, max(args.interval, args.duration / 12)))
    print(
        f"\n{n:,} connections, {stats.c['bytes_checked'] / 1e6:,.0f} MB checked, {stats.c['failures']} failures;"
        f" CPU: tlsgate {100 * proxy_cpu / elapsed:.1f}% of a core, soak client+backend {100 * own_cpu / elapsed:.1f}%"
    )
    print(f"counters: {json.dumps(dict(sorted(stats.c.items())))}")
    print(f"raw: {bl.shown(json_path)}, {bl.shown(csv_path)}")
    return 1 if stats.c["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
