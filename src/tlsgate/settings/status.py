"""``--status`` as a setting: its address parsed and judged against the tunnels, before anything listens.

Lives in settings (layer 1) because the command line and the config file check it with every other setting; the
status port itself (``tlsgate.status``) uses the same parse when it starts listening.

``parse_status_address`` reads the value into a ``StatusAddress``; ``check_status_setting`` adds what needs the
tunnels (HTTPS needs a certificate: ``status_certificate_config`` picks whose); ``status_option_problems``
refuses --enable-pprof/--enable-shutdown without --status; ``exposed_status_warning`` is the start-up warning
for a port other machines can reach.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlsgate import logs
from tlsgate.errors import ConfigError, shown
from tlsgate.settings.addresses import Address, parse_address
from tlsgate.settings.config import TunnelConfig
from tlsgate.settings.convert import check_socket_path

if TYPE_CHECKING:
    from tlsgate.settings.process_options import ProcessOptions


@dataclass(frozen=True)
class StatusAddress:
    address: Address
    https: bool
    # A bare HOST:PORT: HTTPS when a tunnel has a certificate, else HTTP with a warning (ghostunnel's rule).
    https_if_possible: bool = False

    @property
    def exposed(self) -> bool:
        """True when other machines can reach it: ``:PORT``, ``0.0.0.0``, ``[::]`` or a non-loopback host."""
        return not self.address.is_loopback


def parse_status_address(text: str) -> StatusAddress:
    """``http://HOST:PORT``, ``https://HOST:PORT``, ``unix:PATH`` or ``HOST:PORT``; ConfigError names --status."""
    value = text.strip()
    scheme, sep, rest = value.partition("://")
    if not sep:
        address = check_socket_path(parse_address(value, name="--status", activated=True), "--status")
        return StatusAddress(address, https=False, https_if_possible=not address.is_unix)
    if scheme.lower() not in ("http", "https"):
        raise ConfigError(f"--status {shown(text)}: scheme {shown(scheme)} is not http or https")
    rest = rest.rstrip("/")
    if "/" in rest:
        raise ConfigError(f"--status {shown(text)}: give only HOST:PORT after {scheme}:// (the paths are fixed)")
    address = parse_address(rest, name="--status", activated=True)
    return StatusAddress(address, https=scheme.lower() == "https")


def status_certificate_config(configs: Sequence[TunnelConfig]) -> TunnelConfig | None:
    """The tunnel whose certificate an HTTPS status port presents, or None (then the port speaks plain HTTP).

    The first server-mode tunnel: its certificate is the one clients of this host already trust. Failing that, the
    first client-mode tunnel that presents a certificate (``--keystore`` or ``--cert``/``--key``): ghostunnel's
    client mode serves its status port with the client certificate, and health checks written for it expect a
    TLS handshake there. A client with ``--disable-authentication`` has nothing to present.
    """
    servers = [cfg for cfg in configs if cfg.mode == "server"]
    clients = [cfg for cfg in configs if cfg.mode == "client" and (cfg.keystore or cfg.cert)]
    return next(iter(servers + clients), None)


def check_status_setting(text: str, configs: Sequence[TunnelConfig]) -> StatusAddress:
    """``--status`` judged with the tunnels it serves, before anything listens: an address that cannot work
    is a one-line exit 2 at start, not an error after the tunnels already said "listening"."""
    where = parse_status_address(text)
    if where.https and status_certificate_config(configs) is None:
        raise ConfigError(
            f"--status {shown(text)}: no server certificate to serve HTTPS with (no tunnel has one); use http://"
        )
    return where


def status_option_problems(options: ProcessOptions) -> list[str]:
    """The status port's optional endpoints without a status port, one message each (ghostunnel refuses them
    the same way), so a flag that would silently do nothing is a start-up error instead."""
    flags = (("--enable-pprof", options.enable_pprof), ("--enable-shutdown", options.enable_shutdown))
    wanted = [name for name, on in flags if on]
    return [] if options.status else [f"{name} requires --status" for name in wanted]


def exposed_status_warning(where: StatusAddress, text: str) -> None:
    """One start-up line when the status port answers other machines: its pages name every tunnel, target and
    counter, to anyone who asks (no client certificate is ever asked for)."""
    if where.exposed:
        logs.event(
            "status port is reachable from other machines; bind it to 127.0.0.1 or unix:PATH unless intended",
            logging.WARNING, status=text,
        )  # fmt: skip
