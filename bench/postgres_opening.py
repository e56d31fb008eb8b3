#!/usr/bin/env python3
"""What ``--protocol postgres`` adds to a new connection: PostgreSQL's SSLRequest and its ``S`` before the TLS.

Two ``tlsgate server`` processes in front of one plaintext echo server, alike but for ``--protocol postgres``.
A blocking client opens connections one after another: to the plain tunnel a TLS handshake, then one byte
echoed; to the postgres tunnel the SSLRequest, its ``S``, then the same. Rounds alternate the tunnels so drift
hits both alike; the figure is the median time per connection, and the difference is the opening's cost
(one loopback round trip and tlsgate's peek, read and send of the request).

    .venv/bin/python bench/postgres_opening.py             # 7 rounds of 300 connections each
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
    parser.add_argument("--connections", type=int, default=300)
    options = parser.parse_args()

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
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
        try:
            results: dict[str, list[float]] = {"plain": [], "postgres": []}
            for _ in range(options.rounds):
                for name, port, postgres in (("plain", plain_port, False), ("postgres", pg_port, True)):
                    started = time.perf_counter()
                    for _ in range(options.connections):
                        connect(port, client, postgres)
                    results[name].append((time.perf_counter() - started) / options.connections)
        finally:
            for proc in (plain, pg):
                proc.terminate()
                proc.wait()
    plain_us = statistics.median(results["plain"]) * 1e6
    pg_us = statistics.median(results["postgres"]) * 1e6
    print(f"per connection (median of {options.rounds} rounds of {options.connections}):")
    print(f"  TLS at once          {plain_us:8.1f} us")
    print(f"  SSLRequest, S, TLS   {pg_us:8.1f} us  (+{pg_us - plain_us:.1f} us, {100 * (pg_us / plain_us - 1):+.1f}%)")


if __name__ == "__main__":
    main()
