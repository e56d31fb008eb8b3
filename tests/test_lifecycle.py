"""The process lifecycle: ``async with Server(...)``, and the `Lifecycle` shared by a process and a --workers parent."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tlsgate.errors import StartupError
from tlsgate.process.lifecycle import Lifecycle, tunnel_key
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import TunnelConfig, tunnel_config

from helpers import backend, echo, server_opts, tls_connect, wait_until


def _client_ctx(pki_files: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki_files["ca"]))
    ctx.load_cert_chain(pki_files["client_cert"], pki_files["client_key"])
    return ctx


def _config(pki_files: dict[str, Path], target: str, **extra: object) -> TunnelConfig:
    return tunnel_config("server", {**server_opts(pki_files, target, allow_all=True), "listen": "127.0.0.1:0", **extra})


def _refuses(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _port(server: Server) -> int:
    tun = next(iter(server.tunnels.values()))
    return int(tun.addresses[0].rsplit(":", 1)[1])


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # answers nothing: the connection stays open until the client or the tunnel ends it


@pytest.mark.asyncio
async def test_async_with_serves_then_drains_on_exit_with_exit_code_zero(pki_files: dict[str, Path]) -> None:
    async with backend(echo) as target:
        cfg = _config(pki_files, target.address)
        async with Server([cfg], ProcessOptions()) as server:
            assert server.started.is_set() and not server.stopping
            port = _port(server)
            reader, writer = await tls_connect(next(iter(server.tunnels.values())), _client_ctx(pki_files))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
        assert server.stopping and server.exit_code == 0
        assert _refuses(port)


@pytest.mark.asyncio
async def test_async_with_raises_a_status_port_in_use_with_no_tunnel_left_listening(
    pki_files: dict[str, Path],
) -> None:
    """The tunnels bind before the status port: when the status port fails, entering raises and closes them."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status_port = taken.getsockname()[1]
        cfg = _config(pki_files, "127.0.0.1:9")
        server = Server([cfg], ProcessOptions(status=f"127.0.0.1:{status_port}"))
        with pytest.raises(StartupError, match="cannot listen"):
            async with server:
                raise AssertionError("entered a server whose status port is taken")
    assert server.tunnels and all(not tun.listeners for tun in server.tunnels.values())
    assert server.exit_code is None


@pytest.mark.asyncio
async def test_stop_inside_async_with_drains_at_once_and_a_second_stop_cuts(pki_files: dict[str, Path]) -> None:
    async with backend(_hold) as target:
        cfg = _config(pki_files, target.address)
        async with Server([cfg], ProcessOptions()) as server:
            tun = next(iter(server.tunnels.values()))
            _, writer = await tls_connect(tun, _client_ctx(pki_files))
            writer.write(b"held")
            await wait_until(lambda: target.connections == 1)
            server.stop()
            # The drain began without leaving the block: the listener closes while the held connection stays open.
            await wait_until(lambda: tun.draining and not tun.listeners)
            assert server.exit_code is None and tun.active == 1
            server.stop()
            await wait_until(lambda: server.exit_code is not None)
            assert server.exit_code == 1  # a connection had to be cut, as ghostunnel exits 1
            writer.close()


def test_begin_stop_is_true_once_then_false() -> None:
    lifecycle = Lifecycle()
    assert lifecycle.begin_stop() is True
    assert lifecycle.stopping
    assert [lifecycle.begin_stop(), lifecycle.begin_stop()] == [False, False]


@pytest.mark.asyncio
async def test_timed_reload_rereads_the_intervals_after_each_reload() -> None:
    """Each reload may change the tunnels: the next timer follows the new intervals, and none is left after the
    last tunnel with --timed-reload is gone."""
    loop = asyncio.get_running_loop()
    # What each reload leaves configured: first a tunnel with a new interval, then none with a timer at all.
    after_reload: list[list[Any]] = [[SimpleNamespace(timed_reload=0.002)], [SimpleNamespace(timed_reload=0.0)]]
    configs: list[Any] = [SimpleNamespace(timed_reload=0.001), SimpleNamespace(timed_reload=0.0)]
    done = asyncio.Event()

    def reload() -> None:
        configs[:] = after_reload.pop(0)
        if not after_reload:
            done.set()

    lifecycle = Lifecycle()
    lifecycle.schedule_timed_reload(loop, lambda: cast(list[TunnelConfig], configs), reload)
    await done.wait()
    assert not after_reload and lifecycle.timers() == []
    lifecycle.close()


@pytest.mark.asyncio
async def test_signals_reach_the_owner_with_their_number_and_close_gives_them_back() -> None:
    loop = asyncio.get_running_loop()
    got: list[tuple[str, signal.Signals]] = []
    arrived = asyncio.Event()

    def note(kind: str) -> Any:
        def handler(sig: signal.Signals) -> None:
            got.append((kind, sig))
            arrived.set()

        return handler

    lifecycle = Lifecycle()
    lifecycle.install_signals(loop, note("stop"), note("reload"))
    try:
        signal.raise_signal(signal.SIGHUP)
        await arrived.wait()
    finally:
        lifecycle.close()
    assert got == [("reload", signal.SIGHUP)]
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_tunnel_key_is_the_name_or_the_listen_address(pki_files: dict[str, Path]) -> None:
    unnamed = _config(pki_files, "127.0.0.1:8080", listen="127.0.0.1:8443")
    named = tunnel_config(
        "server", {**server_opts(pki_files, "127.0.0.1:8080", allow_all=True), "listen": ":8443"}, name="web"
    )
    assert (tunnel_key(unnamed), tunnel_key(named)) == ("127.0.0.1:8443", "web")
