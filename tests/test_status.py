"""--status: /_status, /_metrics and /metrics, served in-process next to real tunnels on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner

import tlsgate.status.exposition
from tlsgate.cli import cli
from tlsgate.errors import ConfigError
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import tunnel_config
from tlsgate.status import (
    Snapshot,
    TunnelView,
    json_metrics,
    merge_views,
    parse_status_address,
    prometheus_name,
    prometheus_text,
)

from helpers import (
    assert_cut,
    backend,
    client_context,
    request,
    reserved_port,
    running_server,
    server_opts,
    status_address,
    wait_until,
)

GHOSTUNNEL_FIELDS = {
    "ok",
    "status",
    "listen_address",
    "forward_address",
    "backend_ok",
    "backend_status",
    "backend_error",
    "time",
    "hostname",
    "message",
    "revision",
    "last_reload",
}


@contextlib.asynccontextmanager
async def running(
    *tunnels: dict[str, Any], status: str = "http://127.0.0.1:0", prefix: str = "tlsgate", mode: str = "server"
) -> AsyncIterator[Server]:
    """A Server with these tunnels (each on 127.0.0.1:0) and its status port, through Server.serve()."""
    configs = []
    for options in tunnels:
        opts = {"listen": "127.0.0.1:0", **options}
        name = str(opts.pop("name", ""))
        configs.append(tunnel_config(mode, opts, name=name))
    async with running_server(Server(configs, ProcessOptions(status=status, metrics_prefix=prefix))) as server:
        yield server


def tunnel_port(server: Server, index: int = 0) -> int:
    tun = list(server.tunnels.values())[index]
    return int(tun.addresses[0].rsplit(":", 1)[1])


async def get_json(address: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    code, headers, body = await request(address, path, **kwargs)
    assert headers["content-type"] == "application/json"
    return code, json.loads(body)


async def echo_once(server: Server, ctx: ssl.SSLContext, index: int = 0) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", tunnel_port(server, index), ssl=ctx, server_hostname="localhost"
    )
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    await writer.wait_closed()


async def refused_once(server: Server, ctx: ssl.SSLContext) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", tunnel_port(server), ssl=ctx, server_hostname="localhost"
        )
        try:
            writer.write(b"x")  # TLS 1.3: a refused certificate shows only on the first read
            await assert_cut(reader)
            raise ConnectionError("cut")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


# -- /_status ------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_status_is_ok_with_ghostunnel_fields_when_the_backend_answers(pki_files: dict[str, Path]) -> None:
    async with backend() as be, running(server_opts(pki_files, be.address, allow_all=True)) as server:
        code, headers, body = await request(status_address(server), "/_status")
        doc = json.loads(body)
        port, target = tunnel_port(server), be.address
    assert code == 200
    assert headers["connection"] == "close"
    assert set(doc) >= GHOSTUNNEL_FIELDS
    assert doc["ok"] is True and doc["status"] == "ok"
    assert doc["backend_ok"] is True and doc["backend_status"] == "ok" and doc["backend_error"] == ""
    assert doc["message"] == "listening"
    assert doc["listen_address"] == f"127.0.0.1:{port}"
    assert doc["forward_address"] == target
    assert "tunnels" not in doc  # one tunnel: exactly ghostunnel's shape


@pytest.mark.asyncio
async def test_status_is_503_when_the_backend_is_down(pki_files: dict[str, Path], dead_port: int) -> None:
    dead = f"127.0.0.1:{dead_port}"
    async with running(server_opts(pki_files, dead, allow_all=True)) as server:
        code, doc = await get_json(status_address(server), "/_status")
    assert code == 503
    assert doc["ok"] is False and doc["status"] == "critical"
    assert doc["backend_ok"] is False and doc["backend_status"] == "critical"
    assert doc["backend_error"] == f"{dead}: Connection refused"


@pytest.mark.asyncio
async def test_status_checks_a_unix_socket_target(pki_files: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "backend.sock"
    async with running(server_opts(pki_files, f"unix:{path}", allow_all=True)) as server:
        code, doc = await get_json(status_address(server), "/_status")
        assert code == 503 and "No such file" in doc["backend_error"]

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        unix_backend = await asyncio.start_unix_server(hang_up, str(path))
        try:
            code, doc = await get_json(status_address(server), "/_status")
        finally:
            unix_backend.close()
            await unix_backend.wait_closed()
    assert code == 200 and doc["backend_ok"] is True


@pytest.mark.asyncio
async def test_several_tunnels_are_listed_and_one_dead_backend_makes_status_critical(
    pki_files: dict[str, Path], dead_port: int
) -> None:
    dead = f"127.0.0.1:{dead_port}"
    async with (
        backend() as be,
        running(
            server_opts(pki_files, be.address, allow_all=True, name="web"),
            server_opts(pki_files, dead, allow_all=True, name="db"),
        ) as server,
    ):
        code, doc = await get_json(status_address(server), "/_status")
        target = be.address
    assert code == 503
    assert doc["forward_address"] == target  # the first tunnel, as ghostunnel would report it
    assert doc["backend_error"] == f"tunnel db: {dead}: Connection refused"
    assert [(t["name"], t["backend_ok"]) for t in doc["tunnels"]] == [("web", True), ("db", False)]


# -- metrics -------------------------------------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? (\S+)$')


def parse_exposition(text: str) -> dict[str, float]:
    """Check the text format (HELP and TYPE before a family's samples) and return {sample with labels: value}."""
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "summary", "histogram")
            typed[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, line
        name = match.group(1)
        family = re.sub(r"_(sum|count|bucket)$", "", name)
        assert name in typed or family in typed, line
        samples[line.rsplit(" ", 1)[0]] = float(match.group(5))
    return samples


@pytest.mark.asyncio
async def test_metrics_count_traffic_and_refusals_by_rule(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    alice = ca.issue_cert("alice.test", common_name="alice")
    bob = ca.issue_cert("bob.test", common_name="bob")
    async with backend() as be, running(server_opts(pki_files, be.address, allow_cn=["alice"])) as server:
        tun = next(iter(server.tunnels.values()))
        await echo_once(server, client_context(ca, alice))
        await refused_once(server, client_context(ca, bob))
        await wait_until(lambda: tun.stats.closed == 1 and sum(tun.stats.refused.values()) == 1 and not tun.active)
        code, headers, body = await request(status_address(server), "/metrics")
        _, entries = await get_json(status_address(server), "/_metrics")
        label = f'tunnel="127.0.0.1:{tunnel_port(server)}"'
    assert code == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse_exposition(body.decode())
    expected = {
        f"tlsgate_connections_open{{{label}}}": 0,
        f"tlsgate_connections_accepted_total{{{label}}}": 2,
        f"tlsgate_connections_established_total{{{label}}}": 1,
        f"tlsgate_connections_closed_total{{{label}}}": 1,
        f'tlsgate_connections_refused_total{{{label},rule="identity"}}': 1,
        f"tlsgate_received_bytes_total{{{label}}}": 4,
        f"tlsgate_sent_bytes_total{{{label}}}": 4,
        # bob is refused inside his handshake (a TLS alert), so only alice's handshake completed.
        f"tlsgate_handshake_duration_seconds_count{{{label}}}": 1,
        f"tlsgate_connection_duration_seconds_count{{{label}}}": 1,
        f"tlsgate_target_errors_total{{{label}}}": 0,
        f"tlsgate_reloads_total{{{label}}}": 0,
    }
    assert {key: samples.get(key) for key in expected} == expected
    assert samples[f"tlsgate_handshake_duration_seconds_sum{{{label}}}"] > 0
    assert samples[f"tlsgate_certificate_expiry_timestamp_seconds{{{label}}}"] > 0

    by_name = {entry["metric"]: entry["value"] for entry in entries}
    assert all(set(entry) >= {"metric", "value"} for entry in entries)
    assert by_name["tlsgate.accept.total"] == 2
    assert by_name["tlsgate.accept.success"] == 1
    assert by_name["tlsgate.accept.refused.identity"] == 1
    assert by_name["tlsgate.conn.open"] == 0


@pytest.mark.asyncio
async def test_metrics_prefix_and_open_connections_with_their_bytes(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with (
        backend() as be,
        running(server_opts(pki_files, be.address, allow_all=True), prefix="edge-proxy") as server,
    ):
        alice = ca.issue_cert("alice.test", common_name="alice")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", tunnel_port(server), ssl=client_context(ca, alice), server_hostname="localhost"
        )
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        _, _, body = await request(status_address(server), "/metrics")
        _, entries = await get_json(status_address(server), "/_metrics")
        label = f'tunnel="127.0.0.1:{tunnel_port(server)}"'
        writer.close()
        await writer.wait_closed()
    samples = parse_exposition(body.decode())
    # The connection is still open: it is counted, and so are the bytes it has carried so far.
    assert samples[f"edge_proxy_connections_open{{{label}}}"] == 1
    assert samples[f"edge_proxy_received_bytes_total{{{label}}}"] == 5
    assert {e["metric"]: e["value"] for e in entries}["edge-proxy.conn.open"] == 1


@pytest.mark.asyncio
async def test_unknown_path_is_404_and_other_methods_are_405(pki_files: dict[str, Path]) -> None:
    async with backend() as be, running(server_opts(pki_files, be.address, allow_all=True)) as server:
        address = status_address(server)
        not_found, _, _ = await request(address, "/nope")
        post, post_headers, _ = await request(address, "/_status", method="POST")
        head, head_headers, head_body = await request(address, "/metrics", method="HEAD")
        bad, _, _ = await request(address, "", raw=b"nonsense\r\n\r\n")
        huge, _, _ = await request(address, "", raw=b"GET /_status HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        query, _, _ = await request(address, "/_status?verbose=1")
    assert not_found == 404
    assert post == 405 and post_headers["allow"] == "GET, HEAD"
    assert head == 200 and head_body == b"" and int(head_headers["content-length"]) > 0
    assert bad == 400
    assert huge == 431
    assert query == 200


# -- where the status port listens ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_bare_host_port_serves_https_with_the_server_certificate_and_no_client_cert(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    # The tunnel itself demands client certificates; a load balancer's probe has none and must still get in.
    async with (
        backend() as be,
        running(server_opts(pki_files, be.address, allow_cn=["alice"]), status="127.0.0.1:0") as server,
    ):
        code, doc = await get_json(status_address(server), "/_status", ssl_ctx=client_context(ca))
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError)):
            await request(status_address(server), "/_status")  # plain HTTP to a TLS port gets nothing useful
    assert code == 200 and doc["ok"] is True


@pytest.mark.asyncio
async def test_https_status_serves_the_reloaded_certificate(
    pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    async with (
        backend() as be,
        running(server_opts(pki_files, be.address, allow_all=True), status="https://127.0.0.1:0") as server,
    ):
        host, port = status_address(server).rsplit(":", 1)

        async def served_certificate() -> bytes:
            _, writer = await asyncio.open_connection(
                host, int(port), ssl=client_context(ca), server_hostname="localhost"
            )
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            return bytes(der)

        before = await served_certificate()
        renewed = ca.issue_cert("localhost", "127.0.0.1")
        renewed.cert_chain_pems[0].write_to_path(str(pki_files["cert"]))
        renewed.private_key_pem.write_to_path(str(pki_files["key"]))
        assert server.reload()
        after = await served_certificate()
    assert before != after
    assert after == ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())


@pytest.mark.asyncio
async def test_client_mode_without_server_certificate_falls_back_to_http_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    opts = {"target": "127.0.0.1:1", "disable_authentication": True}
    async with running(opts, status="127.0.0.1:0", mode="client") as server:
        code, _, _ = await request(status_address(server), "/_status")
    assert code == 503  # nothing listens on the target
    assert any("plain HTTP" in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)


@pytest.mark.asyncio
async def test_https_scheme_without_server_certificate_is_a_startup_error() -> None:
    # A ConfigError since issue #13 (13d): judged with the other settings, before any tunnel binds.
    with pytest.raises(ConfigError, match="no server certificate"):
        async with running(
            {"target": "127.0.0.1:1", "disable_authentication": True}, status="https://127.0.0.1:0", mode="client"
        ):
            pass


@pytest.mark.asyncio
async def test_status_on_a_unix_socket_is_removed_on_shutdown(pki_files: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    async with (
        backend() as be,
        running(server_opts(pki_files, be.address, allow_all=True), status=f"unix:{path}") as server,
    ):
        assert status_address(server) == f"unix:{path}"
        code, doc = await get_json(f"unix:{path}", "/_status")
        assert code == 200 and doc["ok"] is True
    assert not path.exists()


def start_with_status_port_in_use(pki_files: dict[str, Path], workers: str) -> tuple[int, int, str, bool]:
    """Run the CLI with --status on a taken port: (that port, exit code, output, tunnel port free again?)."""
    with reserved_port() as listen, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            cli,
            [
                "server",
                "--listen", f"127.0.0.1:{listen}",
                "--target", "127.0.0.1:1",
                "--cert", str(pki_files["cert"]),
                "--key", str(pki_files["key"]),
                "--cacert", str(pki_files["ca"]),
                "--allow-all",
                "--status", f"127.0.0.1:{port}",
                "--workers", workers,
                # asyncio's loop lets go of the signal handlers when it closes, so whatever the failed start
                # left behind can be collected below rather than at the end of the session.
                "--loop", "asyncio",
            ],
        )  # fmt: skip
    code, output = result.exit_code, result.output  # click mixes stderr into output
    # While the result (and the traceback in it) lives, a listener the failed start left open is still open.
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", listen))
            freed = True
        except OSError:
            freed = False
    del result
    gc.collect()  # a listener leaked by a failed start would warn here, and warnings are errors
    return port, code, output, freed


@pytest.mark.parametrize("workers", ["1", "2"])
def test_status_port_in_use_exits_2_with_one_line(pki_files: dict[str, Path], workers: str) -> None:
    port, code, output, freed = start_with_status_port_in_use(pki_files, workers)
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("tlsgate: error:")]
    # Worded as a --listen port in use is: the status port is bound by the same code.
    assert errors == [
        f"tlsgate: error: --status 127.0.0.1:{port}: cannot listen (127.0.0.1:{port}: Address already in use)"
    ]
    assert "Traceback" not in output
    if workers == "2":
        assert freed  # the parent let go of the port it had reserved for the workers


def test_status_port_in_use_leaves_no_listener_open(pki_files: dict[str, Path]) -> None:
    *_, freed = start_with_status_port_in_use(pki_files, "1")
    assert freed


# -- the pieces, with plain values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "https", "bare"),
    [
        ("http://127.0.0.1:8080", False, False),
        ("https://127.0.0.1:8080/", True, False),
        ("127.0.0.1:8080", False, True),
        ("unix:/run/tlsgate/status.sock", False, False),
    ],
)
def test_status_address_forms(text: str, https: bool, bare: bool) -> None:
    where = parse_status_address(text)
    assert (where.https, where.https_if_possible) == (https, bare)


@pytest.mark.parametrize("text", ["ftp://127.0.0.1:21", "http://127.0.0.1:80/status", "http://nope", "127.0.0.1"])
def test_bad_status_addresses_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--status"):
        parse_status_address(text)


def view(key: str, **counters: float) -> TunnelView:
    return TunnelView(key=key, label=key, mode="server", listen=[key], target="127.0.0.1:1", counters=dict(counters))


def test_views_of_the_same_tunnel_from_several_workers_add_up() -> None:
    a = view("t", accepted=2, bytes_in=10)
    a.refused = {"identity": 1}
    a.open = 1
    b = view("t", accepted=3, bytes_in=5)
    b.refused = {"identity": 2, "deny-from": 1}
    b.open = 2
    merged = merge_views([[a, view("u", accepted=1)], [b]])
    assert [m.key for m in merged] == ["t", "u"]
    assert merged[0].counters == {"accepted": 5, "bytes_in": 15}
    assert merged[0].refused == {"identity": 3, "deny-from": 1}
    assert merged[0].open == 3
    assert a.counters == {"accepted": 2, "bytes_in": 10}  # inputs untouched


def test_prometheus_text_escapes_label_values_and_sanitises_the_prefix() -> None:
    weird = view('a "quoted"\\name\n', accepted=1)
    text = prometheus_text(Snapshot([weird], "listening"), "my.prefix")
    assert 'my_prefix_connections_accepted_total{tunnel="a \\"quoted\\"\\\\name\\n"} 1' in text
    parse_exposition(text)
    assert prometheus_name("9lives") == "_9lives"


def test_json_metrics_name_each_entry_after_its_tunnel() -> None:
    entries = json_metrics(Snapshot([view("a", accepted=1), view("b", accepted=2)], "listening"), "tlsgate")
    accepted = [(e["tunnel"], e["value"]) for e in entries if e["metric"] == "tlsgate.accept.total"]
    assert accepted == [("a", 1), ("b", 2)]


def test_handshake_latency_is_a_histogram_when_stats_count_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlsgate.status.exposition, "HANDSHAKE_BUCKETS", (0.01, 0.1, 1.0))
    fast = view("t", handshakes=4, handshake_seconds_total=2.5)
    fast.handshake_buckets = [1, 2, 0]  # the fourth took longer than 1s: only in +Inf
    text = prometheus_text(Snapshot([fast], "listening"), "tlsgate")
    samples = parse_exposition(text)
    assert "# TYPE tlsgate_handshake_duration_seconds histogram" in text
    buckets = {
        le: samples[f'tlsgate_handshake_duration_seconds_bucket{{tunnel="t",le="{le}"}}']
        for le in ("0.01", "0.1", "1", "+Inf")
    }
    assert buckets == {"0.01": 1, "0.1": 3, "1": 3, "+Inf": 4}
    assert samples['tlsgate_handshake_duration_seconds_sum{tunnel="t"}'] == 2.5
    assert samples['tlsgate_handshake_duration_seconds_count{tunnel="t"}'] == 4
