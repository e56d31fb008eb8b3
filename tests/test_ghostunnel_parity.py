"""Behaviour a ghostunnel user relies on when switching (issue #15), pinned against ghostunnel's own semantics.

- A peer that ends its stream with a bare TCP FIN (no close_notify) has finished sending; the other direction
  keeps flowing (ghostunnel: Go's crypto/tls reads that FIN as io.EOF).
- Client mode serves its status port over HTTPS with the client certificate (ghostunnel's test-client-status-port).
- A shutdown that has to cut connections when --shutdown-timeout expires exits 1 (ghostunnel's exitFunc(1)).
- KEYSTORE_PATH, CERT_PATH, KEY_PATH, KEYSTORE_PASS and CACERT_PATH feed the flags of the same meaning when the
  flag is not given; an empty variable counts as unset (kingpin's Envar).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tlsgate.cli as tlsgate_cli
from tlsgate.cli import cli
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import Timeouts, TunnelConfig, tunnel_config

from helpers import (
    LISTENING,
    STATUS_LISTENING,
    Handler,
    backend,
    client_context,
    port_of,
    run_tlsgate,
    running_server,
    server_opts,
    tunnel,
    wait_until,
)

MiB = 1 << 20


# -- a) a bare FIN under TLS ends one direction, not the connection ------------------------------------------------


def answer_after_eof(answer: bytes, digests: list[str], *, write_size: int = 0) -> Handler:
    """A backend that reads to EOF, keeps the SHA-256 of what came, then sends ``answer`` (in ``write_size``
    pieces, each drained, when given) and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        while data := await reader.read(256 * 1024):
            digest.update(data)
        digests.append(digest.hexdigest())
        step = write_size or len(answer)
        for start in range(0, len(answer), step):
            writer.write(answer[start : start + step])
            await writer.drain()

    return handle


def read_to_end(tls: ssl.SSLSocket, size: int) -> bytes:
    """Everything the peer sends until its close_notify or FIN."""
    chunks = []
    while True:
        try:
            data = tls.recv(size)
        except ssl.SSLZeroReturnError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def send_then_bare_fin(port: int, ctx: ssl.SSLContext, pieces: Sequence[bytes], read_size: int = 256 * 1024) -> bytes:
    """A TLS client that sends ``pieces`` (one TLS write each), then a TCP FIN with no close_notify, then reads
    the whole answer. Blocking: run it in a thread.

    The FIN goes through a duplicate of the socket's descriptor: ``SSLSocket.shutdown()`` would drop the TLS
    state, and we still have to read the answer through it.
    """
    raw = socket.create_connection(("127.0.0.1", port))
    fin = raw.dup()
    with fin, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        for piece in pieces:
            tls.sendall(piece)
        fin.shutdown(socket.SHUT_WR)
        return read_to_end(tls, read_size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_client_fin_without_close_notify_still_gets_the_whole_answer(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    payload, answer = os.urandom(64 * MiB), os.urandom(64 * MiB)
    digests: list[str] = []
    async with (
        backend(answer_after_eof(answer, digests)) as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
    ):
        received = await asyncio.to_thread(send_then_bare_fin, port_of(tun), client_context(ca), [payload])
        await be.done.wait()
    assert digests == [sha(payload)]
    assert len(received) == len(answer) and sha(received) == sha(answer)


# Write patterns: how the client cuts its request into TLS records before the bare FIN. The explicit example is
# the extreme one, one byte per record (and the answer read one byte at a time).
_pieces = st.lists(st.integers(min_value=1, max_value=40_000), min_size=1, max_size=24)


@pytest.mark.asyncio
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=_pieces)
@example(sizes=[1] * 4096)
async def test_client_fin_without_close_notify_after_any_write_pattern(
    pki_files: dict[str, Path], ca: trustme.CA, sizes: list[int]
) -> None:
    payload = os.urandom(sum(sizes))
    pieces, start = [], 0
    for size in sizes:
        pieces.append(payload[start : start + size])
        start += size
    one_byte = max(sizes) == 1
    answer = os.urandom(4096 if one_byte else 100_000)
    digests: list[str] = []
    async with (
        backend(answer_after_eof(answer, digests, write_size=1 if one_byte else 0)) as be,
        tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun,
    ):
        received = await asyncio.to_thread(
            send_then_bare_fin, port_of(tun), client_context(ca), pieces, 1 if one_byte else 65536
        )
        await be.done.wait()
    assert digests == [sha(payload)]
    assert sha(received) == sha(answer)


@dataclass
class BareFinTlsServer:
    """A TLS server (one connection, in a thread) that sends ``answer``, then a TCP FIN without close_notify,
    then reads the client's stream to its end and keeps its SHA-256."""

    ctx: ssl.SSLContext
    answer: bytes
    listener: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    digest: str | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def serve_one(self) -> None:
        try:
            raw, _ = self.listener.accept()
            fin = raw.dup()
            with fin, self.ctx.wrap_socket(raw, server_side=True) as tls:
                tls.sendall(self.answer)
                fin.shutdown(socket.SHUT_WR)
                self.digest = sha(read_to_end(tls, 256 * 1024))
        except BaseException as err:  # reported by the test, not lost in the thread
            self.error = err
        finally:
            self.listener.close()
            self.finished.set()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_client_mode_relays_to_a_target_that_ends_with_a_bare_fin(
    pki_files: dict[str, Path], ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    target_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(target_ctx)
    answer, payload = os.urandom(64 * MiB), os.urandom(64 * MiB)
    target = BareFinTlsServer(target_ctx, answer)
    serving = asyncio.ensure_future(asyncio.to_thread(target.serve_one))
    try:
        async with tunnel("client", target=f"127.0.0.1:{target.port}", cacert=str(pki_files["ca"])) as tun:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
            received = await reader.read()  # the target's answer, then the end of its stream
            writer.write(payload)  # our request goes out only after the target has finished sending
            writer.write_eof()
            await writer.drain()
            await serving
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    finally:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", target.port)).close()  # unblocks accept() after a failure
        await serving
    assert target.error is None, repr(target.error)
    assert len(received) == len(answer) and sha(received) == sha(answer)
    assert target.digest == sha(payload)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() + str(getattr(record, "fields", "")) for record in caplog.records)


@pytest.mark.asyncio
@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x00\x50\x01"], ids=["nothing", "half-a-client-hello"])
async def test_a_fin_during_the_handshake_is_still_named_as_such(
    pki_files: dict[str, Path], caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    # Under OP_IGNORE_UNEXPECTED_EOF OpenSSL reports that FIN as a clean close, not an EOF error; the log line
    # must not turn into "TLS error: tls/ssl connection has been closed (eof)".
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, disable_authentication=True)) as tun:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        writer.write(sent)
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: tun.stats.handshake_errors >= 1)
    assert logged(caplog, "client closed the connection during the handshake")


@pytest.mark.asyncio
async def test_a_target_fin_during_the_handshake_is_named_as_such(
    pki_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    async def fin_after_the_client_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write_eof()
        await reader.read()

    async with (
        backend(fin_after_the_client_hello) as target,
        tunnel("client", target=target.address, cacert=str(pki_files["ca"])) as tun,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
        with contextlib.suppress(ConnectionError):  # the local client is reset when the target fails
            await reader.read()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        await wait_until(lambda: tun.stats.target_errors >= 1)
    assert logged(caplog, "target closed the connection during the handshake")


# -- b) client mode's status port serves HTTPS with the client certificate -----------------------------------------


@contextlib.asynccontextmanager
async def serving(cfg: TunnelConfig, status: str) -> AsyncIterator[Server]:
    async with running_server(Server([cfg], ProcessOptions(status=status))) as server:
        yield server


async def https_get(port: int, path: str, ctx: ssl.SSLContext) -> tuple[bytes, bytes]:
    """(the certificate the server presented, DER; the response) for one GET over TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    presented = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: status\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return bytes(presented), response


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate for tlsgate client mode, valid for "localhost" too so a health check can verify it."""

    cert: Path
    key: Path
    p12: Path
    der: bytes


@pytest.fixture
def client_identity(ca: trustme.CA, tmp_path: Path) -> ClientIdentity:
    leaf = ca.issue_cert("localhost", common_name="tlsgate-client")
    cert, key, p12 = tmp_path / "client.pem", tmp_path / "client.key", tmp_path / "client.p12"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    private_key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"client",
            private_key,
            certificate,
            None,
            serialization.BestAvailableEncryption(b"storepass"),
        )
    )
    return ClientIdentity(cert, key, p12, certificate.public_bytes(serialization.Encoding.DER))


def client_mode_identity(identity: ClientIdentity, how: str) -> dict[str, object]:
    if how == "keystore":
        return {"keystore": str(identity.p12), "storepass": "storepass"}
    return {"cert": [str(identity.cert)], "key": [str(identity.key)]}


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["keystore", "cert/key"])
@pytest.mark.parametrize("form", ["127.0.0.1:0", "https://127.0.0.1:0"])
async def test_client_mode_status_is_https_with_the_client_certificate(
    pki_files: dict[str, Path], ca: trustme.CA, client_identity: ClientIdentity, how: str, form: str
) -> None:
    async with backend() as be:
        # The status check dials the target over TCP; an open port is enough for "ok".
        opts = {"listen": "127.0.0.1:0", "target": be.address, **client_mode_identity(client_identity, how)}
        async with serving(tunnel_config("client", opts), form) as server:
            port = int(server.status_server.addresses[0].rsplit(":", 1)[1])
            presented, response = await https_get(port, "/_status", client_context(ca))
    assert presented == client_identity.der
    assert response.startswith(b"HTTP/1.1 200 ")


@pytest.mark.asyncio
async def test_client_mode_status_http_scheme_stays_plain_http(client_identity: ClientIdentity) -> None:
    async with backend() as be:
        opts = {"listen": "127.0.0.1:0", "target": be.address, **client_mode_identity(client_identity, "cert/key")}
        async with serving(tunnel_config("client", opts), "http://127.0.0.1:0") as server:
            host, port = server.status_server.addresses[0].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /_status HTTP/1.1\r\nHost: status\r\n\r\n")
            response = await reader.read()
            writer.close()
            await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 200 ")


# -- the real command in a subprocess: status with --workers, exit codes at shutdown ------------------------------


@pytest.mark.asyncio
async def test_client_mode_status_is_https_with_workers(ca: trustme.CA, client_identity: ClientIdentity) -> None:
    async with backend() as be:
        args = ["client", "--listen", "127.0.0.1:0", "--target", be.address, "--workers", "2"]
        args += ["--cert", str(client_identity.cert), "--key", str(client_identity.key), "--status", "127.0.0.1:0"]
        async with run_tlsgate(args) as proc:
            port = await proc.port_from(STATUS_LISTENING)
            presented, response = await https_get(port, "/_status", client_context(ca))
            proc.proc.send_signal(signal.SIGTERM)
            assert await proc.proc.wait() == 0, proc.log
    assert presented == client_identity.der
    assert response.startswith(b"HTTP/1.1 "), response[:100]


async def open_tls_connection(port: int, ca: trustme.CA) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the tunnel that is established end to end (one echo went through)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(ca), server_hostname="localhost"
    )
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    return reader, writer


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_shutdown_timeout_with_connections_open_exits_1(
    pki_files: dict[str, Path], ca: trustme.CA, workers: str
) -> None:
    async with backend() as be:
        args = ["server", "--listen", "127.0.0.1:0", "--target", be.address, "--workers", workers]
        args += ["--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--disable-authentication"]
        args += ["--shutdown-timeout", "100ms"]
        async with run_tlsgate(args) as proc:
            port = await proc.port_from(LISTENING)
            if workers != "1":
                await proc.wait_for(
                    lambda: "all workers ready" in proc.log or proc.log.count("worker ready") >= int(workers),
                    "every worker ready",
                )
            _, writer = await open_tls_connection(port, ca)
            proc.proc.send_signal(signal.SIGTERM)
            code = await proc.proc.wait()
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        log = proc.log
    assert code == 1, log
    assert "shutdown timeout expired" in log
    assert "Traceback" not in log


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_shutdown_with_every_connection_finished_exits_0(
    pki_files: dict[str, Path], ca: trustme.CA, workers: str
) -> None:
    async with backend() as be:
        args = ["server", "--listen", "127.0.0.1:0", "--target", be.address, "--workers", workers]
        args += ["--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--disable-authentication"]
        args += ["--shutdown-timeout", "100ms"]
        async with run_tlsgate(args) as proc:
            port = await proc.port_from(LISTENING)
            _, writer = await open_tls_connection(port, ca)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            await be.done.wait()  # the tunnel saw the close too: nothing is open any more
            await proc.wait_for_line(" closed tunnel=")
            proc.proc.send_signal(signal.SIGTERM)
            code = await proc.proc.wait()
        log = proc.log
    assert code == 0, log
    assert "shutdown timeout expired" not in log


# -- d) --close-timeout --------------------------------------------------------------------------------------------


def test_close_timeout_defaults_to_ghostunnels_60s() -> None:
    cfg = tunnel_config("client", {"listen": "127.0.0.1:0", "target": "127.0.0.1:1"})
    assert cfg.timeouts.close == Timeouts().close == 60.0
    help_text = CliRunner().invoke(cli, ["server", "--help"]).output
    assert re.search(r"--close-timeout\s+DURATION\s+How long .*\[60s\]", " ".join(help_text.split()))


# -- e) ghostunnel's environment variables ------------------------------------------------------------------------


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[TunnelConfig]:
    """Stands in for starting the tunnel: the CLI's final config is recorded instead."""
    configs: list[TunnelConfig] = []

    def record(cfg: TunnelConfig, _: ProcessOptions) -> int:
        configs.append(cfg)
        return 0

    monkeypatch.setattr(tlsgate_cli, "_start", record)
    return configs


_ENV_NAMES = ("KEYSTORE_PATH", "CERT_PATH", "KEY_PATH", "KEYSTORE_PASS", "CACERT_PATH")


def invoke(args: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
    # Variables the test does not set are removed, so the caller's own environment cannot leak in.
    full: dict[str, str | None] = {name: None for name in _ENV_NAMES}
    full.update(env)
    result = CliRunner().invoke(cli, list(args), env=full)
    return result.exit_code, result.output


def mode_args(mode: str, *extra: str) -> list[str]:
    args = [mode, "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", *extra]
    if mode == "server":
        args += ["--allow-all"]
    return args


@pytest.mark.parametrize("mode", ["server", "client"])
def test_keystore_path_and_pass_feed_keystore_and_storepass(
    mode: str, client_identity: ClientIdentity, pki_files: dict[str, Path], started: list[TunnelConfig]
) -> None:
    env = {"KEYSTORE_PATH": str(client_identity.p12), "KEYSTORE_PASS": "storepass", "CACERT_PATH": str(pki_files["ca"])}
    code, output = invoke(mode_args(mode), env)
    assert code == 0, output
    (cfg,) = started
    assert (cfg.keystore, cfg.storepass, cfg.cacert) == (str(client_identity.p12), b"storepass", str(pki_files["ca"]))


@pytest.mark.parametrize("mode", ["server", "client"])
def test_cert_path_and_key_path_feed_cert_and_key(
    mode: str, pki_files: dict[str, Path], started: list[TunnelConfig]
) -> None:
    env = {"CERT_PATH": str(pki_files["cert"]), "KEY_PATH": str(pki_files["key"]), "CACERT_PATH": str(pki_files["ca"])}
    code, output = invoke(mode_args(mode), env)
    assert code == 0, output
    (cfg,) = started
    assert (cfg.cert, cfg.key) == ((str(pki_files["cert"]),), (str(pki_files["key"]),))


@pytest.mark.parametrize("mode", ["server", "client"])
def test_a_flag_on_the_command_line_wins_over_its_variable(
    mode: str, pki_files: dict[str, Path], client_identity: ClientIdentity, started: list[TunnelConfig]
) -> None:
    env = {
        "CERT_PATH": str(client_identity.cert),
        "KEY_PATH": str(client_identity.key),
        "CACERT_PATH": "/nowhere/ca.pem",
        "KEYSTORE_PASS": "from-the-environment",
    }
    flags = ["--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"])]
    code, output = invoke(mode_args(mode, *flags), env)
    assert code == 0, output
    (cfg,) = started
    assert (cfg.cert, cfg.key, cfg.cacert) == (
        (str(pki_files["cert"]),),
        (str(pki_files["key"]),),
        str(pki_files["ca"]),
    )


@pytest.mark.parametrize("mode", ["server", "client"])
def test_empty_variables_count_as_unset(mode: str, pki_files: dict[str, Path], started: list[TunnelConfig]) -> None:
    env = dict.fromkeys(_ENV_NAMES, "")
    flags = ["--cert", str(pki_files["cert"]), "--key", str(pki_files["key"])]
    if mode == "server":
        flags += ["--cacert", str(pki_files["ca"])]
    code, output = invoke(mode_args(mode, *flags), env)
    assert code == 0, output
    (cfg,) = started
    assert cfg.keystore is None and cfg.storepass is None
    assert cfg.cacert == (str(pki_files["ca"]) if mode == "server" else None)


def test_a_path_with_spaces_stays_one_path(
    tmp_path: Path, pki_files: dict[str, Path], started: list[TunnelConfig]
) -> None:
    spaced = tmp_path / "my certs"
    spaced.mkdir()
    cert, key = spaced / "client cert.pem", spaced / "client key.pem"
    cert.write_bytes(pki_files["client_cert"].read_bytes())
    key.write_bytes(pki_files["client_key"].read_bytes())
    code, output = invoke(mode_args("client"), {"CERT_PATH": str(cert), "KEY_PATH": str(key)})
    assert code == 0, output
    assert started[0].cert == (str(cert),) and started[0].key == (str(key),)


@pytest.mark.parametrize("mode", ["server", "client"])
def test_a_variable_that_conflicts_with_a_flag_is_named_in_the_error(
    mode: str, pki_files: dict[str, Path], client_identity: ClientIdentity, started: list[TunnelConfig]
) -> None:
    # ghostunnel reads the variable as if the flag were given, so --cert/--key plus KEYSTORE_PATH is the same
    # "mutually exclusive" mistake; the error must say where the keystore came from.
    flags = ["--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"])]
    code, output = invoke(mode_args(mode, *flags), {"KEYSTORE_PATH": str(client_identity.p12)})
    assert code == 2, output
    assert "KEYSTORE_PATH" in output and "Traceback" not in output
    assert started == []


def test_a_missing_file_from_a_variable_names_the_variable(started: list[TunnelConfig]) -> None:
    code, output = invoke(mode_args("client"), {"CACERT_PATH": "/nowhere/ca.pem", "CERT_PATH": "/nowhere/c.pem"})
    assert code == 2, output
    assert "CACERT_PATH" in output and "CERT_PATH" in output and "Traceback" not in output


def test_client_mode_disable_authentication_with_a_keystore_variable_is_refused(
    client_identity: ClientIdentity, started: list[TunnelConfig]
) -> None:
    # ghostunnel: --keystore, --cert/--key and --disable-authentication are mutually exclusive in client mode.
    code, output = invoke(mode_args("client", "--disable-authentication"), {"KEYSTORE_PATH": str(client_identity.p12)})
    assert code == 2, output
    assert "KEYSTORE_PATH" in output and "--disable-authentication" in output
    assert started == []


_passwords = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=_passwords)
@example(password="env:HOME")
@example(password="file:/etc/passwd")
@example(password="pass:x")
@example(password="with spaces and\nnewline")
def test_keystore_pass_is_taken_literally(
    password: str, client_identity: ClientIdentity, started: list[TunnelConfig]
) -> None:
    # KEYSTORE_PASS is the password itself, as in ghostunnel: never the env:/file: indirection of --storepass.
    started.clear()
    code, output = invoke(mode_args("client"), {"KEYSTORE_PATH": str(client_identity.p12), "KEYSTORE_PASS": password})
    assert code == 0, output
    assert started[0].storepass == password.encode()
    assert password not in output or password.strip() == ""


def test_the_variables_are_ghostunnels() -> None:
    assert set(tlsgate_cli.ENV_FLAGS.values()) == set(_ENV_NAMES)


def test_client_mode_disable_authentication_with_a_certificate_flag_is_refused(
    pki_files: dict[str, Path], started: list[TunnelConfig]
) -> None:
    flags = ["--disable-authentication", "--cert", str(pki_files["client_cert"]), "--key", str(pki_files["client_key"])]
    code, output = invoke(mode_args("client", *flags), {})
    assert code == 2, output
    assert "--disable-authentication" in output and "Traceback" not in output
    assert started == []


@pytest.mark.parametrize("mode", ["server", "client"])
def test_keystore_and_storepass_flags_win_over_their_variables(
    mode: str, pki_files: dict[str, Path], client_identity: ClientIdentity, tmp_path: Path, started: list[TunnelConfig]
) -> None:
    other = tmp_path / "other.p12"
    other.write_bytes(client_identity.p12.read_bytes())
    env = {"KEYSTORE_PATH": str(other), "KEYSTORE_PASS": "from-the-environment", "CACERT_PATH": str(pki_files["ca"])}
    flags = ["--keystore", str(client_identity.p12), "--storepass", "storepass"]
    code, output = invoke(mode_args(mode, *flags), env)
    assert code == 0, output
    (cfg,) = started
    assert (cfg.keystore, cfg.storepass) == (str(client_identity.p12), b"storepass")
