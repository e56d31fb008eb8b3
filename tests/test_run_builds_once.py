"""``tlsgate run FILE`` reads every tunnel's certificates, keys and policy once, not twice.

The check that reports every problem of a file at once has to build each tunnel's runtime (that is where a bad
key or CRL shows up); the server then starts with those runtimes. It used to throw them away and build them all
again in ``Server.start``, doubling the start-up cost of a file with many tunnels.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import tlsgate.cli.run
from tlsgate.cli.run import run
from tlsgate.engine.runtime import Runtime
from tlsgate.process import workers
from tlsgate.process.supervisor import Server
from tlsgate.settings.config import TunnelConfig
from tlsgate.tls import contexts

from helpers import invoke


def write_config(tmp_path: Path, names: list[str]) -> Path:
    """A file of server tunnels on fresh ports, each with the test PKI's certificate (files beside it)."""
    tables = [
        f'[[tunnel]]\nname = "{name}"\nmode = "server"\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\n'
        'cert = "server.pem"\nkey = "server.key"\ncacert = "ca.pem"\nallow-cn = "alice"\n'
        for name in names
    ]
    path = tmp_path / "tlsgate.toml"
    path.write_text("\n".join(tables))
    return path


def test_run_reads_each_tunnels_certificate_once(
    tmp_path: Path, pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, ["one", "two", "three"])
    reads: list[str | None] = []
    real = contexts.load_key_material

    def counting(**kwargs: Any) -> contexts.KeyMaterial:
        reads.append(kwargs.get("cert"))
        return real(**kwargs)

    monkeypatch.setattr(contexts, "load_key_material", counting)
    listening: list[list[str]] = []

    def start_then_stop(configs: list[TunnelConfig], options: Any, **kwargs: Any) -> int:
        """run_server without the process set-up: start the server as run would, and stop it once it listens."""

        def ready(server: Server) -> None:
            listening.append([t.cfg.name for t in server.tunnels.values()])
            server.stop()

        async def main() -> int:
            return await Server(configs, options, **kwargs).serve(ready=ready)

        return asyncio.run(main())

    monkeypatch.setattr(tlsgate.cli.run, "run_server", start_then_stop)
    result = invoke(run, path)
    assert result.exit_code == 0, result.output
    assert listening == [["one", "two", "three"]]
    assert reads == [str(pki_files["cert"])] * 3


def test_server_refuses_runtimes_that_do_not_match_its_configs(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    from tlsgate.process.check import check_config_file

    checked = check_config_file(str(write_config(tmp_path, ["one", "two"])))
    with pytest.raises(ValueError, match="one per config"):
        Server(checked.tunnels, checked.process, runtimes=checked.runtimes[:1])


def test_run_with_workers_hands_the_checked_runtimes_to_the_parent(
    tmp_path: Path, pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The --workers parent reads certificates only to check CRLs before any worker starts; the check already did.
    path = write_config(tmp_path, ["one", "two"])
    path.write_text("[process]\nworkers = 2\n\n" + path.read_text())
    handed: list[Any] = []

    def record(configs: list[TunnelConfig], options: Any, **kwargs: Any) -> int:
        handed.append((len(configs), kwargs.get("runtimes")))
        return 0

    monkeypatch.setattr(workers, "run_workers", record)
    result = invoke(run, path)
    assert result.exit_code == 0, result.output
    [(count, runtimes)] = handed
    assert runtimes is not None and len(runtimes) == count == 2
    assert all(isinstance(runtime, Runtime) for runtime in runtimes)
