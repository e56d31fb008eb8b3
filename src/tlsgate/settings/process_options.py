"""The settings of the whole process, as opposed to one tunnel's: what a ``[process]`` table or the process flags set.

``tlsgate.process`` runs a process with them; they live here, below it, so that the TOML reader
(``settings.file``) can build them without importing the code that runs tunnels. The defaults here are the
defaults of the library API and of the command line alike (``Setting.default`` only repeats them for --help).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProcessOptions"]


@dataclass(frozen=True)
class ProcessOptions:
    """Settings of the process rather than of one tunnel."""

    status: str | None = None
    metrics_prefix: str = "tlsgate"
    # POST /_shutdown on the status port stops the process gracefully (ghostunnel's --enable-shutdown).
    enable_shutdown: bool = False
    # /debug/pprof/ on the status port: stacks and a cProfile window (ghostunnel's --enable-pprof).
    enable_pprof: bool = False
    workers: int = 1
    log_format: str = "text"
    quiet: tuple[str, ...] = ()
    loop: str = "auto"
    # Log to the local syslog socket instead of stderr (ghostunnel's --syslog).
    syslog: bool = False
    config_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
