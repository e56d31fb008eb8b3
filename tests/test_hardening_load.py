"""Load on an in-process tunnel: many connections at once, many in a row, and reloads in the middle of it.

Nothing here measures speed. What is checked is that every byte arrives (checksums on both ends), that nothing
is left behind (file descriptors, memory, objects) and that a reload never disturbs a connection in flight.
The clients run in the test's event loop, the tunnel in the same loop, so one process's descriptors and memory
are the whole picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import random
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tlsgate.engine.relay import Relay
from tlsgate.pki import CertificateAuthority

from helpers import Handler, backend, client_context, fd_limit_at_least, port_of, server_opts, tunnel, wait_until

pytestmark = pytest.mark.asyncio


def echo_and_hash(digests: list[str]) -> Handler:
    """Echo everything and record, per connection, the SHA-256 of what arrived."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        while data := await reader.read(65536):
            digest.update(data)
            writer.write(data)
            await writer.drain()
        digests.append(digest.hexdigest())

    return handle


async def exchange_in_chunks(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes, chunk: int = 16384
) -> bytes:
    """Send ``payload`` in chunks while reading the echo; returns what came back."""

    async def send() -> None:
        for start in range(0, len(payload), chunk):
            writer.write(payload[start : start + chunk])
            await writer.drain()

    async def receive() -> bytes:
        return await reader.readexactly(len(payload))

    _, echoed = await asyncio.gather(send(), receive())
    return echoed


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_500_concurrent_connections_each_move_checksummed_data(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    count, size = 500, 128 * 1024
    ctx = client_context(ca)
    backend_digests: list[str] = []
    opened = 0
    all_open = asyncio.Event()

    async def one(i: int, port: int) -> str:
        nonlocal opened
        payload = random.Random(i).randbytes(size)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        try:
            # A first exchange proves the relay is up; then everybody waits so all 500 are open at once.
            echoed = await exchange_in_chunks(reader, writer, payload[:1024])
            opened += 1
            if opened == count:
                all_open.set()
            await all_open.wait()
            echoed += await exchange_in_chunks(reader, writer, payload[1024:])
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest(), f"connection {i} corrupted"
        return hashlib.sha256(payload).hexdigest()

    with fd_limit_at_least(6 * count + 512):
        async with (
            backend(echo_and_hash(backend_digests)) as be,
            tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
        ):
            port = port_of(tun)
            tasks = [asyncio.ensure_future(one(i, port)) for i in range(count)]
            waiter = asyncio.ensure_future(all_open.wait())
            await asyncio.wait([waiter, *tasks], timeout=90, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            assert all_open.is_set(), f"only {opened} of {count} connections came up"
            assert len(tun.relays) == count
            sent = await asyncio.gather(*tasks)
            await wait_until(lambda: tun.active == 0 and len(backend_digests) == count, attempts=4000)
            assert tun.stats.established == tun.stats.closed == count
            assert tun.stats.bytes_in == tun.stats.bytes_out == count * size
            assert tun.stats.handshake_errors == tun.stats.target_errors == 0
    assert sorted(backend_digests) == sorted(sent)


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_10000_short_connections_leave_no_descriptors_memory_or_objects_behind(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """Open, exchange 100 bytes, close; 10,000 times in 8 lanes. After a warm-up (caches, pools, the first
    allocations of every kind), the process must end with the descriptors, memory and objects it had, within a
    small tolerance for the allocator, and no Relay object alive."""
    lanes, warmup, total = 8, 800, 10_000
    # caplog would keep 10,000 "closed" records: memory that is the test's, not tlsgate's.
    caplog.set_level(logging.WARNING, logger="tlsgate")
    ctx = client_context(ca)
    payload = b"x" * 100

    async def lane(port: int, rounds: int) -> None:
        for _ in range(rounds):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
            await writer.wait_closed()

    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
    ):
        port = port_of(tun)
        await asyncio.gather(*(lane(port, warmup // lanes) for _ in range(lanes)))
        await wait_until(lambda: tun.active == 0 and tun.stats.closed == warmup)
        gc.collect()
        fds_before, rss_before, objects_before = open_fds(), rss_bytes(), len(gc.get_objects())

        await asyncio.gather(*(lane(port, total // lanes) for _ in range(lanes)))
        await wait_until(lambda: tun.active == 0 and tun.stats.closed == warmup + total)
        gc.collect()
        fds_after, rss_after, objects_after = open_fds(), rss_bytes(), len(gc.get_objects())

        assert tun.stats.established == warmup + total
        assert tun.stats.bytes_in == tun.stats.bytes_out == (warmup + total) * len(payload)
        assert tun.stats.handshake_errors == tun.stats.target_errors == tun.stats.accept_errors == 0
        assert not tun.relays and not tun.setups
        assert live(Relay) == 0
        # One object kept per connection would be 10,000; the loop's and the test's own churn is a few hundred.
        assert objects_after - objects_before < 1000, (objects_before, objects_after)
        # The backend may still be closing its last few sockets; allow a handful, not one per connection.
        assert fds_after <= fds_before + 4, (fds_before, fds_after)
        # A leak of even 1 KiB per connection would be 10 MiB; the allocator's own drift stays well below that.
        assert rss_after - rss_before < 8 * 1024 * 1024, (rss_before, rss_after)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_reloads_under_load_lose_nothing_and_apply_to_new_connections(tmp_path: Path) -> None:
    """100 connections stream (echo, checksummed) while the server certificate is rotated and a client
    certificate is revoked, six reloads in all. Every stream finishes intact; new connections see each change."""
    streams, reloads = 100, 6
    ca = CertificateAuthority.create(tmp_path / "ca")
    server_files = ca.issue("localhost").write(tmp_path, "server")
    alice_files = ca.issue("alice", client=True, server=False).write(tmp_path, "alice")
    doomed = [ca.issue(f"mallory{i}", client=True, server=False) for i in range(reloads // 2)]
    doomed_files = [cert.write(tmp_path, f"mallory{i}") for i, cert in enumerate(doomed)]
    crl = tmp_path / "crl.pem"
    crl.write_bytes(ca.build_crl().public_bytes(Encoding.PEM))

    def context_for(files: dict[str, Path]) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        ctx.load_cert_chain(str(files["cert"]), str(files["key"]))
        return ctx

    alice = context_for(alice_files)
    backend_digests: list[str] = []
    rounds_done = 0
    stop = asyncio.Event()

    async def stream(i: int, port: int) -> tuple[str, x509.Certificate]:
        nonlocal rounds_done
        rng = random.Random(i)
        sent, echoed = hashlib.sha256(), hashlib.sha256()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=alice, server_hostname="localhost")
        first_cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        try:
            rounds = 0
            while not stop.is_set() or rounds < 3:
                chunk = rng.randbytes(rng.randint(1, 32 * 1024))
                sent.update(chunk)
                echoed.update(await exchange_in_chunks(reader, writer, chunk))
                rounds += 1
                rounds_done += 1
            # Same certificate to the end: a reload never touches an established connection.
            assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == first_cert
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        assert echoed.digest() == sent.digest(), f"stream {i} corrupted"
        return sent.hexdigest(), x509.load_der_x509_certificate(first_cert)

    async def served(ctx: ssl.SSLContext, port: int) -> x509.Certificate | None:
        """The server certificate a new connection sees, or None when it is refused."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        except (ssl.SSLError, ConnectionError):
            return None
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        try:
            writer.write(b"?")
            ok = await asyncio.wait_for(reader.read(1), 30) == b"?"
        except (ssl.SSLError, ConnectionError):
            ok = False
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        return x509.load_der_x509_certificate(der) if ok else None

    with fd_limit_at_least(8 * streams + 512):
        async with (
            backend(echo_and_hash(backend_digests)) as be,
            tunnel(
                target=be.address,
                cert=[str(server_files["cert"])],
                key=[str(server_files["key"])],
                cacert=str(ca.cert_path),
                allow_cn=["alice", *(f"mallory{i}" for i in range(len(doomed)))],
                crl=[str(crl)],
            ) as tun,
        ):
            port = port_of(tun)
            server = tun.server  # type: ignore[attr-defined]
            tasks = [asyncio.ensure_future(stream(i, port)) for i in range(streams)]
            first_serial = (await served(alice, port)).serial_number  # type: ignore[union-attr]
            serial = first_serial
            try:
                for n in range(reloads):
                    # Spread the reloads over the streaming: wait for some traffic between two of them.
                    target_rounds = rounds_done + 2 * streams
                    await wait_until(lambda t=target_rounds: rounds_done >= t, attempts=6000)
                    if n % 2 == 0:
                        rotated = ca.issue("localhost")
                        rotated.write(tmp_path, "server", force=True)
                        assert server.reload()
                        current = await served(alice, port)
                        assert current is not None and current.serial_number == rotated.serial != serial
                        serial = current.serial_number
                    else:
                        victim = n // 2
                        assert await served(context_for(doomed_files[victim]), port) is not None
                        ca.revoke(doomed[victim].serial)
                        crl.write_bytes(ca.build_crl().public_bytes(Encoding.PEM))
                        assert server.reload()
                        assert await served(context_for(doomed_files[victim]), port) is None
                        assert await served(alice, port) is not None
                    assert len(tun.relays) >= streams, "a stream ended while reloads were still going on"
            finally:
                stop.set()
            results = await asyncio.gather(*tasks)
            await wait_until(lambda: tun.active == 0 and len(backend_digests) >= streams, attempts=4000)
            assert tun.stats.reloads == reloads and tun.stats.reload_errors == 0
            assert tun.stats.refused == {"crl": reloads // 2}
    assert all(cert.serial_number == first_serial for _, cert in results)
    stream_digests = sorted(digest for digest, _ in results)
    assert set(stream_digests) <= set(backend_digests)
    assert len([d for d in backend_digests if d in set(stream_digests)]) == streams
