"""ghostunnel's optional status-port endpoints (issue #15): --enable-shutdown's POST /_shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from test_status import request, status_address
from tlsgate.cli import cli
from tlsgate.config import tunnel_config
from tlsgate.configfile import read_config_file
from tlsgate.supervisor import ProcessOptions, Server

from helpers import backend, server_opts


@contextlib.asynccontextmanager
async def serving(tunnel: dict[str, Any], **process: Any) -> AsyncIterator[tuple[Server, asyncio.Task[int]]]:
    """A Server with one tunnel and an HTTP status port on loopback; yields it and its serve() task."""
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


def opts(pki_files: dict[str, Path], target: str) -> dict[str, Any]:
    return server_opts(pki_files, target, allow_all=True)


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
