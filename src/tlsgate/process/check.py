"""Judging a TOML config file as a start would: read and validate it, then parse every certificate, key and CRL.

``settings.file`` reads and validates the file without touching the files it names (it sits below the engine);
this module adds the part that needs the engine: ``build_runtime`` for every tunnel, and the CRL age checks.
``tlsgate run``, ``tlsgate check-config`` and a reload all go through `check_config_file`, so the three judge a
file the same way. The runtimes it built are returned with the tunnels, so ``run`` hands them to the server, and
a reload's `load_tunnels` to the supervisor, instead of reading every certificate a second time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from tlsgate import logs
from tlsgate.engine.runtime import Runtime, build_runtime
from tlsgate.errors import TlsgateError
from tlsgate.process.crls import check_runtime_crls, crl_warning
from tlsgate.settings.config import ConfigErrors, TunnelConfig
from tlsgate.settings.file import key_names, read_config_file
from tlsgate.settings.process_options import ProcessOptions

__all__ = ["CheckedFile", "LoadedTunnels", "check_config_file", "checked_runtimes", "load_tunnels"]


@dataclass
class CheckedFile:
    """A file that passed every check: its tunnels, its [process] settings, and each tunnel's runtime, in order."""

    tunnels: list[TunnelConfig]
    process: ProcessOptions
    runtimes: list[Runtime] = field(default_factory=list)


def check_config_file(path: str, warnings: list[str] | None = None) -> CheckedFile:
    """`read_config_file`, and every certificate, key, CA bundle and CRL parsed as at start, all problems together.

    What ``run``, ``check-config`` and a reload use, so a file is judged the same way by all three. A CRL older
    than its tunnel's ``crl-max-age`` is a problem; one past its next update is a line added to ``warnings``.
    """
    result = read_config_file(path)
    problems = list(result.problems)
    runtimes: list[Runtime] = []
    for cfg in result.tunnels:
        try:
            runtime = build_runtime(cfg)
            overdue = check_runtime_crls(cfg, runtime)
        except TlsgateError as err:
            problems.extend(f"tunnel {cfg.name!r}: {key_names(line)}" for line in str(err).splitlines())
            continue
        runtimes.append(runtime)
        if warnings is not None:
            warnings.extend(f"tunnel {cfg.name!r}: {crl_warning(source)}" for source in overdue)
    if problems:
        raise ConfigErrors(problems)
    return CheckedFile(result.tunnels, result.process, runtimes)


class LoadedTunnels(list[TunnelConfig]):
    """The tunnels a reload re-read, carrying the runtime the check built for each (see `checked_runtimes`).

    Still a list of tunnels, so the supervisor treats every ``load_configs`` alike (a test's lambda returning a
    plain list too); the runtimes ride along so a reload applies what the check built instead of reading every
    certificate, key and CRL a second time. They never leave the process: a runtime holds SSL contexts, which do
    not pickle, so this pickles (and copies) as the plain list of its tunnels.
    """

    def __init__(self, tunnels: Sequence[TunnelConfig], runtimes: Sequence[Runtime]) -> None:
        if len(tunnels) != len(runtimes):
            raise ValueError("runtimes: expected one per tunnel")
        super().__init__(tunnels)
        self._pairs = tuple(zip(tunnels, runtimes, strict=True))

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))


def checked_runtimes(configs: Sequence[TunnelConfig]) -> list[Runtime] | None:
    """The runtimes that came with ``configs`` (one per config, in order), or None: then build them.

    None unless ``configs`` is a `LoadedTunnels` still holding exactly the tunnels it was made with, so a list
    edited after the check (or any other list) never runs with a runtime built for a different tunnel.
    """
    if not isinstance(configs, LoadedTunnels) or len(configs) != len(configs._pairs):
        return None
    if any(cfg is not built for cfg, (built, _) in zip(configs, configs._pairs, strict=True)):
        return None
    return [runtime for _, runtime in configs._pairs]


def load_tunnels(path: str, running: ProcessOptions | None = None) -> LoadedTunnels:
    """The tunnels of ``path``: what a reload re-reads. Module-level, so ``--workers`` can pickle a partial of it.

    Every certificate is parsed here, so a failed reload logs every file's problem with its tunnel's name, not
    only the first; the runtimes come back with the tunnels, and the supervisor applies them as they are.

    A reload applies tunnels only; when ``running`` (the process settings in use) differs from the file's
    [process] table, a warning says that a restart is needed, rather than leaving the edit silently unapplied.
    """
    checked = check_config_file(path)
    process = checked.process
    if running is not None and process != running:
        changed = [
            f.name.replace("_", "-") for f in fields(process) if getattr(process, f.name) != getattr(running, f.name)
        ]
        logs.event(
            "[process] changed: restart tlsgate to apply it", logging.WARNING, config=path, keys=",".join(changed)
        )
    return LoadedTunnels(checked.tunnels, checked.runtimes)
