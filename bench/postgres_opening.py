#!/usr/bin/env python3
"""What ``--protocol postgres`` adds to a new connection: PostgreSQL's SSLRequest and its ``S`` before the TLS.

Two ``tlsgate server`` processes in front of one plaintext echo server, alike but for ``--protocol postgres``.
A blocking client opens connections one after another: to the plain tunnel a TLS handshake, then one byte
echoed; to the postgres tunnel the SSLRequest, its ``S``, then the same. Rounds alternate the tunnels so drift
hits both alike. Two figures per tunnel: the client's median time per connection (the opening adds one
loopback round trip, which a PostgreSQL client pays with any server) and tlsgate's CPU time per connection
(``/proc/PID/stat``, median of the rounds), where the opening's own cost shows: a peek, a read and a send.

    .venv/bin/python bench/postgres_opening.py             # 7 rounds of 500 connections each
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import socketserver
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import trustme

SSL_REQUEST = bytes([0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F])
LISTENING = re.compile(r"listen\S*127\.0\.0\.1:(\d+)")


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def start_tunnel(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlsgate", "server", *args], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")},
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        match = LISTENING.search(line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(1))
    raise SystemExit(f"tlsgate did not start: {proc.wait()}")


def connect(port: int, ctx: ssl.SSLContext, postgres: bool) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if postgres:
            raw.sendall(SSL_REQUEST)
            assert raw.recv(1) == b"S"
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"x")
            assert tls.recv(1) == b"x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--connections", type=int, default=500)
    options = parser.parse_args()

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    latency: dict[str, list[float]] = {"plain": [], "postgres": []}
    cpu: dict[str, list[float]] = {"plain": [], "postgres": []}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        common = [
            "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo.server_address[1]}",
            "--cert", str(cert), "--key", str(key), "--disable-authentication", "--quiet", "conns",
        ]  # fmt: skip
        plain, plain_port = start_tunnel(common)
        pg, pg_port = start_tunnel([*common, "--protocol", "postgres"])
        tunnels = {"plain": (plain, plain_port, False), "postgres": (pg, pg_port, True)}
        try:
            for _ in range(options.rounds):
                for name, (proc, port, postgres) in tunnels.items():
                    before = cpu_seconds(proc.pid)
                    for _ in range(options.connections):
                        started = time.perf_counter()
                        connect(port, client, postgres)
                        latency[name].append(time.perf_counter() - started)
                    cpu[name].append((cpu_seconds(proc.pid) - before) / options.connections)
        finally:
            for proc, _, _ in tunnels.values():
                proc.terminate()
                proc.wait()
    print(f"per connection ({options.rounds} rounds of {options.connections}, tunnels alternating):")
    print("                       client latency (median)   tlsgate CPU (median of rounds)")
    base_lat, base_cpu = statistics.median(latency["plain"]) * 1e6, statistics.median(cpu["plain"]) * 1e6
    for name, label in (("plain", "TLS at once"), ("postgres", "SSLRequest, S, TLS")):
        lat, used = statistics.median(latency[name]) * 1e6, statistics.median(cpu[name]) * 1e6
        print(
            f"  {label:20} {lat:8.1f} us ({lat - base_lat:+7.1f})      {used:8.1f} us ({used - base_cpu:+7.1f}, "
            f"{100 * (used / base_cpu - 1):+.1f}%)"
        )


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (/proc, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
