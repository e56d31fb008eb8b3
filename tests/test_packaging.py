"""Installing and living with tlsgate as a tool (#17): shell completion, the man page, platform guards, and the
start-up refusals a newcomer hits first (a client-only certificate on a server, `certs ca --force`).

The build/install smoke test (sdist + wheel + clean venv + a real tunnel) is .ci/smoke_install.py, run by .ci/run:
it needs the network for pip, so it stays out of the unit tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.cli import cli
from tlsgate.cli_extras import _escape, render_man_page

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
                for flag in param.opts + param.secondary_opts:
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
