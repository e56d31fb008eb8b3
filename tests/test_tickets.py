"""Session tickets shared by every context of a process tree: across contexts, reloads and --workers N."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tlsgate.tls import contexts, ossl, tickets

from helpers import (
    Echo,
    WorkersProcess,
    backend,
    client_context,
    eventually,
    memory_handshake,
    pki_client_context,
    port_of,
    resume_chain,
    revocable_client,
    server_opts,
    tunnel,
    workers_server_args,
)


@pytest.fixture(autouse=True)
def _fresh_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without a process secret, and leaves the next test none of its own."""
    monkeypatch.setattr(tickets, "_secret", None)


# -- in memory: one client, two server contexts ----------------------------------------------------------------


def material(pki_files: dict[str, Path]) -> contexts.KeyMaterial:
    return contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))


def alice_context(ca: trustme.CA) -> ssl.SSLContext:
    return client_context(ca, ca.issue_cert("alice.test", common_name="alice"))


def test_two_contexts_with_the_same_secret_resume_each_others_tickets(pki_files: dict[str, Path]) -> None:
    assert tickets.available(), "ticket keys are expected to be reachable on CPython + shared OpenSSL"
    client = ssl.create_default_context(cafile=str(pki_files["ca"]))
    a = contexts.server_context(material(pki_files), client_ca=None, require_client_cert=False)
    b = contexts.server_context(material(pki_files), client_ca=None, require_client_cert=False)
    session, reused = memory_handshake(client, a)
    assert not reused
    assert memory_handshake(client, b, session)[1]

    # Another process tree (another secret) cannot read them: the client falls back to a full handshake.
    tickets.set_process_key(os.urandom(tickets.SECRET_LENGTH))
    c = contexts.server_context(material(pki_files), client_ca=None, require_client_cert=False)
    assert not memory_handshake(client, c, session)[1]


def test_plain_contexts_share_tickets_only_after_apply(server_cert: trustme.LeafCert, ca: trustme.CA) -> None:
    def server() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_cert.configure_cert(ctx)
        return ctx

    client = client_context(ca)
    a, b, untouched = server(), server(), server()
    assert tickets.apply(a) and tickets.apply(b)
    session, _ = memory_handshake(client, a)
    assert memory_handshake(client, b, session)[1]
    assert not memory_handshake(client, untouched, session)[1]  # OpenSSL's own random key


def test_a_ticket_does_not_carry_trust_to_a_context_that_verifies_clients_differently(
    pki_files: dict[str, Path], ca: trustme.CA, other_ca: trustme.CA, tmp_path: Path
) -> None:
    """OpenSSL does not verify the client again on resumption: a ticket must not outlive the CAs that vouched."""
    both = tmp_path / "both.pem"
    both.write_bytes(pki_files["ca"].read_bytes() + other_ca.cert_pem.bytes())
    copy = tmp_path / "copy.pem"
    copy.write_bytes(pki_files["ca"].read_bytes())
    outsider = client_context(ca, other_ca.issue_cert("mallory.test", common_name="alice"))

    def server(cafile: Path, require: bool = True) -> ssl.SSLContext:
        return contexts.server_context(material(pki_files), client_ca=str(cafile), require_client_cert=require)

    session, _ = memory_handshake(outsider, server(both))
    with pytest.raises(ssl.SSLError):
        memory_handshake(outsider, server(pki_files["ca"]), session)  # not resumed: a full handshake, which fails

    alice = alice_context(ca)
    session, _ = memory_handshake(alice, server(pki_files["ca"]))
    assert memory_handshake(alice, server(copy), session)[1]  # the same CAs from another file: same key
    assert not memory_handshake(alice, server(pki_files["ca"], require=False), session)[1]


def test_apply_changes_nothing_when_the_pointer_does_not_check_out(
    server_cert: trustme.LeafCert, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    def server() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_cert.configure_cert(ctx)
        return ctx

    client = client_context(ca)
    reference = server()
    assert tickets.apply(reference)
    session, _ = memory_handshake(client, reference)

    class WrongOptions:
        """The real library, except that OpenSSL seems to hold other options than Python reports."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def get_options(self, pointer: int) -> int:
            return int(self.real.get_options(pointer)) ^ 1

    with monkeypatch.context() as patch:
        patch.setattr(tickets, "_LIB", WrongOptions(tickets._LIB))
        mismatched = server()
        assert tickets.apply(mismatched) is False
    with monkeypatch.context() as patch:
        # Another struct layout: the next field (the ALPN list, not set) is where we would look for SSL_CTX*.
        patch.setattr(ossl, "CTX_OFFSET", ossl.CTX_OFFSET + ctypes.sizeof(ctypes.c_void_p))
        shifted = server()
        assert tickets.apply(shifted) is False
    with monkeypatch.context() as patch:
        patch.setattr(tickets, "_LIB", None)
        unavailable = server()
        assert tickets.apply(unavailable) is False
        assert not tickets.available()
    for ctx in (mismatched, shifted, unavailable):
        assert not memory_handshake(client, ctx, session)[1]  # still OpenSSL's own random key
        assert memory_handshake(client, ctx)[0] is not None  # and a working context


def test_set_process_key_takes_only_a_whole_secret() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        tickets.set_process_key(b"short")
    key = os.urandom(tickets.SECRET_LENGTH)
    tickets.set_process_key(key)
    assert tickets.process_key() == key


# -- one process: reload ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tickets_survive_a_reload(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    ctx = alice_context(ca)
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
        port = port_of(tun)
        reused, session = await asyncio.to_thread(resume_chain, port, ctx)
        assert not reused
        before = tun.runtime.accept_ctx
        assert tun.server.reload()  # type: ignore[attr-defined]
        assert tun.runtime.accept_ctx is not before  # a new SSLContext, the same ticket key
        reused, session = await asyncio.to_thread(resume_chain, port, ctx, session)
        assert reused
        assert tun.stats.reloads == 1


@pytest.mark.asyncio
async def test_a_reload_that_drops_a_ca_refuses_its_clients_tickets(
    pki_files: dict[str, Path], ca: trustme.CA, other_ca: trustme.CA
) -> None:
    bundle = pki_files["ca"]
    original = bundle.read_bytes()
    bundle.write_bytes(original + other_ca.cert_pem.bytes())
    outsider = client_context(ca, other_ca.issue_cert("mallory.test", common_name="alice"))
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
        port = port_of(tun)
        _, session = await asyncio.to_thread(resume_chain, port, outsider)
        bundle.write_bytes(original)
        assert tun.server.reload()  # type: ignore[attr-defined]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(resume_chain, port, outsider, session)


@pytest.mark.asyncio
async def test_a_resumed_session_is_still_checked_against_a_new_crl(tmp_path: Path) -> None:
    """A revoked client's ticket gets it nowhere: the new CRL gives a new ticket key, so the client makes a full
    handshake, and tlsgate's own CRL check refuses it (that check runs on resumed connections too)."""
    alice = revocable_client(tmp_path)
    ctx = alice.ctx

    def offer(port: int, session: ssl.SSLSession) -> tuple[bool, bytes]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            reused = bool(tls.session_reused)
            try:
                tls.sendall(b"x")
                return reused, tls.recv(1)
            except (ConnectionError, ssl.SSLError):
                return reused, b""

    async with backend() as be, tunnel(target=be.address, **alice.options) as tun:
        port = port_of(tun)
        _, session = await asyncio.to_thread(resume_chain, port, ctx)
        alice.revoke()
        assert tun.server.reload()  # type: ignore[attr-defined]
        assert await asyncio.to_thread(offer, port, session) == (False, b"")
        assert tun.stats.refused.get("crl") == 1


# -- --workers 2 ----------------------------------------------------------------------------------------------------


@pytest.fixture
def workers_gate(pki_files: dict[str, Path], tmp_path: Path) -> Iterator[WorkersProcess]:
    """``tlsgate server --workers 2`` with client certificates required, in front of a threaded echo server."""
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    echo.daemon_threads = True
    thread = threading.Thread(target=echo.serve_forever, daemon=True)
    thread.start()
    gate = WorkersProcess(
        workers_server_args(pki_files, f"127.0.0.1:{echo.server_address[1]}"), tmp_path / "tlsgate.log"
    )
    try:
        yield gate
    finally:
        gate.stop()
        echo.shutdown()
        echo.server_close()
        thread.join(10)


def closed_by(log: str) -> Callable[[int], bool]:
    """Whether worker N logged a closed connection in ``log``."""
    lines = [line for line in log.splitlines() if " closed " in f" {line} "]
    return lambda index: any(f"worker={index}" in line for line in lines)


def chain_of_resumptions(
    gate: WorkersProcess, ctx: ssl.SSLContext, count: int, session: ssl.SSLSession
) -> ssl.SSLSession:
    """``count`` connections, each offering the previous one's session; every one must resume."""
    for i in range(count):
        reused, session = resume_chain(gate.port, ctx, session)
        assert reused, f"connection {i} was not resumed:\n{gate.log()}"
    return session


def test_every_worker_resumes_every_workers_tickets(workers_gate: WorkersProcess, pki_files: dict[str, Path]) -> None:
    gate = workers_gate
    gate.wait_ready(2)
    ctx = pki_client_context(pki_files)
    reused, session = resume_chain(gate.port, ctx)
    assert not reused
    chain_of_resumptions(gate, ctx, 24, session)
    # The kernel spread them (25 coin flips all one way: 2**-24), so consecutive connections crossed workers and
    # each resumed a ticket the other worker had issued.
    eventually("both workers' connection lines", lambda: all(map(closed_by(gate.log()), (0, 1))))


def test_tickets_survive_sighup_and_a_restarted_worker(
    workers_gate: WorkersProcess, pki_files: dict[str, Path]
) -> None:
    gate = workers_gate
    gate.wait_ready(2)
    ctx = pki_client_context(pki_files)
    _, session = resume_chain(gate.port, ctx)
    session = chain_of_resumptions(gate, ctx, 4, session)

    gate.proc.send_signal(signal.SIGHUP)
    eventually("both workers reloaded", lambda: gate.metric("tlsgate.reload.total") == 2)
    session = chain_of_resumptions(gate, ctx, 10, session)

    gate.kill_worker(0)
    mark = len(gate.log())
    chain_of_resumptions(gate, ctx, 20, session)
    # The new worker 0 took some of them (2**-20 that it took none), with the key it was handed at start.
    eventually("the restarted worker's connection lines", lambda: closed_by(gate.log()[mark:])(0))
