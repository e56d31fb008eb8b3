#!/usr/bin/env python3
"""What --target-http-headers costs per keep-alive request: instructions (callgrind) with and without the flag.

The same harness as instructions.py (one nginx backend, one client, TLS 1.3, requests one at a time over one
kept-alive connection, the counters zeroed after a warm-up), run twice on the working tree: the plain relay,
then with ``--target-http-headers``. instructions.py's server has ``--disable-authentication``, so no client
certificate is sent and the X-Forwarded-Client-Cert value is absent: that value is built once per connection
(and cached per certificate), so the per-request figure is the parse and rewrite of each head and the look at
each response head, which a certificate does not change.

    .venv/bin/python bench/http_identity.py                  # uvloop, 200 connections, 2000 requests
    .venv/bin/python bench/http_identity.py --loop asyncio --requests 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl
from instructions import COLS, PHASES, UNIT, measure, per_unit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("-n", type=int, default=200, help="connections counted")
    ap.add_argument("--requests", type=int, default=2000, help="keep-alive requests counted")
    ap.add_argument("--chunks", type=int, default=5, help="each phase in this many chunks; the median is kept [5]")
    args = ap.parse_args()
    bl.ensure_tools(["nginx", "openssl", "taskset", "valgrind"])
    rows = {}
    with bl.workdir("tlsgate-httpid-") as wd:
        target = f"127.0.0.1:{bl.start_nginx(wd, {'small.txt': 3})}"
        for name, extra in (("plain relay", []), ("--target-http-headers", ["--target-http-headers"])):
            bl.log(f"{name}: running under callgrind ...")
            counts = measure(wd, name.strip("-"), None, args.loop, target, args.n, args.requests, extra, args.chunks)
            rows[name] = per_unit(counts, args.n, args.requests)
    for ph in PHASES:
        many = f"{args.n} connections" if ph == "newconn" else f"{args.requests} requests over one connection"
        print(f"\nThousands of instructions per {UNIT[ph]} ({args.loop}, {many}, one at a time):\n")
        print("| variant | total | " + " | ".join(COLS) + " |")
        print("|---|---:|" + "---:|" * len(COLS))
        for name, row in rows.items():
            cells = " | ".join(f"{row[ph][c] / 1000:,.1f}" for c in COLS)
            print(f"| {name} | {row[ph]['total'] / 1000:,.1f} | {cells} |")
    base, http = rows["plain relay"]["request"]["total"], rows["--target-http-headers"]["request"]["total"]
    print(f"\nper keep-alive request: {http / 1000:,.1f}k vs {base / 1000:,.1f}k instructions ({http / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
