"""The settings table (tlsgate.settings): every flag and key declared once, and what is generated from it.

These pin down that the command line, the TOML file and the typed config are all read through one table (a
setting cannot exist in one and be missing from another), that ``--help`` groups flags in sections with worked
examples, and that click's own usage errors are our one ``tlsgate: error:`` line with exit code 2.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tlsgate import cli as tlsgate_cli
from tlsgate.cli import cli
from tlsgate.errors import ConfigError
from tlsgate.logs import QUIET_CHOICES
from tlsgate.process.supervisor import ProcessOptions
from tlsgate.settings import ENV_FLAGS, SECTIONS, SETTINGS, process_settings, setting
from tlsgate.settings.config import (
    _TIMEOUT_KEYS,
    KNOWN_KEYS,
    PROCESS_KEYS,
    SECRET_KEYS,
    ConfigErrors,
    TunnelConfig,
    server_access,
    tunnel_config,
)
from tlsgate.settings.convert import _CONVERTERS
from tlsgate.settings.file import read_config_file


def invoke(*args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args), prog_name="tlsgate")


def command(name: str) -> click.Command:
    found = cli.commands[name]
    assert isinstance(found, click.Command)
    return found


# -- the table is complete --------------------------------------------------------------------------------------


def test_every_config_field_and_process_option_is_one_setting() -> None:
    # route_default is derived: whether --target was given beside --route (docs/routes.md).
    tunnel_fields = {f.name for f in fields(TunnelConfig)} - {"mode", "name", "timeouts", "route_default"}
    process_fields = {f.name for f in fields(ProcessOptions)} - {"config_path", "extra"}
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)), "a setting is declared twice"
    assert set(names) == tunnel_fields | set(_TIMEOUT_KEYS) | process_fields
    assert set(names) == KNOWN_KEYS
    assert process_fields == PROCESS_KEYS


def test_every_kind_has_a_converter_and_every_section_is_known() -> None:
    for entry in SETTINGS:
        assert entry.section in SECTIONS, entry
        if entry.scope != "process":
            assert entry.kind in _CONVERTERS, entry
        assert entry.help or entry.help_by_mode, entry


def test_secrets_env_vars_and_choices_come_from_the_table() -> None:
    assert {"storepass", "key_pass", "proxy"} == SECRET_KEYS
    assert tlsgate_cli.ENV_FLAGS is ENV_FLAGS
    assert ENV_FLAGS == {
        "keystore": "KEYSTORE_PATH",
        "cert": "CERT_PATH",
        "key": "KEY_PATH",
        "storepass": "KEYSTORE_PASS",
        "cacert": "CACERT_PATH",
    }
    assert setting("quiet").choices == QUIET_CHOICES


@pytest.mark.parametrize("mode", ["server", "client"])
def test_each_command_has_exactly_the_flags_its_mode_takes(mode: str) -> None:
    params = {p.name: p for p in command(mode).params if isinstance(p, click.Option) and p.name != "help"}
    assert set(params) == {s.name for s in SETTINGS if s.takes(mode)}
    for name, param in params.items():
        assert setting(name).flag in param.opts


@pytest.mark.parametrize("entry", [s for s in SETTINGS if s.scope != "process"], ids=lambda s: s.name)
def test_every_tunnel_setting_is_a_file_key_of_the_same_name(entry: object, tmp_path: Path) -> None:
    """A key the table declares is never 'unknown' in a file (its value may still be wrong for the mode)."""
    name = getattr(entry, "name")  # noqa: B009 (the parametrised value is typed as object for the ids)
    path = tmp_path / "t.toml"
    path.write_text(f'[[tunnel]]\nname = "t"\nmode = "server"\n{name.replace("_", "-")} = 1\n')
    problems = read_config_file(str(path)).problems
    assert not any("unknown key" in p for p in problems), problems


@pytest.mark.parametrize("entry", process_settings(), ids=lambda s: s.name)
def test_every_process_setting_is_a_process_key(entry: object, tmp_path: Path) -> None:
    name = getattr(entry, "name")  # noqa: B009
    path = tmp_path / "t.toml"
    path.write_text(f"[process]\n{name.replace('_', '-')} = []\n")
    problems = read_config_file(str(path)).problems
    assert not any("unknown key" in p or "tunnel setting" in p for p in problems), problems


# -- --help -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["server", "client"])
def test_help_groups_the_flags_in_sections_in_order(mode: str) -> None:
    result = invoke(mode, "--help")
    assert result.exit_code == 0
    headings = [line[:-1] for line in result.output.splitlines() if re.fullmatch(r"[A-Z][a-z ]+:", line)]
    expected = [s.capitalize() for s in SECTIONS]
    assert [h for h in headings if h in expected] == expected
    # A flag sits under its own section's heading.
    text = result.output
    assert text.index("Timeouts:") < text.index("--idle-timeout") < text.index("Upstream:")
    assert text.index("Certificates:") < text.index("--cacert") < text.index("Access rules:")


@pytest.mark.parametrize("mode", ["server", "client"])
def test_help_shows_two_worked_examples_that_parse(mode: str) -> None:
    output = invoke(mode, "--help").output
    examples = output[output.index("Examples:") :]
    commands = re.findall(r"^\s*(tlsgate .*?)(?=^\s*#|\Z)", examples, flags=re.M | re.S)
    assert len(commands) == 2
    for text in commands:
        argv = text.replace("\\\n", " ").split()[1:]
        assert argv[0] == mode
        # Every flag of an example exists: it parses (the files it names need not exist here).
        ctx = command(mode).make_context(mode, argv[1:])
        assert ctx.params["listen"] and ctx.params["target"]


@pytest.mark.parametrize("name", ["run", "check-config"])
def test_run_and_check_config_help_explain_more_than_one_line(name: str) -> None:
    result = invoke(name, "--help")
    assert result.exit_code == 0
    description = result.output.split("Options:")[0].splitlines()[2:]
    assert len([line for line in description if line.strip()]) > 3
    assert "Example" in result.output


def test_unsafe_listen_help_says_exactly_when_it_is_needed() -> None:
    server_help = " ".join(invoke("server", "--help").output.split())
    client_help = " ".join(invoke("client", "--help").output.split())
    assert "Allow listening on a non-loopback address" not in server_help
    assert "--unsafe-listen Needed only with --disable-authentication when --listen is not a loopback" in server_help
    assert "--unsafe-listen Needed when --listen is not a loopback address or unix socket" in client_help


def test_unsafe_listen_is_needed_exactly_as_its_help_says(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    server = {"listen": "0.0.0.0:0", "target": "127.0.0.1:1", "cert": str(pem), "key": str(pem)}
    # Client certificates required: any address, no --unsafe-listen.
    tunnel_config("server", {**server, "cacert": str(pem), "allow_all": True})
    with pytest.raises(ConfigErrors, match="--unsafe-listen"):
        tunnel_config("server", {**server, "disable_authentication": True})
    tunnel_config("server", {**server, "disable_authentication": True, "unsafe_listen": True})
    with pytest.raises(ConfigErrors, match="--unsafe-listen"):
        tunnel_config("client", {"listen": "0.0.0.0:0", "target": "127.0.0.1:1"})


# -- click's usage errors are one line ----------------------------------------------------------------------------


def assert_one_error_line(result: click.testing.Result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlsgate: error: "), lines
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@given(st.from_regex(r"--[a-z][a-z0-9-]{0,20}", fullmatch=True))
def test_an_unknown_flag_is_one_error_line_and_exit_2(flag: str) -> None:
    known = {s.flag for s in SETTINGS} | {opt for s in SETTINGS for opt in s.aliases} | {"--help"}
    if flag in known:
        return
    for mode in ("server", "client"):
        assert_one_error_line(invoke(mode, flag, "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1"), flag)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["server", "--target", "127.0.0.1:1"], "--listen"),
        (["server", "--listen"], "--listen"),
        (["server", "--log-format", "xml"], "xml"),
        (["client", "--workers", "0"], "--workers"),
        (["serve"], "serve"),
        (["--no-such-flag"], "--no-such-flag"),
        (["check-config"], "FILE"),
        (["certs", "issue", "--no-such-flag"], "--no-such-flag"),
    ],
)
def test_other_usage_errors_are_one_line_too(argv: list[str], needle: str) -> None:
    assert_one_error_line(invoke(*argv), needle)


def test_a_usage_error_points_at_the_commands_help() -> None:
    result = invoke("server", "--lisen", "x")
    assert "--listen" in result.stderr  # click's suggestion is kept
    assert result.stderr.rstrip().endswith("see tlsgate server --help")


# -- one place for the rules between settings -------------------------------------------------------------------


def test_client_identity_rule_reads_the_same_from_flags_and_from_a_file(tmp_path: Path) -> None:
    result = invoke("client", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1")
    assert_one_error_line(result)
    flag_message = result.stderr.removeprefix("tlsgate: error: ").strip()
    assert (
        flag_message == "client mode needs a certificate: --cert and --key, or --keystore, or --disable-authentication"
    )

    path = tmp_path / "t.toml"
    path.write_text('[[tunnel]]\nname = "c"\nmode = "client"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\n')
    file_messages = read_config_file(str(path)).problems
    assert file_messages == ["tunnel 'c': " + flag_message.replace("--", "")]


def test_disable_authentication_with_a_certificate_reads_the_same_from_flags_and_from_a_file(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    args = ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--disable-authentication"]
    result = invoke("client", *args, "--cert", str(pem), "--key", str(pem))
    assert_one_error_line(result, "--disable-authentication presents no certificate")
    path = tmp_path / "t.toml"
    path.write_text(
        '[[tunnel]]\nname = "c"\nmode = "client"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\n'
        f'cert = "{pem}"\nkey = "{pem}"\ndisable-authentication = true\n'
    )
    assert read_config_file(str(path)).problems == [
        "tunnel 'c': disable-authentication presents no certificate: drop keystore/cert/key"
    ]


@pytest.mark.parametrize(
    "rules",
    [
        {"allow_all": True, "allow_ou": ["eng"]},
        {"disable_authentication": True, "allow_cn": ["alice"]},
        {"disable_authentication": True, "allow_all": True},
        {"disable_authentication": True, "crl": ["CRL"]},
    ],
    ids=["allow-all+allow-ou", "disable-auth+allow-cn", "disable-auth+allow-all", "disable-auth+crl"],
)
def test_policy_combinations_are_refused_by_the_config_in_build_policys_words(
    rules: dict[str, object], tmp_path: Path
) -> None:
    """Before, tunnel_config let ``--allow-all --allow-ou eng`` through and only building the policy refused it:
    check-config reported it apart from the other problems, in other words. Now the one rule function has it."""
    from tlsgate.policy import build_policy

    pem = tmp_path / "x.pem"
    pem.write_text("x")
    rules = {k: [str(pem)] if v == ["CRL"] else v for k, v in rules.items()}
    options = {"listen": "127.0.0.1:0", "target": "127.0.0.1:1", "cert": str(pem), "key": str(pem)}
    with pytest.raises(ConfigError) as from_policy:
        build_policy(server_access(**rules))  # type: ignore[arg-type]
    with pytest.raises(ConfigErrors) as from_config:
        tunnel_config("server", {**options, "cacert": str(pem), **rules})
    assert str(from_policy.value) in from_config.value.problems
