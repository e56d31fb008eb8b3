"""Installing and living with tlsgate as a tool (#17): shell completion, the man page, platform guards, and the
start-up refusals a newcomer hits first (a client-only certificate on a server, `certs ca --force`).

The build/install smoke test (sdist + wheel + clean venv + a real tunnel) is .ci/smoke_install.py, run by .ci/run:
it needs the network for pip, so it stays out of the unit tests.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlsgate.cli import cli
from tlsgate.cli.extras import _escape, render_man_page
from tlsgate.engine.runtime import build_runtime, usage_verdict
from tlsgate.process import platforms
from tlsgate.process.lifecycle import choose_loop
from tlsgate.settings.config import tunnel_config
from tlsgate.tls import contexts

from helpers import backend, echo, server_opts, tls_connect, tunnel

# -- shell completion ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_the_shell_script_that_calls_tlsgate_back(shell: str) -> None:
    result = CliRunner().invoke(cli, ["completion", shell], prog_name="tlsgate")
    assert result.exit_code == 0, result.output
    assert f"_TLSGATE_COMPLETE={shell}_complete" in result.output
    if shell == "bash":
        assert "complete -o nosort -F _tlsgate_completion tlsgate" in result.output


def test_completion_refuses_a_shell_click_cannot_complete() -> None:
    result = CliRunner().invoke(cli, ["completion", "powershell"], prog_name="tlsgate")
    assert result.exit_code == 2
    assert "'powershell' is not one of 'bash', 'zsh', 'fish'" in result.output


def _complete(words: str) -> list[str]:
    """What bash would offer for ``words`` (the last one being typed), by click's _TLSGATE_COMPLETE protocol."""
    env = {**os.environ, "_TLSGATE_COMPLETE": "bash_complete", "COMP_WORDS": words}
    env["COMP_CWORD"] = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    proc = subprocess.run(
        [sys.executable, "-m", "tlsgate"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_completing_ser_offers_server() -> None:
    assert _complete("tlsgate ser") == ["plain,server"]


def test_completing_an_option_of_a_subcommand_offers_the_flag() -> None:
    assert "plain,--listen" in _complete("tlsgate server --lis")
    assert "plain,completion" in _complete("tlsgate comp")


# -- man page ---------------------------------------------------------------------------------------------------


def _commands(command: click.Command, ctx: click.Context, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None
            if not sub.hidden:
                yield from _commands(sub, click.Context(sub, info_name=name, parent=ctx), f"{path} {name}")


def test_man_page_has_every_command_and_every_option() -> None:
    page = render_man_page(cli)
    assert page.startswith(".TH TLSGATE 1 ")
    paths = list(_commands(cli, click.Context(cli, info_name="tlsgate"), "tlsgate"))
    assert len(paths) > 15  # the whole tree, not only the top level
    for path, command in paths:
        if path != "tlsgate":
            assert f'.SS "{_escape(path)}"' in page, path
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                # ghostunnel's older spellings (--allow-dns-san, ...) are hidden, as kingpin's .Hidden() there.
                shown = getattr(param, "visible", ()) or param.opts
                for flag in [*shown, *param.secondary_opts]:
                    assert f"\\fB{_escape(flag)}\\fR" in page, f"{path} {flag}"


def test_man_command_prints_the_page() -> None:
    result = CliRunner().invoke(cli, ["man"], prog_name="tlsgate")
    assert result.exit_code == 0
    assert result.output == render_man_page(cli)


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_page_renders_with_groff_without_a_warning(tmp_path: Path) -> None:
    page = tmp_path / "tlsgate.1"
    page.write_text(render_man_page(cli), encoding="utf-8")
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0
    assert proc.stderr == ""
    text = re.sub(r".\x08", "", proc.stdout)  # overstrike bold/underline
    for expected in ("tlsgate certs issue", "--listen", "--allow-spki-sha256", "KEYSTORE_PATH", "EXIT STATUS"):
        assert expected in text


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_page_opens_with_man_l(tmp_path: Path) -> None:
    page = tmp_path / "tlsgate.1"
    page.write_text(render_man_page(cli), encoding="utf-8")
    proc = subprocess.run(
        ["man", "-l", str(page)],
        env={**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "100"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tlsgate completion" in re.sub(r".\x08", "", proc.stdout)


def _unescape(text: str) -> str:
    return text.removeprefix("\\&").replace("\\-", "-").replace("\\e", "\\")


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=60))
def test_escaped_help_text_is_never_a_roff_request_and_reads_back_unchanged(text: str) -> None:
    escaped = _escape(text)
    assert not escaped.startswith((".", "'"))
    assert _unescape(escaped) == text


# -- a certificate that does not fit its role -------------------------------------------------------------------

_NOW = datetime.datetime.now(datetime.UTC)


class _MiniCA:
    """Just enough CA to issue leaves with any extended key usage (tlsgate's pki only issues sensible ones)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(1)
            .not_valid_before(_NOW - datetime.timedelta(hours=1))
            .not_valid_after(_NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, usages: list[ObjectIdentifier] | None) -> tuple[x509.Certificate, bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(hours=1))
            .not_valid_after(_NOW + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        )
        if usages is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert, cert.public_bytes(serialization.Encoding.PEM), key_pem

    def files(self, where: Path, stem: str, usages: list[ObjectIdentifier] | None) -> tuple[Path, Path]:
        _, cert_pem, key_pem = self.leaf(usages)
        (where / f"{stem}.pem").write_bytes(cert_pem)
        (where / f"{stem}.key").write_bytes(key_pem)
        return where / f"{stem}.pem", where / f"{stem}.key"


_MINI_CA = _MiniCA()
_SERVER, _CLIENT, _ANY = (
    ExtendedKeyUsageOID.SERVER_AUTH,
    ExtendedKeyUsageOID.CLIENT_AUTH,
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
)
_USAGES = [_SERVER, _CLIENT, ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.EMAIL_PROTECTION, _ANY]


def _openssl_accepts_as_server(cert_pem: bytes, key_pem: bytes, tmp: Path) -> bool:
    """Whether an OpenSSL client (CERT_REQUIRED, hostname checked) completes a handshake with this server cert."""
    (tmp / "server.pem").write_bytes(cert_pem + key_pem)
    (tmp / "ca.pem").write_bytes(_MINI_CA.pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "server.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(tmp / "ca.pem")
    bios = [ssl.MemoryBIO() for _ in range(4)]  # client in/out, server in/out
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="localhost")
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):  # a TLS 1.3 handshake is two flights each way; 10 rounds is far more than enough
        for name, end, out_bio, peer_in in (("client", client, bios[1], bios[2]), ("server", server, bios[3], bios[0])):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return False
            peer_in.write(out_bio.read())
        if all(done.values()):
            return True
    raise AssertionError("handshake made no progress")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(usages=st.none() | st.lists(st.sampled_from(_USAGES), min_size=1, max_size=4, unique=True))
def test_server_certificate_verdict_matches_what_openssl_clients_accept(
    usages: list[ObjectIdentifier] | None, tmp_path: Path
) -> None:
    cert, cert_pem, key_pem = _MINI_CA.leaf(usages)
    verdict = usage_verdict(cert, "server")
    accepted = _openssl_accepts_as_server(cert_pem, key_pem, tmp_path)
    # Refused at start-up exactly when no client can use it; a warning when OpenSSL refuses but Go would not.
    assert accepted == (verdict is None)
    if verdict is not None:
        assert verdict[0] == ("warn" if _ANY in (usages or []) else "refuse")


@pytest.fixture
def never_listen(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CLI test that expects a refusal must not start serving (and block) when the refusal is missing."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("tlsgate started listening instead of refusing")

    monkeypatch.setattr("tlsgate.engine.tunnel.Tunnel.start", refuse)


@pytest.mark.usefixtures("never_listen")
def test_server_refuses_a_client_only_certificate_at_startup_in_one_line(tmp_path: Path) -> None:
    cert, key = _MINI_CA.files(tmp_path, "alice", [_CLIENT])
    (tmp_path / "ca.pem").write_bytes(_MINI_CA.pem)
    argv = ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--cert", str(cert), "--key", str(key)]
    argv += ["--cacert", str(tmp_path / "ca.pem"), "--allow-all"]
    result = CliRunner().invoke(cli, argv, prog_name="tlsgate")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"tlsgate: error: --cert {cert}: certificate is not for TLS servers")
    assert "extended key usage: clientAuth; serverAuth needed" in result.output


@pytest.mark.usefixtures("never_listen")
def test_server_refuses_a_client_only_keystore(tmp_path: Path) -> None:
    cert, key = _MINI_CA.files(tmp_path, "alice", [_CLIENT])
    keystore = tmp_path / "alice-bundle.pem"
    keystore.write_bytes(cert.read_bytes() + key.read_bytes())
    argv = ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9", "--keystore", str(keystore)]
    result = CliRunner().invoke(cli, [*argv, "--disable-authentication"], prog_name="tlsgate")
    assert result.exit_code == 2
    assert f"--keystore {keystore}: certificate is not for TLS servers" in result.output


def test_check_config_refuses_a_client_only_server_certificate(tmp_path: Path) -> None:
    cert, key = _MINI_CA.files(tmp_path, "alice", [_CLIENT])
    config = tmp_path / "tlsgate.toml"
    config.write_text(
        f'[[tunnel]]\nname = "edge"\nmode = "server"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:9"\n'
        f'cert = "{cert}"\nkey = "{key}"\ndisable-authentication = true\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(cli, ["check-config", str(config)], prog_name="tlsgate")
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"tlsgate: error: tunnel 'edge': cert {cert}: certificate is not for TLS servers")


@pytest.mark.parametrize(
    ("usages", "ok"), [(None, True), ([_SERVER], True), ([_SERVER, _CLIENT], True), ([_ANY], True), ([_CLIENT], False)]
)
def test_server_certificates_that_fit_still_start(
    tmp_path: Path, usages: list[ObjectIdentifier] | None, ok: bool
) -> None:
    cert, key = _MINI_CA.files(tmp_path, "srv", usages)
    cfg = tunnel_config(
        "server",
        {
            "listen": "127.0.0.1:0",
            "target": "127.0.0.1:9",
            "cert": [str(cert)],
            "key": [str(key)],
            "disable_authentication": True,
        },
    )
    if ok:
        assert build_runtime(cfg).accept_ctx is not None
    else:
        with pytest.raises(Exception, match="not for TLS servers"):
            build_runtime(cfg)


def test_client_mode_warns_about_a_server_only_certificate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = _MINI_CA.files(tmp_path, "srv", [_SERVER])
    (tmp_path / "ca.pem").write_bytes(_MINI_CA.pem)
    options = {"listen": "127.0.0.1:0", "target": "localhost:9", "cacert": str(tmp_path / "ca.pem")}
    cfg = tunnel_config("client", {**options, "cert": [str(cert)], "key": [str(key)]})
    assert build_runtime(cfg).target_ctx is not None  # it starts: a server that does not check would accept it
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"--cert {cert}: certificate lacks clientAuth (extended key usage: serverAuth): "
                        "OpenSSL-based peers refuse it"]  # fmt: skip


def test_target_cert_without_client_auth_is_warned_about(
    pki_files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = _MINI_CA.files(tmp_path, "srv", [_SERVER])
    (tmp_path / "ca.pem").write_bytes(_MINI_CA.pem)
    opts = server_opts(
        pki_files, "localhost:9", allow_all=True, target_tls=True, target_cacert=str(tmp_path / "ca.pem")
    )
    opts.update(listen="127.0.0.1:0", target_cert=str(cert), target_key=str(key))
    build_runtime(tunnel_config("server", opts))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"--target-cert {cert}: certificate lacks clientAuth (extended key usage: serverAuth): "
                        "OpenSSL-based peers refuse it"]  # fmt: skip


def test_client_mode_is_quiet_about_a_client_certificate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = _MINI_CA.files(tmp_path, "alice", [_CLIENT])
    (tmp_path / "ca.pem").write_bytes(_MINI_CA.pem)
    options = {"listen": "127.0.0.1:0", "target": "localhost:9", "cacert": str(tmp_path / "ca.pem")}
    build_runtime(tunnel_config("client", {**options, "cert": [str(cert)], "key": [str(key)]}))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# -- certs ca --force --------------------------------------------------------------------------------------------


def test_certs_ca_force_warns_that_every_issued_certificate_stops_being_trusted(tmp_path: Path) -> None:
    runner = CliRunner()
    ca_dir = tmp_path / "ca"
    first = runner.invoke(cli, ["certs", "ca", "--out", str(ca_dir)], prog_name="tlsgate")
    assert first.exit_code == 0 and first.stderr == ""
    for name in ("localhost", "alice"):
        issued = runner.invoke(
            cli, ["certs", "issue", "--ca", str(ca_dir), "--name", name, "--out", str(tmp_path)], prog_name="tlsgate"
        )
        assert issued.exit_code == 0, issued.output
    again = runner.invoke(cli, ["certs", "ca", "--out", str(ca_dir), "--force"], prog_name="tlsgate")
    assert again.exit_code == 0
    assert again.stderr.count("\n") == 1
    assert again.stderr.startswith(f"tlsgate: warning: replaced the CA in {ca_dir}: every certificate the old CA")
    assert "(2 recorded in ca.json)" in again.stderr


def test_certs_ca_force_on_an_empty_directory_does_not_warn(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["certs", "ca", "--out", str(tmp_path / "ca"), "--force"], prog_name="tlsgate")
    assert result.exit_code == 0
    assert result.stderr == ""


def test_certs_ca_force_warns_even_when_the_record_is_unreadable(tmp_path: Path) -> None:
    runner = CliRunner()
    ca_dir = tmp_path / "ca"
    assert runner.invoke(cli, ["certs", "ca", "--out", str(ca_dir)], prog_name="tlsgate").exit_code == 0
    (ca_dir / "ca.json").write_text("{not json", encoding="utf-8")
    result = runner.invoke(cli, ["certs", "ca", "--out", str(ca_dir), "--force"], prog_name="tlsgate")
    assert result.exit_code == 0
    assert "(ca.json unreadable)" in result.stderr


def test_certs_ca_that_is_refused_does_not_warn(tmp_path: Path) -> None:
    runner = CliRunner()
    ca_dir = tmp_path / "ca"
    assert runner.invoke(cli, ["certs", "ca", "--out", str(ca_dir)], prog_name="tlsgate").exit_code == 0
    result = runner.invoke(cli, ["certs", "ca", "--out", str(ca_dir)], prog_name="tlsgate")
    assert result.exit_code == 2
    assert "warning" not in result.stderr


# -- platforms without Linux's signals and socket options --------------------------------------------------------

_LINUX_ONLY = """
import importlib, pkgutil, signal, socket, os
for name in ("SIGHUP", "SIGUSR1"):
    delattr(signal, name)
for name in ("SO_REUSEPORT", "AF_UNIX"):
    delattr(socket, name)
del os.memfd_create
import tlsgate
for module in pkgutil.iter_modules(tlsgate.__path__):
    importlib.import_module("tlsgate." + module.name)
print("imported")
"""


def test_every_module_imports_without_linux_only_signals_and_socket_options() -> None:
    proc = subprocess.run([sys.executable, "-c", _LINUX_ONLY], capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout == "imported\n", proc.stderr


def _server_argv(pki_files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "server", "--target", "127.0.0.1:9", "--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]),
        "--cacert", str(pki_files["ca"]), "--allow-all", *extra,
    ]  # fmt: skip


@pytest.mark.usefixtures("never_listen")
def test_workers_are_refused_in_one_line_without_so_reuseport(
    pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    argv = _server_argv(pki_files, "--listen", "127.0.0.1:0", "--workers", "2")
    result = CliRunner().invoke(cli, argv, prog_name="tlsgate")
    assert result.exit_code == 2
    assert result.output == (
        f"tlsgate: error: --workers 2: needs SO_REUSEPORT, which this platform ({sys.platform}) lacks; "
        "use --workers 1\n"
    )


@pytest.mark.usefixtures("never_listen")
def test_unix_listen_is_refused_in_one_line_without_af_unix(
    pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delattr(socket, "AF_UNIX")
    result = CliRunner().invoke(cli, _server_argv(pki_files, "--listen", f"unix:{tmp_path}/s"), prog_name="tlsgate")
    assert result.exit_code == 2
    assert result.output == (
        f"tlsgate: error: --listen unix:{tmp_path}/s: unix sockets are not available on {sys.platform}\n"
    )


def _client_ctx(pki_files: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki_files["ca"]))
    ctx.load_cert_chain(pki_files["client_cert"], pki_files["client_key"])
    return ctx


@pytest.mark.usefixtures("never_listen")
def test_syslog_is_refused_in_one_line_without_af_unix(
    pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(socket, "AF_UNIX")
    result = CliRunner().invoke(
        cli, _server_argv(pki_files, "--listen", "127.0.0.1:0", "--syslog"), prog_name="tlsgate"
    )
    assert result.exit_code == 2
    assert result.output == (
        f"tlsgate: error: --syslog: needs a unix socket to the syslog daemon, not available on {sys.platform}\n"
    )


@pytest.mark.asyncio
async def test_server_runs_without_reload_signals_and_says_how_to_reload(
    pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(signal, "SIGHUP")
    monkeypatch.delattr(signal, "SIGUSR1")
    async with backend(echo) as target, tunnel(**server_opts(pki_files, target.address, allow_all=True)) as tun:
        reader, writer = await tls_connect(tun, _client_ctx(pki_files))
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "no SIGHUP or SIGUSR1 on this platform: reload with --timed-reload (or a restart)" in messages


@pytest.mark.asyncio
async def test_stop_signal_still_drains_when_the_loop_cannot_handle_signals(
    pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()

    def unsupported(*_: object) -> None:
        raise NotImplementedError  # what Windows' event loops do

    monkeypatch.setattr(loop, "add_signal_handler", unsupported)
    before = signal.getsignal(signal.SIGTERM)
    async with backend(echo) as target, tunnel(**server_opts(pki_files, target.address, allow_all=True)) as tun:
        server = tun.server  # type: ignore[attr-defined]
        assert signal.getsignal(signal.SIGTERM) is not before  # the plain signal.signal fallback is in place
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server._stop.wait(), 30)
    assert signal.getsignal(signal.SIGTERM) is before  # and the previous handler is back


def test_windows_runs_on_the_selector_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delenv("TLSGATE_LOOP", raising=False)
    runner = choose_loop("asyncio")
    assert runner is platforms.run_on_selector_loop

    async def loop_kind() -> bool:
        return isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)

    assert runner(loop_kind())


def test_key_material_goes_through_a_private_temp_file_off_linux(
    pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    ctx = contexts.server_context(material, client_ca=str(pki_files["ca"]), require_client_cert=True)
    assert isinstance(ctx, ssl.SSLContext)
    assert not any(tmp_path.glob("tlsgate-*"))  # the temp dir with the key is gone as soon as OpenSSL read it
