"""The HTTPS front of ``tlsgate dev``: its settings, its listening sockets, and the `DevFront` server.

`DevSettings.from_flags` turns the command-line text (``--to``, ``--listen``, ``--name``) into checked values.
`DevFront` is a `~tlsgate.process.supervisor.Server` with one server-mode tunnel named ``dev``: TLS with the
leaf from `tlsgate.dev.ca` on ``--listen``, plaintext to ``--to``, no client certificates. ``localhost`` is
bound on both 127.0.0.1 and ::1 (`bind_dev_listeners`) whatever the hosts file says, because browsers resolve
``localhost`` to both on their own. Once serving, it prints a banner and runs `tlsgate.dev.watch.watch_target`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlsgate.dev.ca import BASE_NAMES, ca_root, dev_ca_warning, ensure_dev_ca, ensure_dev_certificate, normalise_name
from tlsgate.dev.stores import TrustStores, is_trusted
from tlsgate.dev.watch import watch_target
from tlsgate.engine.sockets import listen_tcp
from tlsgate.errors import ConfigError, StartupError, shown
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.addresses import Address, parse_address
from tlsgate.settings.config import tunnel_config

DEFAULT_LISTEN = "localhost:8443"

_LOCALHOST_NAMES = ("localhost", "localhost.")


# --------------------------------------------------------------------------------------------------------------
# Settings


def parse_target(text: str) -> Address:
    """``--to``: a bare port means this machine (``localhost:PORT``), else ``HOST:PORT``, ``[v6]:PORT`` or
    ``unix:PATH``.

    A bare port becomes ``localhost`` rather than 127.0.0.1 so each connection tries every address localhost
    has: some dev servers (Vite on recent Node, for one) listen on ::1 only.
    """
    value = text.strip()
    if value.isascii() and value.isdigit():
        port = int(value)
        if not 1 <= port <= 65535:
            raise ConfigError(f"--to {shown(text)}: port out of range (1-65535)")
        return Address(host="localhost", port=port)
    if not value.startswith("unix:") and ":" not in value:
        raise ConfigError(f"--to {shown(text)}: expected a port (3000), HOST:PORT (127.0.0.1:3000) or unix:PATH")
    target = parse_address(value, name=f"--to {text!r}")
    if not target.is_unix and (not target.host or target.port == 0):
        raise ConfigError(f"--to {shown(text)}: give a host and a port other than 0, like 127.0.0.1:3000")
    return target


def _parse_listen(text: str) -> Address:
    listen = parse_address(text, name="--listen")
    if listen.is_unix:
        raise ConfigError(
            f"--listen {shown(text)}: browsers cannot open unix sockets; give HOST:PORT like localhost:8443"
        )
    if not listen.host or not listen.is_loopback:
        raise ConfigError(
            f"--listen {text!r}: tlsgate dev serves this machine only (localhost, 127.0.0.1 or [::1]); "
            "use `tlsgate server` to publish a service to other machines"
        )
    return listen


@dataclass(frozen=True)
class DevSettings:
    """Everything a dev front needs, validated once: `from_flags` turns command-line text into this."""

    target: Address
    listen: Address = field(default_factory=lambda: Address(host="localhost", port=8443))
    names: tuple[str, ...] = ()
    ca_dir: Path = field(default_factory=ca_root)
    # How often a target that is not up yet is tried again; reminders are much rarer (see TargetWatch).
    probe_interval: float = 1.0

    @classmethod
    def from_flags(
        cls,
        *,
        to: str,
        listen: str = DEFAULT_LISTEN,
        names: Sequence[str] = (),
        ca_dir: Path | None = None,
    ) -> DevSettings:
        normalised = [normalise_name(name) for name in names]
        extra = tuple(n for n in dict.fromkeys(normalised) if n not in BASE_NAMES)
        return cls(
            target=parse_target(to),
            listen=_parse_listen(listen),
            names=extra,
            ca_dir=ca_dir if ca_dir is not None else ca_root(),
        )


# --------------------------------------------------------------------------------------------------------------
# Listening


def _bind(host: str, port: int) -> socket.socket:
    # Not `bind_listeners`: that resolves a name and, on port 0, keeps the first address only, while the front
    # needs 127.0.0.1 and ::1 on one port and its own messages about which of them is taken.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return listen_tcp(family, (host, port))


def _bind_error(listen: Address, host: str, port: int, err: OSError) -> StartupError:
    where = str(Address(host=host, port=port))
    if err.errno == errno.EADDRINUSE:
        return StartupError(
            f"--listen {listen}: {where} is already in use by another program; "
            f"pick another port, like --listen {listen.host}:{port + 1 if port < 65535 else 8443}"
        )
    if err.errno == errno.EACCES:
        return StartupError(f"--listen {listen}: {where}: permission denied (ports below 1024 need root)")
    return StartupError(f"--listen {listen}: cannot listen on {where} ({err.strerror or err})")


def bind_dev_listeners(listen: Address) -> list[socket.socket]:
    """Listening sockets for the front: 127.0.0.1 and ::1 for ``localhost`` (on one port), else the one address.

    Browsers resolve ``localhost`` to both addresses themselves and may try either first, so both must reach
    this front; another program on either one would silently take some of the browser's requests, so that
    is an error too. A machine without IPv6 gets 127.0.0.1 alone. Port 0 picks a free port for both.
    """
    hosts = ["127.0.0.1", "::1"] if listen.host.lower() in _LOCALHOST_NAMES else [listen.host]
    attempts = 20 if listen.port == 0 and len(hosts) > 1 else 1
    for attempt in range(attempts):
        sockets: list[socket.socket] = []
        port = listen.port
        try:
            for host in hosts:
                try:
                    sock = _bind(host, port)
                except OSError as err:
                    if host == "::1" and len(hosts) > 1 and err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        continue  # no IPv6 here, so no browser will try ::1 either
                    if err.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                        raise _Retry from None  # port 0: the port free on 127.0.0.1 was taken on ::1
                    raise _bind_error(listen, host, port, err) from None
                sockets.append(sock)
                port = int(sock.getsockname()[1])
            return sockets
        except BaseException as err:
            for sock in sockets:
                sock.close()
            if not isinstance(err, _Retry):
                raise
    raise StartupError(f"--listen {listen}: found no port free on both 127.0.0.1 and ::1")  # pragma: no cover


class _Retry(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------
# The front


class DevFront(Server):
    """A `Server` with one tunnel named ``dev``: TLS with the dev certificate on ``settings.listen``,
    plaintext to ``settings.target``, no client certificates.

    Building it makes the CA and the leaf when needed (so errors in them surface before anything listens);
    `serve` binds, says where to point the browser, watches the target, and runs until stopped.
    """

    def __init__(
        self,
        settings: DevSettings,
        say: Callable[[str], None] = lambda _line: None,
        *,
        stores: TrustStores | None = None,
    ) -> None:
        self.settings = settings
        self.say = say
        self.ca, self.ca_created = ensure_dev_ca(settings.ca_dir)
        self.certificate = ensure_dev_certificate(self.ca, settings.names)
        self._stores = stores
        cfg = tunnel_config(
            "server",
            {
                "listen": str(settings.listen),
                "target": str(settings.target),
                "cert": [str(self.certificate.cert_path)],
                "key": [str(self.certificate.key_path)],
                "disable_authentication": True,
                # Dev servers in containers and VMs sit on private addresses; the hop is the developer's call.
                "unsafe_target": True,
                # Ctrl-C should give the prompt back at once, not after in-flight long polls finish.
                "shutdown_timeout": "2s",
            },
            name="dev",
        )
        super().__init__([cfg], ProcessOptions())
        self._watcher: asyncio.Task[None] | None = None

    def start(self, listeners: dict[str, list[socket.socket]] | None = None) -> None:
        if listeners is not None:
            super().start(listeners)
            return
        sockets = bind_dev_listeners(self.settings.listen)
        try:
            super().start({"dev": sockets})
        except BaseException:
            for sock in sockets:
                sock.close()
            raise

    @property
    def port(self) -> int:
        """The port the front listens on (the real one when ``--listen`` asked for port 0)."""
        return int(self.tunnels["dev"].listeners[0].getsockname()[1])

    def urls(self) -> list[str]:
        """Where to point a browser: localhost, then each extra name that is not a wildcard."""
        port = self.port
        hosts = ["localhost", *(f"[{n}]" if ":" in n else n for n in self.settings.names if not n.startswith("*."))]
        return [f"https://{host}:{port}/" for host in hosts]

    def banner(self) -> list[str]:
        tunnel = self.tunnels["dev"]
        lines = [f"tlsgate dev: https in front of {self.settings.target}", ""]
        lines += [f"  {url}" for url in self.urls()]
        lines += ["", f"listening on {', '.join(tunnel.addresses)}"]
        cert = self.certificate
        if cert.issued_because is not None:
            lines.append(f"issued a new certificate ({cert.issued_because}): {cert.cert_path}")
        if self.ca_created:
            lines.append(f"created a local CA in {self.ca.directory}")
        if (warning := dev_ca_warning(self.ca)) is not None:
            lines.append(f"warning: {warning}")
        if not is_trusted(self.ca.cert_path, self._stores or TrustStores.discover()):
            lines.append("browsers do not trust the local CA yet: run `tlsgate dev trust` once")
        lines.append("Press Ctrl-C to stop.")
        return lines

    async def serve(self, ready: Callable[[Server], Awaitable[None] | None] | None = None) -> int:
        async def announce(server: Server) -> None:
            for line in self.banner():
                self.say(line)
            self._watcher = asyncio.create_task(
                watch_target(self.settings.target, self.say, interval=self.settings.probe_interval)
            )
            if ready is not None:
                result = ready(server)
                if asyncio.iscoroutine(result):
                    await result

        try:
            return await super().serve(announce)
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
