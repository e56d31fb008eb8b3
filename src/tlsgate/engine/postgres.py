"""PostgreSQL's way into TLS, sans-IO: the first bytes of a connection in, what to answer and do next out.

PostgreSQL serves plaintext and TLS on one port, so a client asks before it starts TLS. The *startup
packets* that may open a connection all begin with a 32-bit length (itself included) and a 32-bit code:

* ``SSLRequest`` (length 8, code 80877103): "may I speak TLS?". The server answers one byte, ``S`` (yes:
  the TLS handshake follows at once) or ``N`` (no: the client goes on in plaintext or gives up);
* ``GSSENCRequest`` (length 8, code 80877104): the same for GSSAPI encryption. libpq sends it first when it
  holds a Kerberos ticket; after an ``N`` it sends its ``SSLRequest`` on the same connection;
* ``CancelRequest`` (length 16, code 80877102): cancel a running query, by process id and secret key;
* ``StartupMessage`` (code 196608, protocol 3.0): the plaintext session itself, user and database names;
* PostgreSQL 17's *direct TLS* (``sslnegotiation=direct``): no request at all, the client's TLS ClientHello
  comes first. Its first byte is 0x16 (a TLS handshake record), which no startup packet can start with: their
  first byte is the high byte of a length that is at most 10,000. The client must then offer the ALPN
  protocol ``postgresql``, which tells a PostgreSQL listener from any other TLS service.

``ServerOpening`` is tlsgate in front of a plaintext PostgreSQL (``--protocol postgres``): it answers ``S`` to
an ``SSLRequest``, ``N`` to a ``GSSENCRequest`` (once), lets a direct ClientHello through untouched, and
refuses everything else with an ``ErrorResponse`` the client prints, because a plaintext session would reach
the database without the TLS and the rules tlsgate is there to apply. ``AppOpening`` is tlsgate in front of a
plaintext *application* (client mode, ``--target-protocol postgres``): it answers ``N`` to the application's own
requests (the link to tlsgate is local and plaintext; tlsgate adds TLS towards the server) and hands the
``StartupMessage`` on. ``target_answer`` reads the server's one-byte answer to the ``SSLRequest`` tlsgate
sends in client mode.

Both openings work on *peeked* bytes: each ``receive`` says how many of them to take off the socket
(``Step.consume``), what to send back (``Step.reply``) and what comes next (``Step.then``). A ClientHello is
never consumed, so OpenSSL reads it from the socket itself.
The bytes an opening takes are at most one startup packet, so a client can make it hold no more than that.

Two attacks on this exchange are known, and both are closed by never reading ahead: CVE-2021-23214 (a server
that buffered plaintext sent right after the ``SSLRequest`` and treated it as if it had come through TLS) and
CVE-2021-23222 (the same on the client side, for bytes after the ``S``). ``ServerOpening`` refuses a client whose
bytes after the ``SSLRequest`` are already there when it answers, as PostgreSQL 14.1 and later do, and
``target_answer`` refuses a server whose ``S`` comes with anything after it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "ALPN",
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_STARTUP_PACKET",
    "PROTOCOL_3",
    "SSL_REQUEST",
    "SSL_REQUEST_CODE",
    "AppOpening",
    "ServerOpening",
    "Step",
    "error_response",
    "target_answer",
]

SSL_REQUEST_CODE: Final = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE: Final = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST_CODE: Final = 80877102  # 1234 << 16 | 5678
PROTOCOL_3: Final = 3 << 16
MAX_STARTUP_PACKET: Final = 10000
"""PostgreSQL's own bound (``MAX_STARTUP_PACKET_LENGTH``): a longer startup packet is garbage."""
SSL_REQUEST: Final = struct.pack("!II", 8, SSL_REQUEST_CODE)
ALPN: Final = "postgresql"
"""The ALPN protocol of PostgreSQL over TLS (PostgreSQL 17), required for a direct TLS connection."""

_TLS_HANDSHAKE_RECORD: Final = 0x16
_HEADER: Final = 8
# SQLSTATE of a refused connection: 28000 invalid_authorization_specification, as PostgreSQL's own refusal of
# a connection that pg_hba.conf's hostssl lines do not admit; 08P01 protocol_violation for garbage.
_SQLSTATE_REFUSED: Final = "28000"
_SQLSTATE_PROTOCOL: Final = "08P01"

Next = Literal["read", "tls", "relay", "refuse"]


@dataclass(frozen=True)
class Step:
    """What to do with the bytes just peeked.

    ``consume``: how many of them to take off the socket (never more than were peeked). ``reply``: bytes to send
    back, in full, before going on. ``then``: ``read`` (wait for more bytes, then ``receive`` again), ``tls``
    (start the TLS handshake: OpenSSL reads the ClientHello from the socket), ``relay`` (client mode: the
    application's StartupMessage is next: connect the target, send it ``forward``, relay), or ``refuse``
    (send ``reply``, then close; ``reason`` is for the log).
    """

    consume: int
    then: Next
    reply: bytes = b""
    reason: str = ""
    direct: bool = False  # a direct TLS ClientHello (PostgreSQL 17): the handshake must select ALPN
    forward: bytes = b""  # client mode: bytes taken from the application that the target must get first


def error_response(message: str, sqlstate: str = _SQLSTATE_REFUSED) -> bytes:
    """A FATAL ``ErrorResponse`` message: libpq shows ``FATAL:  <message>`` and gives up on the connection.

    Fields are a type byte and a NUL-terminated string: ``S`` and ``V`` the severity (localised and not), ``C``
    the SQLSTATE, ``M`` the message; one more NUL ends the list.
    """
    fields = b"".join(
        kind + text.encode("utf-8", "replace").replace(b"\0", b"") + b"\0"
        for kind, text in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!I", len(body) + 4) + body


def _packet(header: bytes) -> tuple[int, int]:
    length, code = struct.unpack("!II", header)
    return length, code


def _describe(length: int, code: int) -> str:
    return f"not a PostgreSQL startup packet (length {length}, code {code:#010x})"


class ServerOpening:
    """tlsgate in front of a plaintext PostgreSQL: get the client into TLS, or refuse it in words it shows.

    Feed ``receive`` the bytes peeked from the client socket (at most ``wanted()`` of them) until a step says
    ``tls`` or ``refuse``. A refusal's ``reply`` is an ``ErrorResponse`` for a PostgreSQL client that meant to
    speak plaintext, empty for bytes that are not PostgreSQL at all.
    """

    __slots__ = ("_discard", "_gssenc_answered", "_refusal", "_seen")

    def __init__(self) -> None:
        self._seen = b""  # the bytes of the current packet's header consumed so far
        self._gssenc_answered = False
        self._discard = 0  # bytes of a refused StartupMessage still to take before answering (see below)
        self._refusal: Step | None = None

    def wanted(self) -> int:
        """How many bytes to peek next: one past the header, to see whether a client waited for our answer."""
        if self._discard:
            return min(self._discard, MAX_STARTUP_PACKET)
        return _HEADER - len(self._seen) + 1

    def receive(self, data: bytes) -> Step:
        """The step for ``data``, bytes peeked from the socket (not yet consumed); ``data`` must not be empty."""
        if self._discard:
            return self._discarding(data)
        seen = self._seen
        if not seen and data[0] == _TLS_HANDSHAKE_RECORD:
            return Step(0, "tls", direct=True)
        need = _HEADER - len(seen)
        if len(data) < need:
            # Take what is there: peeked bytes left queued would keep the socket readable (a busy loop).
            self._seen = seen + data
            if self._seen[0] != 0:
                return self._garbage(len(data))
            return Step(len(data), "read")
        self._seen = b""
        length, code = _packet(seen + data[:need])
        extra = len(data) > need
        if length == 8 and code == SSL_REQUEST_CODE:
            if extra:
                return Step(need, "refuse", reason="bytes after SSLRequest before the server's answer")
            return Step(need, "tls", reply=b"S")
        if length == 8 and code == GSSENC_REQUEST_CODE and not self._gssenc_answered:
            if extra:
                return Step(need, "refuse", reason="bytes after GSSENCRequest before the server's answer")
            self._gssenc_answered = True
            return Step(need, "read", reply=b"N")
        if code in (PROTOCOL_3, CANCEL_REQUEST_CODE) and _HEADER <= length <= MAX_STARTUP_PACKET:
            what = "CancelRequest" if code == CANCEL_REQUEST_CODE else "StartupMessage"
            message = "this server accepts TLS connections only (connect with sslmode=require or stronger)"
            refusal = Step(0, "refuse", reply=error_response(message), reason=f"plaintext {what}: TLS required")
            return self._refuse_after_packet(need, length - _HEADER, refusal)
        return self._garbage(need, _describe(length, code))

    def _refuse_after_packet(self, consumed: int, rest: int, refusal: Step) -> Step:
        """Refuse once the rest of the packet is read, as PostgreSQL does: closing a socket with unread bytes
        sends a reset, which can overtake the ``ErrorResponse`` and leave the client with "connection reset"."""
        if rest <= 0:
            return Step(consumed, refusal.then, refusal.reply, refusal.reason)
        self._discard, self._refusal = rest, refusal
        return Step(consumed, "read")

    def _discarding(self, data: bytes) -> Step:
        taken = min(len(data), self._discard)
        self._discard -= taken
        if self._discard:
            return Step(taken, "read")
        refusal, self._refusal = self._refusal, None
        assert refusal is not None
        return Step(taken, "refuse", refusal.reply, refusal.reason)

    @staticmethod
    def _garbage(consume: int, reason: str = "") -> Step:
        text = reason or "not a PostgreSQL startup packet (nor a TLS ClientHello)"
        return Step(consume, "refuse", error_response(text, _SQLSTATE_PROTOCOL), text)


class AppOpening:
    """tlsgate in front of a plaintext PostgreSQL application (client mode): decline its requests for
    encryption (``N``: tlsgate itself encrypts towards the server), and hand on its StartupMessage.

    libpq's default ``sslmode=prefer`` sends an ``SSLRequest`` first; relayed as is, it would reach the server
    inside tlsgate's TLS session, where PostgreSQL refuses it as an unknown protocol. A direct ClientHello is
    refused: the application wants TLS from a listener that offers none. The header of the StartupMessage
    (or CancelRequest) is taken off the socket to be read, so the final step gives it back in ``forward``: the
    engine sends it to the target first, then relays the rest.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen = b""

    def wanted(self) -> int:
        return _HEADER - len(self._seen)

    def receive(self, data: bytes) -> Step:
        seen = self._seen
        if not seen and data[0] == _TLS_HANDSHAKE_RECORD:
            reason = "the application started TLS (sslnegotiation=direct) on a plaintext listener"
            return Step(0, "refuse", reason=reason)
        need = _HEADER - len(seen)
        if len(data) < need:
            self._seen = seen + data
            if self._seen[0] != 0:
                return Step(len(data), "refuse", reason="not a PostgreSQL startup packet")
            return Step(len(data), "read")
        self._seen = b""
        header = seen + data[:need]
        length, code = _packet(header)
        if length == 8 and code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            return Step(need, "read", reply=b"N")
        if code in (PROTOCOL_3, CANCEL_REQUEST_CODE) and _HEADER <= length <= MAX_STARTUP_PACKET:
            return Step(need, "relay", forward=header)
        return Step(need, "refuse", reason=_describe(length, code))


def target_answer(data: bytes) -> str:
    """Check the target's answer to our ``SSLRequest`` (the bytes peeked after sending it): '' when it said
    ``S`` and nothing more, else the reason to give up on it.

    ``N`` means the server does not take TLS (``ssl = off``): tlsgate never falls back to plaintext. ``E`` is
    an ``ErrorResponse`` (a server too old to know the request, or one that refuses every connection).
    """
    if not data:
        return "the target closed the connection after SSLRequest"
    first = data[:1]
    if first == b"S":
        if len(data) > 1:
            return "the target sent bytes after its S, before the TLS handshake (CVE-2021-23222)"
        return ""
    if first == b"N":
        return "the target does not accept TLS (it answered N to SSLRequest: ssl = off?)"
    if first == b"E":
        return "the target answered SSLRequest with an ErrorResponse"
    return f"not a PostgreSQL server (it answered SSLRequest with {data[:8]!r})"
