"""Secrets: private keys on disk are the owner's alone, passwords come from env:/file: and stay off the command
line, and neither keys nor passwords ever reach a log line, whatever happens (refusals, failed reloads).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tlsgate.cli import cli
from tlsgate.pki import CertificateAuthority
from tlsgate.settings.config import tunnel_config

from helpers import backend, garbage, round_trip, tlsgate_server

STOREPASS = "correct-horse-battery-staple-4711"
KEYPASS = "tr0ub4dor-and-3"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_tlsgate_certs_writes_private_keys_owner_only(tmp_path: Path, mask: int) -> None:
    """Whatever the umask, keys and keystores are 0600 from the moment they exist, certificates are readable by
    all (0644, or narrower when the umask insists on it), and a new CA directory is the owner's alone."""
    (tmp_path / "pw").write_text(STOREPASS + "\n")
    env = {"TLSGATE_HARDENING_CA_PASS": KEYPASS, "TLSGATE_HARDENING_KEY_PASS": KEYPASS}
    runner = CliRunner()
    with umask(mask):
        commands = [
            ["certs", "ca", "--out", str(tmp_path / "ca"), "--key-pass", "env:TLSGATE_HARDENING_CA_PASS"],
            [
                "certs", "issue", "--ca", str(tmp_path / "ca"), "--ca-pass", "env:TLSGATE_HARDENING_CA_PASS",
                "--name", "localhost", "--out", str(tmp_path / "out"), "--p12", "--storepass", f"file:{tmp_path}/pw",
                "--key-pass", "env:TLSGATE_HARDENING_KEY_PASS",
            ],
            [
                "certs", "issue", "--ca", str(tmp_path / "ca"), "--ca-pass", "env:TLSGATE_HARDENING_CA_PASS",
                "--name", "alice", "--client", "--out", str(tmp_path / "out"),
            ],
        ]  # fmt: skip
        for args in commands:
            result = runner.invoke(cli, args, env=env)
            assert result.exit_code == 0, result.output
            assert STOREPASS not in result.output and KEYPASS not in result.output
    out, ca_dir = tmp_path / "out", tmp_path / "ca"
    for secret in (ca_dir / "ca.key", out / "localhost.key", out / "localhost.p12", out / "alice.key"):
        assert mode(secret) == 0o600, (secret, oct(mode(secret)))
    for public in (ca_dir / "ca.pem", out / "localhost.pem", out / "localhost-chain.pem", out / "alice.pem"):
        assert mode(public) == 0o644, (public, oct(mode(public)))
    assert mode(ca_dir) & 0o077 == 0, oct(mode(ca_dir))
    assert b"ENCRYPTED PRIVATE KEY" in (out / "localhost.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" not in (out / "alice.key").read_bytes()


@pytest.fixture
def secret_pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate whose key is encrypted (KEYPASS) and whose PKCS#12 store is too (STOREPASS),
    and a client certificate for alice."""
    ca = CertificateAuthority.create(tmp_path / "ca")
    files = ca.issue("localhost").write(
        tmp_path, "server", key_password=KEYPASS.encode(), p12_password=STOREPASS.encode()
    )
    alice = ca.issue("alice", client=True, server=False).write(tmp_path, "alice")
    (tmp_path / "storepass").write_text(STOREPASS + "\n")
    (tmp_path / "keypass").write_text(KEYPASS + "\n")
    return {
        "ca": ca.cert_path,
        "cert": files["cert"],
        "key": files["key"],
        "p12": files["p12"],
        "storepass": tmp_path / "storepass",
        "keypass": tmp_path / "keypass",
        "alice_cert": alice["cert"],
        "alice_key": alice["key"],
    }


def secret_markers(secret_pki: dict[str, Path]) -> list[str]:
    """Strings that must never appear in a log: the passwords, PEM armour, and every line of base64 key data."""
    markers = [STOREPASS, KEYPASS, "PRIVATE KEY", "BEGIN"]
    for name in ("key", "alice_key"):
        body = [line for line in secret_pki[name].read_text().splitlines() if line and not line.startswith("-----")]
        markers += [line[:32] for line in body]
    return markers


SECRET_FORMS = {
    "keystore+storepass-env": (["--keystore", "{p12}", "--storepass", "env:TLSGATE_HARDENING_STOREPASS"], STOREPASS),
    "keystore+storepass-file": (["--keystore", "{p12}", "--storepass", "file:{storepass}"], STOREPASS),
    "pem+key-pass-env": (
        ["--cert", "{cert}", "--key", "{key}", "--key-pass", "env:TLSGATE_HARDENING_KEYPASS"],
        KEYPASS,
    ),
    "pem+key-pass-file": (["--cert", "{cert}", "--key", "{key}", "--key-pass", "file:{keypass}"], KEYPASS),
}


@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("form", sorted(SECRET_FORMS))
async def test_passwords_work_from_env_and_file_and_never_show_in_cmdline_or_logs(
    form: str, log_format: str, secret_pki: dict[str, Path]
) -> None:
    """A real `tlsgate server` whose key needs a password given as env:VAR or file:PATH. It serves mutual TLS;
    the password is not in /proc/PID/cmdline; and after good clients, refused clients, garbage, a failed reload
    (SIGHUP with the key file broken) and a stop, no log line holds a password or any piece of a key."""
    template, password = SECRET_FORMS[form]
    secret_args = [arg.format(**{k: str(v) for k, v in secret_pki.items()}) for arg in template]
    env = {"TLSGATE_HARDENING_STOREPASS": STOREPASS, "TLSGATE_HARDENING_KEYPASS": KEYPASS} if "env" in form else {}
    good = ssl.create_default_context(cafile=str(secret_pki["ca"]))
    good.load_cert_chain(str(secret_pki["alice_cert"]), str(secret_pki["alice_key"]))
    anonymous = ssl.create_default_context(cafile=str(secret_pki["ca"]))
    async with (
        backend() as be,
        tlsgate_server(
            [
                "--listen", "127.0.0.1:0", "--target", be.address, *secret_args, "--cacert", str(secret_pki["ca"]),
                "--allow-cn", "alice", "--log-format", log_format,
            ],
            env=env,
        ) as server,
    ):  # fmt: skip
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert password not in cmdline
        assert secret_args[-1] in cmdline  # the reference (env:VAR, file:PATH) is all there is
        if "file" in form:
            assert password.encode() not in Path(f"/proc/{server.proc.pid}/environ").read_bytes()

        await round_trip(server.port, good)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await round_trip(server.port, anonymous)
        await asyncio.to_thread(garbage, server.port, 3)
        await server.wait_for_line("refused")

        broken = secret_pki["p12" if "keystore" in form else "key"]
        original = broken.read_bytes()
        broken.write_bytes(original[: len(original) // 2])
        server.signal(signal.SIGHUP)
        await server.wait_for_line("reload failed")
        broken.write_bytes(original)
        await round_trip(server.port, good)  # still serving with what it had

        server.signal(signal.SIGTERM)
        assert await server.exit_code() == 0
    log = server.log
    assert "reload failed" in log and "refused" in log
    for marker in secret_markers(secret_pki):
        assert marker not in log, f"{marker!r} appears in the log"


@pytest.mark.parametrize("flag", ["--storepass", "--key-pass"])
def test_a_wrong_password_error_names_the_flag_not_the_password(flag: str, secret_pki: dict[str, Path]) -> None:
    wrong = "not-the-password-but-still-secret-0815"
    store = ["--keystore", str(secret_pki["p12"])] if flag == "--storepass" else []
    pem = ["--cert", str(secret_pki["cert"]), "--key", str(secret_pki["key"])] if flag == "--key-pass" else []
    args = [
        "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", *store, *pem, flag, "env:TLSGATE_WRONG",
        "--cacert", str(secret_pki["ca"]), "--allow-cn", "alice",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args, env={"TLSGATE_WRONG": wrong})
    assert result.exit_code == 2, result.output
    assert flag in result.output
    assert wrong not in result.output


def test_a_tunnel_config_never_shows_its_passwords(secret_pki: dict[str, Path]) -> None:
    cfg = tunnel_config(
        "server",
        {
            "listen": "127.0.0.1:0",
            "target": "127.0.0.1:1",
            "keystore": str(secret_pki["p12"]),
            "storepass": f"file:{secret_pki['storepass']}",
            "key_pass": f"pass:{KEYPASS}",
            "disable_authentication": True,
        },
    )
    assert cfg.storepass == STOREPASS.encode() and cfg.key_pass == KEYPASS.encode()
    assert STOREPASS not in repr(cfg) and KEYPASS not in repr(cfg)
