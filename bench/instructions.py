#!/usr/bin/env python3
"""Instructions per new connection and per keep-alive request, counted by valgrind (callgrind); and the CI guard
that fails when either grows.

CPU time on a shared 2-core VM drifts by ±10-20% between runs, more than most changes to the set-up path are
worth. Instruction counts do not drift: callgrind counts the user-space instructions the proxy executes, the same
number whatever else the machine does. What it cannot see is time in the kernel (count system calls with
`strace -c` for that) and cache misses, so it ranks changes to tlsgate's own work, not whole-machine cost.

Each variant runs under callgrind behind one backend; a single client makes connections one at a time (full TLS
1.3 handshake, one GET, read to the end, close: the run.py new-connection phase without concurrency), then sends
requests one at a time over one kept-alive connection. Each phase starts after a warm-up with the counters
zeroed and ends once the proxy has gone quiet, and the instructions of its N connections (or K requests) are
split by shared object: OpenSSL (libcrypto + libssl), the interpreter, the event loop, the rest.

    .venv/bin/python bench/instructions.py                    # working tree vs HEAD, uvloop, 200 conns, 2000 reqs
    .venv/bin/python bench/instructions.py --rev 1913413 --loop asyncio -n 100

The guard (`make perf-guard`, part of `make test`) measures the working tree exactly as the baseline file says it
was measured and exits 1 when instructions per connection or per request grew by more than the file's tolerance
(3%). The counts depend on the CPU model, the Python, OpenSSL, valgrind and event loop builds; when any of those
differs from the baseline's, the comparison would mean nothing, so it prints SKIP and exits 0. Without valgrind
(and no root to install it) it also SKIPs.

    .venv/bin/python bench/instructions.py --check bench/baseline-instructions.json
    .venv/bin/python bench/instructions.py --write-baseline bench/baseline-instructions.json --rev main --repeat 3
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import platform
import shlex
import socket
import socketserver
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl
from newconn_ab import extract

GROUPS = (
    ("openssl", ("libcrypto", "libssl")),
    ("python", ("libpython", "python3")),
    ("loop", ("uvloop", "loop.")),
    ("haproxy", ("haproxy",)),
)
COLS = [g for g, _ in GROUPS] + ["other"]
PHASES = ("newconn", "request")
UNIT = {"newconn": "connection", "request": "keep-alive request"}
WARMUP_CONNS = 20
WARMUP_REQUESTS = 100
IDLE_SECONDS = 2.0
REQUEST_CLOSE = b"GET /small.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n"
# What the python backend answers: the size of nginx's reply to the same GET, so the proxy relays the same bytes.
REPLY = b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc"


# ---------------------------------------------------------------------------------------------------------------
# backend and client


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        buf = b""
        try:
            while chunk := sock.recv(4096):
                buf += chunk
                while b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    sock.sendall(REPLY)
                    if b"connection: close" in head.lower():
                        return
        except OSError:
            pass


class PythonBackend(socketserver.ThreadingTCPServer):
    """A minimal HTTP/1.1 responder in this process: the guard then needs nothing but valgrind (no nginx)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, name="backend", daemon=True).start()


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def fetch(port: int, ctx: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(REQUEST_CLOSE)
        while tls.recv(4096):
            pass


def request(tls: ssl.SSLSocket) -> None:
    """One GET on a kept-alive connection, read to the end of its body."""
    tls.sendall(REQUEST)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = tls.recv(4096)
        if not chunk:
            raise RuntimeError("the proxy closed a kept-alive connection")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
    )
    while len(body) < length:
        body += tls.recv(4096)


# ---------------------------------------------------------------------------------------------------------------
# measuring


def wait_quiet(pid: int) -> None:
    """Until the proxy used no CPU for half a second: the last close and its log line are done, not cut off."""
    last, still = -1.0, 0
    while still < 5:
        time.sleep(0.1)
        now = bl.cpu_seconds(pid)
        still = still + 1 if now == last else 0
        last = now


class Callgrind:
    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out
        self.seen: set[Path] = set()

    def control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, capture_output=True)

    def dump(self) -> dict[str, int]:
        """The counts since the last zero or dump, by group."""
        self.control("--dump")
        fresh = set(self.out.parent.glob(f"{self.out.name}.*")) - self.seen
        if not fresh:
            raise RuntimeError("callgrind wrote no dump")
        self.seen |= fresh
        return by_object(max(fresh, key=lambda f: f.stat().st_mtime))


def measure(
    wd: bl.Workdir,
    name: str,
    pythonpath: Path | None,
    loop: str,
    target: str,
    n: int,
    requests: int,
    extra: list[str],
    chunks: int = 1,
) -> dict[str, dict[str, int]]:
    """{phase: {group: instructions}} for N new connections and K keep-alive requests, in one proxy process.

    Instrumentation is off until the warm-up is done (start-up under callgrind would take minutes), and the
    interpreter's hash seed is fixed, so that the same source executes the same instructions run after run.
    """
    port = bl.free_port()
    out = wd.path / f"callgrind.{name.replace('/', '_')}.out"
    env = dict(os.environ, TLSGATE_LOOP=loop, PYTHONMALLOC="malloc", PYTHONHASHSEED="0")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no"]
    if name == "haproxy":
        argv += bl.haproxy_argv(wd, port, target)
    else:
        argv += [str(bl.REPO / ".venv" / "bin" / "python"), "-m", "tlsgate", "server"]
        argv += ["--listen", f"127.0.0.1:{port}", "--target", target, "--cert", str(wd.cert), "--key", str(wd.key)]
        argv += ["--disable-authentication", *extra]
    p = wd.spawn(name, argv, bl.PROXY_CPU, None, env=env)
    counts: dict[str, dict[str, int]] = {}
    try:
        if not bl.wait_port(port, timeout=180, proc=p):
            raise RuntimeError(f"{name} did not start under valgrind: {(wd.path / f'{name}.err').read_text()[-800:]}")
        cg = Callgrind(p.pid, out)
        ctx = client_context()
        for _ in range(WARMUP_CONNS):
            fetch(port, ctx)
        cg.control("--instr=on")
        for _ in range(WARMUP_CONNS):
            fetch(port, ctx)
        idle = idle_rate(cg, p.pid)
        counts["newconn"] = median_chunk(cg, p.pid, n, chunks, lambda: fetch(port, ctx), idle)
        if requests:
            with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as tls:
                for _ in range(WARMUP_REQUESTS):
                    request(tls)
                idle = idle_rate(cg, p.pid)  # with this connection open: the sweep looks at it
                counts["request"] = median_chunk(cg, p.pid, requests, chunks, lambda: request(tls), idle)
    finally:
        bl.stop_group(p)
        wd.started.remove(p)
    return counts


def idle_rate(cg: Callgrind, pid: int) -> dict[str, float]:
    """Instructions per second of an idle proxy, by group: its timers (the log flush five times a second, the
    sweep once a second) wake it however fast the client goes."""
    wait_quiet(pid)
    cg.control("--zero")
    t0 = time.monotonic()
    time.sleep(IDLE_SECONDS)
    row = cg.dump()
    elapsed = time.monotonic() - t0
    return {k: v / elapsed for k, v in row.items()}


def median_chunk(
    cg: Callgrind, pid: int, total: int, chunks: int, one: Callable[[], None], idle: dict[str, float]
) -> dict[str, int]:
    """Counts of the median of ``chunks`` back-to-back runs of ``one``, scaled to ``total`` operations.

    The windows follow each other with no gap and no waiting inside: the work an operation leaves for after
    the client saw its end (the close, the log line) falls into the next window, and the last window's
    leftover is balanced by what the first window inherits from the operation before it. What the proxy's
    timers cost while a window lasted (``idle`` per second times its wall time) is taken out: under callgrind
    an operation takes a millisecond or more, and how long depends on what else the machine does, so the
    timers' share would follow the machine's load (it moved the keep-alive count by 1.4% between runs).
    Where an event lands relative to a loop iteration is luck (a full garbage collection too); over windows
    of a few dozen connections that moves plain asyncio's count by ~1%, and the median window leaves such
    bursts out while steady extra work shows in every window.
    """
    size = max(1, total // chunks)
    found = []
    wait_quiet(pid)
    one()
    cg.control("--zero")
    since = time.monotonic()
    for _ in range(chunks):
        for _ in range(size):
            one()
        row = cg.dump()
        now = time.monotonic()
        found.append({k: max(0, round(v - idle.get(k, 0.0) * (now - since))) for k, v in row.items()})
        since = now
    bl.log(
        f"  instructions per operation in {chunks} windows of {size}: "
        + ", ".join(f"{sum(r.values()) // size:,}" for r in found)
        + f" (idle: {sum(idle.values()):,.0f} per second taken out)"
    )
    found.sort(key=lambda row: sum(row.values()))
    mid = found[len(found) // 2]
    return {k: v * total // size for k, v in mid.items()}


def by_object(dump: Path) -> dict[str, int]:
    """Self instructions per group of shared objects, read from a callgrind dump.

    An ``ob=`` line names (or refers by number to) the object of the cost lines that follow; the cost line right
    after ``calls=`` is the inclusive cost of a call into another function, already counted there, so it is
    skipped.
    """
    names: dict[str, str] = {}
    grouped: collections.Counter[str] = collections.Counter()
    group = "other"
    skip = False
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("cob="):
            ref, _, name = line[4:].partition(" ")
            if name:  # the string table is shared: a name may first appear on a call line
                names[ref] = name
        elif line.startswith("ob="):
            ref, _, name = line[3:].partition(" ")
            if name:
                names[ref] = name
            base = os.path.basename(names.get(ref, ref))
            group = next((g for g, keys in GROUPS if any(k in base for k in keys)), "other")
        elif line.startswith("calls="):
            skip = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            if len(parts) > 1:
                grouped[group] += int(parts[1])
    return dict(grouped)


# ---------------------------------------------------------------------------------------------------------------
# baseline and check


def environment(loops: list[str]) -> dict[str, str]:
    """What the counts depend on besides tlsgate's source: a baseline from another of these means nothing."""
    cpu, flags = "unknown", ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.partition(":")[2].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.partition(":")[2].split()))
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    env = {
        "cpu": cpu,
        # OpenSSL picks its code by CPU feature: a VM's model name ("AMD EPYC") does not say which it has.
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "arch": platform.machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "openssl": ssl.OPENSSL_VERSION,
        "libc": " ".join(platform.libc_ver()),
        "valgrind": valgrind,
    }
    if "uvloop" in loops:
        try:
            import uvloop

            env["uvloop"] = uvloop.__version__
        except ImportError:
            env["uvloop"] = "not installed"
    return env


def per_unit(counts: dict[str, dict[str, int]], n: int, requests: int) -> dict[str, dict[str, int]]:
    """{phase: {group and 'total': instructions per connection or request}}."""
    out = {}
    for phase, row in counts.items():
        div = n if phase == "newconn" else requests
        cells = {c: row.get(c, 0) / div for c in COLS}
        cells["total"] = sum(row.values()) / div
        out[phase] = {k: round(v) for k, v in cells.items()}
    return out


def run_once(args: argparse.Namespace, loop: str, path: Path | None, name: str) -> dict[str, dict[str, int]]:
    with bl.workdir("tlsgate-ir-") as wd:
        backend = PythonBackend()
        try:
            target = f"127.0.0.1:{backend.server_address[1]}"
            extra = shlex.split(args.args)
            counts = measure(wd, name, path, loop, target, args.n, args.requests, extra, args.chunks)
        finally:
            backend.shutdown()
            backend.server_close()
    return per_unit(counts, args.n, args.requests)


def have_valgrind() -> bool:
    return not bl.missing_tools(["valgrind", "callgrind_control"])


def write_baseline(args: argparse.Namespace) -> int:
    bl.ensure_tools(["valgrind"])  # installs it when we are root with apt-get, else says how and exits 2
    rev = args.rev[0] if args.rev else None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev or "HEAD"], cwd=bl.REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    loops = args.loops.split(",")
    runs: dict[str, list[dict[str, dict[str, int]]]] = {loop: [] for loop in loops}
    with tempfile.TemporaryDirectory(prefix="tlsgate-ir-src-") as srcs:
        path = extract(rev, Path(srcs)) if rev else None
        for i in range(args.repeat):
            for loop in loops:  # interleaved, so that nothing on the machine lines up with one loop's runs
                bl.log(f"perf-guard: run {i + 1}/{args.repeat}, {loop}, {rev or 'the working tree'} ({commit}) ...")
                t0 = time.monotonic()
                runs[loop].append(run_once(args, loop, path, rev or "worktree"))
                bl.log(f"perf-guard: {json.dumps(runs[loop][-1])} in {time.monotonic() - t0:.0f} s")
    median = {
        loop: {ph: {c: round(statistics.median(r[ph][c] for r in rs)) for c in rs[0][ph]} for ph in rs[0]}
        for loop, rs in runs.items()
    }
    baseline = {
        "what": "user-space instructions per new TLS connection and per keep-alive request; bench/instructions.py",
        "measured": {
            "source": f"{rev or 'working tree'} ({commit})",
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["bench/instructions.py", *sys.argv[1:]]),
            "how": (
                f"one tlsgate process under callgrind, {2 * WARMUP_CONNS} connections then {WARMUP_REQUESTS}"
                f" requests uncounted; {args.n} new connections one at a time (TLS 1.3 handshake, one GET, close),"
                f" then {args.requests} GETs over one kept-alive connection; each phase in {args.chunks} back-to-back"
                f" windows, the idle proxy's instructions per second (measured for {IDLE_SECONDS:g} s before each"
                " phase) times each window's wall time taken out, the median window kept; PYTHONHASHSEED=0,"
                " PYTHONMALLOC=malloc; per_unit is the median of the runs"
            ),
            "connections": args.n,
            "requests": args.requests,
            "chunks": args.chunks,
            "tlsgate_args": args.args,
            "backend": "python (in-process HTTP/1.1 responder, 3-byte body)",
        },
        "environment": environment(loops),
        "tolerance": args.tolerance,
        "per_unit": median,
        "runs": runs,
    }
    Path(args.write_baseline).write_text(json.dumps(baseline, indent=2) + "\n")
    print(f"perf-guard: wrote {args.write_baseline}")
    for loop, rs in runs.items():
        for ph in rs[0]:
            totals = [r[ph]["total"] for r in rs]
            lo, hi = min(totals), max(totals)
            runs_text = ", ".join(f"{t:,}" for t in totals)
            print(
                f"perf-guard: {loop} {ph}: median {median[loop][ph]['total']:,}; runs {runs_text};"
                f" spread {100 * (hi - lo) / lo:.2f}%"
            )
    return 0


def check(args: argparse.Namespace) -> int:
    """Exit 0 (pass or skip) or 1 (a count grew by more than the tolerance); one line per count."""
    try:
        baseline = json.loads(Path(args.check).read_text())
        measured, base_env = baseline["measured"], baseline["environment"]
        limit = float(baseline["tolerance"])
        base: dict[str, dict[str, dict[str, int]]] = baseline["per_unit"]
        args.n, args.requests = int(measured["connections"]), int(measured["requests"])
        args.chunks, args.args = int(measured["chunks"]), str(measured["tlsgate_args"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"perf-guard: cannot read baseline {args.check}: {e}", file=sys.stderr)
        return 2
    if not have_valgrind():
        print("perf-guard: SKIP: valgrind is not installed (apt-get install valgrind); nothing was compared")
        return 0
    here = environment(list(base))
    differ = [f"{k}: baseline {v!r}, here {here.get(k)!r}" for k, v in base_env.items() if v != here.get(k)]
    if differ:
        print("perf-guard: SKIP: this machine is not the baseline's, so its counts are not comparable:")
        for d in differ:
            print(f"perf-guard:   {d}")
        print(f"perf-guard: to guard on this machine, record a baseline here: {refresh_hint(args.check)}")
        return 0
    t0 = time.monotonic()
    failed = False
    for loop, phases in base.items():
        bl.log(f"perf-guard: counting the working tree on {loop} ({args.n} connections, {args.requests} requests) ...")
        now = run_once(args, loop, None, "worktree")
        for ph in PHASES:
            if ph not in phases:
                continue
            was, got = phases[ph]["total"], now[ph]["total"]
            ratio = got / was
            verdict = "FAIL" if ratio > 1 + limit else "ok"
            failed |= verdict == "FAIL"
            groups = ", ".join(f"{c} {phases[ph].get(c, 0):,} -> {now[ph][c]:,}" for c in COLS if now[ph][c])
            print(
                f"perf-guard: {verdict:4} {loop:7} instructions per {UNIT[ph]}: baseline {was:,}, now {got:,},"
                f" ratio {ratio:.3f} (limit {1 + limit:.2f}; {groups})",
                flush=True,
            )
    took = time.monotonic() - t0
    print(f"perf-guard: baseline: {measured['source']}, {measured['date_utc']} UTC; this check took {took:.0f} s")
    if failed:
        print(f"perf-guard: FAILED: tlsgate executes more than {100 * limit:g}% more instructions than the baseline.")
        print("perf-guard: find the change with: .venv/bin/python bench/instructions.py --rev main --loop LOOP")
        print(f"perf-guard: if the cost is intended (say so in the commit), refresh: {refresh_hint(args.check)}")
        return 1
    return 0


def refresh_hint(path: str) -> str:
    return f".venv/bin/python bench/instructions.py --write-baseline {path} --rev HEAD"


# ---------------------------------------------------------------------------------------------------------------


def table(args: argparse.Namespace) -> int:
    bl.ensure_tools(["nginx", "openssl", "taskset", "valgrind"])
    with bl.workdir("tlsgate-ir-") as wd, tempfile.TemporaryDirectory(prefix="tlsgate-ir-src-") as srcs:
        target = f"127.0.0.1:{bl.start_nginx(wd, {'small.txt': 3})}"
        paths: dict[str, Path | None] = {rev: extract(rev, Path(srcs)) for rev in args.rev or ["HEAD"]}
        if not args.no_worktree:
            paths["worktree"] = None
        if args.haproxy:
            paths["haproxy"] = None
        rows = {}
        for name, path in paths.items():
            bl.log(f"{name}: running under callgrind ...")
            counts = measure(
                wd, name, path, args.loop, target, args.n, args.requests, shlex.split(args.args), args.chunks
            )
            rows[name] = per_unit(counts, args.n, args.requests)
    for ph in PHASES:
        if not all(ph in r for r in rows.values()):
            continue
        many = f"{args.n} connections" if ph == "newconn" else f"{args.requests} requests over one connection"
        print(f"\nThousands of instructions per {UNIT[ph]} ({args.loop}, {many}, one at a time):\n")
        print("| variant | total | " + " | ".join(COLS) + " |")
        print("|---|---:|" + "---:|" * len(COLS))
        for name, row in rows.items():
            cells = " | ".join(f"{row[ph][c] / 1000:,.1f}" for c in COLS)
            print(f"| {name} | {row[ph]['total'] / 1000:,.1f} | {cells} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", default=[], help="git revision (repeatable; default HEAD)")
    ap.add_argument("--no-worktree", action="store_true", help="leave out the working tree's src/")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--args", default="", help="more tlsgate server flags, e.g. '--quiet conns'")
    ap.add_argument("--haproxy", action="store_true", help="count haproxy too (the same client, the same nginx)")
    ap.add_argument("-n", type=int, default=200, help=f"connections counted (after {2 * WARMUP_CONNS} not counted)")
    ap.add_argument("--requests", type=int, default=2000, help="keep-alive requests counted (0: none)")
    ap.add_argument("--chunks", type=int, default=5, help="each phase in this many chunks; the median is kept [5]")
    ap.add_argument("--check", metavar="BASELINE", help="compare the working tree with this baseline file")
    ap.add_argument("--write-baseline", metavar="PATH", help="measure --rev (or the working tree) into PATH")
    ap.add_argument("--repeat", type=int, default=3, help="with --write-baseline: runs, the median is kept [3]")
    ap.add_argument("--loops", default="asyncio,uvloop", help="with --write-baseline: loops to count [asyncio,uvloop]")
    ap.add_argument("--tolerance", type=float, default=0.03, help="with --write-baseline: allowed growth [0.03]")
    args = ap.parse_args()
    if (
        args.n < 1
        or args.requests < 0
        or args.repeat < 1
        or not 1 <= args.chunks <= min(args.n, args.requests or args.n)
    ):
        ap.error(
            "-n, --repeat and --chunks must be at least 1, --requests at least 0, --chunks at most -n and --requests"
        )
    if not set(args.loops.split(",")) <= {"asyncio", "uvloop"}:
        ap.error(f"--loops: asyncio, uvloop or both, comma-separated, not {args.loops!r}")
    if args.check:
        return check(args)
    if args.write_baseline:
        return write_baseline(args)
    return table(args)


if __name__ == "__main__":
    raise SystemExit(main())
