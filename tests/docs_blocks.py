"""Find the shell examples of a Markdown page, run them as a reader would, and compare what they print.

A page marks each example with an HTML comment on the line right above its fence (GitHub renders nothing
for it, so the page reads as before):

``<!-- run -->``
    Run the block. A ```` ```sh ```` block is a script: every command must exit 0, its output is not shown
    on the page and not compared. A ```` ```console ```` block is a session: lines starting with ``$ `` are
    commands (a trailing ``\\`` continues one on the next line), the lines after a command are what it prints
    (stdout and stderr together), and that is compared. A ```` ```python ```` block runs with the venv's
    Python.
``<!-- run: background -->``
    A ```` ```sh ```` block with one long-running command (``tlsgate server ...``): started in the background,
    ready once it prints a line containing ``listening`` (``<!-- run: background, ready=TEXT -->`` for
    another line), and stopped with SIGTERM when the page ends.
``<!-- run: file NAME -->``
    Write the block (a config file, say) to ``NAME`` in the scratch directory, as the page tells the reader
    to save it. Written as shown: no port is substituted, so such a file is checked, not run.
``<!-- not run: REASON -->``
    An example the test cannot run (it needs root, systemd, a browser, another machine...). The reason is
    required, so the page says why.

Page-wide set-up that a reader is told about in prose ("Redis listens on localhost:6379") is a comment
anywhere on the page: ``<!-- backend: redis 6379 -->`` (a real ``redis-server``; the page is skipped when it
is not installed), ``<!-- backend: http 8080 -->`` (a plaintext HTTP server answering ``hello from the
backend``), ``<!-- backend: postgres 5432 -->`` (a real plaintext PostgreSQL, superuser ``postgres``, no
password; ``helpers.serve_postgres``).

Shown output is compared line by line after both sides are normalised. Parts that differ from run to run
are recognised by their shape, so the page can show real values: timestamps, dates and Unix times, long hex
strings (serials, hashes), floats with five decimals or more, ``pid=N``, ``duration=Ns``, ephemeral ports
(32768 and up), and the ``hostname`` and ``compiler`` of status JSON. A line holding only ``...``
stands for any number of lines.

Ports: pages show the real ports a reader would use (8443, 6379...). For each page the runner picks a free
loopback port for every port of :data:`DOC_PORTS` and substitutes it in the commands it runs (and back, in
what they print), consistently across the page, so pages run side by side and next to anything already on
the machine. ``0.0.0.0`` in a command becomes ``127.0.0.1``: a test never listens beyond loopback.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: The ports pages may show; each is replaced by a free port per page. Add one here before using it in a page.
DOC_PORTS = (3000, 5432, 5433, 6379, 6380, 6381, 6382, 8080, 8443, 9090, 9091, 9100, 9443)

#: Languages whose blocks are shell examples and so must carry a marker.
SHELL_LANGUAGES = {"sh", "shell", "bash", "console"}
#: A block with no language that starts like a command is a shell example in disguise (output that starts
#: like one is marked ```text).
COMMAND_START = re.compile(r"^\$ |^(tlsgate|curl|redis-cli|kill|docker|make|openssl|systemctl|sudo)\b")

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+)(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>run|not run)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")
_BACKEND = re.compile(r"<!--\s*backend:\s*(?P<kind>\w+)\s+(?P<port>\d+)\s*-->")


@dataclass
class Block:
    """One fenced block of a page, with the marker above it (``None`` when it has none)."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    marker: str | None = None  # "run", "not run"
    argument: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def is_shell_example(self) -> bool:
        if self.language in SHELL_LANGUAGES:
            return True
        first = next((line for line in self.text.splitlines() if line.strip()), "")
        return self.language == "" and bool(COMMAND_START.match(first))


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` in order, with its marker."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        block = Block(page, i + 1, opening["info"].strip().split(" ")[0], "\n".join(body) + "\n")
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        if marker:
            block.marker = marker["kind"]
            block.argument = marker["arg"] or ""
        found.append(block)
        i = j + 1
    return found


def backends(page: Path) -> list[tuple[str, int]]:
    return [(m["kind"], int(m["port"])) for m in _BACKEND.finditer(page.read_text(encoding="utf-8"))]


# --- Commands and their shown output --------------------------------------------------------------------


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)


def console_commands(text: str) -> list[Command]:
    """Split a ``console`` block into commands (``$ `` lines and their continuations) and shown output."""
    commands: list[Command] = []
    continuing = False
    for line in text.splitlines():
        if continuing:
            commands[-1].text += "\n" + line
        elif line.startswith("$ "):
            commands.append(Command(line[2:]))
        elif commands:
            commands[-1].expected.append(line)
        else:
            raise ValueError(f"output before the first command: {line!r}")
        continuing = line.endswith("\\") and (continuing or line.startswith("$ "))
    return commands


# A page reads like one terminal session: variables a block exports are there in the next blocks.
_STATE = '"$HOME/.docs-run-env"'
_RESTORE = f"if [ -f {_STATE} ]; then . {_STATE}; fi"
_SAVE = f"export -p > {_STATE}"

_NORMALISE = [
    (re.compile(r'"(hostname|compiler)": "[^"]*"'), r'"\1": <VARIES>'),
    (re.compile(r"\b1[6-9]\d{8}(\.\d+)?\b"), "<EPOCH>"),
    (re.compile(r"\b\d+\.\d{5,}\b"), "<FLOAT>"),
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)?"), "<TIME>"),
    (re.compile(r"\d{4}-\d\d-\d\d"), "<DATE>"),
    (re.compile(r"\b(0x)?[0-9a-f]{16,}\b(\.\.\.)?"), "<HEX>"),
    (re.compile(r"\bpid=\d+"), "pid=<N>"),
    (re.compile(r"\bduration=[0-9.]+s"), "duration=<D>"),
    (re.compile(r"(?<=:)(3[3-9]\d{3}|[4-6]\d{4}|32[89]\d{2}|327[7-9]\d)\b"), "<EPHEMERAL>"),
]


def normalise(line: str) -> str:
    for pattern, replacement in _NORMALISE:
        line = pattern.sub(replacement, line)
    return line.rstrip()


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """True when ``actual`` reads as ``expected``, where a ``...`` line stands for any number of lines."""
    want = [normalise(line) for line in expected]
    got = [normalise(line) for line in actual]
    # Classic glob matching over lines: reachable[j] = expected[:i] can produce actual[:j].
    reachable = [True] + [False] * len(got)
    for line in want:
        if line.strip() == "...":
            for j in range(1, len(got) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [reachable[j] and got[j] == line for j in range(len(got))]
    return reachable[-1]


# --- Running a page --------------------------------------------------------------------------------------


def free_port() -> int:
    """A port number nothing listens on now. The pages' commands bind it themselves, in programs of their own
    (tlsgate, redis-server, openssl s_server, python -m http.server); tests in the suite use
    ``helpers.reserved_port()`` instead, which holds the port for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Background:
    """A long-running command, ready once a line of its output contains ``ready``."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], ready: str) -> None:
        self.command = command
        self.lines: list[str] = []
        self._ready_text = ready
        self._settled = threading.Event()  # ready, or the output ended (the process died)
        self.ready = False
        self.process = subprocess.Popen(
            ["bash", "-c", f"{_RESTORE}\nexec {command}"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._ready_text in line and not self.ready:
                self.ready = True
                self._settled.set()
        self._settled.set()

    def wait_ready(self) -> None:
        self._settled.wait()
        if not self.ready:
            self.process.wait()
            output = "\n".join(self.lines)
            raise AssertionError(f"{self.command!r} exited {self.process.returncode} before it was ready:\n{output}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            # A drain waits for open connections (up to --shutdown-timeout); a page that failed may leave some.
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join()
        assert self.process.stdout is not None
        self.process.stdout.close()


class PageRun:
    """Runs the marked blocks of one page in order, in ``workdir``, with its own free ports."""

    def __init__(self, page: Path, workdir: Path) -> None:
        self.page = page
        self.workdir = workdir
        self.ports = {port: free_port() for port in DOC_PORTS}
        self.background: list[Background] = []
        home = workdir / ".home"
        home.mkdir(exist_ok=True)
        # curl shows a progress meter when its output is not a terminal, as here; a reader never sees it.
        (home / ".curlrc").write_text("silent\nshow-error\n")
        (home / "system-anchors").mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # Nothing a page runs touches the reader's real home, trust stores or CA.
            "HOME": str(home),
            "TLSGATE_CAROOT": str(home / "dev-ca"),
            "TLSGATE_SYSTEM_CA_DIR": str(home / "system-anchors"),
            "TLSGATE_UPDATE_CA_COMMAND": "true",
            "TLSGATE_NSS_DBS": "",
            "TLSGATE_CERTUTIL": "",
            "NO_COLOR": "1",
        }
        for variable in ("KEYSTORE_PATH", "CERT_PATH", "KEY_PATH", "KEYSTORE_PASS", "CACERT_PATH", "TLSGATE_LOOP"):
            self.env.pop(variable, None)

    def substitute(self, command: str) -> str:
        command = re.sub(r"(?<![\d.])0\.0\.0\.0(?![\d./])", "127.0.0.1", command)
        for doc, real in self.ports.items():
            command = re.sub(rf"(?<![0-9A-Za-z]){doc}(?![0-9A-Za-z])", str(real), command)
        # A port the runner does not know would be used as written, and collide with whatever holds it.
        mapped = {str(real) for real in self.ports.values()}
        # Not an IP address after a colon (curl --resolve NAME:PORT:127.0.0.1): a port is not followed by a dot.
        for port in re.findall(r"(?<=:)(\d{2,5})\b(?!\.)", command):
            if port not in mapped:
                raise AssertionError(f"{self.page.name}: port {port} is not in docs_blocks.DOC_PORTS; add it there")
        return command

    def unsubstitute(self, output: str) -> str:
        for doc, real in self.ports.items():
            output = re.sub(rf"(?<![0-9A-Za-z]){real}(?![0-9A-Za-z])", str(doc), output)
        return output

    # Set-up the page asks for with <!-- backend: ... -->.

    def start_backend(self, kind: str, port: int) -> None:
        if port not in self.ports:
            raise AssertionError(f"{self.page.name}: backend port {port} is not in docs_blocks.DOC_PORTS")
        real = self.ports[port]
        if kind == "redis":
            command = f"redis-server --port {real} --bind 127.0.0.1 --save '' --appendonly no"
            ready = "Ready to accept connections"
        elif kind == "http":
            root = self.workdir / ".backend"
            root.mkdir(exist_ok=True)
            (root / "index.html").write_text("hello from the backend\n")
            command = f"{shlex.quote(sys.executable)} -u -m http.server --bind 127.0.0.1 --directory {root} {real}"
            ready = "Serving HTTP"
        elif kind == "postgres":
            tests = str(REPO / "tests")
            code = f"import sys; sys.path.insert(0, {tests!r}); import helpers; helpers.serve_postgres({real})"
            command = f"{shlex.quote(sys.executable)} -u -c {shlex.quote(code)}"
            ready = "ready to accept connections"
        else:
            raise AssertionError(f"{self.page}: unknown backend {kind!r}")
        self.start(command, ready)

    def start(self, command: str, ready: str) -> None:
        job = Background(command, self.workdir, self.env, ready)
        self.background.append(job)  # stopped by stop_all() even when it never gets ready
        job.wait_ready()

    def stop_all(self) -> None:
        for job in reversed(self.background):
            job.stop()
        self.background.clear()

    # Blocks.

    def run(self, block: Block) -> None:
        if block.marker != "run":
            return
        if block.argument and not re.fullmatch(r"background(,\s*ready=.+)?|file \S+", block.argument):
            # A misspelt `background` would otherwise run a server in the foreground until the test times out.
            raise AssertionError(f"{block.where}: unknown marker <!-- run: {block.argument} -->")
        if block.argument.startswith("file "):
            (self.workdir / block.argument.removeprefix("file ").strip()).write_text(block.text)
        elif block.argument.startswith("background"):
            ready = "listening"
            match = re.search(r"ready=(.+)$", block.argument)
            if match:
                ready = match[1].strip().strip("\"'")
            command = block.text.strip().replace("\\\n", " ")
            self.start(self.substitute(command), ready)
        elif block.language in ("sh", "shell", "bash"):
            script = "set -euo pipefail\n" + self.substitute(block.text)
            result = self.shell(script)
            assert result.returncode == 0, f"{block.where}: exit {result.returncode}\n{result.stdout}"
        elif block.language == "console":
            self.run_console(block)
        elif block.language == "python":
            result = subprocess.run(
                [sys.executable, "-c", self.substitute(block.text)],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, f"{block.where}: exit {result.returncode}\n{result.stderr}"
        else:
            raise AssertionError(f"{block.where}: cannot run a {block.language or 'plain'} block")

    def shell(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", f"exec 2>&1\n{_RESTORE}\ntrap '{_SAVE}' EXIT\n{script}"],
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run_console(self, block: Block) -> None:
        commands = console_commands(block.text)
        separator = "@@docs-run-separator@@"
        # Print a separator after each command, then restore its exit status so a shown `echo $?` works.
        script = "".join(
            f"{self.substitute(command.text)}\n__rc=$?; printf '\\n{separator}\\n'; (exit $__rc)\n"
            for command in commands
        )
        output = self.shell(script).stdout
        chunks = output.split(f"\n{separator}\n")
        if len(chunks) != len(commands) + 1:
            raise AssertionError(f"{block.where}: the session ended early (an `exit`?):\n{output}")
        for command, chunk in zip(commands, chunks, strict=False):
            actual = self.unsubstitute(chunk).splitlines()
            if not output_matches(command.expected, actual):
                raise AssertionError(
                    f"{block.where}: `{command.text}` printed something else.\n"
                    f"--- shown on the page\n" + "\n".join(command.expected) + "\n"
                    "--- printed now\n" + "\n".join(actual) + "\n"
                )


def run_page(page: Path, workdir: Path) -> Iterator[Block]:
    """Run every marked block of ``page`` in order; yields each block after it ran (for progress and tests)."""
    runner = PageRun(page, workdir)
    try:
        for kind, port in backends(page):
            runner.start_backend(kind, port)
        for block in blocks(page):
            runner.run(block)
            yield block
    finally:
        runner.stop_all()


def missing_programs(page: Path) -> list[str]:
    """Programs a page's runnable blocks or backends need that this machine lacks."""
    needed = {"redis-server" for kind, _ in backends(page) if kind == "redis"}
    if any(kind == "postgres" for kind, _ in backends(page)) and not glob.glob("/usr/lib/postgresql/*/bin/postgres"):
        needed.add("postgres")  # Debian keeps the server out of PATH
    for block in blocks(page):
        if block.marker == "run":
            for program in ("redis-cli", "curl", "openssl", "psql"):
                if re.search(rf"(^|[\s$(|]){program}\b", block.text, re.MULTILINE):
                    needed.add(program)
    return sorted(program for program in needed if shutil.which(program) is None)
