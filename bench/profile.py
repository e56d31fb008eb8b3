#!/usr/bin/env python3
"""Where does tlsgate's CPU go? py-spy on a tlsgate (CPU 0) under one wrk load phase (CPU 1), top functions printed.

py-spy is not a project dependency; install it somewhere else, e.g.
    python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy

    .venv/bin/python bench/profile.py --phase newconn            # full handshakes
    .venv/bin/python bench/profile.py --phase keepalive --native # include OpenSSL/C frames (pauses the target)
    .venv/bin/python bench/profile.py --proxy baseline --phase keepalive

Prints self time (the innermost frame of each sample), inclusive time per function and per source file, as % of
on-CPU samples (frames of the event loop itself are cut off),
and leaves the raw collapsed stacks (flamegraph.pl / speedscope input) in $TMPDIR/tlsgate-profile-*.txt.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

# frames at or above the event loop's dispatch; stripped so inclusive % shows the work, not the wrappers
LOOP_FRAMES = (
    "run (uvloop",
    "Runner.run (asyncio",
    "BaseEventLoop.run_forever",
    "BaseEventLoop._run_once",
    "Handle._run (asyncio",
)
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """'read (/x/y/src/tlsgate/relay.py:80)' -> 'read (tlsgate/relay.py)'; per function, not per line."""
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    for marker in ("/src/", "/site-packages/", "/lib/python3"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({f})"


def summarize(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    per_file: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))] or frames
        cut = max((i for i, f in enumerate(frames) if f.startswith(LOOP_FRAMES)), default=-1)
        frames = frames[cut + 1 :] or frames[-1:]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        for f in {f.rpartition(" (")[2].rstrip(")") for f in frames}:
            per_file[f] += n
    if not total:
        return "no samples (was the proxy busy?)"
    out = [f"{total} samples\n", "| self % | function |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{f}` |" for f, c in own.most_common(top)]
    out += ["", "| inclusive % | function |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{f}` |" for f, c in incl.most_common(top)]
    out += ["", "| inclusive % | source file |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{f}` |" for f, c in per_file.most_common(12)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", default="tlsgate", help="tlsgate, tlsgate-asyncio or baseline")
    ap.add_argument("--phase", choices=["keepalive", "newconn", "bulk"], default="newconn")
    ap.add_argument("--secs", type=int, default=10, help="seconds of load, and of sampling")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="sample C frames too (py-spy --native; slows the target)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--py-spy", dest="pyspy", help="py-spy executable (default: on PATH, else /tmp/pyspy/bin)")
    args = ap.parse_args()
    pyspy = args.pyspy or shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy"
    if not Path(pyspy).exists() and not shutil.which(pyspy):
        bl.log("profile: py-spy not found; python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy")
        return 2
    if args.proxy.startswith("tlsgate"):
        ok, why = bl.tlsgate_ready()
        if not ok:
            bl.log(f"profile: {why}")
            return 2
    bl.ensure_tools(["nginx", "wrk", "curl", "openssl", "taskset"])
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = Path(tempfile.gettempdir()) / f"tlsgate-profile-{args.proxy}-{args.phase}-{stamp}.txt"
    with bl.workdir("tlsgate-prof-") as wd:
        backend = f"127.0.0.1:{bl.start_nginx(wd, {'small.txt': 0, 'big.bin': 4 << 30})}"
        (wd.path / "www" / "small.txt").write_text("ok\n")
        port = bl.free_port()
        proxy = wd.spawn(args.proxy, bl.proxy_argv(args.proxy, wd, port, backend), bl.PROXY_CPU, port)
        time.sleep(0.5)
        if args.phase == "bulk":
            load = [
                "curl",
                "-sk",
                "-o",
                "/dev/null",
                "--max-time",
                str(args.secs + 2),
                f"https://127.0.0.1:{port}/big.bin",
            ]
        else:
            conns = "50" if args.phase == "keepalive" else "20"
            load = ["wrk", "-t1", f"-c{conns}", f"-d{args.secs + 2}s", f"https://127.0.0.1:{port}/small.txt"]
            load += ["-H", "Connection: close"] if args.phase == "newconn" else []
        gen = subprocess.Popen(["taskset", "-c", bl.LOAD_CPU, *load], stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        c0 = bl.cpu_seconds_ns(proxy.pid)
        cmd = [pyspy, "record", "-p", str(proxy.pid), "-d", str(args.secs), "-r", str(args.rate)]
        cmd += ["-f", "raw", "-o", str(raw), "--subprocesses"]
        cmd += ["--native"] if args.native else ["--nonblocking"]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        busy = (bl.cpu_seconds_ns(proxy.pid) - c0) / args.secs
        gen.wait(args.secs + 30)
    print(f"### py-spy: {args.proxy}, {args.phase} load, {args.secs} s, proxy core {100 * busy:.0f}% busy\n")
    print(summarize(raw, args.top))
    print(f"\nRaw collapsed stacks: `{bl.shown(raw)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
