"""`tlsgate dev`: the local CA and its leaf, the front in front of a dev server, and the trust stores.

Every test points the CA, the system store, the NSS databases and HOME at its own tmp_path (see the autouse
fixture), so nothing here reads or changes the real user's or the machine's trust stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tlsgate import logs
from tlsgate.cli.dev import dev
from tlsgate.dev import (
    ALREADY_PRESENT,
    FAILED,
    INSTALLED,
    NOT_PRESENT,
    REMOVED,
    SKIPPED,
    SYSTEM_CA_FILE,
    DevFront,
    DevSettings,
    NssDb,
    TargetWatch,
    TrustStores,
    bind_dev_listeners,
    ca_root,
    dev_ca_name,
    ensure_dev_ca,
    ensure_dev_certificate,
    normalise_name,
    parse_target,
    probe_target,
    trust,
    trust_exit_code,
    untrust,
    untrust_exit_code,
)
from tlsgate.dev.demo import serve_demo_backend
from tlsgate.errors import ConfigError, StartupError
from tlsgate.pki import CertificateAuthority, load_certificates
from tlsgate.settings.addresses import Address

from helpers import closed_port, invoke, refused, reserved_port

run = functools.partial(invoke, dev)

CERTUTIL = shutil.which("certutil")
needs_certutil = pytest.mark.skipif(
    CERTUTIL is None, reason="certutil not installed (Debian: apt-get install libnss3-tools)"
)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback()


@pytest.fixture(autouse=True)
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The CA, HOME and every trust store in tmp_path; a fake update-ca-certificates that records its calls.

    The front's CLI sets up logging for the process; the logger is put back so later tests' caplog works.
    """
    saved = (logs.LOGGER.handlers[:], logs.LOGGER.propagate, logs.LOGGER.level, logs.STATE.quiet)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TLSGATE_CAROOT", str(tmp_path / "caroot"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    system = tmp_path / "system-anchors"
    system.mkdir()
    monkeypatch.setenv("TLSGATE_SYSTEM_CA_DIR", str(system))
    monkeypatch.setenv("TLSGATE_UPDATE_CA_COMMAND", str(fake_update_command(tmp_path)))
    monkeypatch.setenv("TLSGATE_NSS_DBS", "")
    monkeypatch.setenv("TLSGATE_CERTUTIL", CERTUTIL or "")
    yield tmp_path
    logs.LOGGER.handlers[:], logs.LOGGER.propagate, level, logs.STATE.quiet = saved
    logs.LOGGER.setLevel(level)


def fake_update_command(tmp_path: Path, *, fail: bool = False) -> Path:
    """A stand-in for update-ca-certificates: appends a line to calls.log, fails when asked to."""
    script = tmp_path / ("update-fails" if fail else "update-ok")
    log = tmp_path / "calls.log"
    body = f'echo "$@" >> {log}\n' + ('echo "boom: bundle not writable" >&2\nexit 1\n' if fail else "exit 0\n")
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


def update_calls(tmp_path: Path) -> int:
    log = tmp_path / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def sans(cert: x509.Certificate) -> set[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in names}


# --------------------------------------------------------------------------------------------------------------
# Where the CA lives


def test_ca_root_follows_caroot_then_xdg_then_home() -> None:
    assert ca_root({"TLSGATE_CAROOT": "/srv/ca", "XDG_DATA_HOME": "/x", "HOME": "/h"}) == Path("/srv/ca")
    assert ca_root({"XDG_DATA_HOME": "/x", "HOME": "/h"}) == Path("/x/tlsgate")
    assert ca_root({"HOME": "/h"}) == Path("/h/.local/share/tlsgate")


def test_relative_xdg_data_home_is_ignored_as_the_spec_says() -> None:
    assert ca_root({"XDG_DATA_HOME": "relative/dir", "HOME": "/h"}) == Path("/h/.local/share/tlsgate")


def test_ca_path_prints_the_directory_and_creates_nothing(sandbox: Path) -> None:
    result = run("--ca-path")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{sandbox / 'caroot'}\n"
    assert not (sandbox / "caroot").exists()


def test_ca_path_uses_xdg_data_home_without_caroot(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLSGATE_CAROOT")
    monkeypatch.setenv("XDG_DATA_HOME", str(sandbox / "data"))
    assert run("--ca-path").stdout == f"{sandbox / 'data' / 'tlsgate'}\n"


# --------------------------------------------------------------------------------------------------------------
# The CA and the leaf


def test_ca_is_created_once_and_reused(sandbox: Path) -> None:
    first, created = ensure_dev_ca(sandbox / "caroot")
    again, created_again = ensure_dev_ca(sandbox / "caroot")
    assert (created, created_again) == (True, False)
    assert again.certificate.serial_number == first.certificate.serial_number
    assert again.certificate == first.certificate
    assert stat.S_IMODE((sandbox / "caroot" / "ca.key").stat().st_mode) == 0o600


def test_ca_is_named_after_the_user_and_host(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    assert ca.name == dev_ca_name()
    assert ca.name.startswith("tlsgate development CA ")
    assert "@" in ca.name and socket.gethostname()[:20] in ca.name
    assert len(ca.name) <= 64


def test_leaf_has_localhost_names_extra_names_server_auth_and_chains_to_the_ca(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    leaf = ensure_dev_certificate(ca, ["myapp.localhost", "*.api.localhost", "127.1.2.3"])
    cert = leaf.certificate
    assert sans(cert) == {"localhost", "127.0.0.1", "::1", "myapp.localhost", "*.api.localhost", "127.1.2.3"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.certificate)
    assert leaf.cert_path == sandbox / "caroot" / "dev.pem"
    assert load_certificates(leaf.cert_path)[0] == cert
    assert stat.S_IMODE(leaf.key_path.stat().st_mode) == 0o600
    assert leaf.issued_because == "first use"


def test_leaf_is_reused_while_good(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    first = ensure_dev_certificate(ca, ["myapp.localhost"])
    again = ensure_dev_certificate(ca, ["myapp.localhost"])
    assert again.issued_because is None
    assert again.certificate.serial_number == first.certificate.serial_number


def test_leaf_is_renewed_within_30_days_of_expiry(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    first = ensure_dev_certificate(ca)
    not_after = first.certificate.not_valid_after_utc
    # 31 days before the end it still does; 29 days before it is renewed.
    assert ensure_dev_certificate(ca, now=not_after - timedelta(days=31)).issued_because is None
    renewed = ensure_dev_certificate(ca, now=not_after - timedelta(days=29))
    assert renewed.issued_because is not None and "expires in 29 day" in renewed.issued_because
    assert renewed.certificate.serial_number != first.certificate.serial_number


def test_an_expired_leaf_is_renewed(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    short = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1", "::1"], days=1,
                     not_before=datetime.now(UTC) - timedelta(days=3))  # fmt: skip
    short.write(sandbox / "caroot", "dev", force=True)
    renewed = ensure_dev_certificate(ca)
    assert renewed.issued_because == "the old one expired"
    assert renewed.certificate.not_valid_after_utc > datetime.now(UTC) + timedelta(days=300)


def test_leaf_is_reissued_when_names_are_added_or_dropped(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    ensure_dev_certificate(ca)
    added = ensure_dev_certificate(ca, ["myapp.localhost"])
    assert added.issued_because == "the names changed"
    assert "myapp.localhost" in sans(added.certificate)
    dropped = ensure_dev_certificate(ca)
    assert dropped.issued_because == "the names changed"
    assert sans(dropped.certificate) == {"localhost", "127.0.0.1", "::1"}


def test_leaf_is_reissued_when_the_ca_was_replaced(sandbox: Path) -> None:
    directory = sandbox / "caroot"
    ca, _ = ensure_dev_ca(directory)
    ensure_dev_certificate(ca)
    new_ca = CertificateAuthority.create(directory, name=dev_ca_name(), force=True)
    leaf = ensure_dev_certificate(new_ca)
    assert leaf.issued_because == "the local CA changed"
    leaf.certificate.verify_directly_issued_by(new_ca.certificate)


def test_damaged_leaf_files_are_replaced(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    leaf = ensure_dev_certificate(ca)
    leaf.key_path.write_text("not a key")
    fixed = ensure_dev_certificate(ca)
    assert fixed.issued_because is not None and fixed.issued_because.startswith("the old one was unreadable")


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("myapp.localhost", "myapp.localhost"),
        ("MyApp.LocalHost.", "myapp.localhost"),
        ("café.localhost", "xn--caf-dma.localhost"),
        ("*.myapp.localhost", "*.myapp.localhost"),
        ("127.0.0.2", "127.0.0.2"),
        ("0:0:0:0:0:0:0:1", "::1"),
    ],
)
def test_extra_names_are_normalised(value: str, stored: str) -> None:
    assert normalise_name(value) == stored


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("my app", "not a DNS name"),
        ("a..b", "not a DNS name"),
        ("-bad.localhost", "not a DNS name"),
        ("http://myapp.localhost", "not a DNS name"),
        ("10.0.0.256", "not an IP address either"),
        ("*.localhost", "browsers refuse a wildcard right under a top-level name"),
        ("", "not a DNS name"),
    ],
)
def test_bad_extra_names_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="--name") as info:
        normalise_name(value)
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# --to and --listen


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("3000", Address(host="localhost", port=3000)),
        ("127.0.0.1:3000", Address(host="127.0.0.1", port=3000)),
        ("[::1]:5173", Address(host="::1", port=5173)),
        ("devbox.internal:8080", Address(host="devbox.internal", port=8080)),
        ("unix:/run/app.sock", Address(path="/run/app.sock")),
    ],
)
def test_to_takes_a_port_host_port_or_unix_path(text: str, address: Address) -> None:
    assert parse_target(text) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("web", "expected a port (3000), HOST:PORT"),
        ("0", "port out of range"),
        ("70000", "port out of range"),
        ("localhost:0", "port other than 0"),
        (":3000", "give a host"),
        ("localhost:http", "is not a number"),
        ("unix:", "empty unix socket path"),
        ("²", "expected a port"),
        ("localhost:²", "is not a number"),
    ],
)
def test_bad_to_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="--to") as info:
        parse_target(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:8443", "serves this machine only"),
        (":8443", "serves this machine only"),
        ("unix:/tmp/dev.sock", "browsers cannot open unix sockets"),
        ("localhost", "is not an address"),
    ],
)
def test_listen_must_be_loopback_tcp(listen: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        DevSettings.from_flags(to="3000", listen=listen)
    assert message in str(info.value)


def test_settings_drop_duplicate_and_base_names(sandbox: Path) -> None:
    settings = DevSettings.from_flags(to="3000", names=["A.localhost", "a.localhost", "localhost", "::1"])
    assert settings.names == ("a.localhost",)
    assert settings.ca_dir == sandbox / "caroot"


# --------------------------------------------------------------------------------------------------------------
# Listening


def test_localhost_listens_on_both_loopback_addresses_on_one_port() -> None:
    sockets = bind_dev_listeners(Address(host="localhost", port=0))
    try:
        names = [sock.getsockname()[:2] for sock in sockets]
        ports = {port for _, port in names}
        assert len(ports) == 1
        assert [host for host, _ in names] == (["127.0.0.1", "::1"] if HAS_IPV6 else ["127.0.0.1"])
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_in_use_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as info:
            bind_dev_listeners(Address(host="localhost", port=port))
    assert str(info.value) == (
        f"--listen localhost:{port}: 127.0.0.1:{port} is already in use by another program; "
        f"pick another port, like --listen localhost:{port + 1}"
    )


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback on this machine")
def test_another_program_on_ipv6_localhost_is_an_error_too() -> None:
    with socket.socket(socket.AF_INET6) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"\[::1\]:{port} is already in use"):
            bind_dev_listeners(Address(host="localhost", port=port))
        with socket.socket() as probe:  # the 127.0.0.1 socket made before the failure was closed again
            probe.bind(("127.0.0.1", port))


# --------------------------------------------------------------------------------------------------------------
# Watching the target (sans-IO)


def test_watch_says_nothing_when_the_target_is_up_from_the_start() -> None:
    watch = TargetWatch("localhost:3000")
    assert watch.observe(True, 0.0) is None
    assert watch.done


def test_watch_reports_a_missing_target_once_then_reminds_rarely_then_says_when_it_is_up() -> None:
    watch = TargetWatch("localhost:3000", first_reminder=30, max_gap=120)
    first = watch.observe(False, 100.0)
    assert first == "nothing listens on localhost:3000 yet; tlsgate keeps going and will connect when it does"
    said = [line for t in range(101, 1000) if (line := watch.observe(False, float(t)))]
    # Reminders at +30s, +90s (gap 60), +210s (gap 120), then every 120s: 8 lines in 15 minutes, not 900.
    assert len(said) == 8
    assert said[0] == "still nothing listens on localhost:3000 (waiting 30s); start it and reload the page"
    assert "(waiting 2 min)" in said[1]
    assert watch.observe(True, 1000.0) == "localhost:3000 answers now; requests go through"
    assert watch.done
    assert watch.observe(False, 2000.0) is None


@pytest.mark.asyncio
async def test_probe_tells_a_listening_target_from_a_missing_one(tmp_path: Path) -> None:
    backend = await serve_demo_backend()
    try:
        port = backend.sockets[0].getsockname()[1]
        assert await probe_target(Address(host="localhost", port=port))
        assert await probe_target(Address(host="127.0.0.1", port=port))
    finally:
        backend.close()
        await backend.wait_closed()
    with closed_port() as dead:
        assert not await probe_target(Address(host="127.0.0.1", port=dead))
    assert not await probe_target(Address(path=str(tmp_path / "nothing.sock")))


# --------------------------------------------------------------------------------------------------------------
# The front, in this event loop


class Front:
    """A running DevFront and the lines it said."""

    def __init__(self, front: DevFront, said: list[str]) -> None:
        self.front = front
        self.said = said

    async def wait_for_line(self, text: str) -> str:
        for _ in range(1000):
            for line in self.said:
                if text in line:
                    return line
            await asyncio.sleep(0.01)
        raise AssertionError(f"no line with {text!r} in {self.said}")


@contextlib.asynccontextmanager
async def start_front(settings: DevSettings, stores: TrustStores) -> AsyncIterator[Front]:
    said: list[str] = []
    front = DevFront(settings, said.append, stores=stores)
    task = asyncio.create_task(front.serve())
    started = asyncio.create_task(front.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()
    try:
        yield Front(front, said)
    finally:
        front.stop()
        assert await asyncio.wait_for(task, 10) == 0


def no_stores() -> TrustStores:
    return TrustStores(platform="linux", system_dir=None, update_command=(), nss_dbs=(), certutil=None)


async def fetch(host: str, port: int, server_hostname: str, cafile: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(cafile))
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_hostname)
    try:
        writer.write(f"GET / HTTP/1.1\r\nhost: {server_hostname}\r\nconnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_front_waits_for_a_missing_target_and_serves_it_once_it_is_up(sandbox: Path) -> None:
    with reserved_port() as target_port:
        settings = dataclasses.replace(
            DevSettings.from_flags(to=str(target_port), listen="localhost:0", names=["myapp.localhost"]),
            probe_interval=0.02,
        )
        async with start_front(settings, no_stores()) as front:
            port = front.front.port
            assert front.said[0] == f"tlsgate dev: https in front of localhost:{target_port}"
            assert f"  https://localhost:{port}/" in front.said
            assert f"  https://myapp.localhost:{port}/" in front.said
            assert "browsers do not trust the local CA yet: run `tlsgate dev trust` once" in front.said
            await front.wait_for_line(f"nothing listens on localhost:{target_port} yet; tlsgate keeps going")

            backend = await serve_demo_backend(port=target_port)
            try:
                await front.wait_for_line(f"localhost:{target_port} answers now")
                cafile = front.front.ca.cert_path
                hosts = ["127.0.0.1", "::1"] if HAS_IPV6 else ["127.0.0.1"]
                for host in hosts:
                    for name in ("localhost", "myapp.localhost"):
                        page = await fetch(host, port, name, cafile)
                        assert page.startswith(b"HTTP/1.1 200 OK"), page
                        assert b"Hello through tlsgate" in page
            finally:
                backend.close()
                await backend.wait_closed()
            assert sum("nothing listens" in line for line in front.said) == 1


@pytest.mark.asyncio
async def test_front_to_a_unix_socket_target(sandbox: Path) -> None:
    path = sandbox / "app.sock"

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nunix says")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(hello, str(path))
    try:
        settings = DevSettings.from_flags(to=f"unix:{path}", listen="127.0.0.1:0")
        async with start_front(settings, no_stores()) as front:
            assert not any("nothing listens" in line for line in front.said)
            page = await fetch("127.0.0.1", front.front.port, "localhost", front.front.ca.cert_path)
            assert page.endswith(b"unix says")
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_front_does_not_nag_about_trust_once_the_ca_is_in_a_store(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    stores = dataclasses.replace(no_stores(), system_dir=sandbox / "system-anchors")
    (sandbox / "system-anchors" / SYSTEM_CA_FILE).write_bytes(ca.cert_pem)
    settings = dataclasses.replace(DevSettings.from_flags(to="1", listen="127.0.0.1:0"), probe_interval=5)
    async with start_front(settings, stores) as front:
        assert not any("do not trust" in line for line in front.said)
        assert not any("created a local CA" in line for line in front.said)


# --------------------------------------------------------------------------------------------------------------
# The command line


def test_missing_to_is_one_line_exit_2() -> None:
    refused(run(), "--to is required")


def test_bad_name_is_one_line_exit_2() -> None:
    refused(run("--to", "3000", "--name", "my app"), "--name 'my app': not a DNS name")


def test_bad_to_is_one_line_exit_2() -> None:
    refused(run("--to", "web"), "--to 'web': expected a port (3000), HOST:PORT")


def test_non_loopback_listen_is_one_line_exit_2() -> None:
    refused(run("--to", "3000", "--listen", "0.0.0.0:8443"), "tlsgate dev serves this machine only")


def test_port_in_use_is_one_line_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused(run("--to", "3000", "--listen", f"127.0.0.1:{port}"), f"127.0.0.1:{port} is already in use")


def test_front_flags_do_not_go_with_a_subcommand() -> None:
    refused(run("--to", "3000", "trust"), "go with `tlsgate dev`, not `tlsgate dev trust`")


def test_untrust_without_a_ca_says_so(sandbox: Path) -> None:
    refused(run("untrust"), f"no local CA in {sandbox / 'caroot'} yet")


# --------------------------------------------------------------------------------------------------------------
# Trust stores: the system store (a temporary anchor directory and a fake update-ca-certificates)


def test_trust_copies_the_ca_into_the_system_store_and_runs_the_update(sandbox: Path) -> None:
    result = run("trust")
    assert result.exit_code == 0, result.output
    anchors = sandbox / "system-anchors"
    installed = anchors / SYSTEM_CA_FILE
    assert installed.read_bytes() == (sandbox / "caroot" / "ca.pem").read_bytes()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o644
    assert update_calls(sandbox) == 1
    assert f"created a local CA in {sandbox / 'caroot'}" in result.stdout
    assert f"system store ({anchors}): installed" in result.stdout
    assert "NSS (Chromium, Firefox): skipped (no Chromium or Firefox certificate database found" in result.stdout

    again = run("trust")
    assert again.exit_code == 0
    assert f"system store ({anchors}): already present" in again.stdout
    assert update_calls(sandbox) == 1


def test_untrust_removes_it_from_the_system_store(sandbox: Path) -> None:
    assert run("trust").exit_code == 0
    result = run("untrust")
    assert result.exit_code == 0, result.output
    assert f"system store ({sandbox / 'system-anchors'}): removed" in result.stdout
    assert not (sandbox / "system-anchors" / SYSTEM_CA_FILE).exists()
    assert update_calls(sandbox) == 2
    again = run("untrust")
    assert again.exit_code == 0
    assert "not present" in again.stdout
    assert (sandbox / "caroot" / "ca.pem").exists()  # untrust never deletes the CA itself


def test_a_failing_update_is_reported_and_rolled_back(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLSGATE_UPDATE_CA_COMMAND", str(fake_update_command(sandbox, fail=True)))
    result = run("trust")
    assert result.exit_code == 1, result.output
    assert "failed (" in result.stdout and "boom: bundle not writable" in result.stdout
    assert not (sandbox / "system-anchors" / SYSTEM_CA_FILE).exists()


def test_without_root_the_system_store_prints_the_sudo_command(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, for whom every directory is writable; pretend the anchor directory is not.
    real_access = os.access
    anchors = sandbox / "system-anchors"
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == anchors else real_access(path, mode))
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    results = trust(ca.cert_path, TrustStores.discover())
    system = results[0]
    assert (system.outcome, system.reason) == (SKIPPED, f"needs root to write {anchors}")
    assert system.commands == (f"sudo install -m 644 {ca.cert_path} {anchors / SYSTEM_CA_FILE} && sudo "
                               f"{fake_update_command(sandbox)}",)  # fmt: skip
    assert trust_exit_code(results) == 1
    assert update_calls(sandbox) == 0


@pytest.mark.parametrize(
    ("platform", "store", "install_command", "remove_command"),
    [
        (
            "darwin",
            "macOS system keychain",
            "sudo security add-trusted-cert -d -r trustRoot",
            "security delete-certificate",
        ),
        ("win32", "Windows root store", "certutil -addstore -f ROOT", "certutil -delstore ROOT"),
        ("linux", "system store", "sudo update-ca-trust", "sudo update-ca-trust"),
    ],
)
def test_other_systems_get_exact_instructions(
    sandbox: Path, platform: str, store: str, install_command: str, remove_command: str
) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    stores = dataclasses.replace(no_stores(), platform=platform)
    installed = trust(ca.cert_path, stores)
    assert installed[0].store == store and installed[0].outcome == SKIPPED
    assert any(install_command in command for command in installed[0].commands)
    assert trust_exit_code(installed) == 1
    removed = untrust(ca.cert_path, stores)
    assert any(remove_command in command for command in removed[0].commands)
    assert untrust_exit_code(removed) == 1
    lines = installed[0].lines()
    assert lines[0].endswith("; to do it by hand:") and lines[1].startswith("    ")


def test_nss_databases_without_certutil_are_skipped_with_the_install_hint(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    stores = dataclasses.replace(no_stores(), nss_dbs=(NssDb(sandbox / "nssdb", "NSS db x"),))
    result = trust(ca.cert_path, stores)[1]
    assert result.outcome == SKIPPED
    assert "certutil is not installed" in result.reason
    assert "apt-get install libnss3-tools" in result.commands[0]


def test_discovery_reads_the_overrides_and_finds_firefox_profiles(sandbox: Path) -> None:
    profile = sandbox / "home" / ".mozilla" / "firefox" / "abcd.default-release"
    profile.mkdir(parents=True)
    (profile / "cert9.db").touch()
    env = {"HOME": str(sandbox / "home"), "TLSGATE_CERTUTIL": "/opt/nss/certutil", "TLSGATE_SYSTEM_CA_DIR": "/a"}
    stores = TrustStores.discover(env, platform="linux")
    assert stores.system_dir == Path("/a")
    assert stores.update_command == ("update-ca-certificates",)
    assert stores.certutil == "/opt/nss/certutil"
    assert NssDb(profile, f"NSS db {profile} (Firefox profile abcd.default-release)") in stores.nss_dbs
    listed = TrustStores.discover({"TLSGATE_NSS_DBS": os.pathsep.join(["/d1", "/d2"]), "TLSGATE_CERTUTIL": ""})
    assert [db.path for db in listed.nss_dbs] == [Path("/d1"), Path("/d2")]
    assert listed.certutil is None


# --------------------------------------------------------------------------------------------------------------
# Trust stores: NSS databases with the real certutil


def make_nss_db(directory: Path) -> Path:
    directory.mkdir(parents=True)
    assert CERTUTIL is not None
    subprocess.run([CERTUTIL, "-N", "-d", f"sql:{directory}", "--empty-password"], check=True, timeout=30)
    return directory


def nss_listing(directory: Path) -> str:
    assert CERTUTIL is not None
    done = subprocess.run([CERTUTIL, "-L", "-d", f"sql:{directory}"], capture_output=True, text=True, timeout=30)
    return done.stdout


@needs_certutil
def test_trust_and_untrust_an_nss_database(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = make_nss_db(sandbox / "nssdb")
    monkeypatch.setenv("TLSGATE_NSS_DBS", str(db))
    result = run("trust")
    assert result.exit_code == 0, result.output
    assert f"NSS db {db}: installed" in result.stdout
    listing = nss_listing(db)
    assert dev_ca_name() in listing
    assert "C,," in listing.split(dev_ca_name(), 1)[1].splitlines()[0]

    assert f"NSS db {db}: already present" in run("trust").stdout

    removed = run("untrust")
    assert removed.exit_code == 0, removed.output
    assert f"NSS db {db}: removed" in removed.stdout
    assert dev_ca_name() not in nss_listing(db)
    assert f"NSS db {db}: not present" in run("untrust").stdout


@needs_certutil
def test_trust_alone_in_nss_is_enough_for_exit_0(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLSGATE_SYSTEM_CA_DIR", "")
    monkeypatch.setenv("TLSGATE_NSS_DBS", str(make_nss_db(sandbox / "nssdb")))
    result = run("trust")
    assert result.exit_code == 0, result.output
    assert "system store: skipped" in result.stdout


@needs_certutil
def test_a_missing_chromium_database_is_created(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    db = sandbox / "home" / ".pki" / "nssdb"
    stores = dataclasses.replace(no_stores(), nss_dbs=(NssDb(db, "chromium", create=True),), certutil=CERTUTIL)
    assert [r.outcome for r in trust(ca.cert_path, stores)] == [SKIPPED, INSTALLED]
    assert (db / "cert9.db").exists()
    assert ca.name in nss_listing(db)


@needs_certutil
def test_a_replaced_ca_replaces_its_nss_entry(sandbox: Path) -> None:
    directory = sandbox / "caroot"
    ca, _ = ensure_dev_ca(directory)
    db = make_nss_db(sandbox / "nssdb")
    stores = dataclasses.replace(no_stores(), nss_dbs=(NssDb(db, "db"),), certutil=CERTUTIL)
    assert trust(ca.cert_path, stores)[1].outcome == INSTALLED
    new_ca = CertificateAuthority.create(directory, name=dev_ca_name(), force=True)
    replaced = trust(new_ca.cert_path, stores)[1]
    assert (replaced.outcome, replaced.reason) == (INSTALLED, "replaced an older tlsgate CA")
    assert nss_listing(db).count(dev_ca_name()) == 1
    assert trust(new_ca.cert_path, stores)[1].outcome == ALREADY_PRESENT
    assert [r.outcome for r in untrust(new_ca.cert_path, stores)] == [SKIPPED, REMOVED]


@needs_certutil
def test_a_broken_nss_database_is_reported_as_failed(sandbox: Path) -> None:
    ca, _ = ensure_dev_ca(sandbox / "caroot")
    db = sandbox / "broken"
    db.mkdir()
    (db / "cert9.db").write_text("not a database")
    stores = dataclasses.replace(no_stores(), nss_dbs=(NssDb(db, "broken db"),), certutil=CERTUTIL)
    result = trust(ca.cert_path, stores)[1]
    assert result.outcome == FAILED
    assert result.reason.startswith("certutil -A: ")
    assert trust_exit_code(trust(ca.cert_path, stores)) == 1


def test_outcome_words_are_the_documented_ones() -> None:
    assert (INSTALLED, ALREADY_PRESENT, REMOVED, NOT_PRESENT, SKIPPED, FAILED) == (
        "installed", "already present", "removed", "not present", "skipped", "failed",
    )  # fmt: skip


@pytest.mark.asyncio
async def test_the_command_runs_the_front_until_interrupted(sandbox: Path) -> None:
    """`tlsgate dev --to PORT` as a process: prints the URL, serves it, exits 0 on Ctrl-C (SIGINT)."""
    backend = await serve_demo_backend()
    target_port = backend.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from tlsgate.cli.dev import dev; dev(prog_name='tlsgate dev')",
        "--to", str(target_port), "--listen", "localhost:0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        said: list[str] = []
        while not said or said[-1] != "Press Ctrl-C to stop.":
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, f"the front ended early: {said}"
            said.append(line.decode().rstrip("\n"))
        url = next(line.strip() for line in said if line.startswith("  https://localhost:"))
        port = int(url.rsplit(":", 1)[1].rstrip("/"))
        page = await fetch("127.0.0.1", port, "localhost", sandbox / "caroot" / "ca.pem")
        assert b"Hello through tlsgate" in page
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
        backend.close()
        await backend.wait_closed()
    assert proc.returncode == 0, err.decode()
    assert not any("nothing listens" in line for line in said)
    assert b"Traceback" not in err
