"""Packaging smoke test: what a user gets from ``pip install tlsgate`` works, not just the dev checkout.

1. Build the sdist and the wheel (``python -m build``) into a scratch dir and check both with ``twine check``.
2. Check what the sdist carries: README, LICENSE and py.typed in; no private key, venv or bench result out.
3. Install the wheel into a CLEAN venv (made from the base interpreter, nothing from the dev venv), then run
   ``tlsgate --version``, ``tlsgate completion bash`` and ``tlsgate man`` from it.
4. One real tunnel round trip with that installed ``tlsgate``: ``certs ca``/``certs issue`` in a scratch dir,
   ``tlsgate server`` in front of a tiny echo backend, a mutual-TLS client sends a line and reads it back.
   Readiness is the server's ``listening`` log line; nothing waits on a fixed sleep.

Run by .ci/run (``python .ci/smoke_install.py``, from the dev venv, which has build and twine). Takes ~20 s, most
of it pip installing cryptography and click into the clean venv. Exit code 0 on success; a failure prints the
step and the output that explains it.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What an sdist must carry for `pip install tlsgate-X.tar.gz` and a packager's review, and what it must never carry.
REQUIRED = ("README.md", "LICENSE", "pyproject.toml", "src/tlsgate/py.typed", "tests/conftest.py", "tests/helpers.py")
FORBIDDEN_PARTS = (".venv", "bench/results", "certs/", ".hypothesis", "__pycache__", ".git/")
FORBIDDEN_SUFFIXES = (".key", ".p12", ".pfx", ".pyc")
# A step that hangs is a failure, not a stuck CI run; generous, as pip may download on a cold cache.
STEP_TIMEOUT = 300
ROUND_TRIP_TIMEOUT = 30


class SmokeFailure(Exception):
    pass


def run(step: str, *argv: str | Path, cwd: Path | None = None) -> str:
    print(f"smoke: {step}: {' '.join(map(str, argv))}", flush=True)
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise SmokeFailure(f"{step} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def build(dist: Path) -> tuple[Path, Path]:
    run("build", sys.executable, "-m", "build", "--outdir", dist, ROOT)
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise SmokeFailure(f"build: expected one sdist and one wheel in {dist}, got {sdists + wheels}")
    run("twine check", sys.executable, "-m", "twine", "check", "--strict", sdists[0], wheels[0])
    return sdists[0], wheels[0]


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        # Every member sits under "tlsgate-X.Y.Z/"; compare the paths below it.
        names = [name.split("/", 1)[1] for name in tar.getnames() if "/" in name]
    missing = [name for name in REQUIRED if name not in names]
    unwanted = [
        name
        for name in names
        if name.endswith(FORBIDDEN_SUFFIXES) or any(part in f"{name}/" for part in FORBIDDEN_PARTS)
    ]
    if missing or unwanted:
        raise SmokeFailure(f"sdist {sdist.name}: missing {missing}, must not contain {unwanted}")
    print(f"smoke: sdist has {len(names)} entries, README/LICENSE/py.typed in, no keys/venv/bench results", flush=True)


def clean_venv(where: Path, wheel: Path) -> Path:
    # venv.create from this interpreter makes a venv on the *base* interpreter: the dev venv's packages stay out.
    print(f"smoke: clean venv in {where}", flush=True)
    venv.create(where, with_pip=True, clear=True)
    bindir = where / ("Scripts" if os.name == "nt" else "bin")
    run("install wheel", bindir / "python", "-m", "pip", "install", "--quiet", wheel)
    tlsgate = bindir / ("tlsgate.exe" if os.name == "nt" else "tlsgate")
    leaked = run("isolation", bindir / "python", "-c", "import importlib.util as u; print(bool(u.find_spec('pytest')))")
    if leaked.strip() != "False":
        raise SmokeFailure("the clean venv sees pytest: it is not isolated from the dev venv")
    return tlsgate


def echo_backend() -> tuple[socket.socket, int]:
    """A plaintext echo server on 127.0.0.1:0, one thread per connection; the caller closes the listener."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # listener closed: the test is over
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


def wait_listening(server: subprocess.Popen[str]) -> str:
    """The server's listen address, from its ``listening`` JSON log line; its whole log if it exits first."""
    assert server.stderr is not None
    seen: list[str] = []
    for line in server.stderr:
        seen.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "listening":
            return str(record["listen"])
    raise SmokeFailure("tlsgate server exited before listening:\n" + "".join(seen))


def round_trip(tlsgate: Path, scratch: Path) -> None:
    for argv in (["ca"], ["issue", "--name", "localhost"], ["issue", "--name", "alice", "--client"]):
        run("certs " + argv[0], tlsgate, "certs", *argv, cwd=scratch)
    certs = scratch / "certs"
    listener, backend_port = echo_backend()
    argv = [str(tlsgate), "server", "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{backend_port}"]
    argv += ["--cert", str(certs / "localhost.pem"), "--key", str(certs / "localhost.key")]
    argv += ["--cacert", str(certs / "ca" / "ca.pem"), "--allow-cn", "alice", "--log-format", "json"]
    server = subprocess.Popen(
        argv,
        cwd=scratch,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        host, port = wait_listening(server).rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=str(certs / "ca" / "ca.pem"))
        ctx.load_cert_chain(str(certs / "alice.pem"), str(certs / "alice.key"))
        message = b"hello through an installed tlsgate\n"
        with (
            socket.create_connection((host, int(port)), timeout=ROUND_TRIP_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(message)
            received = b""
            while len(received) < len(message) and (chunk := tls.recv(65536)):
                received += chunk
        if received != message:
            raise SmokeFailure(f"round trip: sent {message!r}, got back {received!r}")
        print(f"smoke: round trip through {host}:{port} -> echo backend ok", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=ROUND_TRIP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        listener.close()
        if server.stderr is not None:
            server.stderr.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tlsgate-smoke-") as tmp:
        scratch = Path(tmp)
        try:
            sdist, wheel = build(scratch / "dist")
            check_sdist(sdist)
            tlsgate = clean_venv(scratch / "venv", wheel)
            version = run("--version", tlsgate, "--version").strip()
            print(f"smoke: {version}", flush=True)
            if "complete -o nosort -F" not in run("completion", tlsgate, "completion", "bash"):
                raise SmokeFailure("tlsgate completion bash printed no bash completion script")
            if not run("man", tlsgate, "man").startswith(".TH TLSGATE 1"):
                raise SmokeFailure("tlsgate man printed no roff page")
            (scratch / "work").mkdir()
            round_trip(tlsgate, scratch / "work")
        except (SmokeFailure, subprocess.TimeoutExpired) as err:
            print(f"smoke: FAILED: {err}", file=sys.stderr)
            return 1
    print("smoke: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
