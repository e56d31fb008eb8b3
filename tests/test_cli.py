"""Bad input on the command line: one line naming the problem, exit code 2, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from tlsgate.cli import cli
from tlsgate.pki import CertificateAuthority


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def base(pki_files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "server",
        "--listen",
        "127.0.0.1:0",
        "--target",
        "127.0.0.1:1",
        "--cert",
        str(pki_files["cert"]),
        "--key",
        str(pki_files["key"]),
        "--cacert",
        str(pki_files["ca"]),
        "--allow-cn",
        "alice",
        *extra,
    ]


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if line.startswith(("tlsgate: error:", "Error:"))]
    assert error_lines, output
    for needle in needles:
        assert needle in output, output


@pytest.fixture
def p12(tmp_path: Path) -> Path:
    ca = CertificateAuthority.create(tmp_path / "ca")
    files = ca.issue("localhost").write(tmp_path, "store", p12=True, p12_password=b"right")
    return files["p12"]


def test_unknown_flag(pki_files: dict[str, Path]) -> None:
    assert_one_line_error(*run(*base(pki_files, "--frobnicate")), "--frobnicate")


@pytest.mark.parametrize("flag", ["--protocol", "--max-tls-version", "--proxy-protocol-mode"])
def test_a_bad_choice_reads_as_one_sentence(pki_files: dict[str, Path], flag: str) -> None:
    # click ends its message with a full stop; the pointer to --help follows it without a second one.
    code, output = run(*base(pki_files, flag, "nonsense"))
    assert_one_line_error(code, output, f"'{flag}'", " server --help")
    assert ".;" not in output, output


def test_missing_certificate_file(pki_files: dict[str, Path], tmp_path: Path) -> None:
    args = base(pki_files)
    args[args.index("--cert") + 1] = str(tmp_path / "nope.pem")
    assert_one_line_error(*run(*args), "nope.pem", "no such file")


def test_unreadable_key(pki_files: dict[str, Path], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("this is not a key\n")
    args = base(pki_files)
    args[args.index("--key") + 1] = str(garbage)
    assert_one_line_error(*run(*args), "garbage.key", "not a private key")


def test_key_not_matching_certificate(pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    ca.issue_cert("elsewhere").private_key_pem.write_to_path(str(other))
    args = base(pki_files)
    args[args.index("--key") + 1] = str(other)
    assert_one_line_error(*run(*args), "does not match the certificate")


def test_wrong_storepass(pki_files: dict[str, Path], p12: Path) -> None:
    args = [a for a in base(pki_files)]
    i = args.index("--cert")
    del args[i : i + 4]
    args += ["--keystore", str(p12), "--storepass", "wrong"]
    assert_one_line_error(*run(*args), "storepass")


def test_storepass_from_missing_environment_variable(pki_files: dict[str, Path], p12: Path) -> None:
    args = base(pki_files)
    i = args.index("--cert")
    del args[i : i + 4]
    args += ["--keystore", str(p12), "--storepass", "env:TLSGATE_TEST_UNSET_VARIABLE"]
    assert_one_line_error(*run(*args), "TLSGATE_TEST_UNSET_VARIABLE")


@pytest.mark.parametrize("value", ["10", "5 minutes", "-1s", "1d"])
def test_bad_duration(pki_files: dict[str, Path], value: str) -> None:
    assert_one_line_error(*run(*base(pki_files, "--connect-timeout", value)), "--connect-timeout", "duration")


def test_port_in_use(pki_files: dict[str, Path]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = base(pki_files)
        args[args.index("--listen") + 1] = f"127.0.0.1:{port}"
        assert_one_line_error(*run(*args), f"127.0.0.1:{port}", "cannot listen")


def test_server_needs_an_allow_rule(pki_files: dict[str, Path]) -> None:
    args = base(pki_files)
    i = args.index("--allow-cn")
    del args[i : i + 2]
    assert_one_line_error(*run(*args), "--allow-all", "--disable-authentication")


def test_remote_plaintext_target_needs_unsafe_target(pki_files: dict[str, Path]) -> None:
    args = base(pki_files)
    args[args.index("--target") + 1] = "10.1.2.3:6379"
    assert_one_line_error(*run(*args), "--unsafe-target")


def test_public_listen_without_client_auth_needs_unsafe_listen(pki_files: dict[str, Path]) -> None:
    args = base(pki_files)
    i = args.index("--allow-cn")
    args[i : i + 2] = ["--disable-authentication"]
    i = args.index("--cacert")
    del args[i : i + 2]
    args[args.index("--listen") + 1] = "0.0.0.0:0"
    assert_one_line_error(*run(*args), "--unsafe-listen")


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--listen", "localhost", "HOST:PORT"),
        ("--listen", "127.0.0.1:99999", "out of range"),
        ("--allow-from", "10.0.0.300/8", "not a network"),
        ("--max-concurrent-conns", "many", "many"),
    ],
)
def test_malformed_values(pki_files: dict[str, Path], flag: str, value: str, needle: str) -> None:
    args = base(pki_files)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert_one_line_error(*run(*args), needle)


def test_several_problems_are_all_reported(pki_files: dict[str, Path]) -> None:
    code, output = run(*base(pki_files, "--idle-timeout", "soon", "--close-timeout", "later"))
    assert_one_line_error(code, output, "--idle-timeout", "--close-timeout")


def test_client_mode_needs_a_certificate_or_disable_authentication() -> None:
    code, output = run("client", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1")
    assert_one_line_error(code, output, "--disable-authentication")


def test_version_and_help() -> None:
    code, output = run("--version")
    assert code == 0 and "tlsgate" in output
    code, output = run("server", "--help")
    assert code == 0
    for flag in ("--listen", "--target", "--keystore", "--cacert", "--allow-cn", "--allow-uri", "--connect-timeout"):
        assert flag in output
