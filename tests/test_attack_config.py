"""Hostile or careless settings (security issue #13, items 11-13 and 15d): every bad value is one line and exit 2,
never a traceback; a password is never quoted back; the quiet risks (stale CRLs, reload storms, an exposed or
unusable status port) are said out loud; and what a certificate's subject says cannot rewrite a log line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlsgate import cli as cli_module
from tlsgate import logs
from tlsgate.cli import cli
from tlsgate.errors import ConfigError
from tlsgate.policy import CrlSource
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import tunnel_config

from helpers import backend, server_opts, write_crl

bounded = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- how a refusal must look -----------------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def assert_refused(result: Result, *needles: str, lines: int | None = 1) -> list[str]:
    """Exit 2, only ``tlsgate: error:`` lines on stderr (``lines`` of them), no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line]
    assert errors, result.output
    assert all(line.startswith(("tlsgate: error: ", "Error: ", "Usage: ", "Try ")) for line in errors), errors
    if lines is not None:
        assert len([e for e in errors if e.startswith("tlsgate: error: ")]) == lines, errors
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return errors


def server_args(pki_files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1",
        "--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"]),
        "--allow-cn", "alice", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_start(monkeypatch: pytest.MonkeyPatch) -> list[Server]:
    """``tlsgate server``/``client`` go through the whole start-up (certificates, contexts: where OpenSSL sees
    the values; the checks that come before binding) and bind on loopback, then stop instead of serving until
    a signal. So an accepted command exits 0, and a test never waits on a server that should have refused."""
    started: list[Server] = []

    def start(cfg: Any, process: ProcessOptions) -> int:
        async def start_and_stop() -> None:
            server = Server([cfg], process)
            started.append(server)
            server.start()
            for tun in server.tunnels.values():
                tun.stop_listening()
            server._remove_signals()

        asyncio.run(start_and_stop())
        return 0

    monkeypatch.setattr(cli_module, "_start", start)
    return started


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def tunnel_file(tmp_path: Path, pki_files: dict[str, Path], extra: str = "", process: str = "") -> Path:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        (f"[process]\n{process}\n" if process else "")
        + "[[tunnel]]\n"
        + 'name = "t"\nmode = "server"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\nallow-cn = "alice"\n'
        + f"cert = {toml_string(str(pki_files['cert']))}\nkey = {toml_string(str(pki_files['key']))}\n"
        + f"cacert = {toml_string(str(pki_files['ca']))}\n"
        + extra
        + "\n",
        encoding="utf-8",
    )
    return path


# -- 11: values that reached OpenSSL or a recursive walk -------------------------------------------------------


def test_an_alpn_name_over_255_bytes_is_one_line_on_the_command_line(pki_files: dict[str, Path]) -> None:
    assert_refused(invoke(*server_args(pki_files, "--alpn", "h2," + "a" * 256)), "--alpn", "at most 255")


def test_an_alpn_name_over_255_bytes_is_one_line_in_check_config(pki_files: dict[str, Path], tmp_path: Path) -> None:
    path = tunnel_file(tmp_path, pki_files, f"alpn = {toml_string('a' * 256)}")
    assert_refused(invoke("check-config", str(path)), "alpn", "at most 255")


@pytest.mark.parametrize(
    ("alpn", "needle"),
    [('[""]', "empty protocol name"), ('["hé"]', "not printable ASCII"), ('["a\\u0000b"]', "NUL")],
)
def test_odd_alpn_entries_in_a_file_are_one_line(
    alpn: str, needle: str, pki_files: dict[str, Path], tmp_path: Path
) -> None:
    assert_refused(invoke("check-config", str(tunnel_file(tmp_path, pki_files, f"alpn = {alpn}"))), needle)


def test_non_ascii_alpn_on_the_command_line_is_one_line(pki_files: dict[str, Path]) -> None:
    assert_refused(invoke(*server_args(pki_files, "--alpn", "hé")), "--alpn", "not printable ASCII")


def test_alpn_names_of_1_and_255_bytes_are_accepted(pki_files: dict[str, Path], no_start: list[Server]) -> None:
    result = invoke(*server_args(pki_files, "--alpn", "a," + "b" * 255 + ",http/1.1"))
    assert result.exit_code == 0, result.output
    assert no_start


@pytest.mark.parametrize("nested", ["[" * 2000 + "]" * 2000, "{a=" * 2000 + "1" + "}" * 2000])
def test_a_toml_value_nested_2000_deep_is_one_line(nested: str, tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(f"x = {nested}\n")
    assert_refused(invoke("check-config", str(path)), "nested too deeply")
    assert_refused(invoke("run", str(path)), "nested too deeply")  # refused before anything starts


def test_a_5000_digit_number_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text("[process]\nworkers = " + "9" * 5000 + "\n")
    assert_refused(invoke("check-config", str(path)), "number is too long")


def test_a_huge_string_is_not_quoted_back_in_full(pki_files: dict[str, Path], tmp_path: Path) -> None:
    huge = "x" * 1_000_000
    path = tunnel_file(tmp_path, pki_files, f"allow-ou = {toml_string(huge)}")
    (line,) = assert_refused(invoke("check-config", str(path)))
    assert len(line) < 300, len(line)
    (line,) = assert_refused(invoke(*server_args(pki_files, "--allow-from", huge)))
    assert len(line) < 300, len(line)


@pytest.mark.parametrize(
    "args",
    [
        ("--listen", "unix:/tmp/" + "a" * 200),
        ("--listen", "unix:/tmp/a\0b"),
        ("--crl", "/tmp/a\0b"),
        ("--target-tls", "--target-server-name", "a" * 64 + ".example"),
        ("--target-tls", "--target-server-name", "a..b"),
        ("--connect-timeout", "9" * 400 + "s"),
        ("--metrics-prefix", "tls-gate"),
    ],
    ids=["long-unix-path", "nul-unix-path", "nul-file", "long-label", "empty-label", "infinite", "metric-name"],
)
def test_values_that_only_failed_later_are_refused_at_start(
    pki_files: dict[str, Path], args: tuple[str, ...], no_start: list[Server]
) -> None:
    (line,) = assert_refused(invoke(*server_args(pki_files, *args)))
    assert "\0" not in line


def test_infinity_and_nan_durations_in_a_file_are_refused(pki_files: dict[str, Path], tmp_path: Path) -> None:
    path = tunnel_file(tmp_path, pki_files, "connect-timeout = inf\nidle-timeout = nan")
    assert_refused(invoke("check-config", str(path)), "connect-timeout", "idle-timeout", lines=2)


def test_a_config_path_with_a_nul_is_one_line() -> None:
    assert_refused(invoke("check-config", "bad\0name.toml"), "not a valid file path")


# Values of every TOML type, including the awkward ones (deep nesting, huge, control and bidi characters).
toml_scalars = st.one_of(
    st.text(max_size=300).map(toml_string),
    st.integers().map(str),
    st.sampled_from(["inf", "-inf", "nan", "true", "false", "1979-05-27T07:32:00Z", "0.5", "1e400", '"1ns"']),
    st.sampled_from(["[" * 400 + "]" * 400, "[" * 3000 + "]" * 3000, "9" * 5000, toml_string("x" * 10_000)]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2).map(
            lambda table: "{" + ", ".join(f"{k} = {v}" for k, v in table.items()) + "}"
        ),
    ),
    max_leaves=5,
)
tunnel_keys = st.sampled_from(
    [
        "alpn", "listen", "target", "cert", "keystore", "storepass", "key-pass", "allow-cn", "allow-from",
        "crl", "crl-max-age", "timed-reload", "connect-timeout", "max-concurrent-conns", "proxy-protocol-version",
        "target-server-name", "override-server-name", "unsafe-target", "mode", "name", "bogus-key",
    ]
)  # fmt: skip
process_keys = st.sampled_from(["status", "metrics-prefix", "workers", "log-format", "quiet", "loop"])


@bounded
@given(
    tunnel_entries=st.lists(st.tuples(tunnel_keys, toml_values), max_size=3, unique_by=lambda kv: kv[0]),
    process_entries=st.lists(st.tuples(process_keys, toml_values), max_size=2, unique_by=lambda kv: kv[0]),
)
def test_any_toml_document_is_ok_or_one_line_per_problem(
    tunnel_entries: list[tuple[str, str]],
    process_entries: list[tuple[str, str]],
    pki_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    extra = "\n".join(f"{key} = {value}" for key, value in tunnel_entries)
    process = "\n".join(f"{key} = {value}" for key, value in process_entries)
    result = invoke("check-config", str(tunnel_file(tmp_path, pki_files, extra, process)))
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert_refused(result, lines=None)
        for line in result.stderr.splitlines():
            assert line.isprintable() and len(line) < 600, line


option_values = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="ascii"), max_size=300),
    st.sampled_from(["", ",", "a" * 256, "9" * 400 + "s", "1ns", "unix:" + "a" * 200, "http://h:1/x", ":0"]),
).filter(lambda v: "\0" not in v)  # a NUL cannot be in argv, so click never sees one


@bounded
@given(
    flag=st.sampled_from(
        [
            "--alpn", "--listen", "--target", "--allow-cn", "--allow-from", "--crl", "--crl-max-age",
            "--timed-reload", "--connect-timeout", "--max-concurrent-conns", "--proxy-protocol-version",
            "--target-server-name", "--metrics-prefix", "--status", "--storepass",
        ]
    ),
    value=option_values,
)  # fmt: skip
def test_any_option_value_is_ok_or_one_line(
    flag: str, value: str, pki_files: dict[str, Path], no_start: list[Server]
) -> None:
    extra = ["--target-tls", flag, value] if flag == "--target-server-name" else [flag, value]
    if flag == "--crl-max-age":
        extra = []  # needs a --crl; its own test covers it
    result = invoke(*server_args(pki_files, *extra))
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert_refused(result, lines=None)


# -- 12: secrets are never quoted back ------------------------------------------------------------------------

secrets = st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=8, max_size=40).map(
    lambda text: "Zq7" + text  # no word of an error message contains it
)


@bounded
@given(secret=secrets, number=st.integers(min_value=10**7, max_value=10**30))
def test_a_password_never_appears_in_any_error(
    secret: str, number: int, pki_files: dict[str, Path], tmp_path: Path
) -> None:
    outputs: list[tuple[str, str]] = []
    for key in ("storepass", "key-pass"):
        # Each a wrong form of the password itself: a number, a list, a table, with a NUL, far too long.
        for value, shown in (
            (str(number), str(number)),
            (f"[{toml_string(secret)}]", secret),
            (f"{{a = {toml_string(secret)}}}", secret),
            (toml_string(secret + "\0"), secret),
            (toml_string(secret * 600), secret),  # over 4096 characters
        ):
            result = invoke("check-config", str(tunnel_file(tmp_path, pki_files, f"{key} = {value}")))
            assert result.exit_code == 2
            outputs.append((shown, result.output + result.stderr))
    # A keystore that does not open, with its password given directly, from a file and from the environment.
    keystore = tmp_path / "store.p12"
    keystore.write_bytes(b"not a keystore")
    password_file = tmp_path / "pw"
    password_file.write_text(secret + "\n")
    for storepass in (secret, f"file:{password_file}", "env:TLSGATE_ATTACK_SECRET"):
        args = ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--keystore", str(keystore)]
        args += ["--storepass", storepass, "--cacert", str(pki_files["ca"]), "--allow-cn", "a"]
        result = invoke(*args, env={"TLSGATE_ATTACK_SECRET": secret})
        assert result.exit_code == 2
        outputs.append((secret, result.output + result.stderr))
    for secret_shown, output in outputs:
        assert secret_shown not in output, output


@pytest.mark.parametrize("source", ["file:a\nb", "env:A\u202eB"])
def test_a_password_source_with_control_characters_is_one_line(
    source: str, pki_files: dict[str, Path], tmp_path: Path
) -> None:
    path = tunnel_file(tmp_path, pki_files, f"key-pass = {toml_string(source)}")
    (line,) = assert_refused(invoke("check-config", str(path)), "key-pass")
    assert line.isprintable(), line


def test_digit_storepass_in_a_file_names_the_key_and_the_type_only(pki_files: dict[str, Path], tmp_path: Path) -> None:
    path = tunnel_file(tmp_path, pki_files, "storepass = 12345678")
    (line,) = assert_refused(invoke("check-config", str(path)), "storepass", "got a number")
    assert "12345678" not in line


@pytest.mark.asyncio
async def test_a_failed_reload_logs_no_password(
    pki_files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hunter2-correct-horse"
    path = tunnel_file(tmp_path, pki_files)
    from tlsgate.process.check import load_tunnels

    server = Server(load_tunnels(str(path)), ProcessOptions(), load_configs=lambda: load_tunnels(str(path)))
    task = asyncio.create_task(server.serve())
    await server.started.wait()
    path.write_text(path.read_text() + f"key-pass = [{toml_string(secret)}]\n")
    with caplog.at_level(logging.INFO, logger="tlsgate"):
        assert not server.reload()
    server.stop()
    await task
    text = "\n".join(str(getattr(r, "fields", "")) + r.getMessage() for r in caplog.records)
    assert "reload failed" in text
    assert secret not in text


# -- 13b: --timed-reload has a floor --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1ns", "999ms", "0.5s"])
def test_timed_reload_below_one_second_is_refused(
    value: str, pki_files: dict[str, Path], tmp_path: Path, no_start: list[Server]
) -> None:
    assert_refused(invoke(*server_args(pki_files, "--timed-reload", value)), "--timed-reload", "at least 1s")
    path = tunnel_file(tmp_path, pki_files, f"timed-reload = {toml_string(value)}")
    assert_refused(invoke("check-config", str(path)), "timed-reload", "at least 1s")


def test_timed_reload_below_one_second_as_a_number_in_a_file_is_refused(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    path = tunnel_file(tmp_path, pki_files, "timed-reload = 0.001")
    assert_refused(invoke("check-config", str(path)), "timed-reload", "at least 1s")


@pytest.mark.parametrize("value", ["0", "1s", "1m"])
def test_timed_reload_of_zero_or_at_least_a_second_is_accepted(
    value: str, pki_files: dict[str, Path], no_start: list[Server]
) -> None:
    assert invoke(*server_args(pki_files, "--timed-reload", value)).exit_code == 0


# -- 13c/d: the status port ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "needle"),
    [("http://127.0.0.1:0/x", "paths are fixed"), ("ftp://127.0.0.1:0", "not http or https")],
)
def test_a_bad_status_address_is_refused_before_anything_listens(
    status: str, needle: str, pki_files: dict[str, Path], tmp_path: Path, no_start: list[Server]
) -> None:
    result = invoke(*server_args(pki_files, "--status", status))
    assert_refused(result, needle)
    assert "listening" not in result.output + result.stderr
    path = tunnel_file(tmp_path, pki_files, process=f"status = {toml_string(status)}")
    assert_refused(invoke("check-config", str(path)), needle)


def test_https_status_without_any_certificate_is_refused_before_anything_listens(
    pki_files: dict[str, Path], tmp_path: Path, no_start: list[Server]
) -> None:
    args = ["client", "--listen", "127.0.0.1:0", "--target", "localhost:1", "--disable-authentication"]
    result = invoke(*args, "--cacert", str(pki_files["ca"]), "--status", "https://127.0.0.1:0")
    assert_refused(result, "no server certificate to serve HTTPS")
    assert "listening" not in result.output + result.stderr
    path = tmp_path / "client.toml"
    path.write_text(
        '[process]\nstatus = "https://127.0.0.1:0"\n[[tunnel]]\nname = "c"\nmode = "client"\n'
        'listen = "127.0.0.1:0"\ntarget = "localhost:1"\ndisable-authentication = true\n'
    )
    assert_refused(invoke("check-config", str(path)), "no server certificate to serve HTTPS")


@pytest.mark.asyncio
async def test_a_server_refuses_a_bad_status_before_binding(pki_files: dict[str, Path]) -> None:
    cfg = tunnel_config("server", server_opts(pki_files, "127.0.0.1:1", listen="127.0.0.1:0", allow_cn=["a"]))
    server = Server([cfg], ProcessOptions(status="http://127.0.0.1:0/metrics"))
    with pytest.raises(ConfigError):
        await server.serve()
    assert not server.tunnels


@pytest.mark.parametrize(
    ("status", "exposed"),
    [
        (":9000", True), ("0.0.0.0:9000", True), ("[::]:9000", True), ("http://:9000", True),
        ("10.1.2.3:9000", True), ("127.0.0.1:9000", False), ("localhost:9000", False),
        ("[::1]:9000", False), ("unix:/run/tlsgate.sock", False),
    ],
)  # fmt: skip
def test_which_status_addresses_are_exposed(status: str, exposed: bool) -> None:
    from tlsgate.status import check_status_setting

    assert check_status_setting(status, []).exposed is exposed


@pytest.mark.asyncio
async def test_an_exposed_status_port_is_one_warning_at_start(
    pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The test must not listen on every interface: the status server itself is replaced, the warning is not.
    class NoStatus:
        def close(self) -> None:
            pass

    async def start_status_server(server: Server, address: str) -> NoStatus:
        return NoStatus()

    import tlsgate.status.http

    monkeypatch.setattr(tlsgate.status.http, "start_status_server", start_status_server)
    for status, warned in ((":9000", True), ("127.0.0.1:0", False)):
        caplog.clear()
        cfg = tunnel_config("server", server_opts(pki_files, "127.0.0.1:1", listen="127.0.0.1:0", allow_cn=["a"]))
        server = Server([cfg], ProcessOptions(status=status))
        with caplog.at_level(logging.INFO, logger="tlsgate"):
            task = asyncio.create_task(server.serve())
            await server.started.wait()
            await asyncio.sleep(0)
            server.stop()
            await task
        warnings = [r for r in caplog.records if "status port is reachable" in r.getMessage()]
        assert len(warnings) == (1 if warned else 0), status


# -- 13a: CRLs past their next update, and --crl-max-age -------------------------------------------------------


@pytest.fixture
def overdue_crl(ca: trustme.CA, tmp_path: Path) -> Path:
    now = datetime.now(UTC)
    return write_crl(tmp_path / "old.pem", ca, issued=now - timedelta(days=40), next_update=now - timedelta(days=10))


@pytest.fixture
def fresh_crl(ca: trustme.CA, tmp_path: Path) -> Path:
    now = datetime.now(UTC)
    return write_crl(tmp_path / "new.pem", ca, issued=now - timedelta(hours=1), next_update=now + timedelta(days=7))


def crl_warnings(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    return [r.fields for r in records if r.getMessage().startswith("CRL is past its next update")]  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_an_overdue_crl_is_one_warning_at_start_and_at_each_reload(
    pki_files: dict[str, Path], overdue_crl: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tunnel_config(
        "server", server_opts(pki_files, "127.0.0.1:1", listen="127.0.0.1:0", allow_cn=["a"], crl=[str(overdue_crl)])
    )
    server = Server([cfg], ProcessOptions())
    with caplog.at_level(logging.INFO, logger="tlsgate"):
        task = asyncio.create_task(server.serve())
        await server.started.wait()
        (warning,) = crl_warnings(caplog.records)
        assert warning["crl"] == str(overdue_crl)
        assert warning["next_update"].startswith((datetime.now(UTC) - timedelta(days=10)).strftime("%Y-%m-%d"))
        assert server.reload()
        assert len(crl_warnings(caplog.records)) == 2
        server.stop()
        await task


def test_an_overdue_crl_is_a_warning_in_check_config_and_policy_check(
    pki_files: dict[str, Path], overdue_crl: Path, fresh_crl: Path, tmp_path: Path
) -> None:
    path = tunnel_file(tmp_path, pki_files, f"crl = [{toml_string(str(overdue_crl))}, {toml_string(str(fresh_crl))}]")
    result = invoke("check-config", str(path))
    assert result.exit_code == 0, result.output
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("tlsgate: warning: tunnel 't': CRL ") and str(overdue_crl) in warning, warning
    result = invoke(
        "policy", "check", "--cert", str(pki_files["client_cert"]), "--cacert", str(pki_files["ca"]),
        "--allow-cn", "alice", "--crl", str(overdue_crl), "--crl", str(fresh_crl),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "past its next update" in line]
    assert len(lines) == 1 and str(overdue_crl) in lines[0], result.output


def test_crl_max_age_refuses_to_start_with_an_old_crl(
    pki_files: dict[str, Path], overdue_crl: Path, tmp_path: Path, no_start: list[Server]
) -> None:
    result = invoke(*server_args(pki_files, "--crl", str(overdue_crl), "--crl-max-age", "720h"))
    assert_refused(result, str(overdue_crl), "--crl-max-age 720h")
    assert "listening" not in result.output + result.stderr
    path = tunnel_file(tmp_path, pki_files, f'crl = {toml_string(str(overdue_crl))}\ncrl-max-age = "720h"')
    assert_refused(invoke("check-config", str(path)), str(overdue_crl), "crl-max-age")


def test_crl_max_age_accepts_a_younger_crl(pki_files: dict[str, Path], fresh_crl: Path, no_start: list[Server]) -> None:
    result = invoke(*server_args(pki_files, "--crl", str(fresh_crl), "--crl-max-age", "2h"))
    assert result.exit_code == 0, result.output


def test_crl_max_age_needs_a_crl_and_server_mode(pki_files: dict[str, Path], no_start: list[Server]) -> None:
    assert_refused(invoke(*server_args(pki_files, "--crl-max-age", "1h")), "give --crl too")


@pytest.mark.asyncio
async def test_crl_max_age_keeps_the_running_policy_when_a_reload_brings_an_old_crl(
    ca: trustme.CA, pki_files: dict[str, Path], fresh_crl: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    opts = server_opts(
        pki_files, "127.0.0.1:1", listen="127.0.0.1:0", allow_cn=["a"], crl=[str(fresh_crl)], crl_max_age="24h"
    )
    server = Server([tunnel_config("server", opts)], ProcessOptions())
    task = asyncio.create_task(server.serve())
    await server.started.wait()
    (tun,) = server.tunnels.values()
    running = tun.runtime
    now = datetime.now(UTC)
    write_crl(fresh_crl, ca, issued=now - timedelta(days=2), next_update=now + timedelta(days=5))
    with caplog.at_level(logging.INFO, logger="tlsgate"):
        assert not server.reload()
    assert tun.runtime is running
    assert tun.stats.reload_errors == 1
    assert any("reload failed" in r.getMessage() for r in caplog.records)
    server.stop()
    await task


def crl_source(last: datetime, next_update: datetime | None) -> CrlSource:
    return CrlSource("crl.pem", "CN=ca", 0, last, next_update)


@settings(max_examples=200, deadline=None)
@given(
    age=st.integers(min_value=0, max_value=10**8),
    max_age=st.integers(min_value=1, max_value=10**8),
    due=st.one_of(st.none(), st.integers(min_value=-(10**8), max_value=10**8)),
)
def test_crl_age_rules(age: int, max_age: int, due: int | None) -> None:
    from tlsgate.process.crls import crl_problems, overdue_crls

    now = datetime(2026, 11, 29, tzinfo=UTC)
    source = crl_source(now - timedelta(seconds=age), None if due is None else now + timedelta(seconds=due))
    assert bool(crl_problems([source], max_age, now)) is (age > max_age)
    assert crl_problems([source], 0, now) == []
    assert bool(overdue_crls([source], now)) is (due is not None and due < 0)


# -- 15d: what a certificate says cannot rewrite a log line ----------------------------------------------------


def unprintable(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn") or (
        unicodedata.category(char) == "Zs" and char != " "
    )


hostile_text = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.sampled_from(["\u202e", "\u202d", "\u2066", "\u200f", "\u2028", "\u2029", "\x85", "\r", "\x1b", "\x7f"]),
        st.sampled_from(["\U000e0001", "\U0001d173", "\ufeff", "\u061c", "\u00ad", "\ud800"]),
    ),
    max_size=40,
)


def format_line(fmt: str, value: str) -> str:
    formatter = logs.JsonFormatter() if fmt == "json" else logs.TextFormatter()
    record = logging.LogRecord("tlsgate", logging.INFO, "", 0, "refused", (), None)
    record.created = 0.0
    record.fields = {"identity": f"CN={value}", "peer": value, "rule": "identity"}
    direct = formatter.format_event(0.0, logging.INFO, "refused", dict(record.fields))
    assert formatter.format(record) == direct  # the LogRecord path and the direct path write the same line
    return direct


@settings(max_examples=300, deadline=None)
@given(value=hostile_text, fmt=st.sampled_from(["text", "json"]))
def test_no_control_bidi_or_separator_character_reaches_a_log_line_raw(value: str, fmt: str) -> None:
    line = format_line(fmt, value)
    assert not any(unprintable(char) for char in line), ascii(line)
    assert len(line.splitlines()) == 1
    line.encode("utf-8")  # a lone surrogate would make the write fail and the line be lost
    if fmt == "json":
        assert json.loads(line)["peer"] == value
    elif not value:
        assert " peer=" not in line  # an empty field is left out of text lines
    else:
        quoted = line.split(" peer=", 1)[1].split(" rule=", 1)[0]
        assert (json.loads(quoted) if quoted.startswith('"') else quoted) == value


def test_a_right_to_left_override_in_a_cn_is_escaped_in_both_formats() -> None:
    assert "CN=evil\\u202egpj.exe" in format_line("text", "evil\u202egpj.exe")
    assert "CN=evil\\u202egpj.exe" in format_line("json", "evil\u202egpj.exe")


@pytest.mark.asyncio
async def test_a_refused_client_with_a_bidi_cn_is_logged_escaped(ca: trustme.CA, pki_files: dict[str, Path]) -> None:
    import io
    import ssl

    from helpers import assert_cut, client_context, tls_connect, tunnel

    stream = io.StringIO()
    logs.setup_logging("text", stream=stream)
    try:
        evil = ca.issue_cert("evil.test", common_name="admin\u202enimda")
        async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
            try:
                reader, _ = await tls_connect(tun, client_context(ca, evil))
                await assert_cut(reader)
            except (ssl.SSLError, ConnectionError):
                pass
            await asyncio.sleep(0)
        logs.flush_logs()
    finally:
        logs.setup_logging("text", stream=sys.stderr)
        logs.STATE.direct = None
        logs.LOGGER.handlers.clear()
    text = stream.getvalue()
    assert "\u202e" not in text
    assert "admin\\u202enimda" in text, text
