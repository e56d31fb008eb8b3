"""One TLS session-ticket key for the whole process tree, so returning clients resume on any worker.

Why this exists: OpenSSL gives every ``SSL_CTX`` its own random ticket key. With ``--workers N`` each worker
has its own contexts, and SO_REUSEPORT sends a returning client to any worker, so a ticket resumed only when it
happened to land on the worker that issued it (about half the time with two workers). A reload makes new
contexts, so every ticket issued before it was refused too. Refused tickets cost a full handshake each.

So each process holds one secret (`process_key`): created at random on first use, or adopted from the parent
with `set_process_key` in a worker. `apply` installs a ticket key derived from it on a server context. Python's
``ssl`` has no API for that, so we call ``SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS)`` through ``ctypes`` on
the ``SSL_CTX*`` behind the context, like `tlsgate.tls.closenotify` does for ``SSL*`` (both through the
bindings in `tlsgate.tls.ossl`).

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

How long a chain of resumptions lasts. Each ticket is good for the context's session timeout (OpenSSL's
default, 7200 s; Python cannot set it). On TLS 1.2 a resumption keeps the session's original time, so a chain
ends that long after the full handshake. On TLS 1.3 OpenSSL issues a new ticket on every resumption with the
time reset to now (measured with OpenSSL 3.0), so a client that came back within each timeout would resume
forever without its chain being verified again; RFC 8446 section 4.6.1 recommends a bound. So `apply` also
installs ticket callbacks (``SSL_CTX_set_session_ticket_cb``): a new session's ticket carries, inside its
encryption, the time of the full handshake that authenticated the client, copied unchanged into every ticket
issued on resumption; a ticket whose stamp is older than `MAX_AUTHENTICATION_AGE` (or that has none) is not
resumed, and the client makes a full, verified handshake. Between full handshakes, tlsgate's per-connection
checks keep the leaf's validity, revocation and identity current, and any change of the admission inputs
(a new key) or a restart (a new secret) ends every chain at once.

Reaching ``SSL_CTX*`` relies on CPython's ``PySSLContext`` layout (``PyObject_HEAD`` then ``SSL_CTX *ctx``,
unchanged from 3.6 to 3.14). Before trusting the pointer we check that OpenSSL reports the same options and
verify mode for it as Python does for the context, and that the ticket-key block is the 80 bytes we write; after
writing we read the key back. Where anything does not fit (another Python, OpenSSL linked statically, a future
key layout) `apply` returns False and leaves the context with OpenSSL's own random key: resumption then works
only on the worker and the configuration that issued the ticket, as before.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import struct
import threading
import time
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tlsgate.tls import internals, ossl

SECRET_LENGTH = 32

MAX_AUTHENTICATION_AGE = 7200.0
"""Seconds after a full handshake that resumptions stemming from it are accepted: OpenSSL's default session
timeout, the bound TLS 1.2 resumption already has, now for TLS 1.3 chains too. A client resuming more than
this long after it was last verified makes one full handshake."""
# SSL_TICKET_STATUS (what OpenSSL found in the ticket) and SSL_TICKET_RETURN (what to do), from <openssl/ssl.h>.
_TICKET_FATAL_ERR_MALLOC, _TICKET_FATAL_ERR_OTHER, _TICKET_NONE, _TICKET_EMPTY = 0, 1, 2, 3
_TICKET_NO_DECRYPT, _TICKET_SUCCESS, _TICKET_SUCCESS_RENEW = 4, 5, 6
_RETURN_ABORT, _RETURN_IGNORE, _RETURN_IGNORE_RENEW, _RETURN_USE, _RETURN_USE_RENEW = 0, 1, 2, 3, 4
# The application data a ticket carries: a tag, then the time of the full handshake (whole seconds since 1970).
_STAMP = struct.Struct(">4sQ")
_STAMP_TAG = b"tga1"
_LIB = internals.bind("tickets", ossl.TicketLib)

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
    if _LIB is None:
        return None
    pointer = ossl.context_pointer(_LIB, ctx)
    if pointer is None:
        return None
    # With no buffer, the "get keys" ctrl answers the block size: proves the ctrl exists and the layout is ours.
    if ossl.ticket_key_size(_LIB, pointer) != ossl.KEY_BLOCK:
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


def _now() -> float:
    """The clock tickets are stamped and judged with (a module function, so tests can move it)."""
    return time.time()


def _authenticated_at(session: int) -> int | None:
    """The full-handshake time stamped in ``session``'s ticket data, or None when it carries no stamp of ours."""
    assert _LIB is not None
    data = ossl.get_ticket_appdata(_LIB, session)
    if data is None or len(data) != _STAMP.size:
        return None
    tag, when = _STAMP.unpack(data)
    return int(when) if tag == _STAMP_TAG else None


def _on_new_ticket(ssl_pointer: int | None, _arg: int | None) -> int:
    """OpenSSL is about to issue a ticket: stamp a new session with the time of its full handshake.

    A session resumed from a ticket keeps the stamp it came with (OpenSSL copies the ticket data into the
    session it issues the next ticket for), so the stamp always dates the last full verification.
    """
    try:
        session = _LIB.get_session(ssl_pointer) if _LIB is not None and ssl_pointer else None
        if session and _authenticated_at(session) is None:
            stamp = _STAMP.pack(_STAMP_TAG, max(0, int(_now())))
            _LIB.set_ticket_appdata(session, stamp, _STAMP.size)  # type: ignore[union-attr]
    except Exception:  # nothing may escape into OpenSSL; an unstamped ticket is merely not resumed
        pass
    return 1  # 0 would fail the handshake


def _on_ticket(
    _ssl: int | None, session: int | None, _name: int | None, _name_length: int, status: int, _arg: int | None
) -> int:
    """OpenSSL decrypted (or failed to decrypt) a ticket: resume only within `MAX_AUTHENTICATION_AGE`."""
    try:
        if status in (_TICKET_SUCCESS, _TICKET_SUCCESS_RENEW):
            stamped = _authenticated_at(session) if session else None
            if stamped is None or not 0 <= _now() - stamped < MAX_AUTHENTICATION_AGE:
                return _RETURN_IGNORE_RENEW  # a full handshake, and a fresh ticket after it
            return _RETURN_USE if status == _TICKET_SUCCESS else _RETURN_USE_RENEW
        if status in (_TICKET_FATAL_ERR_MALLOC, _TICKET_FATAL_ERR_OTHER):
            return _RETURN_ABORT
        # OpenSSL's own choices without a callback: no ticket, or one it cannot read, means a full handshake.
        return _RETURN_IGNORE if status == _TICKET_NONE else _RETURN_IGNORE_RENEW
    except Exception:  # nothing may escape into OpenSSL; when in doubt, a full handshake
        return _RETURN_IGNORE_RENEW


# Kept here for the life of the process: OpenSSL holds raw pointers to these.
_GENERATE_CALLBACK = ossl.GenerateTicket(_on_new_ticket)
_DECRYPT_CALLBACK = ossl.DecryptTicket(_on_ticket)


def _key_block(secret: bytes, scope: bytes) -> bytes:
    info = b"tlsgate session ticket keys v2\0" + scope
    return HKDF(algorithm=hashes.SHA256(), length=ossl.KEY_BLOCK, salt=None, info=info).derive(secret)


def apply(ctx: ssl.SSLContext, admission: Sequence[bytes] = ()) -> bool:
    """Give server context ``ctx`` the process's ticket key; False (``ctx`` unchanged) where that cannot be done.

    Call it once the context's client verification is final (CA certificates loaded, verify mode set), and
    before the context serves a handshake. ``admission`` is every input that decides which client certificates
    a full handshake (and tlsgate's revocation check) admits, as bytes: the trust bundle exactly as loaded, each
    CRL. Any change to them gives another key, so no ticket issued before the change resumes after it.

    It also installs the callbacks that bound a chain of resumptions to `MAX_AUTHENTICATION_AGE` after the
    full handshake it stems from (see the module docstring).

    With SNI, OpenSSL encrypts and decrypts tickets with the context a connection started on, so the default
    context is the one that matters; tlsgate applies it to all of them.
    """
    pointer = _ctx_pointer(ctx)
    if pointer is None:
        return False
    assert _LIB is not None
    block = _key_block(process_key(), _scope(ctx, admission))
    try:
        previous = ossl.get_ticket_keys(_LIB, pointer)
        if previous is None:
            return False
        # Callbacks first: a shared key without the age bound would let TLS 1.3 chains run on forever.
        if _LIB.set_ticket_callbacks(pointer, _GENERATE_CALLBACK, _DECRYPT_CALLBACK, None) != 1:
            return False
        if not ossl.set_ticket_keys(_LIB, pointer, block):
            return False
        if ossl.get_ticket_keys(_LIB, pointer) == block:
            return True
        ossl.set_ticket_keys(_LIB, pointer, previous)  # put OpenSSL's own key back
        return False
    finally:
        _LIB.clear_errors()  # a refused ctrl leaves an error queued that the next ssl call would report


def available() -> bool:
    """Whether ticket keys can be installed at all here (for the start-up warning and the tests)."""
    return _LIB is not None
