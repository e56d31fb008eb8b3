"""ghostunnel's status-port parity (issue #15): /_shutdown, --target-status, timer metrics, /debug/pprof/."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tlsgate.status.pprof
from tlsgate.cli import cli
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import tunnel_config
from tlsgate.settings.file import read_config_file
from tlsgate.status import TunnelView, merge_views, timer_entries
from tlsgate.status.health import check_backend as _check_backend

from helpers import backend, client_context, request, server_opts, status_address, wait_until


@contextlib.asynccontextmanager
async def serving(tunnel: dict[str, Any], **process: Any) -> AsyncIterator[tuple[Server, asyncio.Task[int]]]:
    """A Server with one tunnel and an HTTP status port on loopback; yields it and its serve() task.

    helpers.running_server without the task hidden: POST /_shutdown tests read serve()'s exit code from it.
    """
    cfg = tunnel_config("server", {"listen": "127.0.0.1:0", **tunnel})
    server = Server([cfg], ProcessOptions(status="http://127.0.0.1:0", **process))
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve(ready=lambda _: ready.set()))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiting.cancel()
        task.result()
    try:
        yield server, task
    finally:
        if not server.stopping:
            server.stop()
        await task


def opts(pki_files: dict[str, Path], target: str, **extra: object) -> dict[str, Any]:
    return server_opts(pki_files, target, allow_all=True, **extra)


# -- --enable-shutdown ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_post_shutdown_answers_200_then_stops_gracefully(pki_files: dict[str, Path]) -> None:
    async with backend() as be, serving(opts(pki_files, be.address), enable_shutdown=True) as (server, task):
        code, _, body = await request(status_address(server), "/_shutdown", method="POST")
        assert code == 200 and body == b"shutting down\n"
        # The same stop as SIGTERM: serve() returns 0, as nothing had to be cut.
        assert await asyncio.wait_for(task, 30) == 0
        assert server.stopping


@pytest.mark.asyncio
async def test_post_shutdown_with_a_body_is_accepted(pki_files: dict[str, Path]) -> None:
    # curl -X POST -d '' sends a Content-Length; the body means nothing and must not confuse the parser.
    raw = b"POST /_shutdown?now=1 HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\n{}"
    async with backend() as be, serving(opts(pki_files, be.address), enable_shutdown=True) as (server, task):
        code, _, _ = await request(status_address(server), "/_shutdown", raw=raw)
        assert code == 200
        assert await asyncio.wait_for(task, 30) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
async def test_shutdown_refuses_every_method_but_post(pki_files: dict[str, Path], method: str) -> None:
    async with backend() as be, serving(opts(pki_files, be.address), enable_shutdown=True) as (server, task):
        code, headers, _ = await request(status_address(server), "/_shutdown", method=method)
        assert code == 405 and headers["allow"] == "POST"
        code, _, _ = await request(status_address(server), "/_status")
        assert code == 200 and not server.stopping and not task.done()


@pytest.mark.asyncio
async def test_shutdown_is_not_served_without_the_flag(pki_files: dict[str, Path]) -> None:
    async with backend() as be, serving(opts(pki_files, be.address)) as (server, _task):
        code, _, _ = await request(status_address(server), "/_shutdown", method="POST")
        assert code == 404 and not server.stopping


def test_enable_shutdown_without_status_is_a_one_line_exit_2(pki_files: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1",
            "--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"]),
            "--allow-all", "--enable-shutdown",
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--enable-shutdown requires --status" in result.output
    assert "Traceback" not in result.output


def test_enable_shutdown_in_a_file_without_status_is_a_problem(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        '[process]\nenable-shutdown = true\n\n[[tunnel]]\nmode = "server"\nlisten = "127.0.0.1:0"\n'
        f'target = "127.0.0.1:1"\ncert = "{pki_files["cert"]}"\nkey = "{pki_files["key"]}"\n'
        f'cacert = "{pki_files["ca"]}"\nallow-all = true\n'
    )
    result = read_config_file(str(path))
    assert any("enable-shutdown requires" in p for p in result.problems), result.problems
    path.write_text(path.read_text().replace("enable-shutdown = true", 'enable-shutdown = "yes"'))
    assert any("enable-shutdown: expected true or false" in p for p in read_config_file(str(path)).problems)


# -- --target-status -----------------------------------------------------------------------------------------------


def http_answer(code: int, seen: list[bytes], *, reason: str = "Whatever") -> Any:
    """A backend handler: records the request head, answers ``code`` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()

    return handle


async def status_of(server: Server) -> tuple[int, dict[str, Any]]:
    code, _, body = await request(status_address(server), "/_status")
    return code, json.loads(body)


@pytest.mark.asyncio
async def test_target_status_200_is_up_and_the_get_goes_to_the_target(pki_files: dict[str, Path]) -> None:
    seen: list[bytes] = []
    url = "http://app.internal:9999/health?deep=1"
    async with (
        backend(http_answer(200, seen)) as be,
        serving(opts(pki_files, be.address, target_status=url)) as (
            server,
            _,
        ),
    ):
        code, doc = await status_of(server)
    assert code == 200 and doc["backend_ok"] is True, doc
    # Sent over the connection to --target; the URL only names the path and the Host header (ghostunnel's way).
    head = seen[0].decode()
    assert head.startswith("GET /health?deep=1 HTTP/1.1\r\n")
    assert "\r\nHost: app.internal:9999\r\n" in head


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [204, 301, 404, 500, 503])
async def test_target_status_other_than_200_is_down(pki_files: dict[str, Path], code: int) -> None:
    url = "http://localhost/health"
    async with (
        backend(http_answer(code, [])) as be,
        serving(opts(pki_files, be.address, target_status=url)) as (
            server,
            _,
        ),
    ):
        status, doc = await status_of(server)
    assert status == 503 and doc["backend_ok"] is False
    assert doc["backend_error"] == f"target returned status: {code}"


async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
    await writer.drain()


@pytest.mark.asyncio
@pytest.mark.parametrize("handler", [close_at_once, garbage])
async def test_target_status_without_an_http_answer_is_down(pki_files: dict[str, Path], handler: Any) -> None:
    # A plain TCP connect succeeds here: the old check would have said "up".
    url = "http://localhost/health"
    async with backend(handler) as be, serving(opts(pki_files, be.address, target_status=url)) as (server, _):
        status, doc = await status_of(server)
    assert status == 503 and "--target-status: no HTTP answer" in doc["backend_error"]


@pytest.mark.asyncio
async def test_target_status_https_is_verified_with_the_url_host(
    pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    leaf = ca.issue_cert("app.internal")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    seen: list[bytes] = []
    tls = {"target_tls": True, "target_cacert": str(pki_files["ca"]), "target_server_name": "app.internal"}
    async with backend(http_answer(200, seen), ssl_ctx=ctx) as be:
        good = opts(pki_files, be.address, target_status="https://app.internal/health", **tls)
        async with serving(good) as (server, _):
            code, doc = await status_of(server)
        assert code == 200 and doc["backend_ok"] is True, doc
        assert seen and seen[0].startswith(b"GET /health HTTP/1.1\r\n")
        # The same certificate does not name this host: refused, as Go's client refuses it for ghostunnel.
        wrong = opts(pki_files, be.address, target_status="https://other.internal/health", **tls)
        async with serving(wrong) as (server, _):
            code, doc = await status_of(server)
        assert code == 503 and "TLS handshake for --target-status failed" in doc["backend_error"], doc
        assert len(seen) == 1


@pytest.mark.asyncio
async def test_target_status_still_needs_the_target_to_accept(pki_files: dict[str, Path]) -> None:
    async with backend() as be:
        address = be.address
    async with serving(opts(pki_files, address, target_status="http://localhost/")) as (server, _):
        code, doc = await status_of(server)
    assert code == 503 and doc["backend_error"].startswith(address)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=st.integers(100, 599), reason=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20))
def test_target_status_only_200_means_up(code: int, reason: str) -> None:
    async def check() -> str | None:
        async with backend(http_answer(code, [], reason=reason)) as be:
            view = TunnelView("k", "t", "server", [], be.address, target_status="http://localhost/")
            return await _check_backend(view)

    error = asyncio.run(check())
    assert error == (None if code == 200 else f"target returned status: {code}")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://localhost/", "should start with http:// or https://"),
        ("localhost:8080/health", "should start with http:// or https://"),
        ("http:///health", "give a URL with a host"),
        ("http://localhost/a b", "must be percent-encoded"),
        ("http://localhost/\r\nX-Injected: 1", "must be percent-encoded"),
        ("http://localhost/caf\u00e9", "must be percent-encoded"),
    ],
)
def test_target_status_must_be_an_http_url(pki_files: dict[str, Path], url: str, message: str) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1",
            "--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"]),
            "--allow-all", "--target-status", url,
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


# -- ghostunnel's metric names in /_metrics --------------------------------------------------------------------

TIMER_SUFFIXES = ("count", "min", "max", "mean", "50-percentile", "75-percentile", "95-percentile", "99-percentile")


async def metrics_of(server: Server) -> dict[str, float]:
    code, _, body = await request(status_address(server), "/_metrics")
    assert code == 200
    return {entry["metric"]: entry["value"] for entry in json.loads(body)}


@pytest.mark.asyncio
async def test_json_metrics_have_ghostunnels_timers_in_nanoseconds(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    ctx = client_context(ca, ca.issue_cert("alice@example.test", common_name="alice"))
    async with backend() as be, serving(opts(pki_files, be.address), metrics_prefix="ghostunnel") as (server, _):
        tun = next(iter(server.tunnels.values()))
        port = int(tun.addresses[0].rsplit(":", 1)[1])
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        await wait_until(lambda: tun.stats.closed == 3)
        metrics = await metrics_of(server)
    for timer in ("conn.handshake", "conn.lifetime"):
        values = [metrics[f"ghostunnel.{timer}.{suffix}"] for suffix in TIMER_SUFFIXES]
        count, low, high, mean, *percentiles = values
        assert count == 3
        # Nanoseconds: a loopback handshake takes well over a microsecond and well under a minute.
        assert 1_000 < low <= mean <= high < 60e9
        assert low <= percentiles[0] <= percentiles[1] <= percentiles[2] <= percentiles[3] <= high
    for name in ("conn.open", "conn.timeout", "accept.total", "accept.success", "accept.error", "accept.timeout"):
        assert f"ghostunnel.{name}" in metrics
    assert metrics["ghostunnel.accept.total"] == 3 and metrics["ghostunnel.accept.success"] == 3
    assert metrics["ghostunnel.conn.timeout"] == 0 and metrics["ghostunnel.accept.timeout"] == 0


@pytest.mark.asyncio
async def test_accept_timeout_counts_handshakes_cut_by_the_handshake_timeout(pki_files: dict[str, Path]) -> None:
    async with backend() as be, serving(opts(pki_files, be.address, handshake_timeout="100ms")) as (server, _):
        tun = next(iter(server.tunnels.values()))
        port = int(tun.addresses[0].rsplit(":", 1)[1])
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)  # and never say hello
        await wait_until(lambda: tun.stats.handshake_timeouts == 1)
        metrics = await metrics_of(server)
        writer.close()
    assert metrics["tlsgate.accept.timeout"] == 1 and metrics["tlsgate.accept.error"] == 1
    assert metrics["tlsgate.conn.timeout"] == 0


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # accepts, never answers the TLS hello


@pytest.mark.asyncio
async def test_conn_timeout_counts_targets_slower_than_the_connect_timeout(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    ctx = client_context(ca, ca.issue_cert("alice@example.test", common_name="alice"))
    async with backend(silent) as be:
        tls = {"target_tls": True, "target_cacert": str(pki_files["ca"]), "connect_timeout": "100ms"}
        async with serving(opts(pki_files, be.address, **tls)) as (server, _):
            tun = next(iter(server.tunnels.values()))
            port = int(tun.addresses[0].rsplit(":", 1)[1])
            _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            await wait_until(lambda: tun.stats.connect_timeouts == 1)
            metrics = await metrics_of(server)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    assert metrics["tlsgate.conn.timeout"] == 1 and metrics["tlsgate.accept.timeout"] == 0


def test_timer_entries_match_go_metrics_percentiles() -> None:
    # go-metrics: position p*(n+1) in the sorted sample, interpolated; clamped to the ends.
    got = dict(timer_entries([float(s) for s in range(10, 0, -1)]))
    assert got == {
        "min": 1_000_000_000, "max": 10_000_000_000, "mean": 5.5e9,
        "50-percentile": 5.5e9, "75-percentile": 8.25e9, "95-percentile": 10e9, "99-percentile": 10e9,
    }  # fmt: skip
    assert all(value == 0 for value in dict(timer_entries([])).values())


@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=300))
def test_timer_entries_are_ordered_and_within_the_sample(samples: list[float]) -> None:
    got = dict(timer_entries(samples))
    ordered = [got["min"], got["50-percentile"], got["75-percentile"], got["95-percentile"], got["99-percentile"]]
    tolerance = 1e-3  # float interpolation in nanoseconds
    assert all(a <= b + tolerance for a, b in itertools.pairwise(ordered))
    assert got["99-percentile"] <= got["max"] + tolerance
    assert got["min"] - tolerance <= got["mean"] <= got["max"] + tolerance


def test_worker_samples_are_joined_not_summed() -> None:
    one = TunnelView("k", "t", "server", [], "x", samples={"handshake": [1.0, 2.0]})
    two = TunnelView("k", "t", "server", [], "x", samples={"handshake": [3.0], "lifetime": [4.0]})
    (merged,) = merge_views([[one], [two]])
    assert merged.samples == {"handshake": [1.0, 2.0, 3.0], "lifetime": [4.0]}
    assert one.samples == {"handshake": [1.0, 2.0]}  # the inputs are left alone


# -- --enable-pprof ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pprof_index_and_stacks_of_threads_and_tasks(pki_files: dict[str, Path]) -> None:
    secret = secrets.token_hex(16)

    async def holding(value: str, started: asyncio.Event) -> None:
        started.set()
        await asyncio.Event().wait()  # suspended here, with value in a local

    started = asyncio.Event()
    task = asyncio.create_task(holding(secret, started), name="pprof-probe")
    await started.wait()
    try:
        async with backend() as be, serving(opts(pki_files, be.address), enable_pprof=True) as (server, _):
            code, _, index = await request(status_address(server), "/debug/pprof/")
            assert code == 200 and b"/debug/pprof/goroutine" in index and b"/debug/pprof/profile" in index
            code, headers, dump = await request(status_address(server), "/debug/pprof/goroutine")
    finally:
        task.cancel()
    text = dump.decode()
    assert code == 200 and headers["content-type"].startswith("text/plain")
    assert "thread MainThread" in text and "asyncio tasks:" in text
    assert "task pprof-probe" in text and "in holding" in text
    # Code locations only: a local variable's value never shows.
    assert secret not in text


@pytest.mark.asyncio
async def test_pprof_profile_window(pki_files: dict[str, Path]) -> None:
    async with backend() as be, serving(opts(pki_files, be.address), enable_pprof=True) as (server, _):
        profiling = asyncio.create_task(request(status_address(server), "/debug/pprof/profile?seconds=1"))
        await wait_until(lambda: tlsgate.status.pprof._profiling, attempts=2000)
        # One window at a time; /_status keeps answering meanwhile.
        code, _, body = await request(status_address(server), "/debug/pprof/profile?seconds=1")
        assert code == 409 and b"another profile is running" in body
        code, _, _ = await request(status_address(server), "/_status")
        assert code == 200
        code, _, report = await profiling
    assert code == 200 and b"cProfile of the event loop thread for 1s" in report
    assert b"function calls" in report
    assert not tlsgate.status.pprof._profiling


@pytest.mark.asyncio
@pytest.mark.parametrize("query", ["seconds=0", "seconds=61", "seconds=abc", "seconds=-1", "seconds=1.5", "seconds="])
async def test_pprof_profile_refuses_a_bad_window(pki_files: dict[str, Path], query: str) -> None:
    async with backend() as be, serving(opts(pki_files, be.address), enable_pprof=True) as (server, _):
        code, _, body = await request(status_address(server), f"/debug/pprof/profile?{query}")
    assert code == 400 and body == b"seconds: give a whole number from 1 to 60\n"
    assert not tlsgate.status.pprof._profiling


@pytest.mark.asyncio
async def test_pprof_refusals(pki_files: dict[str, Path]) -> None:
    async with backend() as be:
        async with serving(opts(pki_files, be.address), enable_pprof=True) as (server, _):
            assert (await request(status_address(server), "/debug/pprof/heap"))[0] == 404
            assert (await request(status_address(server), "/debug/pprof/", method="POST"))[0] == 405
        async with serving(opts(pki_files, be.address)) as (server, _):
            assert (await request(status_address(server), "/debug/pprof/"))[0] == 404
            assert (await request(status_address(server), "/debug/pprof/goroutine"))[0] == 404


def test_enable_pprof_without_status_is_a_one_line_exit_2(pki_files: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1",
            "--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"]),
            "--allow-all", "--enable-pprof",
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--enable-pprof requires --status" in result.output and "Traceback" not in result.output
