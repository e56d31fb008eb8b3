"""The socket side of the STARTTLS-style openings (``--protocol``, ``--target-protocol``): a few non-blocking
reads and writes around the sans-IO decisions of ``tlsgate.engine.postgres``.

``Setup`` calls these from its steps (the readiness, deadline and refusals stay there); each function does the
system calls of one step and says what happened, so the steps read as the protocol does. Nothing here reads
ahead: every byte taken off a socket is one the opening asked for, and a ClientHello is left for OpenSSL.
"""

from __future__ import annotations

import socket
from typing import TypeAlias

from tlsgate.engine import postgres

Opening: TypeAlias = postgres.ServerOpening | postgres.AppOpening


def advance(sock: socket.socket, opening: Opening) -> postgres.Step | None:
    """Peek at the client's next bytes, let ``opening`` decide, take the bytes it consumes and send its reply.

    Returns the step, or None when the client is gone (end of stream, an error, or bytes the kernel just showed
    us that a read then did not return). Raises ``BlockingIOError`` when nothing is there yet: the caller waits
    for the socket to be readable. A step that waits for more has always taken bytes, so the socket is never
    left readable with nothing to do (no spin).
    """
    try:
        data = sock.recv(opening.wanted(), socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        raise BlockingIOError from None
    except OSError:
        return None
    if not data:
        return None
    step = opening.receive(data)
    try:
        taken = sock.recv(step.consume) if step.consume else b""
        # A reply is one byte or a short ErrorResponse: a fresh socket's send buffer always takes it whole.
        sent = sock.send(step.reply) if step.reply else 0
    except OSError:
        return None
    if len(taken) != step.consume or sent != len(step.reply):
        return None
    return step


def request_tls(sock: socket.socket) -> str:
    """Send PostgreSQL's ``SSLRequest`` to a just-connected target: '' once sent, else the reason it was not."""
    try:
        sent = sock.send(postgres.SSL_REQUEST)
    except OSError as err:
        return f"sending SSLRequest: {err}"
    if sent != len(postgres.SSL_REQUEST):
        return "the target did not take the SSLRequest at once"
    return ""


def target_answer(sock: socket.socket) -> str:
    """Read the target's answer to ``request_tls``: '' when it said ``S`` alone (the byte is then taken off the
    socket, and the TLS handshake may start), else the reason to refuse it. Raises ``BlockingIOError`` when the
    answer has not come yet.

    Two bytes are peeked: an ``S`` must come alone, since a byte after it was sent before our ClientHello and
    can only be someone's attempt to pass plaintext off as part of the session (CVE-2021-23222).
    """
    try:
        answer = sock.recv(2, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        raise BlockingIOError from None
    except OSError as err:
        return f"reading the answer to SSLRequest: {err}"
    reason = postgres.target_answer(answer)
    if reason:
        return reason
    try:
        taken = sock.recv(1)
    except OSError as err:
        return f"reading the answer to SSLRequest: {err}"
    return "" if taken == b"S" else "the target's answer to SSLRequest vanished"
