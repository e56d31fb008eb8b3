"""The process: what runs the tunnels from start-up to exit, for one process or for ``--workers N``.

Read `lifecycle` first: the steps every tlsgate process goes through (checks before the loop, signals, the
log-flush and ``--timed-reload`` timers, first stop drains and second stop cuts, the exit code), written once.
Then the two owners of a lifecycle:

* `supervisor` -- `Server`, the tunnels of one process in one event loop: builds every runtime before anything
  listens, starts the tunnels and the status port, reloads (certificates only, or the whole config file:
  changed tunnels are replaced, their sockets handed over) and drains. ``async with Server(...)`` is the
  library form; ``run_server`` the CLI's. `ProcessOptions` holds the settings of the process itself.
* `workers` -- the ``--workers N`` parent: starts, restarts and signals N worker processes and sums their
  counters for ``--status``. `worker` is a worker's side (a `Server` on the sockets the parent hands down),
  `ports` the parent's reservation of each listen address before any worker starts.

Helpers with one job each: `systemd` (socket activation, readiness, watchdog), `platforms` (what the OS lacks:
start-up refusals, signal lists), `crls` (stale-CRL warnings and ``--crl-max-age`` at start and reload).

Data flows one way: typed configs from `tlsgate.settings` -> runtimes from `tlsgate.engine.runtime` -> running
`tlsgate.engine.tunnel.Tunnel`s. Nothing here parses a flag or touches a connection's bytes; the CLI calls in,
and only `tlsgate.dev` and `tlsgate.cli` sit above this package.
"""
