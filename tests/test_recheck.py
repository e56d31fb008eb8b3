"""Re-check on reload (issue #16 part 3, ghostunnel#380): after SIGHUP, --timed-reload or a config file reload,
every open connection's peer is checked again against the new rules and CRLs; those now refused are closed, one
log line and one ``rechecked_closed_total{rule}`` count each, and the others carry on untouched.

Real sockets on loopback, port 0; every wait is on an event or a bounded poll, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import trustme
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding

from tlsgate.cli import cli
from tlsgate.pki import CertificateAuthority
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import TunnelConfig, tunnel_config
from tlsgate.settings.file import read_config_file
from tlsgate.status import ServerSource, prometheus_text

from helpers import (
    DEADLINE,
    Backend,
    WorkersProcess,
    assert_cut,
    backend,
    eventually,
    port_of,
    threaded_echo_server,
    tls_connect,
    tunnel,
    wait_until,
)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Pki:
    """A CA, a server certificate, clients alice and bob, and a CRL file the test can revoke either in."""

    ca: CertificateAuthority
    crl: Path
    serials: dict[str, int]
    contexts: dict[str, ssl.SSLContext]
    options: dict[str, Any]  # server options: certificate, client CA, allow-cn alice and bob, the CRL

    def revoke(self, name: str) -> None:
        self.ca.revoke(self.serials[name])
        self.crl.write_bytes(self.ca.build_crl().public_bytes(Encoding.PEM))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority.create(tmp_path / "ca")
    server = ca.issue("localhost", ips=["127.0.0.1"]).write(tmp_path, "server")
    crl = tmp_path / "crl.pem"
    crl.write_bytes(ca.build_crl().public_bytes(Encoding.PEM))
    serials, contexts = {}, {}
    for name in ("alice", "bob"):
        issued = ca.issue(name, client=True, server=False)
        files = issued.write(tmp_path, name)
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        ctx.load_cert_chain(files["cert"], files["key"])
        serials[name], contexts[name] = issued.serial, ctx
    options: dict[str, Any] = {
        "cert": [str(server["cert"])],
        "key": [str(server["key"])],
        "cacert": str(ca.cert_path),
        "allow_cn": ["alice", "bob"],
        "crl": [str(crl)],
        # A failed assertion leaves connections open: the tunnel's drain must not outlast the test's timeout.
        "shutdown_timeout": "5s",
    }
    return Pki(ca, crl, serials, contexts, options)


async def echoes(stream: Stream, payload: bytes = b"still here") -> bool:
    reader, writer = stream
    writer.write(payload)
    return await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload


async def close(*streams: Stream) -> None:
    for _, writer in streams:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


def recheck_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of each "closed on recheck" log line."""
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == "closed on recheck"]


@contextlib.asynccontextmanager
async def file_server(wanted: list[TunnelConfig]) -> AsyncIterator[Server]:
    """A Server in file mode: each reload reads ``wanted`` again, as ``tlsgate run`` re-reads its file."""
    server = Server(list(wanted), ProcessOptions(), load_configs=lambda: list(wanted))
    ready = asyncio.Event()
    task = asyncio.create_task(server.serve(ready=lambda _: ready.set()))
    started = asyncio.create_task(ready.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()
    try:
        yield server
    finally:
        if not server.stopping:
            server.stop()
        await task


# -- revocation ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_revoked_clients_open_connection_ends_on_reload_while_another_clients_carries_on(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with backend() as be, tunnel(target=be.address, **pki.options) as tun:
        alice = await tls_connect(tun, pki.contexts["alice"])
        bob = await tls_connect(tun, pki.contexts["bob"])
        assert await echoes(alice) and await echoes(bob)

        pki.revoke("alice")
        assert tun.server.reload()  # type: ignore[attr-defined]

        await assert_cut(alice[0])
        assert await echoes(bob)
        assert tun.stats.rechecked_closed == {"crl": 1}
        lines = recheck_lines(caplog)
        assert len(lines) == 1, lines
        assert lines[0]["rule"] == "crl" and "revoked" in lines[0]["reason"] and "alice" in lines[0]["identity"], lines
        await wait_until(lambda: len(tun.relays) == 1)
        snapshot = await ServerSource(tun.server).snapshot()  # type: ignore[attr-defined]
        assert 'tlsgate_rechecked_closed_total{tunnel="127.0.0.1:' in prometheus_text(snapshot, "tlsgate")
        assert 'rule="crl"} 1' in prometheus_text(snapshot, "tlsgate")
        # A later reload with nothing new closes nothing more.
        assert tun.server.reload()  # type: ignore[attr-defined]
        assert await echoes(bob)
        assert tun.stats.rechecked_closed == {"crl": 1}
        await close(bob)


@pytest.mark.asyncio
async def test_a_resumed_session_is_rechecked_with_its_certificate_too(pki: Pki) -> None:
    """A resumed session brings the leaf only (no new verification); the re-check still finds alice's certificate
    and her CRL entry. Blocking client sockets on a thread: asyncio has no way to offer a session."""
    async with backend() as be, tunnel(target=be.address, **pki.options) as tun:
        ctx, port = pki.contexts["alice"], port_of(tun)

        def first_session() -> ssl.SSLSession | None:
            with _tls(port, ctx) as tls:
                assert _echoes(tls)  # the TLS 1.3 ticket arrives with the first read
                return tls.session

        session = await asyncio.to_thread(first_session)
        assert session is not None
        resumed = await asyncio.to_thread(_tls, port, ctx, session)
        with _closing([resumed]):
            assert resumed.session_reused
            assert await asyncio.to_thread(_echoes, resumed)
            pki.revoke("alice")
            assert tun.server.reload()  # type: ignore[attr-defined]
            assert await asyncio.to_thread(_cut, resumed)
            assert tun.stats.rechecked_closed == {"crl": 1}


# -- rules that change -----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_removed_allow_cn_closes_that_clients_connection(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with backend() as be:
        base = {**pki.options, "target": be.address, "listen": "127.0.0.1:0"}
        wanted = [tunnel_config("server", base, name="t")]
        async with file_server(wanted) as server:
            old = server.tunnels["t"]
            alice = await tls_connect(old, pki.contexts["alice"])
            bob = await tls_connect(old, pki.contexts["bob"])
            assert await echoes(alice) and await echoes(bob)

            wanted[0] = tunnel_config("server", {**base, "allow_cn": ["bob"]}, name="t")
            assert server.reload()

            await assert_cut(alice[0])
            assert await echoes(bob)  # on the retiring tunnel: it drains, it is not cut
            assert old.stats.rechecked_closed == {"identity": 1}
            lines = recheck_lines(caplog)
            assert [(line["rule"], "alice" in line["identity"]) for line in lines] == [("identity", True)], lines
            await close(bob)


@pytest.mark.asyncio
async def test_a_new_deny_from_closes_the_connections_from_that_source(pki: Pki, loopback2: str) -> None:
    async with backend() as be:
        base = {**pki.options, "target": be.address, "listen": "127.0.0.1:0"}
        wanted = [tunnel_config("server", base, name="t")]
        async with file_server(wanted) as server:
            tun = server.tunnels["t"]
            near = await tls_connect(tun, pki.contexts["alice"])
            far = await tls_connect(tun, pki.contexts["alice"], local_addr=(loopback2, 0))
            assert await echoes(near) and await echoes(far)

            wanted[0] = tunnel_config("server", {**base, "deny_from": [f"{loopback2}/32"]}, name="t")
            assert server.reload()

            await assert_cut(far[0])
            assert await echoes(near)
            assert tun.stats.rechecked_closed == {"deny-from": 1}
            await close(near)


@pytest.mark.asyncio
async def test_client_mode_rechecks_the_targets_identity_against_new_verify_rules(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    server_cert = ca.issue_cert("localhost", common_name="localhost")
    async with tls_backend(server_cert) as be:
        base = {"target": f"localhost:{be.port}", "listen": "127.0.0.1:0", "cacert": str(pki_files["ca"])}
        wanted = [tunnel_config("client", {**base, "verify_cn": ["localhost"]}, name="c")]
        async with file_server(wanted) as server:
            tun = server.tunnels["c"]
            stream = await asyncio.open_connection("127.0.0.1", port_of(tun))
            assert await echoes(stream)

            # Still allowed under the new rules: carries on, on the retiring tunnel.
            wanted[0] = tunnel_config("client", {**base, "verify_cn": ["localhost", "other"]}, name="c")
            assert server.reload()
            assert await echoes(stream)
            assert tun.stats.rechecked_closed == {}

            wanted[0] = tunnel_config("client", {**base, "verify_cn": ["someone-else"]}, name="c")
            assert server.reload()
            await assert_cut(stream[0])
            assert tun.stats.rechecked_closed == {"identity": 1}


# -- when nothing is closed ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_recheck_on_reload_false_keeps_every_connection(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with backend() as be, tunnel(target=be.address, recheck_on_reload=False, **pki.options) as tun:
        alice = await tls_connect(tun, pki.contexts["alice"])
        bob = await tls_connect(tun, pki.contexts["bob"])
        pki.revoke("alice")
        assert tun.server.reload()  # type: ignore[attr-defined]
        assert await echoes(alice) and await echoes(bob)
        assert tun.stats.rechecked_closed == {}
        assert recheck_lines(caplog) == []
        # New connections still get the new CRL.
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            late = await tls_connect(tun, pki.contexts["alice"])
            await echoes(late)
        await close(alice, bob)


@pytest.mark.asyncio
async def test_a_failed_reload_closes_nothing(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async with backend() as be, tunnel(target=be.address, **pki.options) as tun:
        alice = await tls_connect(tun, pki.contexts["alice"])
        pki.revoke("alice")
        cert = Path(pki.options["cert"][0])
        good = cert.read_bytes()
        cert.write_bytes(b"not a certificate")
        assert not tun.server.reload()  # type: ignore[attr-defined]
        assert await echoes(alice)
        assert tun.stats.rechecked_closed == {} and recheck_lines(caplog) == []

        cert.write_bytes(good)  # the same revocation, now in a reload that succeeds
        assert tun.server.reload()  # type: ignore[attr-defined]
        await assert_cut(alice[0])
        assert tun.stats.rechecked_closed == {"crl": 1}


@pytest.mark.asyncio
async def test_a_failed_config_file_reload_closes_nothing(pki: Pki) -> None:
    async with backend() as be:
        base = {**pki.options, "target": be.address, "listen": "127.0.0.1:0"}
        wanted = [tunnel_config("server", base, name="t")]
        async with file_server(wanted) as server:
            tun = server.tunnels["t"]
            alice = await tls_connect(tun, pki.contexts["alice"])
            wanted[0] = tunnel_config("server", {**base, "allow_cn": ["bob"]}, name="t")
            pki.crl.write_bytes(b"not a CRL")
            assert not server.reload()
            assert server.tunnels["t"] is tun
            assert await echoes(alice)
            assert tun.stats.rechecked_closed == {}
            await close(alice)


# -- the setting -----------------------------------------------------------------------------------------------


def _params(mode: str, *extra: str) -> dict[str, Any]:
    command = cli.commands[mode]
    assert isinstance(command, click.Command)
    ctx = command.make_context(mode, ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", *extra])
    return dict(ctx.params)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), True),
        (("--recheck-on-reload",), True),
        (("--recheck-on-reload=true",), True),
        (("--recheck-on-reload=false",), False),
        (("--recheck-on-reload", "false"), False),
        (("--recheck-on-reload=no",), False),
    ],
)
@pytest.mark.parametrize("mode", ["server", "client"])
def test_recheck_on_reload_is_on_unless_set_to_false(mode: str, argv: tuple[str, ...], expected: bool) -> None:
    params = _params(mode, *argv)
    # Absent stays None, so that TunnelConfig's default (or a file's key) decides.
    assert params["recheck_on_reload"] is (expected if argv else None)
    options = {k: v for k, v in params.items() if k in ("listen", "target", "recheck_on_reload")}
    assert tunnel_config("client", options).recheck_on_reload is expected


def test_recheck_on_reload_with_a_bad_value_is_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(
        cli, ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--recheck-on-reload=maybe"]
    )
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, output
    assert "Traceback" not in output and "maybe" in output
    assert result.output.count("tlsgate: error:") == 1 and "'maybe' is not a valid boolean" in output, output


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("true", True)])
def test_recheck_on_reload_as_a_file_key(
    tmp_path: Path, pki_files: dict[str, Path], value: str, expected: bool
) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        f"""
[[tunnel]]
name = "web"
mode = "server"
listen = "127.0.0.1:0"
target = "127.0.0.1:1"
cert = "{pki_files["cert"]}"
key = "{pki_files["key"]}"
cacert = "{pki_files["ca"]}"
allow-cn = ["alice"]
recheck-on-reload = {value}
"""
    )
    result = read_config_file(str(path))
    assert not result.problems, result.problems
    assert [cfg.recheck_on_reload for cfg in result.tunnels] == [expected]


def test_recheck_on_reload_file_key_must_be_a_boolean(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        f"""
[[tunnel]]
name = "web"
mode = "server"
listen = "127.0.0.1:0"
target = "127.0.0.1:1"
cert = "{pki_files["cert"]}"
key = "{pki_files["key"]}"
cacert = "{pki_files["ca"]}"
allow-cn = ["alice"]
recheck-on-reload = "false"
"""
    )
    problems = read_config_file(str(path)).problems
    assert any("recheck-on-reload" in p and "true or false" in p for p in problems), problems


# -- workers ---------------------------------------------------------------------------------------------------


def _tls(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    return ctx.wrap_socket(raw, server_hostname="localhost", session=session)


def _echoes(tls: ssl.SSLSocket, payload: bytes = b"ping") -> bool:
    tls.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = tls.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == payload


def _cut(tls: ssl.SSLSocket) -> bool:
    try:
        return tls.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


@contextlib.contextmanager
def _closing(socks: list[ssl.SSLSocket]) -> Iterator[None]:
    try:
        yield
    finally:
        for sock in socks:
            sock.close()


def test_with_two_workers_each_worker_rechecks_its_own_connections(tmp_path: Path, pki: Pki) -> None:
    o = pki.options
    args = [
        "server", "--listen", "127.0.0.1:0", "--target", "", "--cert", o["cert"][0], "--key", o["key"][0],
        "--cacert", o["cacert"], "--allow-cn", "alice", "--allow-cn", "bob", "--crl", o["crl"][0], "--workers", "2",
    ]  # fmt: skip
    with threaded_echo_server() as target:
        args[args.index("--target") + 1] = target
        with _tlsgate(*args, log=tmp_path / "tlsgate.log") as gate:
            gate.wait_ready(2)
            port = gate.port
            # Eight of each: SO_REUSEPORT spreads them over the workers by source port, so each worker holds some.
            alices = [_tls(port, pki.contexts["alice"]) for _ in range(8)]
            bobs = [_tls(port, pki.contexts["bob"]) for _ in range(8)]
            with _closing(alices + bobs):
                assert all(_echoes(s) for s in alices + bobs)
                eventually("16 open", lambda: gate.metric("tlsgate.conn.open") == 16)
                pki.revoke("alice")
                gate.proc.send_signal(signal.SIGHUP)
                eventually("both workers reloaded", lambda: gate.metric("tlsgate.reload.total") == 2)
                eventually("alice's 8 closed", lambda: gate.metric("tlsgate.conn.rechecked_closed.crl") == 8)
                assert all(_cut(s) for s in alices)
                assert all(_echoes(s) for s in bobs)
                assert gate.log().count("closed on recheck") == 8, gate.log()


@contextlib.contextmanager
def _tlsgate(*args: str, log: Path) -> Iterator[WorkersProcess]:
    gate = WorkersProcess(list(args), log)
    try:
        yield gate
    finally:
        gate.stop()


@contextlib.asynccontextmanager
async def tls_backend(cert: trustme.LeafCert) -> AsyncIterator[Backend]:
    """An echoing TLS server standing in for the service a client-mode tunnel reaches."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    async with backend(ssl_ctx=ctx) as be:
        yield be
