"""What a newcomer hits in the first hour, pinned down: each test fails on the behaviour a first-time user reported."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from tlsgate.cli import cli
from tlsgate.cli.certs import certs
from tlsgate.dev.demo import serve_demo_backend
from tlsgate.pki import load_certificates

from helpers import invoke

run = functools.partial(invoke, certs)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def sans(path: Path) -> x509.SubjectAlternativeName:
    cert = load_certificates(path)[0]
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_localhost_certificate_names_both_loopback_addresses(workdir: Path) -> None:
    ok(run("ca"))
    ok(run("issue", "--name", "localhost"))
    names = sans(workdir / "certs" / "localhost.pem")
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_explicit_sans_for_localhost_are_kept_as_given(workdir: Path) -> None:
    ok(run("ca"))
    ok(run("issue", "--name", "localhost", "--dns", "localhost"))
    names = sans(workdir / "certs" / "localhost.pem")
    assert names.get_values_for_type(x509.IPAddress) == []


def test_crl_is_published_again_after_a_revocation_without_force(workdir: Path) -> None:
    ok(run("ca"))
    ok(run("issue", "--name", "alice", "--client"))
    ok(run("crl"))
    hint = ok(run("revoke", "certs/alice.pem"))
    assert "tlsgate certs crl" in hint
    out = ok(run("crl"))  # exactly what the revoke message tells the user to run
    assert "1 revoked" in out
    crl = x509.load_pem_x509_crl((workdir / "certs" / "crl.pem").read_bytes())
    assert len(list(crl)) == 1


def test_crl_never_silently_replaces_something_that_is_not_our_crl(workdir: Path) -> None:
    ok(run("ca"))
    key = workdir / "certs" / "precious.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n")
    result = run("crl", "--out", str(key))
    assert result.exit_code == 2
    assert "already exists; pass --force" in result.stderr
    assert b"not really" in key.read_bytes()


def test_crl_of_another_ca_is_not_replaced_without_force(workdir: Path) -> None:
    ok(run("ca", "--out", "other", "--name", "other CA"))
    ok(run("crl", "--ca", "other", "--out", "shared-crl.pem"))
    ok(run("ca"))
    result = run("crl", "--out", "shared-crl.pem")
    assert result.exit_code == 2
    assert "already exists" in result.stderr


def test_example_certificates_written_next_to_the_examples_are_ignored_by_git() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("docs/examples/certs/ca/ca.key", "docs/examples/certs/localhost.key"):
        check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path], check=False)
        assert check.returncode == 0, f"{path} would be committed by `git add -A`"


@pytest.mark.asyncio
async def test_demo_page_escapes_the_request_line() -> None:
    server = await serve_demo_backend()
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /<script>alert(1)</script> HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        await writer.drain()
        page = await reader.read()
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert b"<script>" not in page
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in page


def _leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in sorted(group.commands.items()):
        if command.hidden:
            continue
        if isinstance(command, click.Group):
            found += _leaf_commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


@pytest.mark.parametrize("words", _leaf_commands(cli), ids=" ".join)
def test_every_command_help_shows_a_worked_example(words: tuple[str, ...]) -> None:
    """Help that teaches: each command's --help shows at least one command line a newcomer can copy."""
    result = CliRunner().invoke(cli, [*words, "--help"])
    assert result.exit_code == 0, result.output
    command_line = "tlsgate " + " ".join(words)
    examples = [line for line in result.output.splitlines() if command_line in line and "Usage:" not in line]
    assert examples, f"`tlsgate {' '.join(words)} --help` shows no example:\n{result.output}"
