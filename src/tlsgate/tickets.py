"""One TLS session-ticket key for the whole process tree, so returning clients resume on any worker.

Why this exists: OpenSSL gives every ``SSL_CTX`` its own random ticket key. With ``--workers N`` each worker
has its own contexts, and SO_REUSEPORT sends a returning client to any worker, so a ticket resumed only when it
happened to land on the worker that issued it (about half the time with two workers). A reload makes new
contexts, so every ticket issued before it was refused too. Refused tickets cost a full handshake each.

So each process holds one secret (`process_key`): created at random on first use, or adopted from the parent
with `set_process_key` in a worker. `apply` installs a ticket key derived from it on a server context. Python's
``ssl`` has no API for that, so we call ``SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS)`` through ``ctypes`` on
the ``SSL_CTX*`` behind the context, like `tlsgate.closenotify` does for ``SSL*``.

Why derived, not the secret itself: on resumption OpenSSL does not verify the client certificate again, it
trusts the session. Every context ``_ssl`` makes carries the same session-id context ("Python"), so a ticket
issued by a context that trusts certificate X would resume on one that no longer does: across two tunnels, or
across a reload that removed X from ``--cacert``. The key is therefore derived from the secret *and* what
decides who a full handshake admits: the verify mode and flags, and the *admission* bytes the context builder
passes in, which are the whole ``--cacert`` file exactly as OpenSSL loaded it and every ``--crl`` file.
Contexts that admit alike share tickets; any other ticket does not decrypt and the client makes a full
handshake, verified as usual. (Identity rules, validity and CRLs are checked by tlsgate on every connection,
resumed or not; see `tlsgate.policy`. What resumption skips is OpenSSL's chain verification.)

The file bytes, not ``SSLContext.get_ca_certs()``: that list leaves out every certificate without CA:TRUE,
and a self-signed CA:FALSE certificate in the bundle is a trust anchor (a pinned client). Deriving from that
list let a pinned client removed from ``--cacert`` resume across the reload, and chain further resumptions.

How long a ticket chain lasts (measured with OpenSSL 3.0): each ticket is good for the context's session
timeout (OpenSSL's default, 7200 s; Python cannot set it). On TLS 1.2 a resumption keeps the session's original
time, so a chain ends that long after the full handshake. On TLS 1.3 OpenSSL issues a new ticket on every
resumption with the time reset to now, so a client that comes back within each timeout resumes indefinitely
without its chain being verified again (RFC 8446 section 4.6.1 recommends a bound). That is why the key must
change whenever the admission inputs do: a reload that changes them ends every chain; the per-connection
checks keep the leaf's validity, revocation and identity current in between. A process restart (a new secret)
ends every chain too.

Reaching ``SSL_CTX*`` relies on CPython's ``PySSLContext`` layout (``PyObject_HEAD`` then ``SSL_CTX *ctx``,
unchanged from 3.6 to 3.14). Before trusting the pointer we check that OpenSSL reports the same options and
verify mode for it as Python does for the context, and that the ticket-key block is the 80 bytes we write; after
writing we read the key back. Where anything does not fit (another Python, OpenSSL linked statically, a future
key layout) `apply` returns False and leaves the context with OpenSSL's own random key: resumption then works
only on the worker and the configuration that issued the ticket, as before.
"""

from __future__ import annotations

import _ssl
import ctypes
import hashlib
import os
import ssl
import threading
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tlsgate.closenotify import load_openssl

_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
# OpenSSL's ticket-key block: 16 bytes key name, 32 bytes HMAC secret, 32 bytes AES key.
_KEY_BLOCK = 80
SECRET_LENGTH = 32
# SSL_VERIFY_* bits as Python reports them through verify_mode.
_VERIFY_MODES = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL, 3: ssl.CERT_REQUIRED}


class _LibSSL:
    def __init__(self, libssl: ctypes.CDLL, libcrypto: ctypes.CDLL) -> None:
        self.ctrl = libssl.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        # uint64_t in OpenSSL 3 (unsigned long before: the same on 64-bit Linux; elsewhere the check fails).
        self.get_options = libssl.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64
        self.get_verify_mode = libssl.SSL_CTX_get_verify_mode
        self.get_verify_mode.argtypes = [ctypes.c_void_p]
        self.get_verify_mode.restype = ctypes.c_int
        self.clear_errors = libcrypto.ERR_clear_error
        self.clear_errors.argtypes = []
        self.clear_errors.restype = None


_LIB = load_openssl(_LibSSL)
# PyObject_HEAD (refcount, type) comes before the SSL_CTX pointer.
_CTX_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p)

_lock = threading.Lock()
_secret: bytes | None = None


def process_key() -> bytes:
    """This process's ticket secret, made at random on first use. A worker's parent hands it to the worker."""
    global _secret
    with _lock:
        if _secret is None:
            _secret = os.urandom(SECRET_LENGTH)
        return _secret


def set_process_key(key: bytes) -> None:
    """Adopt ``key`` (the parent's `process_key`): contexts built from now on share tickets with the parent's."""
    global _secret
    if len(key) != SECRET_LENGTH:
        raise ValueError(f"a ticket secret is {SECRET_LENGTH} bytes, not {len(key)}")
    with _lock:
        _secret = bytes(key)


def _ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """The ``SSL_CTX*`` behind ``ctx``, or None unless OpenSSL agrees with Python about what it holds."""
    if _LIB is None or not isinstance(ctx, _ssl._SSLContext) or type(ctx).__basicsize__ <= _CTX_OFFSET:
        return None
    pointer = ctypes.c_void_p.from_address(id(ctx) + _CTX_OFFSET).value
    if not pointer:
        return None
    # Python reads both of these from this very SSL_CTX: a 64-bit value and a small one must match.
    if _LIB.get_options(pointer) != int(ctx.options):
        return None
    if _VERIFY_MODES.get(_LIB.get_verify_mode(pointer) & 3) != ctx.verify_mode:
        return None
    # With no buffer, the "get keys" ctrl answers the block size: proves the ctrl exists and the layout is ours.
    if _LIB.ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, 0, None) != _KEY_BLOCK:
        _LIB.clear_errors()
        return None
    return pointer


def _scope(ctx: ssl.SSLContext, admission: Sequence[bytes]) -> bytes:
    """A digest of who ``ctx`` admits at the handshake (see the module docstring for why)."""
    digest = hashlib.sha256(b"%d %d %d\n" % (ctx.verify_mode, ctx.verify_flags, len(admission)))
    # Each input by its own digest, so no two different lists of inputs can run together into the same bytes.
    for data in admission:
        digest.update(hashlib.sha256(data).digest())
    # Also what OpenSSL reports it holds: a caller that loaded CAs but passed no admission bytes still gets a
    # key that depends on them (on the CA:TRUE ones, which is all this list shows).
    for der in sorted(ctx.get_ca_certs(binary_form=True)):
        digest.update(hashlib.sha256(der).digest())
    stats = ctx.cert_store_stats()
    digest.update(b"%d %d %d" % (stats["x509"], stats["x509_ca"], stats["crl"]))
    return digest.digest()


def _key_block(secret: bytes, scope: bytes) -> bytes:
    info = b"tlsgate session ticket keys v2\0" + scope
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BLOCK, salt=None, info=info).derive(secret)


def apply(ctx: ssl.SSLContext, admission: Sequence[bytes] = ()) -> bool:
    """Give server context ``ctx`` the process's ticket key; False (``ctx`` unchanged) where that cannot be done.

    Call it once the context's client verification is final (CA certificates loaded, verify mode set), and
    before the context serves a handshake. ``admission`` is every input that decides which client certificates
    a full handshake (and tlsgate's revocation check) admits, as bytes: the trust bundle exactly as loaded, each
    CRL. Any change to them gives another key, so no ticket issued before the change resumes after it.

    With SNI, OpenSSL encrypts and decrypts tickets with the context a connection started on, so the default
    context is the one that matters; tlsgate applies it to all of them.
    """
    pointer = _ctx_pointer(ctx)
    if pointer is None:
        return False
    assert _LIB is not None
    block = _key_block(process_key(), _scope(ctx, admission))
    previous, readback = ctypes.create_string_buffer(_KEY_BLOCK), ctypes.create_string_buffer(_KEY_BLOCK)
    try:
        if _LIB.ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, _KEY_BLOCK, previous) != 1:
            return False
        if _LIB.ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, _KEY_BLOCK, block) != 1:
            return False
        if _LIB.ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, _KEY_BLOCK, readback) == 1 and readback.raw == block:
            return True
        _LIB.ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, _KEY_BLOCK, previous)  # put OpenSSL's own key back
        return False
    finally:
        _LIB.clear_errors()  # a refused ctrl leaves an error queued that the next ssl call would report


def available() -> bool:
    """Whether ticket keys can be installed at all here (for the start-up warning and the tests)."""
    return _LIB is not None
