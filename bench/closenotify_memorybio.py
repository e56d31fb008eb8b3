#!/usr/bin/env python3
"""What a MemoryBIO-based TLS half-close would cost, against the ctypes ``SSL_shutdown`` tlsgate uses.

``SSLSocket.unwrap()`` reads from the socket after sending close_notify and may drop the peer's data (see
src/tlsgate/closenotify.py). An ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` has no such race: its second
``SSL_shutdown`` reads only from the incoming BIO, which we fill. But a relay on SSLObject pays for every
record, not only at the close: socket -> incoming BIO -> SSLObject.read, and SSLObject.write -> outgoing BIO ->
socket, a copy and two more Python calls each way. This measures both parts on loopback socket pairs:

- close: one close_notify sent and on the wire, per connection (ctypes SSL_shutdown on an SSLSocket; unwrap()
  on an SSLObject plus moving its outgoing bytes to the socket);
- read: one 16 KiB application record received and decrypted (SSLSocket's C read; recv_into + BIO write +
  SSLObject.read);
- write: one 16 KiB record encrypted and sent (SSLSocket's C write; SSLObject.write + BIO read + send).

    .venv/bin/python bench/closenotify_memorybio.py            # 2000 connections, 20000 records
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import sys
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from tlsgate.tls import closenotify

RECORD = 16384


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server)
    server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


def pump(
    left: ssl.SSLSocket, right: ssl.SSLObject, r_in: ssl.MemoryBIO, r_out: ssl.MemoryBIO, raw: socket.socket
) -> None:
    """Handshake an SSLSocket (left) with an SSLObject (right) whose BIOs are fed from socket ``raw``."""
    done = [False, False]
    while not all(done):
        for i, side in enumerate((left, right)):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
        if r_out.pending:
            raw.sendall(r_out.read())
        try:
            data = raw.recv(65536)
        except BlockingIOError:
            data = b""
        if data:
            r_in.write(data)


def connection(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[ssl.SSLSocket, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    tls = server.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    r_in, r_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client.wrap_bio(r_in, r_out, server_hostname="localhost")
    pump(tls, obj, r_in, r_out, b)
    return tls, obj, r_in, r_out, b


def measure_close(n: int, server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[list[float], list[float]]:
    ctypes_ns, bio_ns = [], []
    for _ in range(n):
        tls, obj, _, r_out, raw = connection(server, client)
        start = time.perf_counter_ns()
        closenotify.send_close_notify(tls)  # SSLSocket side: ctypes SSL_shutdown once
        ctypes_ns.append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        try:
            obj.unwrap()  # SSLObject side: close_notify into its BIO, then WANT_READ from an empty BIO
        except ssl.SSLWantReadError:
            pass
        raw.send(r_out.read())
        bio_ns.append(time.perf_counter_ns() - start)
        tls.close()
        raw.close()
    return ctypes_ns, bio_ns


def measure_records(n: int, server: ssl.SSLContext, client: ssl.SSLContext) -> dict[str, float]:
    tls, obj, r_in, r_out, raw = connection(server, client)
    payload = memoryview(b"x" * RECORD)
    buffer = memoryview(bytearray(65536))
    sslobj = tls._sslobj  # type: ignore[attr-defined]
    out: dict[str, list[int]] = {"socket read": [], "bio read": [], "socket write": [], "bio write": []}
    for _ in range(n):
        # SSLObject writes a record, SSLSocket reads it.
        obj.write(payload)
        raw.send(r_out.read())
        start = time.perf_counter_ns()
        got = sslobj.read(len(buffer), buffer)
        out["socket read"].append(time.perf_counter_ns() - start)
        assert got == RECORD
        # SSLSocket writes a record, the SSLObject reads it through its BIO.
        start = time.perf_counter_ns()
        sslobj.write(payload)
        out["socket write"].append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        size = raw.recv_into(buffer)
        r_in.write(buffer[:size])
        got = obj.read(RECORD)
        out["bio read"].append(time.perf_counter_ns() - start)
        assert len(got) == RECORD
        start = time.perf_counter_ns()
        obj.write(payload)
        raw.send(r_out.read())
        out["bio write"].append(time.perf_counter_ns() - start)
        sslobj.read(len(buffer), buffer)  # drain what the timed BIO write sent
    tls.close()
    raw.close()
    return {name: statistics.median(values) / 1000 for name, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="connections for the close measurement")
    parser.add_argument("--records", type=int, default=20000, help="records for the read/write measurement")
    args = parser.parse_args()
    if not closenotify.available():
        raise SystemExit("the ctypes close_notify path is off here (TLSGATE_INTERNALS?): nothing to compare")
    server, client = contexts()
    ctypes_ns, bio_ns = measure_close(args.n, server, client)
    print(
        f"close_notify, median of {args.n}: ctypes SSL_shutdown {statistics.median(ctypes_ns) / 1000:.2f} µs, "
        f"SSLObject.unwrap + BIO -> socket {statistics.median(bio_ns) / 1000:.2f} µs"
    )
    records = measure_records(args.records, server, client)
    print(f"16 KiB record, median of {args.records}: " + ", ".join(f"{k} {v:.2f} µs" for k, v in records.items()))
    extra = records["bio read"] - records["socket read"] + records["bio write"] - records["socket write"]
    print(f"a MemoryBIO relay pays {extra:.2f} µs more per record relayed one way (read + write)")


if __name__ == "__main__":
    main()
