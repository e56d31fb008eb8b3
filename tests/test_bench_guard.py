"""What the soak (bench/soak.py) and the performance guard (bench/instructions.py) found or rely on.

The soak's `abort` connections (a client that resets right after its handshake) left relays open for ever on
uvloop: two file descriptors and a few KiB each, the worker's RSS and fd count climbing for as long as such
clients came. The cause and the fix are in ``tunnel._dead_socket``; the test here makes that client exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import select
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import backend, client_context, port_of, server_opts, tunnel, wait_until

_LINGER_RESET = struct.pack("ii", 1, 0)


async def handshake_then_reset(port: int, ctx: ssl.SSLContext, data: bytes) -> None:
    """A TLS 1.3 client that sends its Finished (and ``data``) and resets the connection at once.

    The handshake runs over memory BIOs so that the Finished, the data and the reset leave in one go, with no
    chance for the server (in this event loop) to run in between: it then reads the Finished, and its reply,
    the session tickets, is what meets the reset. That write takes the socket's pending error (ECONNRESET),
    so the error is no longer there for anyone who asks the socket later.
    """
    loop = asyncio.get_running_loop()
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    await loop.sock_sendall(raw, outgoing.read())
                chunk = await loop.sock_recv(raw, 65536)
                assert chunk, "the server closed during the handshake"
                incoming.write(chunk)
        if data:
            tls.write(data)
        raw.send(outgoing.read())  # Finished (+ data): a few hundred bytes, always taken whole on loopback
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    finally:
        raw.close()  # the reset, before the loop runs again


def no_epoll() -> Any:
    raise OSError(28, "No space left on device")  # what epoll_ctl says at fs.epoll.max_user_watches


@pytest.mark.asyncio
@pytest.mark.parametrize("watch", [True, False], ids=["error-watch", "sweep-only"])
@pytest.mark.parametrize("data", [b"", b"E" * 100], ids=["nothing", "data"])
async def test_a_client_that_resets_after_its_finished_leaves_nothing_open(
    data: bytes, watch: bool, pki_files: dict[str, Path], ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every such connection is closed, and the tunnel forgets it, within a few sweeps (it never was on
    uvloop: 4-15 of 30 such connections stayed, each with its backend connection). ``sweep-only``: without the
    tunnel's error watch (no epoll watches left) the sweep is all there is, and it must not rely on SO_ERROR."""
    if not watch:
        monkeypatch.setattr(select, "epoll", no_epoll)
    opts = server_opts(pki_files, "", disable_authentication=True, shutdown_timeout="1s")
    async with backend() as be, tunnel(**{**opts, "target": be.address}) as tun:
        ctx = client_context(ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # the tickets come after the client's Finished
        for _ in range(5):
            await handshake_then_reset(port_of(tun), ctx, data)
        await wait_until(lambda: tun.stats.accepted >= 5)
        await wait_until(lambda: tun.active == 0, attempts=2000)
        assert not tun.relays


@pytest.mark.asyncio
async def test_close_notify_to_a_client_that_reset_aborts_without_an_exception(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend ends at once, so the relay's first act is a close_notify to a client that already reset.
    SSL_shutdown's write fails (SSL_ERROR_SYSCALL), closenotify raises its own SSLError, and describing that
    error raised AttributeError out of the loop callback (1,976 tracebacks in the soak's hour on uvloop)."""
    escaped: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: escaped.append(context))

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    opts = server_opts(pki_files, "", disable_authentication=True, shutdown_timeout="1s")
    async with backend(hang_up) as be, tunnel(**{**opts, "target": be.address}) as tun:
        ctx = client_context(ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        for _ in range(5):
            await handshake_then_reset(port_of(tun), ctx, b"")
        await wait_until(lambda: be.connections >= 5, attempts=2000)
        await wait_until(lambda: tun.active == 0, attempts=2000)
    assert not escaped, [c.get("exception") or c.get("message") for c in escaped]
    ends = [getattr(r, "fields", {}).get("end", "") for r in caplog.records if r.getMessage() == "closed"]
    assert len(ends) == 5 and all(end.startswith(("client", "target")) for end in ends), ends


# --- the performance guard's verdicts (bench/instructions.py --check), without valgrind ---------------------

_BENCH = Path(__file__).resolve().parent.parent / "bench"
_ENV = {"cpu": "AMD EPYC", "arch": "x86_64", "python": "CPython 3.11.7", "openssl": "OpenSSL 3.0.19"}


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> Any:
    """bench/instructions.py, imported, on a machine that has valgrind and is the baseline's."""
    monkeypatch.syspath_prepend(str(_BENCH))
    instructions = importlib.import_module("instructions")
    monkeypatch.setattr(instructions, "have_valgrind", lambda: True)
    monkeypatch.setattr(instructions, "environment", lambda loops: dict(_ENV))
    return instructions


def write_baseline(path: Path, per_unit: dict[str, dict[str, dict[str, int]]], **env: str) -> Path:
    measured = {
        "source": "main (abc1234)", "date_utc": "2026-11-29 15:00", "command": "bench/instructions.py ...",
        "connections": 300, "requests": 5000, "chunks": 5, "tlsgate_args": "",
    }  # fmt: skip
    doc = {"measured": measured, "environment": {**_ENV, **env}, "tolerance": 0.03, "per_unit": per_unit}
    path.write_text(json.dumps(doc))
    return path


def counts(newconn: int, request: int) -> dict[str, dict[str, int]]:
    """Per-unit counts as run_once() returns them: every group, and the total."""
    groups = {"openssl": 0, "loop": 0, "haproxy": 0, "other": 0}
    return {
        "newconn": {**groups, "python": newconn, "total": newconn},
        "request": {**groups, "python": request, "total": request},
    }


def run_check(guard: Any, monkeypatch: pytest.MonkeyPatch, baseline: Path, now: dict[str, dict[str, int]]) -> int:
    monkeypatch.setattr(guard, "run_once", lambda args, loop, path, name: now)
    return int(guard.check(argparse.Namespace(check=str(baseline))))


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    base=st.tuples(st.integers(10_000, 10_000_000), st.integers(1_000, 100_000)),
    growth=st.tuples(st.floats(0.5, 1.5), st.floats(0.5, 1.5)),
)
def test_the_guard_fails_exactly_when_a_count_grows_more_than_3_percent(
    guard: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    base: tuple[int, int],
    growth: tuple[float, float],
) -> None:
    now = tuple(round(b * g) for b, g in zip(base, growth, strict=True))
    baseline = write_baseline(tmp_path / "baseline.json", {"asyncio": counts(*base)})
    code = run_check(guard, monkeypatch, baseline, counts(*now))
    out = capsys.readouterr().out
    grew = any(n / b > 1.03 for n, b in zip(now, base, strict=True))
    assert code == (1 if grew else 0), out
    for b, n in zip(base, now, strict=True):  # both numbers and the ratio, on one line per count
        assert f"baseline {b:,}, now {n:,}, ratio {n / b:.3f}" in out


def test_the_guard_skips_on_another_machine_without_measuring(
    guard: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = write_baseline(tmp_path / "b.json", {"uvloop": counts(100, 10)}, cpu="Intel Xeon")

    def must_not_run(*args: object) -> None:
        raise AssertionError("measured on a machine the baseline does not describe")

    monkeypatch.setattr(guard, "run_once", must_not_run)
    assert guard.check(argparse.Namespace(check=str(baseline))) == 0
    out = capsys.readouterr().out
    assert "perf-guard: SKIP" in out and "Intel Xeon" in out and "AMD EPYC" in out


def test_the_guard_skips_without_valgrind(
    guard: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(guard, "have_valgrind", lambda: False)
    assert run_check(guard, monkeypatch, write_baseline(tmp_path / "b.json", {}), {}) == 0
    assert "SKIP: valgrind is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["", "{}", '{"measured": {}}', "not json"])
def test_an_unreadable_baseline_is_one_line_and_exit_2(
    guard: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    path = tmp_path / "b.json"
    path.write_text(content)
    assert guard.check(argparse.Namespace(check=str(path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("perf-guard: cannot read baseline") and err.count("\n") == 1
