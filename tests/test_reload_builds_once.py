"""A reload of ``tlsgate run FILE`` reads each tunnel's certificates, keys and policy once per process, not twice.

A reload checks the whole file first (`load_tunnels`: every runtime built, every CRL judged), so that a bad
file is refused with every problem named and nothing changed. The supervisor then applied it by building every
runtime again, and under ``--workers`` every worker did the same: twice the reads, in each worker, per reload.
The runtimes the check built now come back with the tunnels (`LoadedTunnels`) and are the ones applied.

Reads are counted at `contexts.load_key_material`, where a server tunnel's certificate and key are read. In a
real ``tlsgate run`` (one process, and the ``--workers 2`` parent with its two workers) they are counted by a
``sitecustomize`` module that the test puts on the child processes' PYTHONPATH: each read appends a line with
the process id to a file, so the count is per process.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tlsgate.process.check import LoadedTunnels, check_config_file, checked_runtimes, load_tunnels
from tlsgate.process.supervisor import Server
from tlsgate.process.worker import mapped_loader
from tlsgate.settings.addresses import parse_address
from tlsgate.tls import contexts

from helpers import TLSGATE_CLI, run_tlsgate, running_server

TUNNEL = (
    '[[tunnel]]\nname = "{name}"\nmode = "server"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\n'
    'cert = "server.pem"\nkey = "server.key"\ncacert = "ca.pem"\nallow-cn = "{cn}"\n'
)


def write_config(tmp_path: Path, names: list[str], header: str = "", cn: str = "alice") -> Path:
    """A file of server tunnels on port 0, each with the test PKI's certificate (the files beside it)."""
    path = tmp_path / "tlsgate.toml"
    path.write_text(header + "\n".join(TUNNEL.format(name=name, cn=cn) for name in names))
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Every certificate this process reads for a server tunnel, in order."""
    seen: list[str | None] = []
    real = contexts.load_key_material

    def counting(**kwargs: Any) -> contexts.KeyMaterial:
        seen.append(kwargs.get("cert"))
        return real(**kwargs)

    monkeypatch.setattr(contexts, "load_key_material", counting)
    return seen


def started_server(path: Path, **kwargs: Any) -> Server:
    """The server ``tlsgate run`` starts for ``path``, reloading the file as ``run`` has it do."""
    checked = check_config_file(str(path))
    load = kwargs.pop("load_configs", functools.partial(load_tunnels, str(path), checked.process))
    return Server(checked.tunnels, checked.process, load_configs=load, runtimes=checked.runtimes, **kwargs)


# -- in one process ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_reload_reads_each_certificate_once(
    tmp_path: Path, pki_files: dict[str, Path], reads: list[str | None]
) -> None:
    path = write_config(tmp_path, ["one", "two", "three"])
    async with running_server(started_server(path)) as server:
        before = dict(server.tunnels)
        reads.clear()
        assert server.reload()
        assert reads == [str(pki_files["cert"])] * 3
        # Nothing changed in the file: the same tunnels keep running (and keep their connections).
        assert server.tunnels == before


@pytest.mark.asyncio
async def test_a_reload_that_changes_the_file_reads_each_new_tunnels_certificate_once(
    tmp_path: Path, pki_files: dict[str, Path], reads: list[str | None]
) -> None:
    path = write_config(tmp_path, ["one", "two"])
    async with running_server(started_server(path)) as server:
        kept = server.tunnels["one"]
        # "two" changes, "three" is new, "one" stays as it was.
        path.write_text(TUNNEL.format(name="one", cn="alice") + TUNNEL.format(name="two", cn="bob")
                        + TUNNEL.format(name="three", cn="alice"))  # fmt: skip
        reads.clear()
        assert server.reload()
        assert reads == [str(pki_files["cert"])] * 3
        assert sorted(server.tunnels) == ["one", "three", "two"]
        assert server.tunnels["one"] is kept
        assert server.tunnels["two"].cfg.allow_cn == ("bob",)


@pytest.mark.asyncio
async def test_a_failed_reload_keeps_every_tunnel_and_names_each_problem(
    tmp_path: Path, pki_files: dict[str, Path], reads: list[str | None], caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, ["one", "two"])
    async with running_server(started_server(path)) as server:
        before = dict(server.tunnels)
        (tmp_path / "broken.pem").write_text("not a certificate\n")
        path.write_text(
            TUNNEL.format(name="one", cn="alice").replace('cert = "server.pem"', 'cert = "broken.pem"')
            + TUNNEL.format(name="two", cn="bob")
            + TUNNEL.format(name="three", cn="alice").replace('key = "server.key"', 'key = "missing.key"')
        )
        reads.clear()
        assert not server.reload()
        assert server.tunnels == before
        assert all(t.stats.reload_errors == 1 for t in before.values())
        failed = [
            str(getattr(r, "fields", {}).get("error"))
            for r in caplog.records
            if r.getMessage() == "reload failed, keeping the running tunnels"
        ]
        # Every problem of the file, each naming its tunnel (a missing file is found before any runtime is built).
        one, three = sorted(failed)
        assert len(failed) == 2 and one.startswith("tunnel 'one': ") and "broken.pem" in one, failed
        assert three.startswith("tunnel 'three': ") and "missing.key" in three, failed
        # The check read what it could; nothing was built a second time for a file that was refused.
        assert reads.count(str(pki_files["cert"])) == 1


@pytest.mark.asyncio
async def test_a_load_configs_returning_a_plain_list_still_builds_its_runtimes(
    tmp_path: Path, pki_files: dict[str, Path], reads: list[str | None]
) -> None:
    path = write_config(tmp_path, ["one", "two"])
    wanted = list(check_config_file(str(path)).tunnels)
    async with running_server(started_server(path, load_configs=lambda: list(wanted))) as server:
        reads.clear()
        assert server.reload()
        assert reads == [str(pki_files["cert"])] * 2


def test_a_workers_reload_keeps_the_checked_runtimes_with_the_parents_ports(
    tmp_path: Path, pki_files: dict[str, Path], reads: list[str | None]
) -> None:
    # What a --workers worker reloads with: the file's tunnels with port 0 replaced by the ports the parent holds.
    path = write_config(tmp_path, ["one", "two"])
    real = parse_address("127.0.0.1:40000")
    load = mapped_loader(functools.partial(load_tunnels, str(path)), {parse_address("127.0.0.1:0"): real})
    loaded = load()
    assert reads == [str(pki_files["cert"])] * 2
    assert [cfg.listen for cfg in loaded] == [real, real]
    built = checked_runtimes(loaded)
    assert built is not None and len(built) == 2
    # A plain list (a test's lambda) is mapped as before, with nothing to carry.
    assert checked_runtimes(mapped_loader(lambda: list(loaded), {})()) is None


def test_loaded_tunnels_pickle_as_a_plain_list_without_their_runtimes(
    tmp_path: Path, pki_files: dict[str, Path]
) -> None:
    # The --workers parent pickles what its reload loaded into every new worker's plan; SSL contexts do not pickle.
    loaded = load_tunnels(str(write_config(tmp_path, ["one", "two"])))
    assert checked_runtimes(loaded) is not None
    copy = pickle.loads(pickle.dumps(loaded))
    assert type(copy) is list and copy == list(loaded)
    assert checked_runtimes(copy) is None


def test_runtimes_are_not_used_for_a_list_edited_after_the_check(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    loaded = load_tunnels(str(write_config(tmp_path, ["one", "two"])))
    loaded.reverse()
    assert checked_runtimes(loaded) is None
    loaded.reverse()
    assert checked_runtimes(loaded) is not None
    loaded.pop()
    assert checked_runtimes(loaded) is None
    with pytest.raises(ValueError, match="one per tunnel"):
        LoadedTunnels(list(loaded), [])


# -- real processes: tlsgate run, and tlsgate run with [process] workers = 2 ---------------------------------------

SITECUSTOMIZE = """\
import os

from tlsgate.tls import contexts

_real = contexts.load_key_material


def _counting(**kwargs):
    with open(os.environ["TLSGATE_TEST_READS"], "a") as out:
        out.write(f"{os.getpid()} {kwargs.get('cert')}\\n")
    return _real(**kwargs)


contexts.load_key_material = _counting
"""


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_tlsgate_run_reloads_reading_each_certificate_once_per_process(
    tmp_path: Path, pki_files: dict[str, Path], workers: int
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    counted = tmp_path / "reads.log"
    counted.touch()
    path = write_config(tmp_path, ["one", "two", "three"], header=f"[process]\nworkers = {workers}\n\n")
    env = {
        "TLSGATE_TEST_READS": str(counted),
        "PYTHONPATH": os.pathsep.join([str(hooks), *sys.path]),
    }

    def per_process() -> Counter[int]:
        lines = counted.read_text().splitlines()
        assert all(line.split(" ", 1)[1] == str(pki_files["cert"]) for line in lines), lines
        return Counter(int(line.split(" ", 1)[0]) for line in lines)

    async with run_tlsgate(["run", str(path)], command=(sys.executable, "-c", TLSGATE_CLI), env=env) as gate:
        await gate.wait_for_line("workers ready" if workers > 1 else "listening", within=60)
        started = per_process()
        counted.write_text("")
        gate.signal(signal.SIGHUP)
        await gate.wait_for_line("reloaded", count=workers, within=60)
        reloaded = per_process()
        gate.signal(signal.SIGTERM)
        assert await gate.exit_code(within=60) == 0, gate.log
    parent = gate.proc.pid
    if workers == 1:
        assert started == {parent: 3}
        assert reloaded == {parent: 3}, gate.log
    else:
        # At start the parent uses the check's runtimes (CRL ages); each worker builds its own.
        assert started[parent] == 3 and len(started) == 3 and set(started.values()) == {3}, started
        # On reload the parent checks the file once (kept for workers it restarts later); each worker loads once.
        assert reloaded[parent] == 3, reloaded
        assert len(reloaded) == 3 and set(reloaded.values()) == {3}, (reloaded, gate.log)
