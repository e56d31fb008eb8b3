"""Shared helpers for the bench/ scripts: tool checks, process-tree CPU/RSS, certificates, backends, proxies.

CPU and memory are read from /proc for the proxy's whole process tree (the pid we started and every descendant),
so multi-process proxies (hitch's manager and worker, say) are charged in full. The proxy is pinned to CPU 0 with
taskset; backends and load generators to CPU 1, so the numbers are per core and the load never steals the proxy's.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
PEERBENCH = (REPO.parent / "shared" / "tools" / "peerbench.py").resolve()
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "0"
LOAD_CPU = "1"

# program on PATH -> Debian package that provides it
TOOL_PACKAGES: dict[str, str] = {
    "haproxy": "haproxy",
    "stunnel": "stunnel4",
    "hitch": "hitch",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "curl": "curl",
    "openssl": "openssl",
    "taskset": "util-linux",
    "valgrind": "valgrind",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# tools


def missing_tools(tools: list[str]) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def ensure_tools(tools: list[str]) -> None:
    """Install the Debian packages for missing tools when we are root with apt-get; else explain and exit 2."""
    missing = missing_tools(tools)
    if not missing:
        return
    packages = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"bench: installing {' '.join(packages)} (missing: {' '.join(missing)})")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", *packages]
        if subprocess.run(cmd, env=env, stdout=sys.stderr).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, stdout=sys.stderr)
            subprocess.run(cmd, env=env, stdout=sys.stderr)
        missing = missing_tools(tools)
        if not missing:
            return
    log(f"bench: missing programs: {' '.join(missing)}")
    log(f"bench: install them with: apt-get install -y {' '.join(sorted({TOOL_PACKAGES.get(t, t) for t in missing}))}")
    sys.exit(2)


def raise_fd_limit(want: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard too when we may) to at least `want`; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard != resource.RLIM_INFINITY and hard < want:
        try:  # raising the hard limit needs CAP_SYS_RESOURCE, which containers often drop
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return fd_limit()


def fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def tlsgate_bin() -> Path | None:
    """The tlsgate console script of the interpreter running us, else the repo's .venv one."""
    for cand in (Path(sys.executable).parent / "tlsgate", REPO / ".venv" / "bin" / "tlsgate"):
        if cand.exists():
            return cand
    return None


def tlsgate_ready() -> tuple[bool, str]:
    exe = tlsgate_bin()
    if exe is None:
        return False, "no tlsgate console script (run: .venv/bin/pip install -e .)"
    try:
        p = subprocess.run([str(exe), "server", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{exe} server --help failed: {e}"
    if p.returncode != 0:
        return False, f"{exe} server --help exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"
    return True, str(exe)


# ---------------------------------------------------------------------------------------------------------------
# /proc accounting


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree rooted at pid, in seconds."""
    ticks = 0
    for p in proc_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            f = stat[stat.rindex(")") + 2 :].split()
            ticks += int(f[11]) + int(f[12])
        except (OSError, ValueError, IndexError):
            pass
    return ticks / CLK_TCK


def cpu_seconds_ns(pid: int) -> float:
    """On-CPU time of every thread in the tree from /proc/*/task/*/schedstat (nanoseconds, not 10 ms ticks).

    Threads that have already exited are not counted, so use it around work done by long-lived processes."""
    ns = 0
    for p in proc_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            with contextlib.suppress(OSError, ValueError, IndexError):
                ns += int(Path(f"/proc/{p}/task/{t}/schedstat").read_text().split()[0])
    return ns / 1e9


def rss_kib(pid: int) -> int:
    """VmRSS of the process tree rooted at pid, in KiB."""
    total = 0
    for p in proc_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


# ---------------------------------------------------------------------------------------------------------------
# sockets and processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_group(p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if p.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(grace)


@dataclass
class Workdir:
    """A private temp directory with a self-signed ECDSA P-256 certificate (same as the peer benchmark uses)."""

    path: Path
    cert: Path = field(init=False)
    key: Path = field(init=False)
    combined: Path = field(init=False)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path.chmod(0o755)  # nginx workers run unprivileged
        self.cert, self.key, self.combined = self.path / "cert.pem", self.path / "key.pem", self.path / "combined.pem"
        cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        cmd += ["-keyout", str(self.key), "-out", str(self.cert), "-days", "30", "-subj", "/CN=localhost"]
        cmd += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        subprocess.run(cmd, check=True, capture_output=True)
        self.combined.write_text(self.cert.read_text() + self.key.read_text())

    def spawn(
        self, name: str, argv: list[str], cpu: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        err = (self.path / f"{name}.err").open("wb")
        p = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            env=env,
            cwd=REPO,
        )
        err.close()
        self.started.append(p)
        if port is not None and not wait_port(port, proc=p):
            stop_group(p)
            tail = (self.path / f"{name}.err").read_text(errors="replace")[-800:]
            raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port}: {tail}")
        return p

    def close(self) -> None:
        for p in self.started:
            stop_group(p)
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Workdir]:
    wd = Workdir(Path(tempfile.mkdtemp(prefix=prefix)))

    def on_signal(signum: int, _frame: object) -> None:
        wd.close()
        sys.exit(128 + signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield wd
    finally:
        wd.close()
        for s, h in old.items():
            signal.signal(s, h)


def start_nginx(wd: Workdir, files: dict[str, int]) -> int:
    """nginx on CPU 1 serving sparse files {name: size}; returns its port."""
    www = wd.path / "www"
    www.mkdir(exist_ok=True)
    for name, size in files.items():
        with (www / name).open("wb") as f:
            f.truncate(size)
    port = free_port()
    conf = wd.path / "nginx.conf"
    conf.write_text(
        f"worker_processes 1; daemon off; pid {wd.path}/nginx.pid; error_log {wd.path}/nginx.err;\n"
        f"worker_rlimit_nofile 70000;\nevents {{ worker_connections 30000; }}\n"
        f"http {{ access_log off; sendfile on; keepalive_requests 10000000; keepalive_timeout 300s;\n"
        f"  server {{ listen 127.0.0.1:{port} backlog=4096; root {www}; }} }}\n"
    )
    wd.spawn("nginx", ["nginx", "-c", str(conf)], LOAD_CPU, port)
    return port


# ---------------------------------------------------------------------------------------------------------------
# proxies under test

ProxyFactory = Callable[[Workdir, int, str], tuple[list[str], dict[str, str] | None]]


def tlsgate_argv(loop: str | None = None) -> list[str]:
    exe = tlsgate_bin()
    if exe is None:
        raise RuntimeError("tlsgate is not installed (run: .venv/bin/pip install -e .)")
    argv = [str(exe), "server", "--listen", "127.0.0.1:{port}", "--target", "{target}"]
    argv += ["--cert", "{cert}", "--key", "{key}", "--disable-authentication"]
    return (["env", f"TLSGATE_LOOP={loop}"] if loop else []) + argv


def baseline_argv() -> list[str]:
    return [sys.executable, str(BENCH / "baseline_streams.py"), "--listen", "127.0.0.1:{port}", "--target", "{target}"]


def template(argv: list[str]) -> str:
    """A peerbench TLSGATE_CMD template (words with {port} {target} {cert} {key})."""
    words = argv if "--cert" in argv else [*argv, "--cert", "{cert}", "--key", "{key}"]
    return shlex.join(words)


def fill(tmpl: str, wd: Workdir, port: int, target: str) -> list[str]:
    return [w.format(port=port, target=target, cert=wd.cert, key=wd.key) for w in shlex.split(tmpl)]


def haproxy_argv(wd: Workdir, port: int, target: str, maxconn: int = 9000, threads: int = 1) -> list[str]:
    cfg = wd.path / f"haproxy{port}.cfg"
    cfg.write_text(
        f"global\n maxconn {maxconn}\n nbthread {threads}\ndefaults\n mode tcp\n timeout connect 5s\n"
        f" timeout client 300s\n timeout server 300s\nfrontend f\n bind 127.0.0.1:{port} ssl crt {wd.combined}\n"
        f" default_backend b\n"
        f"backend b\n server s1 {target}\n"
    )
    return ["haproxy", "-db", "-f", str(cfg)]


def proxy_argv(name: str, wd: Workdir, port: int, target: str, maxconn: int = 9000) -> list[str]:
    """argv for the proxies the scaling scripts compare: tlsgate, tlsgate-asyncio, haproxy, baseline."""
    if name == "haproxy":
        return haproxy_argv(wd, port, target, maxconn)
    if name == "tlsgate":
        return fill(template(tlsgate_argv()), wd, port, target)
    if name == "tlsgate-asyncio":
        return fill(template(tlsgate_argv("asyncio")), wd, port, target)
    if name == "baseline":
        return fill(template(baseline_argv()), wd, port, target)
    raise ValueError(f"unknown proxy {name!r}")


def shown(path: Path) -> str:
    """path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
