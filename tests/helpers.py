"""Backends and a server runner for end-to-end tests: real sockets on loopback, port 0, no fixed sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import resource
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tlsgate.config import tunnel_config
from tlsgate.pki import CertificateAuthority
from tlsgate.supervisor import ProcessOptions, Server
from tlsgate.tunnel import Tunnel

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
async def tunnel(mode: str = "server", **options: Any) -> AsyncIterator[Tunnel]:
    """Run one tlsgate tunnel in this event loop; yields it once it listens (port from tunnel.addresses)."""
    options.setdefault("listen", "127.0.0.1:0")
    cfg = tunnel_config(mode, options)
    server = Server([cfg], ProcessOptions())
    task = asyncio.create_task(server.serve())
    started = asyncio.create_task(server.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up error
    tun = next(iter(server.tunnels.values()))
    tun.server = server  # type: ignore[attr-defined]
    try:
        yield tun
    finally:
        if not server.stopping:
            server.stop()
        await task


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
