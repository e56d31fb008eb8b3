"""Backends and a server runner for end-to-end tests: real sockets on loopback, port 0, no fixed sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import resource
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
import trustme
from click.testing import CliRunner, Result

from tlsgate.engine.tunnel import Tunnel
from tlsgate.pki import CertificateAuthority
from tlsgate.policy.identity import IdentityRules
from tlsgate.policy.networks import AddressRules
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import tunnel_config
from tlsgate.settings.convert import convert

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Backend:
    """A plaintext TCP server that records every connection and the bytes it received."""

    server: asyncio.Server
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


@contextlib.asynccontextmanager
async def backend(
    handler: Handler | None = None, host: str = "127.0.0.1", *, ssl_ctx: ssl.SSLContext | None = None
) -> AsyncIterator[Backend]:
    """``handler`` defaults to echo. The Backend counts connections and keeps what each one received."""
    state: dict[str, Backend] = {}

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        be = state["be"]
        be.connections += 1
        try:
            await (handler or echo)(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            be.done.set()

    srv = await asyncio.start_server(wrapped, host, 0, ssl=ssl_ctx)
    be = Backend(srv)
    state["be"] = be
    try:
        yield be
    finally:
        srv.close()
        await srv.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def recording(store: list[bytes]) -> Handler:
    """Reads until EOF and keeps what came; answers nothing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        store.append(await reader.read())

    return handle


async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers only once the client has finished sending: needs half-close to survive the tunnel."""
    data = await reader.read()
    writer.write(b"got " + str(len(data)).encode() + b" bytes, sha256 " + hashlib.sha256(data).hexdigest().encode())
    await writer.drain()


@contextlib.asynccontextmanager
async def running_server(server: Server) -> AsyncIterator[Server]:
    """Run ``server`` in this event loop: yields once it is ready (its tunnels listen, its status port is up), raises
    its start-up error if it has one, and on the way out stops it and waits until it has drained."""
    async with server:
        yield server


@contextlib.asynccontextmanager
async def tunnel(mode: str = "server", **options: Any) -> AsyncIterator[Tunnel]:
    """Run one tlsgate tunnel in this event loop; yields it once it listens (port from tunnel.addresses)."""
    options.setdefault("listen", "127.0.0.1:0")
    async with running_server(Server([tunnel_config(mode, options)], ProcessOptions())) as server:
        tun = next(iter(server.tunnels.values()))
        tun.server = server  # type: ignore[attr-defined]
        yield tun


def server_opts(pki_files: dict[str, Path], target: str, **extra: object) -> dict[str, object]:
    """Options for a server tunnel with the test PKI's certificate, verifying clients against the test CA."""
    opts: dict[str, object] = {
        "target": target,
        "cert": [str(pki_files["cert"])],
        "key": [str(pki_files["key"])],
        "cacert": str(pki_files["ca"]),
    }
    opts.update(extra)
    return opts


def port_of(tun: Tunnel) -> int:
    return int(tun.addresses[0].rsplit(":", 1)[1])


async def tls_connect(
    tun: Tunnel, ctx: ssl.SSLContext, *, local_addr: tuple[str, int] | None = None, server_hostname: str = "localhost"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port_of(tun), ssl=ctx, server_hostname=server_hostname, local_addr=local_addr
    )


async def wait_until(predicate: Callable[[], bool], attempts: int = 1000) -> None:
    """Poll a condition, yielding to the loop between tries (bounded, no fixed sleeps)."""
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def assert_cut(reader: asyncio.StreamReader, timeout: float = 10) -> None:
    """The server ended the connection without sending anything: a clean EOF or a reset are both fine."""
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except (ConnectionError, ssl.SSLError):
        return
    assert data == b"", data


@contextlib.contextmanager
def fd_limit_at_least(wanted: int) -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE (the in-process server shares it) for the duration."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} descriptors this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class RevocableClient:
    """A CA, a server certificate, client "alice" and a CRL file: a tunnel that checks revocation, and a way to
    revoke alice in the middle of a test."""

    ca: CertificateAuthority
    serial: int
    crl: Path
    ctx: ssl.SSLContext  # alice's client context
    options: dict[str, Any]  # tunnel(...) options: certificate, client CA, allow-cn alice, the CRL

    def revoke(self) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        self.ca.revoke(self.serial)
        self.crl.write_bytes(self.ca.build_crl().public_bytes(Encoding.PEM))


def revocable_client(tmp_path: Path) -> RevocableClient:
    from cryptography.hazmat.primitives.serialization import Encoding

    ca = CertificateAuthority.create(tmp_path / "ca")
    server = ca.issue("localhost").write(tmp_path, "server")
    alice = ca.issue("alice", client=True, server=False)
    alice_files = alice.write(tmp_path, "alice")
    crl = tmp_path / "crl.pem"
    crl.write_bytes(ca.build_crl().public_bytes(Encoding.PEM))
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.load_cert_chain(alice_files["cert"], alice_files["key"])
    options: dict[str, Any] = {
        "cert": [str(server["cert"])],
        "key": [str(server["key"])],
        "cacert": str(ca.cert_path),
        "allow_cn": ["alice"],
        "crl": [str(crl)],
    }
    return RevocableClient(ca, alice.serial, crl, ctx, options)


# -- the real command in a subprocess --------------------------------------------------------------------------

# Runs the CLI as `tlsgate` (its name in usage and error lines) without needing the console script on PATH.
TLSGATE_CLI = "import sys; sys.argv[0] = 'tlsgate'; from tlsgate.cli import main; main()"
# The "listening" event's listen field, as text (listen=127.0.0.1:PORT) or JSON ("listen": "127.0.0.1:PORT").
LISTENING = re.compile(r'\blisten"?[=:] ?"?127\.0\.0\.1:(\d+)')
# The status server's start-up line: its listen field is a URL (listen=http://127.0.0.1:PORT).
STATUS_LISTENING = re.compile(r'\bstatus\b.*\blisten"?[=:] ?"?https?://127\.0\.0\.1:(\d+)')


@dataclass
class TlsgateProcess:
    """A running `tlsgate ...`: its process and (when its stderr is read) every log line so far.

    Every wait is for an event: a new line on stderr wakes the waiters, the end of stderr fails them with the log
    so far, so a test never sleeps for a fixed time nor hangs on a process that already died."""

    proc: asyncio.subprocess.Process
    port: int = 0  # from the first "listening" line, when run_tlsgate(..., listening=True)
    lines: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ended: bool = False
    _reader: asyncio.Future[None] | None = None

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.lines)

    async def wait_for(self, condition: Callable[[], bool], what: str, within: float | None = 30) -> None:
        """Wait until ``condition()`` holds, checked after each new log line."""
        async with asyncio.timeout(within):
            while not condition():
                if self._ended:
                    raise AssertionError(f"tlsgate's stderr ended before {what}:\n{self.log}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_line(self, needle: str, count: int = 1, within: float | None = 30) -> str:
        """Wait for the ``count``-th line that contains ``needle``, and return it."""
        await self.wait_for(lambda: self.count(needle) >= count, repr(needle), within)
        return [line for line in self.lines if needle in line][count - 1]

    async def port_from(self, pattern: re.Pattern[str] = LISTENING, within: float | None = 30) -> int:
        """Wait for a line that ``pattern`` matches and return its first group as a port."""
        await self.wait_for(lambda: pattern.search(self.log) is not None, repr(pattern.pattern), within)
        match = pattern.search(self.log)
        assert match is not None
        return int(match.group(1))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, within: float | None = 30) -> int:
        """Wait for the process to exit; by then every line it logged has been read."""
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._ended = True
        self._changed.set()


@contextlib.asynccontextmanager
async def run_tlsgate(
    args: Sequence[str],
    *,
    command: Sequence[str] = (sys.executable, "-c", TLSGATE_CLI),
    env: dict[str, str] | None = None,
    inherit_env: bool = True,
    pass_fds: Sequence[int] = (),
    stderr: Any = None,
    listening: bool = False,
) -> AsyncIterator[TlsgateProcess]:
    """Start ``command ARGS`` (by default the tlsgate CLI) and kill it on the way out if it still runs.

    By default its stderr is read line by line; with ``stderr`` given (a file or descriptor) nothing is read.
    With ``listening``, this waits for the "listening" line and sets ``.port`` from it: pass
    ``--listen 127.0.0.1:0`` and the port is the one the kernel chose, with no window for another to take it.
    ``env`` is added to this process's environment (or is the whole environment when ``inherit_env`` is false)."""
    environment = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
    proc = await asyncio.create_subprocess_exec(
        *command, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE if stderr is None else stderr, env=environment, pass_fds=tuple(pass_fds),
    )  # fmt: skip
    running = TlsgateProcess(proc)
    try:
        if stderr is None:
            assert proc.stderr is not None
            running._reader = asyncio.ensure_future(running._read(proc.stderr))
            if listening:
                running.port = await running.port_from(LISTENING)
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if running._reader is not None:
            await running._reader


# -- shared by several modules: a test module imports only from here, never from another test module -----------


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port number for a server that must bind a known port itself (a config file rewritten with the same
    address, two tunnels swapping ports), held for as long as the block runs.

    The socket is bound with SO_REUSEADDR and SO_REUSEPORT but never listens: the kernel's port-0 choice skips a
    bound port, so no other test or program is handed it meanwhile, while a server that sets SO_REUSEADDR (as
    tlsgate, and nearly every server, does) may still bind and listen on it. Binding and releasing a port (the
    old ``free_port()``) left a window in which anyone could take it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


# Runs the CLI after lowering RLIMIT_NOFILE (argv[1], 0 = leave it), so the limit is in place before anything opens.
TLSGATE_WITH_NOFILE = """
import resource, sys
limit = int(sys.argv.pop(1))
if limit:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from tlsgate.cli import main
sys.argv[0] = "tlsgate"
main()
"""


@contextlib.asynccontextmanager
async def tlsgate_server(
    args: Sequence[str],
    *,
    nofile: int = 0,
    stderr: Any = None,
    env: dict[str, str] | None = None,
    listener: socket.socket | None = None,
) -> AsyncIterator[TlsgateProcess]:
    """Start `tlsgate server ARGS` under RLIMIT_NOFILE ``nofile``. By default its stderr is read line by line and
    the port comes from the "listening" line (use ``--listen 127.0.0.1:0``). With ``stderr`` given (a file or
    descriptor) nothing is read, so no line tells the port: hand over a ``listener`` bound to port 0 (see
    listening_tcp()), passed as systemd would (use ``--listen systemd:tunnel``), and wait for it to serve with
    wait_for_listener()."""
    if listener is None:
        launch: Sequence[str] = (sys.executable, "-c", TLSGATE_WITH_NOFILE, str(nofile), "server")
        pass_fds: tuple[int, ...] = ()
    else:
        assert not nofile, "the activation wrapper does not lower RLIMIT_NOFILE"
        prefix, pass_fds = activated_command([listener])
        launch = (*prefix, "server")
        env = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "tunnel", **(env or {})}
    async with run_tlsgate(
        args, command=launch, env=env, pass_fds=pass_fds, stderr=stderr, listening=stderr is None
    ) as server:
        yield server


def listen_args(pki_files: dict[str, Path], target: str, *extra: str, listen: str = "127.0.0.1:0") -> list[str]:
    return [
        "--listen", listen, "--target", target,
        "--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--disable-authentication",
        *extra,
    ]  # fmt: skip


async def wait_for_listener(port: int, within: float = 30) -> None:
    """Poll until the server accepts TCP connections (a bare connect, closed at once)."""
    async with asyncio.timeout(within):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            return


async def round_trip(
    to: int | str | Tunnel, ctx: ssl.SSLContext, payload: bytes = b"ping", *, within: float = 30
) -> None:
    """One TLS connection that echoes ``payload`` back, then closes: a port on 127.0.0.1, a unix socket path, or an
    in-process tunnel."""
    async with asyncio.timeout(within):
        if isinstance(to, str):
            reader, writer = await asyncio.open_unix_connection(to, ssl=ctx, server_hostname="localhost")
        else:
            port = to if isinstance(to, int) else port_of(to)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        await echoed(reader, writer, payload)


async def echoed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes = b"ping") -> None:
    """On an open connection to an echo backend: ``payload`` comes back whole; then the connection is closed
    (an unclean close is the server's business, not what this checks)."""
    writer.write(payload)
    assert await reader.readexactly(len(payload)) == payload
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


def garbage(port: int, count: int) -> None:
    """``count`` connections that send HTTP instead of a ClientHello and go: each makes the server log a line.
    Nothing waits for the server's answer, so this finishes even when the server is stuck."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


DEADLINE = 30.0


def eventually(what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """Poll ``check`` until it returns something truthy; bounded, with a short pause between tries."""
    end = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class WorkersProcess:
    """``python -m tlsgate server --workers N ...`` with its log in a file and its status port on loopback."""

    def __init__(self, args: list[str], log: Path) -> None:
        self._status_port = 0
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tlsgate", *args, "--status", "http://127.0.0.1:0"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def status_port(self) -> int:
        """The port the kernel chose for --status (port 0), from its log line; 0 until that line is written."""
        if not self._status_port and (match := STATUS_LISTENING.search(self.log())):
            self._status_port = int(match.group(1))
        return self._status_port

    def get(self, path: str) -> tuple[int, Any] | None:
        """One status request; None while the port is not up (or no longer up)."""
        if not self.status_port:
            return None
        conn = http.client.HTTPConnection("127.0.0.1", self.status_port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        except (ConnectionError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        answer = self.get("/_status")
        assert answer is not None, self.log()
        return dict(answer[1])

    def metric(self, name: str) -> float:
        answer = self.get("/_metrics")
        assert answer is not None, self.log()
        return float(sum(e["value"] for e in answer[1] if e["metric"] == name))

    def wait_ready(self, workers: int) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc.poll() is None, f"tlsgate exited with {self.proc.returncode}:\n{self.log()}"
            answer = self.get("/_status")
            if answer is None:
                return None
            doc = answer[1]
            up = [w for w in doc.get("workers", []) if w["ready"]]
            return dict(doc) if len(up) == workers else None

        return dict(eventually("all workers ready", ready))

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker ``index`` and wait until the parent has a new one ready in its place."""
        victim = self.status()["workers"][index]["pid"]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            worker = self.status()["workers"][index]
            return bool(worker["ready"] and worker["pid"] not in (None, victim))

        eventually(f"worker {index} to come back", replaced)

    @property
    def port(self) -> int:
        return int(self.status()["listen_address"].rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def workers_server_args(pki_files: dict[str, Path], target: str, *extra: str, workers: int = 2) -> list[str]:
    return [
        "server",
        "--listen", "127.0.0.1:0",
        "--target", target,
        "--cert", str(pki_files["cert"]),
        "--key", str(pki_files["key"]),
        "--cacert", str(pki_files["ca"]),
        "--allow-cn", "alice",
        "--workers", str(workers),
        *extra,
    ]  # fmt: skip


def pki_client_context(pki_files: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki_files["ca"]))
    ctx.load_cert_chain(str(pki_files["client_cert"]), str(pki_files["client_key"]))
    return ctx


def memory_handshake(
    client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession, bool]:
    """A full TLS exchange over memory BIOs; the client reads application data, which brings it the ticket."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    while not all(done.values()):
        moved = False
        for name, side in (("client", c), ("server", s)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        for src, dst in ((c_out, s_in), (s_out, c_in)):
            if src.pending:
                dst.write(src.read())
                moved = True
        assert moved or all(done.values()), "memory_handshake stalled"
    s.write(b"hello")
    c_in.write(s_out.read())
    assert c.read(5) == b"hello"
    session = c.session
    assert session is not None and session.has_ticket
    return session, c.session_reused


def resume_chain(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> tuple[bool, ssl.SSLSession]:
    """One echo connection offering ``session``; whether it was resumed, and the session to offer next."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(b"x")
        assert tls.recv(1) == b"x"  # the ticket arrives after the memory_handshake; reading collects it
        assert tls.session is not None
        return bool(tls.session_reused), tls.session


async def exchange(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping", within: float = 30) -> bytes:
    """Send ``payload`` over one TLS connection to 127.0.0.1:``port`` and return as many bytes as came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), within)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def write_crl(
    path: Path,
    ca: trustme.CA,
    serials: Sequence[int] = (),
    *,
    issued: datetime | None = None,
    next_update: datetime | None = None,
) -> Path:
    """Write a PEM CRL signed by ``ca`` that revokes ``serials`` (trustme has no CRLs; the CA's key signs one with
    cryptography). ``issued`` and ``next_update`` default to an hour ago and a week ahead: a CRL in force."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject)
        .last_update(now - timedelta(hours=1) if issued is None else issued)
        .next_update(now + timedelta(days=7) if next_update is None else next_update)
    )
    for serial in serials:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(minutes=5))
        entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]  # trustme's CA key is one that can sign
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def invoke(command: click.Command, *args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Run a click command in process, as its tests do: ``run = functools.partial(invoke, certs)``."""
    return CliRunner().invoke(command, [str(arg) for arg in args], env=env)


def refused(result: Result, message: str) -> str:
    """The command failed the way tlsgate promises: exit 2, one `tlsgate: error:` line that says what is wrong
    (``message`` is part of it), no traceback. Returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tlsgate: error: ")
    assert message in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on ``host`` where nothing listens, for as long as the block runs.

    The socket stays bound but never listens, so a connection to the port is refused and no other process can
    take it meanwhile; binding and releasing a port (the old ``free_port()``) left a window in which another test
    or program could start listening there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


# Moves the descriptors named in argv[1] (comma-separated) to 3, 4, ..., sets LISTEN_PID to this very process
# (exec keeps the pid) unless LISTEN_PID is already given, then execs the tlsgate CLI with the rest of argv.
ACTIVATE = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.setdefault("LISTEN_PID", str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-c", "from tlsgate.cli import main; main()", *sys.argv[2:]])
"""


def listening_tcp() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def activated_command(sockets: Sequence[socket.socket | int]) -> tuple[list[str], tuple[int, ...]]:
    """The command prefix (run ``tlsgate`` after it) and the ``pass_fds`` that hand ``sockets`` to tlsgate as
    systemd does: moved to descriptors 3, 4, ... with LISTEN_PID set to tlsgate's pid. The caller sets
    LISTEN_FDS (and LISTEN_FDNAMES) in the environment."""
    fds = tuple(s if isinstance(s, int) else s.fileno() for s in sockets)
    return [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds))], fds


# --- the status port ---------------------------------------------------------------------------------------------


def status_address(server: Server) -> str:
    return str(server.status_server.addresses[0])


async def request(
    address: str,
    path: str,
    *,
    method: str = "GET",
    ssl_ctx: ssl.SSLContext | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request; the server closes the connection after its answer, so read to EOF."""
    if address.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(address[5:])
    else:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=ssl_ctx, server_hostname="localhost" if ssl_ctx else None
        )
    writer.write(raw if raw is not None else f"{method} {path} HTTP/1.1\r\nHost: status\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split(" ")[1])
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return code, headers, body


# --- small shared clients and backends ----------------------------------------------------------------------------


async def try_client(tun: object, ctx: ssl.SSLContext) -> bool:
    """Whether a TLS client with ``ctx`` gets through ``tun`` to an echo backend (one byte there and back)."""
    try:
        reader, writer = await tls_connect(tun, ctx)  # type: ignore[arg-type]
        writer.write(b"?")
        ok = await asyncio.wait_for(reader.read(1), 10) == b"?"
    except (ssl.SSLError, ConnectionError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except (ssl.SSLError, ConnectionError):
        pass
    return ok


async def read_until_end(reader: asyncio.StreamReader, within: float = 20) -> bytes:
    """Read until the connection ends (EOF or an error) within ``within`` seconds; returns what came."""
    chunks = []
    try:
        async with asyncio.timeout(within):
            while data := await reader.read(65536):
                chunks.append(data)
    except (ConnectionError, ssl.SSLError):
        pass
    return b"".join(chunks)


@contextlib.contextmanager
def threaded_echo_server() -> Iterator[str]:
    """An echo server on its own threads (for tests whose tlsgate runs in a subprocess); yields HOST:PORT."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)


# -- a real PostgreSQL: tests/test_postgres.py, and the docs' <!-- backend: postgres PORT --> (docs_blocks.py) ------


def postgres_bindir() -> Path:
    """Where ``initdb`` and ``postgres`` are: Debian keeps them out of PATH, under /usr/lib/postgresql/N/bin.

    A missing server is a failure, not a skip: CI installs the packages (``.ci/run``), so the tests must run."""
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    pytest.fail("PostgreSQL is not installed: apt-get install postgresql postgresql-client (see .ci/run)")


@dataclass
class PostgresServer:
    """A running PostgreSQL on 127.0.0.1:``port``; superuser ``tester`` (or the name given), no password."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes]


def _start_postgres(
    bindir: Path, data: Path, user: str | None, sockets: Path, port: int
) -> tuple[subprocess.Popen[bytes], int, threading.Thread] | None:
    """Start ``postgres``, ready once it says so on stderr (no polling, no sleep); None if the port was taken.

    PostgreSQL cannot listen on port 0, so with ``port`` 0 it gets one the kernel just handed out and released."""
    if not port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
    proc = subprocess.Popen(
        [
            str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={sockets}", "-c", "fsync=off", "-c", "logging_collector=off",
        ],
        # PostgreSQL refuses to run as root: as root, it runs as the packages' unprivileged user.
        user=user, group=user, extra_groups=[] if user else None,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        if "ready to accept connections" in line:
            # Keep reading its log, or a full pipe would stall the server.
            drain = threading.Thread(target=proc.stderr.read, daemon=True)
            drain.start()
            return proc, port, drain
    proc.wait()
    proc.stderr.close()
    if any("could not bind" in line or "already in use" in line for line in lines):
        return None
    pytest.fail("PostgreSQL did not start:\n" + "\n".join(lines))


@contextlib.contextmanager
def postgres_server(
    port: int = 0, *, tls: tuple[bytes, bytes] | None = None, superuser: str = "tester"
) -> Iterator[PostgresServer]:
    """``initdb`` and ``postgres`` in a fresh directory, trusting every local and 127.0.0.1 connection; with
    ``tls`` (certificate chain and key, PEM) also ``ssl = on``. Stopped (fast shutdown) and removed on exit."""
    import shutil
    import tempfile

    bindir = postgres_bindir()
    user = "postgres" if os.geteuid() == 0 else None
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as another user.
    directory = Path(tempfile.mkdtemp(prefix="tlsgate-pg-"))
    try:
        data = directory / "data"
        if user:
            shutil.chown(directory, user, user)
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", superuser, "--no-sync", "-E", "UTF8",
             "--locale=C"],
            user=user, group=user, extra_groups=[] if user else None, check=True, capture_output=True,
        )  # fmt: skip
        conf = ""
        if tls is not None:
            for name, blob in (("server.crt", tls[0]), ("server.key", tls[1])):
                (data / name).write_bytes(blob)
                os.chmod(data / name, 0o600)
                if user:
                    shutil.chown(data / name, user, user)
            conf += "ssl = on\n"
        with (data / "postgresql.conf").open("a") as file:
            file.write(conf)
        (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        for _ in range(1 if port else 5):
            started = _start_postgres(bindir, data, user, directory, port)
            if started is not None:
                break
        else:
            pytest.fail(f"PostgreSQL could not listen on {port or 'a free port'}")
        proc, real_port, drain = started
        try:
            yield PostgresServer(real_port, directory, proc)
        finally:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: end sessions, no waiting for clients
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            drain.join(DEADLINE)
            assert proc.stderr is not None
            proc.stderr.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def serve_postgres(port: int) -> None:
    """Run a plaintext PostgreSQL on 127.0.0.1:``port`` (superuser ``postgres``) until SIGTERM: the docs' backend.

    Prints ``ready to accept connections`` once it does, for the runner that waits on that line."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with postgres_server(port, superuser="postgres"):
        print("postgres: ready to accept connections", flush=True)
        stop.wait()


def address_rules(allow_from: Sequence[str] = (), deny_from: Sequence[str] = ()) -> AddressRules:
    """`AddressRules` from CIDR strings, parsed by the settings converters as a flag or file key would be."""
    return AddressRules(convert("allow_from", list(allow_from)), convert("deny_from", list(deny_from)))


def identity_rules(
    *, flag_prefix: str = "allow", allow_all: bool = False, rego: Any = None, **rules: Any
) -> IdentityRules:
    """`IdentityRules` from flag strings (``cn=["alice"]``; ``--verify-*`` with ``flag_prefix="verify"``), each value
    parsed by the settings converter of ``--{flag_prefix}-{kind}``, so a bad value raises its ConfigError."""
    parsed = {kind: convert(f"{flag_prefix}_{kind}", list(values)) for kind, values in rules.items()}
    return IdentityRules(allow_all=allow_all, flag_prefix=flag_prefix, rego=rego, **parsed)


class TlsTarget:
    """A TLS echo server in a thread that records how each handshake ended: ``"ok"`` or the SSL error's reason."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.results: asyncio.Queue[str] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                try:
                    with self.ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(tls.recv(4) or b"")
                        result = "ok"
                except ssl.SSLError as err:
                    result = str(err.reason)
                except OSError as err:
                    result = type(err).__name__
            self.loop.call_soon_threadsafe(self.results.put_nowait, result)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self.listener.close()
        self.thread.join()


@contextlib.asynccontextmanager
async def tls_target(ctx: ssl.SSLContext) -> AsyncIterator[TlsTarget]:
    target = TlsTarget(ctx)
    try:
        yield target
    finally:
        target.close()
