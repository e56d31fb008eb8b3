"""Send a TLS close_notify without reading: the half-close Python's ``ssl`` module cannot express.

Why this exists: ``SSLSocket.unwrap()`` calls OpenSSL's ``SSL_shutdown`` twice. The first call sends our
close_notify; the second reads from the socket, waiting for the peer's, and if the peer's *application data*
is there instead, OpenSSL drops it and fails with APPLICATION_DATA_AFTER_CLOSE_NOTIFY. For a tunnel that is
data loss: the target has finished, the client is still sending (a half-closed connection), and its bytes
arrive in the instant between the two calls. Python releases the GIL between them, so any other thread widens
that instant; tests on loopback lost data in about one run in ten.

So we call ``SSL_shutdown`` once ourselves, on the ``SSL*`` behind the socket, through ``ctypes``
(the binding and the pointer read are in `tlsgate.tls.ossl`). Reaching that
pointer relies on CPython's ``PySSLSocket`` layout (``PyObject_HEAD``, a weakref, then ``SSL *ssl``), unchanged
from 3.6 to 3.14. Every call checks the pointer twice before trusting it: OpenSSL must report our socket's
file descriptor for it, and the app-data slot that ``_ssl`` sets to its own object must point back to that
object. The layout and the OpenSSL are checked once at start-up by `tlsgate.tls.internals` (path ``closenotify``).
Where anything does not fit (another Python, OpenSSL linked statically, ``TLSGATE_INTERNALS=-closenotify``)
we fall back to ``unwrap()``, and the relay first drains what the peer already sent, which leaves only that
instant uncovered.
"""

from __future__ import annotations

import os
import ssl

from tlsgate.tls import internals, ossl

_SSL_ERROR_SSL = 1
_SSL_ERROR_WANT_READ = 2
_SSL_ERROR_WANT_WRITE = 3
_SSL_ERROR_SYSCALL = 5

_LIB = internals.bind("closenotify", ossl.CloseNotifyLib)


def _ssl_pointer(sock: ssl.SSLSocket) -> int | None:
    return None if _LIB is None else ossl.ssl_pointer(_LIB, sock)


def send_close_notify(sock: ssl.SSLSocket) -> None:
    """Send close_notify on ``sock`` and keep it readable, like ``shutdown(SHUT_WR)`` for TLS.

    Raises ``ssl.SSLWantWriteError`` when the alert could not be written yet (call again when writable),
    ``OSError`` with the errno when writing it failed (``SSL_ERROR_SYSCALL``: EPIPE, ECONNRESET, ...), and
    ``ssl.SSLError`` when OpenSSL refuses (after a fatal error, e.g. a peer that vanished). Every error carries
    what ``_ssl``'s own do (``errno``, ``strerror``; ``reason`` and ``library`` for SSLError), so code written
    for those can read them without a second path.
    """
    pointer = _ssl_pointer(sock)
    if pointer is None:
        try:
            sock.unwrap()
        except ssl.SSLWantReadError:
            pass  # expected: close_notify is out, the peer's has not come yet
        return
    assert _LIB is not None
    _LIB.clear_errors()
    result, errno = ossl.shutdown(_LIB, pointer)
    if result >= 0:
        return  # 0: our close_notify is sent; 1: both sides have sent theirs
    code = _LIB.get_error(pointer, result)
    _LIB.clear_errors()
    if code == _SSL_ERROR_WANT_WRITE:
        raise _ssl_error(ssl.SSLWantWriteError, code, "WANT_WRITE", "close_notify not yet written")
    if code == _SSL_ERROR_WANT_READ:
        return
    if code == _SSL_ERROR_SYSCALL and errno:
        raise OSError(errno, os.strerror(errno))
    if code == _SSL_ERROR_SYSCALL:
        # No errno: OpenSSL saw the transport end (EOF) where it wanted to write.
        raise _ssl_error(ssl.SSLEOFError, code, "UNEXPECTED_EOF", "SSL_shutdown: the connection is gone")
    raise _ssl_error(ssl.SSLError, code, f"SSL_ERROR_{code}", f"SSL_shutdown failed (SSL_get_error {code})")


def _ssl_error(cls: type[ssl.SSLError], code: int, reason: str, message: str) -> ssl.SSLError:
    """An ``ssl.SSLError`` shaped like the ones ``_ssl`` raises: those always have ``reason`` and ``library``."""
    err = cls(code, message)
    err.reason = reason
    err.library = "SSL"
    return err


def available() -> bool:
    """Whether the race-free path is in use (for the start-up log and the tests)."""
    return _LIB is not None
