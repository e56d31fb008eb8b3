"""Docs that run: every shell example of README.md and docs/*.md runs here as a reader would type it.

How pages mark their examples, how shown output is compared, and how ports are mapped to free ones is
described in ``tests/docs_blocks.py``. One test per page (a page runs its blocks in order, in its own
scratch directory, with ``tlsgate`` on PATH), one per example config file, and one per page that fails when
a shell example carries no marker, so a new example is either run or says why it cannot be.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from docs_blocks import (
    REPO,
    Block,
    PageRun,
    blocks,
    console_commands,
    missing_programs,
    output_matches,
    run_page,
)

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.toml"))


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_shell_example_is_run_or_says_why_not(page: Path) -> None:
    unmarked = [block.where for block in blocks(page) if block.is_shell_example and block.marker is None]
    assert not unmarked, f"shell examples without <!-- run --> or <!-- not run: REASON -->: {unmarked}"
    reasonless = [block.where for block in blocks(page) if block.marker == "not run" and not block.argument]
    assert not reasonless, f"<!-- not run --> needs a reason: {reasonless}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.marker == "run" for b in blocks(p))], ids=page_id)
def test_page_examples_run_as_shown(page: Path, tmp_path: Path) -> None:
    missing = missing_programs(page)
    if missing:
        pytest.skip(f"{page_id(page)} needs {', '.join(missing)} (.ci/run installs the packages)")
    ran = list(run_page(page, tmp_path))
    assert ran


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid_once_its_certificates_exist(example: Path, tmp_path: Path) -> None:
    """Each example's header comment says which `tlsgate` commands make its certificates; run them, then check."""
    shutil.copy(example, tmp_path / example.name)
    commands = [
        line.lstrip("#").strip().split("  #")[0].strip()
        for line in example.read_text().splitlines()
        if re.match(r"#\s+tlsgate (certs|check-config) ", line)
    ]
    assert any(c.startswith("tlsgate check-config") for c in commands), f"{example.name}: no check-config line"
    runner = PageRun(example, tmp_path)
    for command in commands:
        result = runner.shell(command)
        assert result.returncode == 0, f"{example.name}: `{command}` exited {result.returncode}\n{result.stdout}"
        assert "ok:" in result.stdout or not command.startswith("tlsgate check-config")
        for shown in shown_outputs(command):
            assert output_matches(shown, result.stdout.splitlines()), f"docs show {shown}, it printed {result.stdout}"


def shown_outputs(command: str) -> list[list[str]]:
    """What docs/configuration.md shows ``command`` printing (its check-config of an example is not run there)."""
    page = REPO / "docs" / "configuration.md"
    return [
        shown.expected
        for block in blocks(page)
        if block.language == "console"
        for shown in console_commands(block.text)
        if shown.text == command
    ]


def test_dev_front_example_binds_both_loopback_addresses_as_tlsgate_dev_does() -> None:
    """Browsers try 127.0.0.1 or ::1 for localhost; a hosts file naming one would leave the other unanswered."""
    doc = tomllib.loads((REPO / "docs" / "examples" / "dev-front.toml").read_text())
    assert {tunnel["listen"] for tunnel in doc["tunnel"]} == {"127.0.0.1:8443", "[::1]:8443"}


def test_wrap_redis_example_connects_by_an_address_or_says_how_its_name_resolves() -> None:
    text = (REPO / "docs" / "examples" / "wrap-redis.toml").read_text()
    for line in text.splitlines():
        if "-h redis.internal" in line:
            assert "hosts" in text and "DNS" in text, "redis.internal needs a DNS record or a hosts entry"
    assert re.search(r"redis-cli .* -h \d+\.\d+\.\d+\.\d+ ", text), "show a redis-cli line that works without DNS"


# --- The runner itself -----------------------------------------------------------------------------------


def test_output_comparison_ignores_only_what_varies() -> None:
    shown = ["wrote pki/crl.pem: 0 revoked, next update 2026-12-25 06:56:26 UTC", "..."]
    assert output_matches(shown, ["wrote pki/crl.pem: 0 revoked, next update 2027-01-03 10:00:01 UTC", "x", "y"])
    assert output_matches(shown, ["wrote pki/crl.pem: 0 revoked, next update 2027-01-03 10:00:01 UTC"])
    assert not output_matches(shown, ["wrote pki/crl.pem: 1 revoked, next update 2027-01-03 10:00:01 UTC"])
    assert not output_matches(["DENY"], ["ALLOW"])
    assert not output_matches(["a"], ["a", "b"])
    assert output_matches(["a", "...", "z"], ["a", "z"])


# Lines as pages show them: words and punctuation, never a bare "..." (that is the wildcard).
_lines = st.lists(
    st.text(st.sampled_from("abc xyz:=-"), min_size=1, max_size=12).filter(lambda t: t.strip()), max_size=8
)


@given(_lines, st.data())
def test_a_wildcard_anywhere_still_matches_and_a_changed_line_never_does(lines: list[str], data: st.DataObject) -> None:
    assert output_matches(lines, lines)
    at = data.draw(st.integers(0, len(lines)))
    assert output_matches([*lines[:at], "...", *lines[at:]], lines)
    if lines:
        i = data.draw(st.integers(0, len(lines) - 1))
        changed = [*lines[:i], lines[i] + "!", *lines[i + 1 :]]
        assert not output_matches(lines, changed)
        assert not output_matches(lines, lines[:i] + lines[i + 1 :])


@given(st.lists(st.sampled_from([8443, 6379, 6380, 9090, 3000]), min_size=1, max_size=5))
def test_port_mapping_round_trips_whatever_the_ports_a_page_shows(ports: list[int]) -> None:
    runner = PageRun.__new__(PageRun)  # no scratch directory needed to map ports
    runner.ports = {8443: 41001, 6379: 41002, 6380: 41003, 9090: 41004, 3000: 41005}
    command = " ".join(f"--listen 127.0.0.1:{port} -p {port}" for port in ports)
    mapped = runner.substitute(command)
    assert not any(str(port) in mapped for port in ports)
    assert runner.unsubstitute(mapped) == command


def test_console_blocks_split_into_commands_and_shown_output() -> None:
    text = "$ tlsgate x \\\n    --flag\nout 1\nout 2\n$ echo $?\n1\n"
    commands = console_commands(text)
    assert [c.text for c in commands] == ["tlsgate x \\\n    --flag", "echo $?"]
    assert [c.expected for c in commands] == [["out 1", "out 2"], ["1"]]


def test_a_drifted_output_fails_with_both_versions(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- run -->\n```console\n$ echo hello\ngoodbye\n```\n")
    with pytest.raises(AssertionError, match=r"(?s)shown on the page.*goodbye.*printed now.*hello"):
        list(run_page_outside_repo(page, tmp_path))


def test_a_failing_sh_command_fails_the_page(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- run -->\n```sh\ntrue\ntlsgate certs show missing.pem\n```\n")
    with pytest.raises(AssertionError, match="exit 2"):
        list(run_page_outside_repo(page, tmp_path))


def test_ports_are_mapped_consistently_and_back(tmp_path: Path) -> None:
    runner = PageRun(tmp_path / "page.md", tmp_path)
    command = runner.substitute("tlsgate server --listen 0.0.0.0:8443 --target localhost:6379 --allow-from 10.0.0.0/8")
    assert "8443" not in command and "6379" not in command and "0.0.0.0:" not in command
    assert "--allow-from 10.0.0.0/8" in command
    assert f"127.0.0.1:{runner.ports[8443]}" in command
    assert runner.unsubstitute(f"listen=127.0.0.1:{runner.ports[8443]}") == "listen=127.0.0.1:8443"


def test_background_server_is_ready_on_its_listening_line_and_stopped_at_the_end(tmp_path: Path) -> None:
    result = subprocess.run(
        ["tlsgate", "certs", "ca"], cwd=tmp_path, capture_output=True, text=True, env=PageRun(tmp_path, tmp_path).env
    )
    assert result.returncode == 0, result.stderr
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- backend: http 8080 -->\n"
        "<!-- run -->\n```sh\ntlsgate certs issue --name localhost\n```\n"
        "<!-- run: background -->\n```sh\n"
        "tlsgate server --listen localhost:8443 --target localhost:8080 \\\n"
        "  --cert certs/localhost.pem --key certs/localhost.key --disable-authentication\n```\n"
        "<!-- run -->\n```console\n$ curl -s --cacert certs/ca/ca.pem https://localhost:8443/\n"
        "hello from the backend\n```\n"
    )
    ran = list(run_page_outside_repo(page, tmp_path))
    assert len(ran) == 3


def run_page_outside_repo(page: Path, workdir: Path) -> list[Block]:
    """run_page for a page written by a test (Block.where wants a path under the repository)."""
    import docs_blocks

    saved = docs_blocks.REPO
    docs_blocks.REPO = page.parent
    try:
        return list(run_page(page, workdir))
    finally:
        docs_blocks.REPO = saved


def test_a_page_needing_redis_is_skipped_with_the_package_to_install_when_it_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- backend: redis 6379 -->\n<!-- run -->\n```console\n$ redis-cli -p 6379 ping\nPONG\n```\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing installed
    assert missing_programs(page) == ["redis-cli", "redis-server"]


def test_readme_tour_says_how_to_put_tlsgate_on_path_and_that_way_works() -> None:
    """Finding 1 of #17: after `make run`, every tour command failed with `tlsgate: command not found`."""
    readme = (REPO / "README.md").read_text()
    tour = readme[readme.index("## A 60-second tour") :]
    first_command = tour.index("```")
    match = re.search(r"`(\. \.venv/bin/activate)`", tour[:first_command])
    assert match, "the tour must say how to get tlsgate on PATH before its first command"
    if not (REPO / ".venv" / "bin" / "activate").exists():
        pytest.skip("no .venv here (make run or make test creates it)")
    result = subprocess.run(
        ["bash", "-c", f"{match[1]} && command -v tlsgate"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == str(REPO / ".venv" / "bin" / "tlsgate"), result.stderr


@pytest.mark.parametrize(
    ("marker", "problem"),
    [("<!-- run: backgrond -->", "unknown marker"), ("<!-- run -->", "port 7000 is not in")],
)
def test_a_misspelt_marker_or_an_unknown_port_fails_at_once(tmp_path: Path, marker: str, problem: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"{marker}\n```sh\ntlsgate server --listen 127.0.0.1:7000 --target 127.0.0.1:8080\n```\n")
    with pytest.raises(AssertionError, match=problem):
        run_page_outside_repo(page, tmp_path)
