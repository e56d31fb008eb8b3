"""--workers N: real processes on loopback. Readiness is polled through the status port, never slept on."""

from __future__ import annotations

import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

import tlsgate.process.workers
from tlsgate.cli import cli
from tlsgate.process.workers import restart_delay

from helpers import (
    DEADLINE,
    WorkersProcess,
    eventually,
    pki_client_context,
    reserved_port,
    threaded_echo_server,
    workers_server_args,
)


@pytest.fixture
def echo_backend() -> Iterator[str]:
    with threaded_echo_server() as address:
        yield address


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., WorkersProcess]]:
    running: list[WorkersProcess] = []

    def launch(*args: str) -> WorkersProcess:
        gate = WorkersProcess(list(args), tmp_path / f"tlsgate-{len(running)}.log")
        running.append(gate)
        return gate

    try:
        yield launch
    finally:
        for gate in running:
            gate.stop()


def echo_through(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bytes:
    """One connection through the tunnel; returns the DER certificate the server presented."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = tls.recv(65536)
            assert chunk, "connection closed early"
            got += chunk
        assert got == payload
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_workers_share_the_port_and_status_adds_their_counters_up(
    start: Callable[..., WorkersProcess], pki_files: dict[str, Path], echo_backend: str
) -> None:
    gate = start(*workers_server_args(pki_files, echo_backend))
    doc = gate.wait_ready(2)
    assert doc["ok"] is True and doc["message"] == "listening"
    assert len({w["pid"] for w in doc["workers"]}) == 2
    ctx = pki_client_context(pki_files)
    for _ in range(30):
        echo_through(gate.port, ctx)
    eventually("30 closed connections", lambda: gate.metric("tlsgate.conn.closed") == 30)
    assert gate.metric("tlsgate.accept.total") == 30
    assert gate.metric("tlsgate.conn.bytes_in") == 30 * 4

    # The kernel spread the connections: both workers logged some (30 coin flips all landing one way: 2**-29).
    # Log lines are written in batches (at most 200 ms late), so wait for them rather than read once.
    def both_logged() -> bool:
        closed = gate.log().split("closed", 1)[-1]
        return "worker=0" in closed and "worker=1" in closed

    eventually("both workers' connection lines", both_logged)


def test_sighup_reloads_every_worker(
    start: Callable[..., WorkersProcess], pki_files: dict[str, Path], echo_backend: str, ca: trustme.CA
) -> None:
    gate = start(*workers_server_args(pki_files, echo_backend))
    gate.wait_ready(2)
    ctx = pki_client_context(pki_files)
    old = echo_through(gate.port, ctx)
    renewed = ca.issue_cert("localhost", "127.0.0.1")
    renewed.cert_chain_pems[0].write_to_path(str(pki_files["cert"]))
    renewed.private_key_pem.write_to_path(str(pki_files["key"]))
    new = ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())
    assert new != old

    gate.proc.send_signal(signal.SIGHUP)
    eventually("both workers reloaded", lambda: gate.metric("tlsgate.reload.total") == 2)
    seen = {echo_through(gate.port, ctx) for _ in range(20)}
    assert seen == {new}


def test_sigterm_drains_open_connections_then_exits_0(
    start: Callable[..., WorkersProcess], pki_files: dict[str, Path], echo_backend: str
) -> None:
    gate = start(*workers_server_args(pki_files, echo_backend))
    gate.wait_ready(2)
    port = gate.port
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pki_client_context(pki_files).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"before")
        assert tls.recv(100) == b"before"
        gate.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                return True
            return False

        eventually("the port to close", refused)
        assert gate.proc.poll() is None  # still draining the open connection
        tls.sendall(b"during drain")
        assert tls.recv(100) == b"during drain"
    assert gate.proc.wait(DEADLINE) == 0, gate.log()
    assert "stopped workers=2 exit=0" in gate.log()


def test_a_killed_worker_is_restarted_and_counters_do_not_go_back(
    start: Callable[..., WorkersProcess], pki_files: dict[str, Path], echo_backend: str
) -> None:
    gate = start(*workers_server_args(pki_files, echo_backend))
    gate.wait_ready(2)
    ctx = pki_client_context(pki_files)
    for _ in range(10):
        echo_through(gate.port, ctx)
    eventually("10 closed connections", lambda: gate.metric("tlsgate.conn.closed") == 10)

    gate.kill_worker(0)
    assert gate.status()["workers"][0]["restarts"] == 1
    assert gate.metric("tlsgate.process.worker_restarts") == 1
    assert gate.metric("tlsgate.conn.closed") == 10
    echo_through(gate.port, ctx)
    assert "worker died; restarting" in gate.log()


def test_workers_share_a_unix_listener(
    start: Callable[..., WorkersProcess], pki_files: dict[str, Path], echo_backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "tlsgate.sock"
    args = workers_server_args(pki_files, echo_backend)
    args[args.index("127.0.0.1:0")] = f"unix:{path}"
    gate = start(*args)
    gate.wait_ready(2)
    ctx = pki_client_context(pki_files)
    for _ in range(4):
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(str(path))
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"unix")
                assert tls.recv(100) == b"unix"
    gate.stop()
    assert gate.proc.returncode == 0, gate.log()
    assert not path.exists()


def test_workers_stop_when_the_parent_is_killed(
    start: Callable[..., WorkersProcess], pki_files: dict[str, Path], echo_backend: str
) -> None:
    gate = start(*workers_server_args(pki_files, echo_backend))
    pids = [w["pid"] for w in gate.wait_ready(2)["workers"]]
    gate.proc.kill()
    gate.proc.wait()

    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, waiting to be reaped
        except FileNotFoundError:
            return True

    eventually("orphaned workers to exit", lambda: all(gone(pid) for pid in pids))


def test_listen_port_in_use_with_workers_exits_2_before_any_worker_starts(pki_files: dict[str, Path]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = workers_server_args(pki_files, "127.0.0.1:1")
        args[args.index("127.0.0.1:0")] = f"127.0.0.1:{port}"
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("tlsgate: error:")]
    assert errors == [
        f"tlsgate: error: --listen 127.0.0.1:{port}: cannot listen (127.0.0.1:{port}: Address already in use)"
    ]


def test_a_worker_that_cannot_start_stops_the_start_with_its_exit_code(
    pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every attempt would fail alike (say, a file only the workers cannot read): restarting would just spin.
    monkeypatch.setattr(tlsgate.process.workers, "_WORKER_CODE", "raise SystemExit(3)")
    with reserved_port() as port:
        args = workers_server_args(pki_files, "127.0.0.1:1")
        args[args.index("127.0.0.1:0")] = f"127.0.0.1:{port}"
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3, result.output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # the port the parent reserved is free again


def test_restart_back_off_doubles_and_is_capped() -> None:
    assert [restart_delay(n) for n in range(1, 5)] == [0.1, 0.2, 0.4, 0.8]
    assert restart_delay(100) == 30.0
