"""The client side of an HTTP CONNECT or SOCKS5 handshake with a proxy, sans-IO: bytes in, bytes out, a verdict.

``Setup`` (client mode with ``--proxy``) connects to the proxy, sends ``first_flight()``, then feeds what the
proxy sends to ``take()`` until the tunnel is open, and only then starts TLS with the target over the same
socket. Nothing here touches a socket, so every reply a proxy can send (split anywhere, garbage, a refusal) is
tested with plain values.

``take(available)`` is given the bytes the socket holds, *peeked*, and answers how many of them belong to the
proxy's reply (``Step.used``): the engine then takes exactly those off the socket, so the first byte of the
target's own stream (after a CONNECT, a TLS server that talks first would be odd but valid) is never swallowed.
An incomplete reply uses every byte offered (all of them belong to it), so the socket never stays readable with
bytes nobody takes: no input makes the engine spin. Replies are bounded (``MAX_HTTP_REPLY``); a proxy that keeps
sending headers is refused, not buffered.

Why our own code rather than ``python-socks``: that library's public clients are blocking sockets or coroutines
with their own timeouts, and its sans-IO layer is private (``python_socks._protocols``); the engine runs a
callback state machine per connection with one deadline (``--connect-timeout``), and the two handshakes are a
few dozen lines each. ``socksio`` is sans-IO but SOCKS only.

Every failure is ``ViaProxyError`` with a reason in words; no reason quotes the credentials, and text the proxy
sent (a reason phrase) is cut short and kept to printable ASCII.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass

from tlsgate.engine.sockets import host_port
from tlsgate.settings.proxyurl import ProxyURL

__all__ = ["MAX_HTTP_REPLY", "HttpConnect", "Socks5Connect", "Step", "ViaProxyError", "handshake_for"]

# A CONNECT reply is a status line and a few headers; 16 KiB is far more than any proxy sends, and bounds memory.
MAX_HTTP_REPLY = 16384

_SOCKS_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused by the target",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class ViaProxyError(Exception):
    """The proxy refused, failed or broke the protocol; ``str()`` is the reason, free of secrets."""


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after ``take``: consume ``used`` bytes, send ``send`` (may be empty), and whether it is open."""

    used: int
    send: bytes = b""
    open: bool = False


def handshake_for(proxy: ProxyURL, host: str, port: int) -> HttpConnect | Socks5Connect:
    """The handshake that asks ``proxy`` for a tunnel to ``host:port`` (a name, sent as is, or an IP literal)."""
    if proxy.kind == "http":
        return HttpConnect(host, port, proxy.username, proxy.password)
    return Socks5Connect(host, port, proxy.username, proxy.password)


def _printable(data: bytes, limit: int = 60) -> str:
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in data[:limit])
    return text + ("..." if len(data) > limit else "")


class HttpConnect:
    """``CONNECT host:port HTTP/1.1``, with ``Proxy-Authorization: Basic`` when the URL has credentials.

    Any 2xx opens the tunnel (RFC 9110, 9.3.6); ghostunnel's Go dialer takes only 200, and no proxy we know sends
    another 2xx, so the two agree in practice. 407 (or 401, tinyproxy's) says whether credentials were sent,
    since that is the fix.
    """

    __slots__ = ("_authorization", "_seen", "_target")

    def __init__(self, host: str, port: int, username: bytes | None, password: bytes | None) -> None:
        try:
            name = host if host.isascii() else host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ViaProxyError("target name cannot be sent to an HTTP proxy (not a valid IDNA name)") from None
        self._target = host_port(name, port).encode("ascii")
        self._authorization = b""
        if username is not None:
            token = base64.b64encode(username + b":" + (password or b""))
            self._authorization = b"Proxy-Authorization: Basic " + token + b"\r\n"
        self._seen = b""

    def first_flight(self) -> bytes:
        target = self._target
        return b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n" + self._authorization + b"\r\n"

    def take(self, available: bytes) -> Step:
        seen = self._seen
        # The blank line may straddle what we had and what came: search from just before the join.
        end = (seen + available).find(b"\r\n\r\n", max(len(seen) - 3, 0))
        if end == -1:
            if len(seen) + len(available) >= MAX_HTTP_REPLY:
                raise ViaProxyError(f"proxy reply headers longer than {MAX_HTTP_REPLY} bytes")
            self._seen = seen + available
            return Step(len(available))
        used = end + 4 - len(seen)
        head = (seen + available)[: end + 4]
        if len(head) > MAX_HTTP_REPLY:
            raise ViaProxyError(f"proxy reply headers longer than {MAX_HTTP_REPLY} bytes")
        self._seen = b""
        status_line = head.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not _is_status(parts[1]):
            raise ViaProxyError(f"not an HTTP proxy reply: {_printable(status_line)!r}")
        code = int(parts[1])
        if 200 <= code < 300:
            return Step(used, open=True)
        phrase = _printable(parts[2]) if len(parts) > 2 else ""
        said = f"{code} {phrase}".strip()
        # 407 is the standard answer; tinyproxy (1.11, Debian 12) answers a missing or wrong BasicAuth with 401.
        if code in (401, 407):
            if self._authorization:
                raise ViaProxyError(f"proxy refused the credentials in the --proxy URL ({said})")
            raise ViaProxyError(f"proxy wants credentials: put user:password@ in the --proxy URL ({said})")
        raise ViaProxyError(f"proxy refused the CONNECT: {said}")


def _is_status(value: bytes) -> bool:
    return len(value) == 3 and value.isdigit()


# SOCKS5 states: what the next reply answers.
_METHOD, _AUTH, _CONNECT = 0, 1, 2


class Socks5Connect:
    """RFC 1928 CONNECT, with RFC 1929 username/password when the URL has credentials (as Go's x/net/proxy).

    We offer "no authentication" always and "username/password" too when we have credentials; the proxy picks.
    A name is sent for the proxy to resolve (ATYP 3), an IP literal as an address (ATYP 1 or 4).
    """

    __slots__ = ("_need", "_password", "_request", "_seen", "_state", "_username")

    def __init__(self, host: str, port: int, username: bytes | None, password: bytes | None) -> None:
        self._username, self._password = username, password
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            try:
                name = host.encode("idna") if not host.isascii() else host.encode("ascii")
            except UnicodeError:
                raise ViaProxyError("target name cannot be sent to a SOCKS5 proxy (not a valid IDNA name)") from None
            if not 0 < len(name) <= 255:
                raise ViaProxyError("target name too long for SOCKS5 (255 bytes at most)") from None
            address = b"\x03" + bytes([len(name)]) + name
        else:
            address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        self._request = b"\x05\x01\x00" + address + port.to_bytes(2, "big")
        self._state = _METHOD
        self._seen = b""
        self._need = 2

    def first_flight(self) -> bytes:
        return b"\x05\x02\x00\x02" if self._username is not None else b"\x05\x01\x00"

    def take(self, available: bytes) -> Step:
        seen = self._seen
        room = self._need - len(seen)
        chunk = available[:room]
        seen += chunk
        if self._state == _CONNECT and len(seen) >= 5 and self._need == 5:
            self._need = _connect_reply_length(seen)
            room = self._need - len(seen)
            extra = available[len(chunk) : len(chunk) + room]
            chunk += extra
            seen += extra
        if len(seen) < self._need:
            self._seen = seen
            return Step(len(chunk))
        self._seen = b""
        return self._reply(seen, len(chunk))

    def _reply(self, reply: bytes, used: int) -> Step:
        if self._state == _METHOD:
            if reply[0] != 5:
                raise ViaProxyError(f"not a SOCKS5 proxy (it answered {_printable(reply)!r})")
            method = reply[1]
            if method == 0:
                return self._send_request(used)
            if method == 2 and self._username is not None:
                self._state, self._need = _AUTH, 2
                user, password = self._username, self._password or b""
                return Step(used, b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            if method == 0xFF and self._username is None:
                raise ViaProxyError("SOCKS5 proxy wants credentials: put user:password@ in the --proxy URL")
            if method == 0xFF:
                raise ViaProxyError("SOCKS5 proxy accepts none of our authentication methods")
            raise ViaProxyError(f"SOCKS5 proxy chose authentication method {method}, which we did not offer")
        if self._state == _AUTH:
            if reply[0] != 1 or reply[1] != 0:
                raise ViaProxyError("SOCKS5 proxy refused the credentials in the --proxy URL")
            return self._send_request(used)
        if reply[0] != 5:
            raise ViaProxyError("SOCKS5 proxy broke the protocol (bad version in its reply)")
        if reply[1] != 0:
            why = _SOCKS_REPLIES.get(reply[1], f"reply code {reply[1]}")
            raise ViaProxyError(f"SOCKS5 proxy refused the CONNECT: {why}")
        return Step(used, open=True)

    def _send_request(self, used: int) -> Step:
        self._state, self._need = _CONNECT, 5
        return Step(used, self._request)


def _connect_reply_length(head: bytes) -> int:
    """The whole CONNECT reply's length from its first five bytes (VER REP RSV ATYP and one address byte)."""
    atyp = head[3]
    if atyp == 1:
        return 4 + 4 + 2
    if atyp == 4:
        return 4 + 16 + 2
    if atyp == 3:
        return 4 + 1 + head[4] + 2
    if head[1] != 0:  # a refusal with a malformed address: the reply code is what matters
        raise ViaProxyError(f"SOCKS5 proxy refused the CONNECT: {_SOCKS_REPLIES.get(head[1], 'error')}")
    raise ViaProxyError(f"SOCKS5 proxy broke the protocol (address type {atyp})")
