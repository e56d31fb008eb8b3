#!/usr/bin/env python3
"""Instructions per new connection, counted by valgrind (callgrind), for source trees of tlsgate.

CPU time on a shared 2-core VM drifts by ±10-20% between runs, more than most changes to the set-up path are
worth. Instruction counts do not drift: callgrind counts the user-space instructions the proxy executes, the same
number whatever else the machine does. What it cannot see is time in the kernel (count system calls with
`strace -c` for that) and cache misses, so it ranks changes to tlsgate's own work, not whole-machine cost.

Each variant runs under callgrind behind one nginx; a single client makes connections one at a time (full TLS 1.3
handshake, one GET, read to the end, close: the run.py new-connection phase without concurrency), the counters
are zeroed after a warm-up, and the instructions of the next N connections are split by shared object:
OpenSSL (libcrypto + libssl), the interpreter, the event loop, the rest.

    .venv/bin/python bench/instructions.py                    # working tree vs HEAD, uvloop, 200 connections
    .venv/bin/python bench/instructions.py --rev 1913413 --loop asyncio -n 100
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import time
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


def fetch(port: int, ctx: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"GET /small.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while tls.recv(4096):
            pass


def measure(
    wd: bl.Workdir, name: str, pythonpath: Path | None, loop: str, target: str, n: int, extra: list[str]
) -> dict[str, int]:
    port = bl.free_port()
    out = wd.path / f"callgrind.{name.replace('/', '_')}.out"
    env = dict(os.environ, TLSGATE_LOOP=loop, PYTHONMALLOC="malloc")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=yes"]
    if name == "haproxy":
        argv += bl.haproxy_argv(wd, port, target)
    else:
        argv += [str(bl.REPO / ".venv" / "bin" / "python"), "-m", "tlsgate", "server"]
        argv += ["--listen", f"127.0.0.1:{port}", "--target", target, "--cert", str(wd.cert), "--key", str(wd.key)]
        argv += ["--disable-authentication", *extra]
    p = wd.spawn(name, argv, bl.PROXY_CPU, None, env=env)
    try:
        if not bl.wait_port(port, timeout=180, proc=p):
            raise RuntimeError(f"{name} did not start under valgrind: {(wd.path / f'{name}.err').read_text()[-800:]}")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        for _ in range(20):
            fetch(port, ctx)
        subprocess.run(["callgrind_control", "--zero", str(p.pid)], check=True, capture_output=True)
        for _ in range(n):
            fetch(port, ctx)
        time.sleep(0.5)  # let the last close and its log line finish inside the proxy
        subprocess.run(["callgrind_control", "--dump", str(p.pid)], check=True, capture_output=True)
    finally:
        bl.stop_group(p)
        wd.started.remove(p)
    dumps = sorted(wd.path.glob(f"{out.name}.*"), key=lambda f: f.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"{name}: callgrind wrote no dump")
    return by_object(dumps[-1])


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", default=[], help="git revision (repeatable; default HEAD)")
    ap.add_argument("--no-worktree", action="store_true", help="leave out the working tree's src/")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--args", default="", help="more tlsgate server flags, e.g. '--quiet conns'")
    ap.add_argument("--haproxy", action="store_true", help="count haproxy too (the same client, the same nginx)")
    ap.add_argument("-n", type=int, default=200, help="connections counted (after 20 not counted)")
    args = ap.parse_args()
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
            rows[name] = measure(wd, name, path, args.loop, target, args.n, shlex.split(args.args))
    cols = [g for g, _ in GROUPS] + ["other"]
    print(f"\nThousands of instructions per new connection ({args.loop}, {args.n} connections, one at a time):\n")
    print("| variant | total | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for name, row in rows.items():
        total = sum(row.values())
        cells = " | ".join(f"{row.get(c, 0) / args.n / 1000:,.0f}" for c in cols)
        print(f"| {name} | {total / args.n / 1000:,.0f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
