"""systemd without systemd: sd_notify, socket activation and the watchdog, spoken to a real `tlsgate` process.

The test plays systemd's part. It binds a unix datagram socket and passes it as NOTIFY_SOCKET (with SO_PASSCRED,
so every notification says which process sent it), and it binds listening sockets and starts tlsgate through a
tiny wrapper that moves them to descriptors 3, 4, ..., sets LISTEN_PID to its own pid and execs, as systemd does.
Every wait is for an event (a datagram, a log line, an exit); nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsgate import logs
from tlsgate.errors import ConfigError
from tlsgate.process.systemd import Activation, notify_address, one_line, watchdog_interval
from tlsgate.settings.addresses import Address, parse_address

from helpers import (
    TLSGATE_CLI,
    TlsgateProcess,
    activated_command,
    backend,
    client_context,
    listening_tcp,
    round_trip,
    run_tlsgate,
)

subprocess_test = pytest.mark.asyncio(loop_factories=["asyncio"])

_LISTENING = re.compile(r"\blisten=(?:\"?)([^ \"]+)")


def short_dir(tmp_path: Path) -> Path:
    """A directory whose socket paths fit sun_path (108 bytes): tmp_path when it is short enough."""
    if len(str(tmp_path)) < 80:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))


# -- playing systemd ---------------------------------------------------------------------------------------------


@dataclass
class Notification:
    fields: dict[str, str]
    pid: int
    at: float

    @property
    def kind(self) -> str:
        for key in ("READY", "RELOADING", "STOPPING", "WATCHDOG"):
            if key in self.fields:
                return key
        return "STATUS"


@dataclass
class NotifySocket:
    """NOTIFY_SOCKET: records every datagram with its sender's pid (SCM_CREDENTIALS) and arrival time."""

    sock: socket.socket
    address: str
    received: list[Notification] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _on_readable(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            lines = data.decode().split("\n")
            fields = dict(line.split("=", 1) for line in lines if line)
            self.received.append(Notification(fields, pid, time.monotonic()))
            self.changed.set()

    def kinds(self, *, watchdog: bool = False) -> list[str]:
        return [n.kind for n in self.received if watchdog or n.kind != "WATCHDOG"]

    def count(self, kind: str) -> int:
        return sum(n.kind == kind for n in self.received)

    async def wait_for(self, kind: str, count: int = 1) -> Notification:
        while self.count(kind) < count:
            self.changed.clear()
            await self.changed.wait()
        return [n for n in self.received if n.kind == kind][count - 1]


@contextlib.asynccontextmanager
async def notify_socket(where: Path | None) -> AsyncIterator[NotifySocket]:
    """At ``where`` (a path), or in the abstract namespace when None (NOTIFY_SOCKET=@name)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.setblocking(False)
    if where is None:
        name = f"tlsgate-test-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        sock.bind(str(where))
        address = str(where)
    recorder = NotifySocket(sock, address)
    loop = asyncio.get_running_loop()
    loop.add_reader(sock.fileno(), recorder._on_readable)
    try:
        yield recorder
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


@contextlib.asynccontextmanager
async def tlsgate(
    args: Sequence[str], *, env: dict[str, str] | None = None, activate: Sequence[socket.socket | int] | None = None
) -> AsyncIterator[TlsgateProcess]:
    """Run `tlsgate ARGS`, reading its stderr; with ``activate``, those sockets are passed as systemd would."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    environment.update(env or {})
    if activate is None:
        command = [sys.executable, "-c", TLSGATE_CLI]
        pass_fds: tuple[int, ...] = ()
    else:
        command, pass_fds = activated_command(activate)
        environment.setdefault("LISTEN_FDS", str(len(pass_fds)))
    async with run_tlsgate(args, command=command, env=environment, inherit_env=False, pass_fds=pass_fds) as running:
        yield running


def server_args(pki_files: dict[str, Path], listen: str, target: str, *extra: str) -> list[str]:
    return [
        "server", "--listen", listen, "--target", target, "--cert", str(pki_files["cert"]),
        "--key", str(pki_files["key"]), "--disable-authentication", "--shutdown-timeout", "5s", *extra,
    ]  # fmt: skip


def port_from(line: str) -> int:
    match = _LISTENING.search(line)
    assert match, line
    return int(match.group(1).rsplit(":", 1)[1])


# -- sd_notify through a real start, reload and stop -------------------------------------------------------------


@subprocess_test
async def test_ready_reloading_ready_stopping_in_order_through_start_sighup_sigterm(
    tmp_path: Path, pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    async with backend() as be, notify_socket(short_dir(tmp_path) / "notify") as notify:
        args = server_args(pki_files, "127.0.0.1:0", be.address, "--status", "127.0.0.1:0")
        async with tlsgate(args, env={"NOTIFY_SOCKET": notify.address}) as gate:
            ready = await notify.wait_for("READY")
            # READY=1 means it: by now the tunnel accepts and relays, and the status port is up.
            port = port_from(await gate.wait_for_line("listening"))
            await gate.wait_for_line("status listen=")
            await round_trip(port, client_context(ca))
            assert ready.pid == gate.proc.pid
            assert ready.fields["STATUS"] == f"listening | server proxying 127.0.0.1:{port} => {be.address}"

            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            gate.proc.send_signal(signal.SIGHUP)
            reloading = await notify.wait_for("RELOADING")
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            # systemd orders the reload by this stamp: CLOCK_MONOTONIC, microseconds, taken when the reload began.
            assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
            assert reloading.fields["STATUS"].startswith("reloading | server proxying")
            await notify.wait_for("READY", 2)

            gate.proc.send_signal(signal.SIGTERM)
            stopping = await notify.wait_for("STOPPING")
            assert stopping.fields["STATUS"].startswith("stopping | draining")
            assert await gate.exit_code() == 0
    assert notify.kinds() == ["READY", "RELOADING", "READY", "STOPPING"]
    assert {n.pid for n in notify.received} == {gate.proc.pid}


@subprocess_test
async def test_workers_parent_alone_notifies_on_an_abstract_socket_ready_once_all_workers_are(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    async with backend() as be, notify_socket(None) as notify:
        args = server_args(pki_files, "127.0.0.1:0", be.address, "--workers", "2")
        async with tlsgate(args, env={"NOTIFY_SOCKET": notify.address}) as gate:
            ready = await notify.wait_for("READY")
            assert ready.fields["STATUS"].startswith("listening | 2 workers | server proxying 127.0.0.1:")
            # The parent says READY=1 where it logs "workers ready" (both workers reported), and only there.
            port = port_from(await gate.wait_for_line("workers ready"))
            assert gate.log.count("worker ready") == 2 and notify.count("READY") == 1, gate.log
            await round_trip(port, client_context(ca))

            gate.proc.send_signal(signal.SIGHUP)
            await notify.wait_for("READY", 2)
            gate.proc.send_signal(signal.SIGTERM)
            await notify.wait_for("STOPPING")
            assert await gate.exit_code() == 0
    assert notify.kinds() == ["READY", "RELOADING", "READY", "STOPPING"]
    # The workers neither inherit NOTIFY_SOCKET nor speak for the service (NotifyAccess=main would drop them).
    assert {n.pid for n in notify.received} == {gate.proc.pid}


@subprocess_test
async def test_watchdog_pings_at_half_the_interval_from_the_main_process(
    tmp_path: Path, pki_files: dict[str, Path]
) -> None:
    interval = 0.1  # WATCHDOG_USEC=100000: a ping every 0.05 s
    async with backend() as be, notify_socket(short_dir(tmp_path) / "notify") as notify:
        env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(int(interval * 1e6))}
        async with tlsgate(server_args(pki_files, "127.0.0.1:0", be.address), env=env) as gate:
            env["WATCHDOG_PID"] = str(gate.proc.pid)
            await notify.wait_for("READY")
            first = await notify.wait_for("WATCHDOG", notify.count("WATCHDOG") + 1)
            last = await notify.wait_for("WATCHDOG", notify.count("WATCHDOG") + 10)
            gate.proc.send_signal(signal.SIGTERM)
            await notify.wait_for("STOPPING")
            assert await gate.exit_code() == 0
    pings = [n for n in notify.received if n.kind == "WATCHDOG"]
    assert {n.pid for n in pings} == {gate.proc.pid}
    assert all(n.fields == {"WATCHDOG": "1"} for n in pings)
    # Ten more pings took at least ten half-intervals (timers do not fire early): no spinning, no burst. The
    # upper side is what systemd enforces and needs no test here: the pings kept coming until we stopped.
    assert last.at - first.at >= 10 * interval / 2 * 0.9


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, 42) is None
    for usec in ("", "0", "-5", "1e6", "３０"):
        assert watchdog_interval({"WATCHDOG_USEC": usec}, 42) is None


def test_notify_socket_forms() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract/name") == b"\0abstract/name"
    assert notify_address("vsock:2:1234") is None
    assert notify_address("relative/path") is None
    assert notify_address("@") is None


@given(st.text())
def test_a_status_line_is_always_one_line(text: str) -> None:
    line = one_line(text)
    assert "\n" not in line and "\r" not in line


@subprocess_test
async def test_nothing_is_sent_and_all_works_without_notify_socket(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with backend() as be, tlsgate(server_args(pki_files, "127.0.0.1:0", be.address)) as gate:
        await round_trip(port_from(await gate.wait_for_line("listening")), client_context(ca))
        gate.proc.send_signal(signal.SIGTERM)
        assert await gate.exit_code() == 0
    assert "systemd" not in gate.log


# -- socket activation ---------------------------------------------------------------------------------------------


@subprocess_test
async def test_activated_tcp_listener_and_status_socket_serve_a_tls_round_trip(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    with listening_tcp() as tunnel_sock, listening_tcp() as status_sock:
        port, status_port = tunnel_sock.getsockname()[1], status_sock.getsockname()[1]
        async with backend() as be:
            args = server_args(pki_files, "systemd:tunnel", be.address, "--status", "http://systemd:status")
            env = {"LISTEN_FDNAMES": "tunnel:status"}
            async with tlsgate(args, env=env, activate=[tunnel_sock, status_sock]) as gate:
                line = await gate.wait_for_line("listening")
                assert f"listen=127.0.0.1:{port}" in line
                await round_trip(port, client_context(ca))
                reader, writer = await asyncio.open_connection("127.0.0.1", status_port)
                writer.write(b"GET /_status HTTP/1.0\r\n\r\n")
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
                writer.close()
                gate.proc.send_signal(signal.SIGTERM)
                assert await gate.exit_code() == 0, gate.log


@subprocess_test
async def test_activated_socket_is_shared_by_workers_which_see_no_listen_variables(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    with listening_tcp() as tunnel_sock:
        port = tunnel_sock.getsockname()[1]
        async with backend() as be:
            args = server_args(pki_files, "systemd:web", be.address, "--workers", "2")
            async with tlsgate(args, env={"LISTEN_FDNAMES": "web"}, activate=[tunnel_sock]) as gate:
                await gate.wait_for_line("workers ready")
                for _ in range(4):
                    await round_trip(port, client_context(ca))
                gate.proc.send_signal(signal.SIGTERM)
                assert await gate.exit_code() == 0, gate.log
    # A worker that had read LISTEN_PID/LISTEN_FDS would have refused the parent's pid or taken fd 3 itself.
    assert "error" not in gate.log, gate.log


@subprocess_test
async def test_activated_unix_socket_is_used_and_its_path_survives_the_stop(
    tmp_path: Path, pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    path = str(short_dir(tmp_path) / "tunnel.sock")
    with socket.socket(socket.AF_UNIX) as unix_sock:
        unix_sock.bind(path)
        unix_sock.listen()
        async with backend() as be:
            args = server_args(pki_files, "systemd:tunnel", be.address)
            async with tlsgate(args, env={"LISTEN_FDNAMES": "tunnel"}, activate=[unix_sock]) as gate:
                assert f"listen=unix:{path}" in await gate.wait_for_line("listening")
                await round_trip(path, client_context(ca))
                gate.proc.send_signal(signal.SIGTERM)
                assert await gate.exit_code() == 0, gate.log
        # The path, its owner and mode belong to the .socket unit (ghostunnel's regression test of the same name).
        assert os.path.exists(path)


@pytest.mark.parametrize(
    ("env", "make", "args_listen", "expected"),
    [
        (
            {"LISTEN_FDNAMES": "other"},
            "tcp",
            "systemd:web",
            "systemd passed no socket named 'web' (names passed: other)",
        ),
        ({"LISTEN_FDNAMES": "web", "LISTEN_PID": "1"}, "tcp", "systemd:web", "passed to process 1 (LISTEN_PID)"),
        ({"LISTEN_FDNAMES": "web"}, "bound", "systemd:web", "descriptor 3 is a socket that is not listening"),
        ({"LISTEN_FDNAMES": "web"}, "udp", "systemd:web", "descriptor 3 is a SOCK_DGRAM socket, not a stream socket"),
        ({"LISTEN_FDNAMES": "web"}, "file", "systemd:web", "descriptor 3 is not a socket"),
        (
            {"LISTEN_FDNAMES": "web:web"},
            "two",
            "systemd:web",
            "systemd passed 2 sockets named 'web'; expected exactly one",
        ),
        ({"LISTEN_FDNAMES": "web:x"}, "tcp", "systemd:web", "LISTEN_FDNAMES has 2 names for 1 sockets"),
        ({}, "none", "systemd:web", "systemd passed no sockets (LISTEN_FDS is not set)"),
    ],
)
@subprocess_test
async def test_activation_refusals_are_one_line_and_exit_2(
    tmp_path: Path, pki_files: dict[str, Path], env: dict[str, str], make: str, args_listen: str, expected: str
) -> None:
    with contextlib.ExitStack() as stack:
        sockets: list[socket.socket | int] | None
        if make == "none":
            sockets = None
        elif make == "file":
            handle = stack.enter_context(open(tmp_path / "not-a-socket", "wb"))
            sockets = [handle.fileno()]
        elif make == "two":
            sockets = [stack.enter_context(listening_tcp()), stack.enter_context(listening_tcp())]
        elif make == "tcp":
            sockets = [stack.enter_context(listening_tcp())]
        else:
            sock = stack.enter_context(socket.socket(type=socket.SOCK_DGRAM if make == "udp" else socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sockets = [sock]
        args = server_args(pki_files, args_listen, "127.0.0.1:9")
        async with tlsgate(args, env=env, activate=sockets) as gate:
            assert await gate.exit_code() == 2
    assert len(gate.lines) == 1, gate.log
    assert gate.lines[0].startswith(f"tlsgate: error: --listen {args_listen}: ") and expected in gate.lines[0]


@subprocess_test
async def test_status_on_an_unknown_systemd_name_is_refused(pki_files: dict[str, Path]) -> None:
    with listening_tcp() as sock:
        args = server_args(pki_files, "systemd:web", "127.0.0.1:9", "--status", "systemd:metrics")
        async with tlsgate(args, env={"LISTEN_FDNAMES": "web"}, activate=[sock]) as gate:
            assert await gate.exit_code() == 2
    # The tunnel was up (its "listening" line) when the status port failed; the error is the one line that says why.
    errors = [line for line in gate.lines if "error" in line]
    assert errors == gate.lines[-1:], gate.log
    assert errors[0].startswith("tlsgate: error: --status systemd:metrics: systemd passed no socket named 'metrics'")


def test_activation_parses_names_and_defaults_as_go_systemd() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "web:status:web2"}
    assert Activation.from_environment(env, 7).fds == {"web": [3], "status": [4], "web2": [5]}
    unnamed = Activation.from_environment({"LISTEN_PID": "7", "LISTEN_FDS": "2"}, 7)
    assert unnamed.fds == {"LISTEN_FD_3": [3], "LISTEN_FD_4": [4]}
    assert not Activation.from_environment({}, 7).passed
    assert Activation.from_environment({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, 7).problem


@given(pid=st.integers(1, 2**22), other=st.integers(1, 2**22), count=st.integers(0, 64))
def test_sockets_passed_to_another_pid_are_never_ours(pid: int, other: int, count: int) -> None:
    env = {"LISTEN_PID": str(other), "LISTEN_FDS": str(count)}
    activation = Activation.from_environment(env, pid)
    assert (activation.fds == {} and bool(activation.problem)) if pid != other else not activation.problem


@given(st.text(min_size=1, max_size=300))
def test_systemd_names_are_accepted_exactly_when_systemd_accepts_them(name: str) -> None:
    # Surrounding white space goes, as for every address; what is left must be a valid FileDescriptorName=.
    kept = f"systemd:{name}".strip().removeprefix("systemd:")
    valid = 0 < len(kept) <= 255 and ":" not in kept and all(" " <= c <= "~" for c in kept)
    try:
        address = parse_address(f"systemd:{name}", name="--listen", activated=True)
    except ConfigError as err:
        assert not valid, (name, err)
        assert "\n" not in str(err)
    else:
        assert valid and address == Address(systemd=kept) and str(address) == f"systemd:{kept}"


def test_systemd_is_for_listening_only_and_launchd_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot be a target"):
        parse_address("systemd:web", name="--target")
    with pytest.raises(ConfigError, match="launchd socket activation is not supported"):
        parse_address("launchd:Listeners", name="--listen", activated=True)
    with pytest.raises(ConfigError, match="empty socket name"):
        parse_address("systemd:", name="--listen", activated=True)


@subprocess_test
async def test_cli_refuses_a_systemd_target_and_a_launchd_listen_in_one_line(pki_files: dict[str, Path]) -> None:
    for listen, target, expected in (
        ("127.0.0.1:0", "systemd:web", "--target: 'systemd:web': systemd:NAME is a socket to listen on"),
        ("launchd:Listeners", "127.0.0.1:9", "--listen: 'launchd:Listeners': launchd socket activation"),
    ):
        async with tlsgate(server_args(pki_files, listen, target)) as gate:
            assert await gate.exit_code() == 2
        assert len(gate.lines) == 1 and expected in gate.lines[0], gate.log


# -- syslog ------------------------------------------------------------------------------------------------------

_SYSLOG_LINE = re.compile(r"^<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d tlsgate\[(\d+)\]: (.*)$")


@contextlib.contextmanager
def syslog_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(short_dir(tmp_path) / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path


async def receive(sock: socket.socket) -> str:
    return (await asyncio.get_running_loop().sock_recv(sock, 65536)).decode()


@subprocess_test
async def test_syslog_gets_one_message_per_event_and_stderr_none(
    tmp_path: Path, pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    with syslog_socket(tmp_path) as (sock, path):
        async with backend() as be:
            args = [*server_args(pki_files, "127.0.0.1:0", be.address), "--syslog"]
            async with tlsgate(args, env={"TLSGATE_SYSLOG_SOCKET": path}) as gate:
                messages: list[str] = []
                while not any(" listening " in m for m in messages):
                    messages.append(await receive(sock))
                listening = next(m for m in messages if " listening " in m)
                await round_trip(port_from(listening), client_context(ca))
                gate.proc.send_signal(signal.SIGTERM)
                while not any(" stopped " in m or m.endswith(" stopped") for m in messages):
                    messages.append(await receive(sock))
                assert await gate.exit_code() == 0
    assert gate.lines == []  # everything went to syslog
    for message in messages:
        match = _SYSLOG_LINE.match(message)
        assert match, message
        priority, pid, text = int(match.group(1)), int(match.group(2)), match.group(3)
        assert pid == gate.proc.pid and "\n" not in message
        level = text.split()[0]
        # facility daemon (3), severity from the line's level
        assert priority == 3 * 8 + {"info": 6, "warning": 4, "error": 3}[level], message
    assert any(" closed " in m and "bytes_in=4" in m for m in messages)


def test_syslog_without_a_socket_is_a_one_line_error(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    import subprocess

    env = {**os.environ, "TLSGATE_SYSLOG_SOCKET": str(tmp_path / "no-such-socket")}
    result = subprocess.run(
        [sys.executable, "-c", TLSGATE_CLI, *server_args(pki_files, "127.0.0.1:0", "127.0.0.1:9"), "--syslog"],
        env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"tlsgate: error: --syslog: no syslog socket accepts us ({tmp_path / 'no-such-socket'}: "
        "No such file or directory); is a syslog daemon running?"
    ]


@settings(max_examples=25)  # each example sets logging up anew: a writer thread and a socket apiece
@given(value=st.text(max_size=50))
def test_every_event_is_one_syslog_message_whatever_its_fields_hold(value: str) -> None:
    with tempfile.TemporaryDirectory(prefix="sd-", dir="/tmp") as where:
        path = os.path.join(where, "log")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            os.environ["TLSGATE_SYSLOG_SOCKET"] = path
            try:
                logs.setup_logging(syslog=True)
                logs.event("refused", logging.WARNING, reason=value)
                logs.flush_logs(wait=5.0)
            finally:
                del os.environ["TLSGATE_SYSLOG_SOCKET"]
                logs.setup_logging()
            message = sock.recv(65536).decode()
    match = _SYSLOG_LINE.match(message)
    assert match and match.group(1) == str(3 * 8 + 4), message
    assert "\n" not in message and match.group(3).startswith("warning refused")


def test_reading_the_variables_removes_them_and_keeps_the_sockets_from_children() -> None:
    import subprocess

    probe = (
        "import os, socket; from tlsgate.process import systemd\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); os.dup2(s.fileno(), 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='web',\n"
        "                  NOTIFY_SOCKET='@x', WATCHDOG_USEC='1000000', WATCHDOG_PID=str(os.getpid()))\n"
        "systemd.consume_environment()\n"
        "left = sorted(k for k in os.environ if k.startswith(('LISTEN_', 'NOTIFY_', 'WATCHDOG_')))\n"
        "print(left, os.get_inheritable(3), systemd.notifier().watchdog)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL
    )
    assert result.stdout.split("\n")[0] == "[] False 0.5"


def test_config_file_takes_systemd_listen_addresses_and_a_boolean_syslog(
    tmp_path: Path, pki_files: dict[str, Path]
) -> None:
    from click.testing import CliRunner

    from tlsgate.cli import cli

    def check(process: str, listens: Sequence[str]) -> tuple[int, str]:
        tunnels = "".join(
            f'[[tunnel]]\nname = "t{i}"\nmode = "server"\nlisten = "{listen}"\ntarget = "127.0.0.1:9"\n'
            f'cert = "{pki_files["cert"]}"\nkey = "{pki_files["key"]}"\ndisable-authentication = true\n'
            for i, listen in enumerate(listens)
        )
        path = tmp_path / "tlsgate.toml"
        path.write_text(f"[process]\n{process}\n{tunnels}")
        result = CliRunner().invoke(cli, ["check-config", str(path)])
        return result.exit_code, result.output

    assert check("syslog = true", ["systemd:https", "systemd:admin"])[0] == 0
    code, output = check('syslog = "yes"', ["systemd:https"])
    assert code == 2 and "syslog: expected true or false" in output, output
    code, output = check("", ["systemd:https", "systemd:https"])
    assert code == 2 and "systemd:https is already the listen address of" in output, output
