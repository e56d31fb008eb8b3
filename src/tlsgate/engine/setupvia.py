"""The set-up steps of client ``--proxy``: ask an HTTP CONNECT or SOCKS5 proxy for the target, before TLS with it.

``Setup`` (``engine.setup``) connects to the proxy instead of the target (``Tunnel.resolve`` looks up the proxy's
name), then runs these steps in phase ``PROXY_HANDSHAKE``, and once the proxy has opened the tunnel goes on with
``_connected`` as if it had connected to the target itself: the target's TLS handshake, its ``--verify-*`` rules
and the relay are the same. The protocol is ``engine.viaproxy`` (sans-IO); here is only the socket work: send
what it says, peek at what the proxy sent, and take off the socket exactly the bytes that belong to the reply.
"""

from __future__ import annotations

import socket

from tlsgate.engine.setupcore import SetupCore, SetupPhase
from tlsgate.engine.viaproxy import ViaProxyError, handshake_for

_PROXY_HANDSHAKE = SetupPhase.PROXY_HANDSHAKE

# How much of a proxy's reply one read looks at: a CONNECT reply is a few hundred bytes, a SOCKS5 one at most 262.
_VIA_READ = 4096


class ViaProxySteps(SetupCore):
    """The ``--proxy`` steps; ``Setup`` provides ``_connected`` and ``_arm_connect``, which they go on with."""

    __slots__ = ()

    def _connected(self) -> None:
        raise NotImplementedError  # engine.setup.Setup

    def _arm_connect(self) -> None:
        raise NotImplementedError  # engine.setup.Setup

    def _via_start(self) -> None:
        """Connected to the proxy: ask it for the target. One deadline (--connect-timeout) covers the connect to
        the proxy, its handshake and the target's TLS handshake, as in ghostunnel, so a stalled proxy is cut."""
        cfg = self.tunnel.cfg
        assert cfg.proxy is not None
        self.phase = _PROXY_HANDSHAKE
        self._arm_connect()  # a loopback proxy connected at once, before any deadline was armed
        try:
            self.via = handshake_for(cfg.proxy, cfg.target.host, cfg.target.port)
        except ViaProxyError as err:
            self._target_failed(str(err))
            return
        self._via_send(self.via.first_flight())

    def _via_send(self, data: bytes) -> None:
        sock = self.target
        assert sock is not None
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self._target_failed(f"sending to the proxy: {err.strerror or err}")
            return
        if sent < len(data):
            self.via_out = data[sent:]
            self._want(sock.fileno(), False, self._via_flush)
            return
        self._want(sock.fileno(), True, self._via_read)

    def _via_flush(self) -> None:
        data, self.via_out = self.via_out, b""
        self._via_send(data)

    def _via_read(self) -> None:
        """Take the proxy's reply off the socket, and not one byte more (see engine.viaproxy)."""
        sock = self.target
        assert sock is not None
        try:
            data = sock.recv(_VIA_READ, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return  # a spurious wake-up: the reader stays registered
        except OSError as err:
            self._target_failed(f"the proxy reset the connection ({err.strerror or err})")
            return
        if not data:
            self._target_failed("the proxy closed the connection before the tunnel was open")
            return
        try:
            step = self.via.take(data)
        except ViaProxyError as err:
            self._target_failed(str(err))
            return
        try:
            taken = sock.recv(step.used)
        except OSError:
            taken = b""
        if len(taken) != step.used:  # the kernel just showed us these bytes; anything else is a vanished proxy
            self._target_failed("the proxy connection broke during its handshake")
            return
        if step.open:
            self.via = None
            self._unwant()
            self._connected()
        elif step.send:
            self._via_send(step.send)
