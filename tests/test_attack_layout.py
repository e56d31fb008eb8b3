"""The adversarial pass over the package restructure and PostgreSQL openings (engine/sockets.py, setup phases,
starttls): each test is a hostile case that once gave a traceback, a hang or a leak, or one that held and is
pinned so that it keeps holding."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlsgate.cli import cli
from tlsgate.engine.sockets import bind_unix
from tlsgate.errors import StartupError

from helpers import invoke, listen_args, refused


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
