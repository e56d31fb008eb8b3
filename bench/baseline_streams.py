#!/usr/bin/env python3
"""The seed-style baseline: the asyncio-streams TLS proxy everyone writes first.

`asyncio.start_server(ssl=ctx)` accepts and terminates TLS, `asyncio.open_connection` dials the target, and two
`reader.read(65536)` / `writer.write` / `await writer.drain()` loops copy bytes each way. No tuning at all: this is
the floor tlsgate's relay engine must clear by a wide margin, measured with the same harness as haproxy.

    python bench/baseline_streams.py --listen 127.0.0.1:8443 --target 127.0.0.1:8080 --cert c.pem --key k.pem

Runs on plain asyncio; `--loop uvloop` (or env TLSGATE_LOOP=uvloop) swaps in uvloop for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl

CHUNK = 65536


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


async def handle(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, target: tuple[str, int]
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))
    finally:
        for w in (client_writer, upstream_writer):
            w.close()
        for w in (client_writer, upstream_writer):
            with contextlib.suppress(Exception):
                await w.wait_closed()


async def serve(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    host, port = args.listen
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.target), host, port, ssl=ctx, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=split_hostport, required=True, help="HOST:PORT to accept TLS on")
    ap.add_argument("--target", type=split_hostport, required=True, help="HOST:PORT to relay plaintext to")
    ap.add_argument("--cert", required=True, help="PEM certificate chain")
    ap.add_argument("--key", required=True, help="PEM private key")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default=os.environ.get("TLSGATE_LOOP", "asyncio"))
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
