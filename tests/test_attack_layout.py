"""The adversarial pass over the package restructure and PostgreSQL openings (engine/sockets.py, setup phases,
starttls): each test is a hostile case that once gave a traceback, a hang or a leak, or one that held and is
pinned so that it keeps holding."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlsgate.cli import cli
from tlsgate.engine.postgres import CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3, SSL_REQUEST
from tlsgate.engine.sockets import bind_unix
from tlsgate.errors import StartupError
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import tunnel_config

from helpers import backend, invoke, listen_args, port_of, refused, server_opts, tunnel, wait_until


def _under_a_file(tmp_path: Path) -> tuple[Path, str]:
    plain = tmp_path / "plain"
    plain.write_text("not a directory")
    return plain / "x.sock", "Not a directory"


def _symlink_loop(tmp_path: Path) -> tuple[Path, str]:
    loop = tmp_path / "loop.sock"
    loop.symlink_to(loop)
    return loop, "symbolic links"


@pytest.mark.parametrize("where", [_under_a_file, _symlink_loop], ids=["under-a-file", "symlink-loop"])
@pytest.mark.parametrize("flag", ["--listen", "--status"])
def test_a_unix_path_that_cannot_be_looked_at_is_one_line_not_a_traceback(
    pki_files: dict[str, Path], tmp_path: Path, flag: str, where: object
) -> None:
    """``os.stat`` of the path failing with anything but "no such file" escaped as a traceback (exit 1), for
    tunnels and the status port alike, since both bind through engine.sockets."""
    path, reason = where(tmp_path)  # type: ignore[operator]
    args = listen_args(pki_files, "127.0.0.1:1")
    if flag == "--listen":
        args[args.index("--listen") + 1] = f"unix:{path}"
    else:
        args += ["--status", f"unix:{path}"]
    result = invoke(cli, "server", *args)
    if flag == "--listen":
        line = refused(result, f"{flag} unix:{path}: ")
    else:
        # The status port binds once the tunnels listen, so their "listening" lines come first.
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        line = result.stderr.splitlines()[-1]
        assert line.startswith(f"tlsgate: error: {flag} unix:{path}: "), result.stderr
    assert reason in line


@pytest.fixture
def full_listener(tmp_path: Path) -> Iterator[Path]:
    """A live unix listener whose backlog is full: a blocking connect to it waits until someone accepts."""
    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    try:
        while True:
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            queued.append(sock)
            try:
                sock.connect(str(path))
            except BlockingIOError:
                break
        yield path
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def test_a_live_unix_listener_with_a_full_backlog_is_refused_not_waited_on(full_listener: Path) -> None:
    """The stale-socket probe was a blocking connect: against a live listener that does not accept, start-up
    hung for as long as its backlog stayed full (before the fix, this test runs into the per-test timeout). It
    is a live listener, so the answer is a refusal, at once, and its file stays."""
    with pytest.raises(StartupError, match="another process is listening there"):
        bind_unix(str(full_listener))
    assert full_listener.exists()


# -- PostgreSQL openings from hostile peers ------------------------------------------------------------------------

_STARTUP = struct.pack("!II", 23, PROTOCOL_3) + b"user\0alice\0database\0x\0"  # 23 bytes: no final NUL needed here
_GSSENC = struct.pack("!II", 8, GSSENC_REQUEST_CODE)
_PROXY_V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 5433\r\n"

# What each hostile client sends before it resets (or, with "fin", closes) its connection. Every one of them must
# end its set-up at once: nothing reaches the target, no exception, no descriptor left behind.
HOSTILE_OPENINGS = {
    "half-ssl-request": SSL_REQUEST[:3],
    "ssl-request-then-gone": SSL_REQUEST,
    "gssenc-then-gone": _GSSENC,
    "gssenc-twice": _GSSENC + _GSSENC,
    "startup-header-only": _STARTUP[:8],
    "startup-half-body": _STARTUP[:15],
    "startup-whole": _STARTUP,
    "cancel-request-whole": struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, 1, 2),
    "garbage": b"GET / HTTP/1.1\r\n\r\n",
    "ssl-request-with-extra": SSL_REQUEST + b"Q",
}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _hang_up(sock: socket.socket, how: str) -> None:
    if how == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("behind_proxy", [False, True], ids=["direct", "behind-proxy"])
@pytest.mark.parametrize("how", ["rst", "fin"])
async def test_a_postgres_opening_cut_anywhere_ends_its_setup_at_once_and_leaks_nothing(
    pki_files: dict[str, Path], how: str, behind_proxy: bool
) -> None:
    """Each hostile opening (behind a trusted balancer: after its PROXY header, and half a header alone), 10
    times over, then a reset or a FIN: every set-up ends at once (the handshake deadline is far away), none
    reached the target, no internal error, and the process holds as many descriptors as before.

    On uvloop, a client that reset after part of a PROXY header or part of its opening held its set-up until
    the handshake deadline: its bytes were taken, and the reader waited for a readiness libuv no longer
    reports for a socket that has seen a reset."""
    loop = asyncio.get_running_loop()
    extra: dict[str, object] = {"accept_proxy_from": ["127.0.0.1/32"]} if behind_proxy else {}
    prefix = _PROXY_V1 if behind_proxy else b""
    openings = [prefix + sent for sent in HOSTILE_OPENINGS.values()]
    if behind_proxy:
        openings += [_PROXY_V1[:20], _PROXY_V1[:-1]]
    async with backend() as be:
        opts = server_opts(pki_files, be.address, allow_cn=["alice"], protocol="postgres", **extra)
        async with tunnel("server", **opts, handshake_timeout="1h") as tun:
            port = port_of(tun)
            before = _open_fds()
            for _ in range(10):
                for sent in openings:
                    sock = socket.socket()
                    sock.setblocking(False)
                    await loop.sock_connect(sock, ("127.0.0.1", port))
                    await loop.sock_sendall(sock, sent)
                    _hang_up(sock, how)
            await wait_until(lambda: tun.active == 0)
            assert tun.stats.internal_errors == 0
            assert tun.stats.handshake_timeouts == 0
            assert be.connections == 0
            assert _open_fds() == before


@pytest.mark.asyncio
async def test_an_application_that_asks_for_tls_over_and_over_is_cut_at_the_handshake_timeout(
    pki_files: dict[str, Path],
) -> None:
    """Client mode, --target-protocol postgres: each SSLRequest of the application is answered N. One that keeps
    asking never gets past the opening, and the handshake deadline, armed once, still cuts it."""
    loop = asyncio.get_running_loop()
    async with backend() as be:
        opts = {
            "target": be.address, "target_protocol": "postgres", "cacert": str(pki_files["ca"]),
            "handshake_timeout": "300ms",
        }  # fmt: skip
        async with tunnel("client", **opts) as tun:
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port_of(tun)))
            answers = b""
            try:
                while True:
                    await loop.sock_sendall(sock, SSL_REQUEST)
                    answer = await loop.sock_recv(sock, 1)
                    if not answer:
                        break
                    answers += answer
            except ConnectionError:
                pass
            finally:
                sock.close()
            assert answers and set(answers) == {ord("N")}
            await wait_until(lambda: tun.stats.handshake_timeouts == 1)
            assert be.connections == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [None, "postgres"])
async def test_a_client_that_resets_before_its_handshake_starts_is_a_handshake_failure_not_an_internal_error(
    pki_files: dict[str, Path], protocol: str | None
) -> None:
    """A client that resets before tlsgate wraps its socket (at once on a TLS listener; right after its
    SSLRequest with --protocol postgres, so our ``S`` meets the reset): ``wrap_socket`` leaves no SSL object on
    a socket that is no longer connected, and the direct handshake path raised AttributeError on it. The guard
    cut the connection, but as an ``internal error`` at ERROR, counted in ``internal_errors_total``: any client
    could raise the metric that is meant to page someone."""
    loop = asyncio.get_running_loop()
    extra: dict[str, object] = {"protocol": protocol} if protocol else {}
    async with (
        backend() as be,
        tunnel("server", **server_opts(pki_files, be.address, allow_cn=["alice"], **extra)) as tun,
    ):
        for _ in range(10):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port_of(tun)))
            if protocol:
                await loop.sock_sendall(sock, SSL_REQUEST)
                sock.close()  # a FIN; our S then meets a closed socket, and the kernel resets ours
            else:
                _hang_up(sock, "rst")  # before the loop even accepts: this test runs in the server's loop
        await wait_until(lambda: tun.stats.accepted == 10 and tun.active == 0)
        assert tun.stats.internal_errors == 0
        assert be.connections == 0


# -- the status port failing after the tunnels listen -------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("listen", ["127.0.0.1:0", "unix"])
async def test_a_status_port_that_cannot_bind_leaves_nothing_open(
    pki_files: dict[str, Path], tmp_path: Path, listen: str
) -> None:
    """The status port binds after the tunnels (it needs them to report on): when it fails, the tunnels' sockets
    are closed again, a unix tunnel's file is removed, and the error is the start-up error. Held."""
    listen_at = f"unix:{tmp_path / 't.sock'}" if listen == "unix" else listen
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        before = _open_fds()
        for _ in range(5):
            cfg = tunnel_config("server", server_opts(pki_files, "127.0.0.1:1", allow_all=True, listen=listen_at))
            with pytest.raises(StartupError, match="--status"):
                async with Server([cfg], ProcessOptions(status=busy)):
                    pass
        assert _open_fds() == before
        assert not (tmp_path / "t.sock").exists()
