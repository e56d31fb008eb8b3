"""tlsgate run / check-config: many tunnels from one TOML file, every problem reported at once, and reloads that
replace changed tunnels while unchanged ones keep their connections."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import json
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import click
import pytest
import trustme
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.serialization import Encoding

from tlsgate.cli.run import check_config, run
from tlsgate.cli.support import TlsgateGroup
from tlsgate.pki import CertificateAuthority
from tlsgate.process.check import load_tunnels
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.addresses import Address
from tlsgate.settings.config import ConfigErrors
from tlsgate.settings.file import load_config_file, read_config_file

from helpers import STATUS_LISTENING, backend, client_context, eventually, exchange, reserved_port, running_server

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
DEADLINE = 30.0


@click.group(cls=TlsgateGroup)
def cli() -> None:
    """The two commands under test, in the group class of tlsgate's own command line."""


cli.add_command(run)
cli.add_command(check_config)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def toml_value(value: object) -> str:
    # JSON strings, numbers, booleans and arrays of them are valid TOML values.
    return json.dumps(value)


# A server tunnel that validates, with the test PKI's files named relative to the config file (pki_files sits
# next to it in tmp_path).
SERVER: dict[str, object] = {
    "mode": "server",
    "listen": "127.0.0.1:0",
    "target": "127.0.0.1:1",
    "cert": "server.pem",
    "key": "server.key",
    "cacert": "ca.pem",
    "allow-cn": "alice",
}


def block(name: str | None, **keys: object) -> str:
    """One [[tunnel]] table: SERVER's keys, overridden by ``keys`` (None leaves a key out)."""
    lines = ["[[tunnel]]"]
    if name is not None:
        lines.append(f"name = {toml_value(name)}")
    merged = {**SERVER, **{k.replace("_", "-"): v for k, v in keys.items()}}
    lines += [f"{key} = {toml_value(value)}" for key, value in merged.items() if value is not None]
    return "\n".join(lines) + "\n"


def error_lines(result: Result) -> list[str]:
    return result.stderr.splitlines()


# -- every problem at once ---------------------------------------------------------------------------------------

BAD_FILES: dict[str, tuple[str, list[str]]] = {
    "toml syntax, with line and column": (
        '[[tunnel]]\nname = "a"\nmode = \n',
        ["tlsgate.toml: line 3, column 8: invalid value"],
    ),
    "no tunnels": (
        "[process]\nworkers = 2\n",
        ["tlsgate.toml: no [[tunnel]] tables: nothing to run"],
    ),
    "[tunnel] instead of [[tunnel]]": (
        '[tunnel]\nname = "a"\n',
        ["tunnel: write [[tunnel]] (double brackets) for each tunnel, not [tunnel]"],
    ),
    "unknown keys, with suggestions": (
        "[tunnels]\n" + block("a", tagret="127.0.0.1:2", colour="blue"),
        [
            "tlsgate.toml: unknown top-level key 'tunnels' (did you mean [[tunnel]]?)",
            "tunnel 'a': unknown key 'tagret' (did you mean 'target'?)",
            "tunnel 'a': unknown key 'colour'",
        ],
    ),
    "keys in the wrong section": (
        '[process]\nlisten = "127.0.0.1:1"\n[defaults]\nname = "x"\nloop = "asyncio"\n' + block("a", workers=2),
        [
            "process: 'listen' is a tunnel setting: put it under a [[tunnel]], or [defaults] for every tunnel",
            "defaults: name cannot have a default: each [[tunnel]] needs its own",
            "defaults: 'loop' is a process setting: put it under [process]",
            "tunnel 'a': 'workers' is a process setting: put it under [process]",
        ],
    ),
    "wrong types and values in [process]": (
        '[process]\nworkers = 0\nlog-format = "xml"\nquiet = ["conns", "loud"]\nloop = 3\n'
        'metrics-prefix = "my-app"\nstatus = "127.0.0.1:99999"\n' + block("a"),
        [
            "process: workers: 0 out of range (1-256)",
            "process: log-format: expected one of 'text', 'json', got 'xml'",
            "process: quiet: 'loud' is not one of 'conns', 'conn-errs', 'handshake-errs', 'all'",
            "process: loop: expected one of 'auto', 'uvloop', 'asyncio', got 3",
            "process: metrics-prefix: 'my-app' is not a metric name (letters, digits, _ and :)",
            "process: status: port 99999 out of range (0-65535)",
        ],
    ),
    "wrong types in a tunnel": (
        block("a", unsafe_listen="yes", max_concurrent_conns=-1, idle_timeout=True, allow_cn=["alice", 3]),
        [
            "tunnel 'a': allow-cn: expected a string or a list of strings, got ['alice', 3]",
            "tunnel 'a': unsafe-listen: expected true or false, got 'yes'",
            "tunnel 'a': max-concurrent-conns: -1 out of range (0-10000000)",
            "tunnel 'a': idle-timeout: expected a duration like 10s, got True",
        ],
    ),
    "missing or bad name and mode": (
        block(None) + block("b", mode=None) + block("c", mode="proxy") + block(5),  # type: ignore[arg-type]
        [
            "tunnel #1: name is required (logs, status and reloads know a tunnel by its name)",
            'tunnel \'b\': mode is required: "server" or "client"',
            "tunnel 'c': mode: expected \"server\" or \"client\", got 'proxy'",
            "tunnel #4: name: expected a non-empty string on one line, got 5",
        ],
    ),
    "duplicate names and listen addresses": (
        block("a", listen="127.0.0.1:7000")
        + block("a", listen="127.0.0.1:7001")
        + block("b", listen="127.0.0.1:7000")
        + block("c", listen="0.0.0.0:7001")
        + block("d", listen="localhost:7002")
        + block("e", listen="[::1]:7002"),
        [
            "tunnel 'a' (#2): tunnel #1 has the same name; names must be unique",
            "tunnel 'b': listen: 127.0.0.1:7000 is already the listen address of tunnel 'a'",
            "tunnel 'c': listen: 0.0.0.0:7001 overlaps 127.0.0.1:7001 of tunnel 'a' (#2) (same port, same interface)",
            "tunnel 'e': listen: [::1]:7002 overlaps localhost:7002 of tunnel 'd' (same port, same interface)",
        ],
    ),
    "missing files, named by their resolved path": (
        block("a", cert="missing.pem", crl=["revoked.pem"], cacert="/nonexistent/ca.pem"),
        [
            "tunnel 'a': cacert: /nonexistent/ca.pem: no such file",
            "tunnel 'a': cert: {dir}/missing.pem: no such file",
            "tunnel 'a': crl: {dir}/revoked.pem: no such file",
        ],
    ),
    "bad addresses": (
        block("redis", listen="0.0.0.0:99999", target="nowhere"),
        [
            "tunnel 'redis': listen: port 99999 out of range (0-65535)",
            "tunnel 'redis': target: 'nowhere' is not an address (use HOST:PORT or unix:PATH)",
        ],
    ),
    "rules that involve several keys": (
        block("a", allow_cn=None, listen="0.0.0.0:0", target="10.1.2.3:80")
        + block("c", mode="client", cert=None, key=None, allow_cn=None, target="127.0.0.1:443"),
        [
            "tunnel 'a': server mode needs one of allow-all, allow-cn, allow-ou, allow-dns, allow-ip, allow-uri, "
            "allow-spki-sha256, allow-spki-pin, allow-policy/allow-query, or disable-authentication",
            "tunnel 'a': target 10.1.2.3:80 is not on this machine and the hop is plaintext; use target-tls, "
            "or add unsafe-target if the network in between is trusted",
            "tunnel 'c': client mode needs a certificate: cert and key, or keystore, or disable-authentication",
        ],
    ),
    "one key spelled two ways": (
        block("a") + 'allow_cn = "bob"\n',
        ["tunnel 'a': 'allow-cn' and 'allow_cn' are the same key: give it once"],
    ),
}


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_every_problem_in_a_file_is_reported_at_once_with_exit_2(
    case: str, command: str, pki_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, expected = BAD_FILES[case]
    (tmp_path / "tlsgate.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    result = invoke(command, "tlsgate.toml")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    want = [line.format(dir=tmp_path) for line in expected]
    assert error_lines(result) == [f"tlsgate: error: {line}" for line in want]
    with pytest.raises(ConfigErrors) as raised:
        load_config_file("tlsgate.toml")
    assert raised.value.problems == want


def test_problems_from_every_tunnel_and_every_section_come_together(pki_files: dict[str, Path], tmp_path: Path) -> None:
    text = "[process]\nworkers = 0\n" + block("a", listen="127.0.0.1:99999") + block("b", colour="red") + block(None)
    (tmp_path / "tlsgate.toml").write_text(text)
    assert read_config_file(str(tmp_path / "tlsgate.toml")).problems == [
        "process: workers: 0 out of range (1-256)",
        "tunnel 'a': listen: port 99999 out of range (0-65535)",
        "tunnel 'b': unknown key 'colour'",
        "tunnel #3: name is required (logs, status and reloads know a tunnel by its name)",
    ]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "{path}: no such file"),
        (lambda p: p.mkdir(), "{path}: is a directory, expected a TOML file"),
        (
            lambda p: p.write_bytes(b'[[tunnel]]\nname = "\xff"\n'),
            "{path}: line 2: not UTF-8 text; TOML files are UTF-8",
        ),
    ],
    ids=["missing", "directory", "not utf-8"],
)
def test_a_file_that_cannot_be_read_is_one_line(make: Callable[[Path], object], expected: str, tmp_path: Path) -> None:
    path = tmp_path / "tlsgate.toml"
    make(path)
    result = invoke("check-config", str(path))
    assert result.exit_code == 2
    assert error_lines(result) == ["tlsgate: error: " + expected.format(path=path)]


def test_certificates_and_keys_are_parsed_and_their_problems_join_the_file_problems(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "garbage.key").write_text("this is not a key\n")
    text = block("a", key="garbage.key") + block("b", colour="red") + block("c")
    (tmp_path / "tlsgate.toml").write_text(text)
    result = invoke("check-config", str(tmp_path / "tlsgate.toml"))
    assert result.exit_code == 2
    lines = error_lines(result)
    assert lines[0] == "tlsgate: error: tunnel 'b': unknown key 'colour'"
    assert lines[1].startswith("tlsgate: error: tunnel 'a': ") and "garbage.key" in lines[1], lines
    assert len(lines) == 2


# -- what a good file means --------------------------------------------------------------------------------------


def test_defaults_are_merged_under_each_tunnel_and_a_tunnel_key_replaces_them(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "tlsgate.toml").write_text(
        "[defaults]\n"
        'mode = "server"\ncert = "server.pem"\nkey = "server.key"\ncacert = "ca.pem"\n'
        'allow-cn = ["alice", "bob"]\nhandshake-timeout = "3s"\ntarget = "127.0.0.1:1"\n'
        '[[tunnel]]\nname = "a"\nlisten = "127.0.0.1:0"\n'
        '[[tunnel]]\nname = "b"\nlisten = "127.0.0.1:0"\nallow_cn = "carol"\nhandshake_timeout = 5\n'
    )
    (a, b), process = load_config_file(str(tmp_path / "tlsgate.toml"))
    assert (a.name, a.mode, a.allow_cn, a.timeouts.handshake) == ("a", "server", ("alice", "bob"), 3.0)
    # Lists are replaced, not appended to: a tunnel says exactly who it admits.
    assert (b.name, b.allow_cn, b.timeouts.handshake) == ("b", ("carol",), 5.0)
    assert a.cert == b.cert == (str(pki_files["cert"]),)
    assert process == ProcessOptions(config_path=str(tmp_path / "tlsgate.toml"))


def test_process_table_sets_process_options(pki_files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tlsgate.toml").write_text(
        '[process]\nstatus = "http://127.0.0.1:9100"\nmetrics-prefix = "edge"\nworkers = 4\n'
        'log_format = "json"\nquiet = "conns"\nloop = "asyncio"\n' + block("a")
    )
    _, process = load_config_file(str(tmp_path / "tlsgate.toml"))
    assert process == ProcessOptions(
        status="http://127.0.0.1:9100",
        metrics_prefix="edge",
        workers=4,
        log_format="json",
        quiet=("conns",),
        loop="asyncio",
        config_path=str(tmp_path / "tlsgate.toml"),
    )


def test_relative_paths_are_relative_to_the_config_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "tlsgate"
    ca = CertificateAuthority.create(etc / "certs" / "ca")
    ca.issue("localhost").write(etc / "certs", "server")
    (etc / "secret.txt").write_text("hunter2\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / "extra-ca.pem").write_bytes(ca.cert_pem)
    (etc / "tlsgate.toml").write_text(
        "[[tunnel]]\n"
        'name = "a"\nmode = "server"\nlisten = "unix:run/a.sock"\ntarget = "127.0.0.1:1"\n'
        'cert = "certs/server.pem"\nkey = "./certs/../certs/server.key"\nkey-pass = "file:secret.txt"\n'
        f'cacert = "~/extra-ca.pem"\ncrl = ["{etc}/certs/ca/ca.pem"]\nallow-all = true\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(home))
    [cfg], _ = load_config_file("../etc/tlsgate/tlsgate.toml")
    assert cfg.cert == (str(etc / "certs" / "server.pem"),)
    assert cfg.key == (str(etc / "certs" / "server.key"),)
    assert cfg.key_pass == b"hunter2"
    assert cfg.cacert == str(home / "extra-ca.pem")
    assert cfg.crl == (str(etc / "certs" / "ca" / "ca.pem"),)
    assert cfg.listen == Address(path=str(etc / "run" / "a.sock"))


def test_port_0_may_appear_in_many_tunnels(pki_files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tlsgate.toml").write_text(block("a") + block("b") + block("c", listen="localhost:0"))
    configs, _ = load_config_file(str(tmp_path / "tlsgate.toml"))
    assert [c.name for c in configs] == ["a", "b", "c"]


def test_alpn_takes_the_flags_comma_separated_form_or_a_list(pki_files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tlsgate.toml").write_text(block("a", alpn="h2, http/1.1") + block("b", alpn=["http/1.1"]))
    a, b = load_config_file(str(tmp_path / "tlsgate.toml"))[0]
    assert (a.alpn, b.alpn) == (("h2", "http/1.1"), ("http/1.1",))


def test_check_config_prints_a_one_line_summary(pki_files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tlsgate.toml").write_text(
        block("api", listen="127.0.0.1:8443", target="127.0.0.1:8080", allow_cn=None, allow_ou="eng")
        + 'allow-from = "10.0.0.0/8"\n'
        + block(
            "out",
            mode="client",
            listen="127.0.0.1:9091",
            target="127.0.0.1:9443",
            cert=None,
            key=None,
            allow_cn=None,
            disable_authentication=True,
            verify_cn="api",
        )
    )
    result = invoke("check-config", str(tmp_path / "tlsgate.toml"))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout == (
        "ok: 2 tunnels: api (server 127.0.0.1:8443 -> 127.0.0.1:8080, mTLS allow-ou eng, allow-from 10.0.0.0/8), "
        "out (client 127.0.0.1:9091 -> 127.0.0.1:9443, TLS verify-cn api)\n"
    )


# -- the shipped examples ----------------------------------------------------------------------------------------


def make_certificates_for(example: Path, directory: Path) -> None:
    """Every file under certs/ that the example names: a CA in certs/ca, a CRL, and a leaf per other name."""
    doc = tomllib.loads(example.read_text())
    ca = CertificateAuthority.create(directory / "certs" / "ca")
    named: set[str] = set()
    for table in [doc.get("defaults", {}), *doc.get("tunnel", [])]:
        for key in ("cert", "key", "cacert", "crl", "target-cacert", "target-cert", "target-key"):
            value = table.get(key, [])
            named.update([value] if isinstance(value, str) else value)
    for name in sorted(named):
        assert name.startswith("certs/"), f"{example.name}: {name} is not under certs/ as the docs promise"
        if name == "certs/ca/ca.pem":
            continue
        stem = Path(name).stem
        if stem == "crl":
            (directory / name).write_bytes(ca.build_crl().public_bytes(Encoding.PEM))
        elif not (directory / "certs" / f"{stem}.pem").exists():
            ca.issue(stem, client=True).write(directory / "certs", stem)


def test_the_examples_the_docs_promise_are_there() -> None:
    names = {p.name for p in EXAMPLES.glob("*.toml")}
    assert {"wrap-redis.toml", "mtls-gateway.toml", "dev-front.toml", "multi-tunnel.toml"} <= names


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_each_example_passes_check_config(example: Path, tmp_path: Path) -> None:
    make_certificates_for(example, tmp_path)
    copy = tmp_path / example.name
    copy.write_text(example.read_text())
    result = invoke("check-config", str(copy))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: "), result.stdout


# -- reloading the file ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(path: Path) -> AsyncIterator[Server]:
    """The tunnels of ``path`` in this event loop, as `tlsgate run` starts them (reload re-reads the file)."""
    configs, process = load_config_file(str(path))
    reload = functools.partial(load_tunnels, str(path), process)
    async with running_server(Server(configs, process, load_configs=reload)) as server:
        yield server


def port_of(server: Server, name: str) -> int:
    return int(server.tunnels[name].addresses[0].rsplit(":", 1)[1])


async def refuses(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def eventually_refused(port: int, attempts: int = 1000) -> None:
    for _ in range(attempts):
        if await refuses(port):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"port {port} still accepts")


@pytest.fixture
def alice(ca: trustme.CA) -> ssl.SSLContext:
    return client_context(ca, ca.issue_cert("alice.test", common_name="alice"))


@pytest.mark.asyncio
async def test_reload_replaces_changed_tunnels_starts_added_stops_removed_and_keeps_connections(
    pki_files: dict[str, Path], tmp_path: Path, alice: ssl.SSLContext
) -> None:
    path = tmp_path / "tlsgate.toml"
    async with backend() as old, backend() as new:
        path.write_text(
            block("a", target=old.address) + block("b", target=old.address) + block("d", target=old.address)
        )
        async with serving(path) as server:
            tunnel_a = server.tunnels["a"]
            port_b, port_d = port_of(server, "b"), port_of(server, "d")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port_of(server, "a"), ssl=alice, server_hostname="localhost"
            )
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"

            path.write_text(
                block("a", target=old.address) + block("b", target=new.address) + block("c", target=old.address)
            )
            assert server.reload() is True

            assert server.tunnels["a"] is tunnel_a  # unchanged: the same listener, the same connections
            writer.write(b"after")
            assert await reader.readexactly(5) == b"after"
            # b kept its port (the listening socket was handed over) and now forwards to the new target.
            assert port_of(server, "b") == port_b
            assert await exchange(port_b, alice) == b"ping"
            assert new.connections == 1
            assert await exchange(port_of(server, "c"), alice) == b"ping"
            assert "d" not in server.tunnels
            await eventually_refused(port_d)
            assert old.connections == 2  # a's long connection and c's; none went through d or the new b

            writer.close()
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_a_broken_file_on_reload_keeps_every_tunnel_running_and_logs_every_problem(
    pki_files: dict[str, Path], tmp_path: Path, alice: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tlsgate.toml"
    async with backend() as be:
        path.write_text(block("a", target=be.address) + block("b", target=be.address))
        async with serving(path) as server:
            before = dict(server.tunnels)
            (tmp_path / "garbage.key").write_text("not a key\n")
            path.write_text(
                block("a", target="127.0.0.1:99999")
                + block("b", target=be.address, colour="red")
                + block("c", key="garbage.key")
            )
            assert server.reload() is False
            assert server.tunnels == before
            for name in ("a", "b"):
                assert await exchange(port_of(server, name), alice) == b"ping"
            logged = [
                str(getattr(r, "fields", {}).get("error"))
                for r in caplog.records
                if r.getMessage() == "reload failed, keeping the running tunnels"
            ]
            assert logged[:2] == [
                "tunnel 'a': target: port 99999 out of range (0-65535)",
                "tunnel 'b': unknown key 'colour'",
            ]
            # Files are parsed on reload as by check-config: the problem names its tunnel.
            assert len(logged) == 3 and logged[2].startswith("tunnel 'c': ") and "garbage.key" in logged[2]


@pytest.mark.asyncio
async def test_a_changed_process_table_is_not_applied_by_a_reload_and_says_so(
    pki_files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(block("a"))
    async with serving(path) as server:
        path.write_text('[process]\nworkers = 2\nlog-format = "json"\n' + block("a", target="127.0.0.1:2"))
        assert server.reload() is True
        assert server.tunnels["a"].cfg.target == Address("127.0.0.1", 2)
        [warning] = [r for r in caplog.records if r.getMessage() == "[process] changed: restart tlsgate to apply it"]
        assert warning.fields["keys"] == "workers,log-format"  # type: ignore[attr-defined]


PORT_HANDOVER_BUG = (
    "supervisor._reload_file hands a bound socket over only to a successor with the same name; any other tunnel "
    "on that address fails to bind while the leaving tunnel still holds it (patch in the report)"
)


@pytest.mark.asyncio
async def test_a_renamed_tunnel_takes_over_its_port(
    pki_files: dict[str, Path], tmp_path: Path, alice: ssl.SSLContext
) -> None:
    path = tmp_path / "tlsgate.toml"
    with reserved_port() as port:
        async with backend() as be:
            path.write_text(block("old", listen=f"127.0.0.1:{port}", target=be.address))
            async with serving(path) as server:
                path.write_text(block("new", listen=f"127.0.0.1:{port}", target=be.address))
                assert server.reload() is True
                assert list(server.tunnels) == ["new"]
                assert await exchange(port, alice) == b"ping"


@pytest.mark.asyncio
async def test_two_tunnels_can_swap_ports(pki_files: dict[str, Path], tmp_path: Path, alice: ssl.SSLContext) -> None:
    path = tmp_path / "tlsgate.toml"
    with reserved_port() as one, reserved_port() as two:
        async with backend() as first, backend() as second:
            path.write_text(
                block("x", listen=f"127.0.0.1:{one}", target=first.address)
                + block("y", listen=f"127.0.0.1:{two}", target=second.address)
            )
            async with serving(path) as server:
                path.write_text(
                    block("x", listen=f"127.0.0.1:{two}", target=first.address)
                    + block("y", listen=f"127.0.0.1:{one}", target=second.address)
                )
                assert server.reload() is True
                assert await exchange(two, alice) == b"ping"
                assert (first.connections, second.connections) == (1, 0)
                assert await exchange(one, alice) == b"ping"
                assert (first.connections, second.connections) == (1, 1)


@pytest.mark.asyncio
async def test_a_tunnel_that_cannot_start_fails_the_reload_and_the_others_keep_running(
    pki_files: dict[str, Path], tmp_path: Path, alice: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tlsgate.toml"
    async with backend() as be:
        path.write_text(block("a", target=be.address))
        async with serving(path) as server:
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = taken.getsockname()[1]
                path.write_text(block("a", target=be.address) + block("c", listen=f"127.0.0.1:{busy}"))
                reloaded = server.reload()
            assert list(server.tunnels) == ["a"]
            assert await exchange(port_of(server, "a"), alice) == b"ping"
            assert any(r.getMessage() == "tunnel failed to start" for r in caplog.records)
            assert reloaded is False


# -- tlsgate run, as a process -----------------------------------------------------------------------------------


class CountingEcho(socketserver.BaseRequestHandler):
    """Echo that counts connections carrying data (the status port's backend probes send none)."""

    def handle(self) -> None:
        counted = False
        while data := self.request.recv(65536):
            if not counted:
                self.server.connections += 1  # type: ignore[attr-defined]
                counted = True
            self.request.sendall(data)


@pytest.fixture
def echo_servers() -> Iterator[Callable[[], socketserver.ThreadingTCPServer]]:
    servers: list[socketserver.ThreadingTCPServer] = []

    def make() -> socketserver.ThreadingTCPServer:
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), CountingEcho)
        server.daemon_threads = True
        server.connections = 0  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def address_of(server: socketserver.ThreadingTCPServer) -> str:
    return f"127.0.0.1:{server.server_address[1]}"


def echo_through(port: int, ctx: ssl.SSLContext) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"ping")
        assert tls.recv(4) == b"ping"


@contextlib.contextmanager
def tlsgate_run(path: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from tlsgate.cli.run import run; run(prog_name='tlsgate')", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


def status_up(port: int, workers: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/_status")
        doc = json.loads(conn.getresponse().read())
    except (ConnectionError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return workers == 1 or len([w for w in doc.get("workers", []) if w["ready"]]) == workers


@pytest.mark.parametrize("workers", [1, 2])
def test_tlsgate_run_serves_the_file_and_sighup_rereads_it(
    workers: int,
    pki_files: dict[str, Path],
    tmp_path: Path,
    echo_servers: Callable[[], socketserver.ThreadingTCPServer],
) -> None:
    first, second = echo_servers(), echo_servers()
    with (
        reserved_port() as port
    ):  # a number, not 0: the file is rewritten with this same address and served after the reload
        process = f'[process]\nstatus = "http://127.0.0.1:0"\nworkers = {workers}\n'
        path = tmp_path / "tlsgate.toml"
        path.write_text(process + block("a", listen=f"127.0.0.1:{port}", target=address_of(first)))
        ctx = ssl.create_default_context(cafile=str(pki_files["ca"]))
        ctx.load_cert_chain(str(pki_files["client_cert"]), str(pki_files["client_key"]))
        log = tmp_path / "tlsgate.log"
        with tlsgate_run(path, log) as proc:

            def up() -> bool:
                assert proc.poll() is None, log.read_text()
                status = STATUS_LISTENING.search(log.read_text())
                return status is not None and status_up(int(status.group(1)), workers)

            eventually("tlsgate listening", up)
            echo_through(port, ctx)
            assert first.connections == 1  # type: ignore[attr-defined]

            path.write_text(process + block("a", listen=f"127.0.0.1:{port}", target=address_of(second)))
            proc.send_signal(signal.SIGHUP)
            eventually("every process reloaded", lambda: log.read_text().count(" reloaded tunnels=1") == workers)
            for _ in range(10):
                echo_through(port, ctx)
            assert second.connections == 10  # type: ignore[attr-defined]
            assert first.connections == 1  # type: ignore[attr-defined]

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(DEADLINE) == 0, log.read_text()


def test_tlsgate_run_with_a_port_in_use_exits_2(pki_files: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "tlsgate.toml"
        path.write_text(block("a", listen=f"127.0.0.1:{port}"))
        log = tmp_path / "tlsgate.log"
        with tlsgate_run(path, log) as proc:
            assert proc.wait(DEADLINE) == 2
        output = log.read_text()
        assert "Traceback" not in output
        assert "tlsgate: error: " in output and str(port) in output, output


def test_run_and_check_config_are_named_for_the_cli() -> None:
    assert (run.name, check_config.name) == ("run", "check-config")
