"""Every reach into private CPython or OpenSSL internals, each behind a start-up probe and a kill switch.

Python's ``ssl`` module cannot express a few things a tunnel needs, and a few of its public methods cost more
than the private ones under them. tlsgate uses these *paths*, and nothing else private:

=============  ==========================================================================================
path           what it does, and what happens when it is off
=============  ==========================================================================================
closenotify    ``SSL_shutdown`` through ctypes on the ``SSL*`` behind an ``SSLSocket``: a TLS half-close
               that never reads (see `tlsgate.tls.closenotify`). Off: ``SSLSocket.unwrap()`` after draining.
tickets        ``SSL_CTX_ctrl`` ticket keys and ``SSL_CTX_set_session_ticket_cb`` on the ``SSL_CTX*``:
               one ticket key per process tree, resumption chains bounded in age (see `tlsgate.tls.tickets`).
               Off: OpenSSL's own random key per context, as ``--session-tickets per-context``.
verify         ``SSL_CTX_set_verify`` with a verify callback on the ``SSL_CTX*``: the peer's certificate
               meets tlsgate's identity and revocation rules *during* the handshake, so a refused peer gets
               a TLS alert (`install_peer_check`). Off: the same rules after the handshake, then a reset;
               and ``--allow-spki-pin``/``--verify-spki-pin``, which need it, refuse to start.
sslobj         ``SSLSocket._sslobj.do_handshake/read/write``: the C methods without the two Python frames
               around each (about 1.3 µs a request). Off: the public ``SSLSocket`` methods.
accept         ``socket._accept()``: the raw ``(fd, address)`` without building enums per connection.
               Off: ``socket.accept()``.
chain          ``_sslobj.get_verified_chain()`` on Python 3.11-3.12 (3.13 has a public method, used there).
               Off: the leaf alone, so CRL checks cannot see the issuer chain of a resumed session.
=============  ==========================================================================================

The kill switch is the environment variable ``TLSGATE_INTERNALS``: a comma-separated list of ``-path`` entries
turns those paths off (``TLSGATE_INTERNALS=-closenotify,-tickets``), and ``off`` turns every path off, leaving
only Python's public API. The older ``TLSGATE_CLOSE_NOTIFY=unwrap`` still works and means ``-closenotify``.
It is read once, at start-up; an unknown name is an error (exit 2) rather than a switch silently ignored.

The ctypes paths (closenotify, tickets, verify) rest on two facts that are checked here, once, before any pointer is
trusted: the object header is the plain one (``PyObject_HEAD`` of two pointers: not a free-threaded build, not
a ``Py_TRACE_REFS`` debug build), so the C pointer sits where we read it; and the OpenSSL we load through
ctypes is the very one ``_ssl`` is linked with (``OpenSSL_version_num()`` of the loaded libcrypto equals
``ssl.OPENSSL_VERSION_NUMBER``), so the pointer means the same thing to both. Each module then checks each
pointer again before using it (file descriptor, options, verify mode).

The ctypes bindings themselves (opening the libraries, symbol prototypes, reading a pointer out of an object,
ctypes buffers) are all in `tlsgate.tls.ossl`; this module decides whether they may be used (`bind`).

At start-up `report` gives one `Capabilities` value: the active paths and, for each path that is off, why.
The process logs it as one line, and the ``/metrics`` build-info metric carries it as a label.
"""

from __future__ import annotations

import _ssl
import logging
import os
import platform
import socket
import ssl
import sys
import sysconfig
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from tlsgate.errors import ConfigError
from tlsgate.tls import ossl

if TYPE_CHECKING:
    import ctypes

_T = TypeVar("_T")

PATHS = ("closenotify", "tickets", "verify", "sslobj", "accept", "chain")
"""Every private path tlsgate may use, in the order the log line names them."""
ENV = "TLSGATE_INTERNALS"
_CTYPES_PATHS = frozenset({"closenotify", "tickets", "verify"})


@dataclass(frozen=True)
class Facts:
    """What the probe looks at, gathered in one place so a test can substitute any of them."""

    implementation: str
    version: tuple[int, int]
    header_size: int  # object.__basicsize__: two pointers for the plain PyObject_HEAD
    gil_disabled: bool
    trace_refs: bool
    ssl_version_number: int  # ssl.OPENSSL_VERSION_NUMBER: the OpenSSL _ssl was built against
    libssl: str | None
    libcrypto: str | None


def gather_facts() -> Facts:
    """The facts of this process (``_ssl`` is imported, so its OpenSSL is mapped by now)."""
    return Facts(
        implementation=platform.python_implementation(),
        version=sys.version_info[:2],
        header_size=object.__basicsize__,
        gil_disabled=bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
        trace_refs=bool(sysconfig.get_config_var("Py_TRACE_REFS")) or hasattr(sys, "getobjects"),
        ssl_version_number=ssl.OPENSSL_VERSION_NUMBER,
        libssl=ossl.loaded_library("libssl"),
        libcrypto=ossl.loaded_library("libcrypto"),
    )


def switched_off(environ: Mapping[str, str]) -> dict[str, str]:
    """The paths the kill switch turns off, each with the setting that did; `ConfigError` for a bad value."""
    off: dict[str, str] = {}
    value = environ.get(ENV, "").strip()
    if value.lower() in ("off", "none"):
        off = dict.fromkeys(PATHS, f"{ENV}=off")
    else:
        for entry in filter(None, (item.strip() for item in value.split(","))):
            name = entry.removeprefix("-")
            if not entry.startswith("-") or name not in PATHS:
                raise ConfigError(
                    f"{ENV}={value}: {entry!r} is not '-PATH' with PATH one of {', '.join(PATHS)} "
                    "(or the whole value 'off')"
                )
            off[name] = f"{ENV}={entry}"
    if environ.get("TLSGATE_CLOSE_NOTIFY") == "unwrap":
        off.setdefault("closenotify", "TLSGATE_CLOSE_NOTIFY=unwrap")
    return off


def _layout_problem(facts: Facts) -> str | None:
    """Why C pointers cannot be read at CPython's usual offsets here, or None when they can."""
    if facts.implementation != "CPython" or not (3, 11) <= facts.version <= (3, 14):
        return f"not CPython 3.11-3.14 ({facts.implementation} {facts.version[0]}.{facts.version[1]})"
    if facts.gil_disabled:
        return "free-threaded build (another object header)"
    if facts.trace_refs:
        return "Py_TRACE_REFS build (another object header)"
    if facts.header_size != 2 * ossl.POINTER_SIZE:
        return f"object header of {facts.header_size} bytes"
    return None


def _probe_sslobj() -> object:
    """The ``_sslobj`` of a real ``SSLSocket`` (None when it has none), without any network traffic."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        left, right = socket.socketpair()  # the cheapest connected socket: _sslobj exists only once connected
    except (OSError, AttributeError):
        # No socket pair here (no AF_UNIX, say): an SSLObject keeps the same private attribute.
        return getattr(ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="probe.invalid"), "_sslobj", None)
    try:
        with ctx.wrap_socket(left, do_handshake_on_connect=False, server_hostname="probe.invalid") as tls:
            return getattr(tls, "_sslobj", None)
    finally:
        left.close()
        right.close()


def _python_paths_missing() -> dict[str, str]:
    """The pure-Python private paths whose attributes are missing in this Python."""
    missing: dict[str, str] = {}
    c_socket: Any = getattr(_ssl, "_SSLSocket", None)
    if not all(hasattr(c_socket, name) for name in ("do_handshake", "read", "write")):
        missing["sslobj"] = "_ssl._SSLSocket lacks do_handshake/read/write"
    elif not isinstance(_probe_sslobj(), c_socket):
        missing["sslobj"] = "SSLSocket has no _sslobj"
    if not hasattr(socket.socket, "_accept"):
        missing["accept"] = "socket has no _accept"
    if not hasattr(ssl.SSLSocket, "get_verified_chain") and not hasattr(c_socket, "get_verified_chain"):
        missing["chain"] = "no get_verified_chain"
    return missing


@dataclass(frozen=True)
class Capabilities:
    """The outcome of the start-up probe: which paths are in use, and why each other one is not."""

    active: tuple[str, ...]
    off: dict[str, str] = field(default_factory=dict)
    openssl: ossl.OpenSSL | None = None

    def enabled(self, path: str) -> bool:
        return path in self.active

    def label(self) -> str:
        """The ``/metrics`` label value: the active paths, comma-separated (``none`` when every path is off)."""
        return ",".join(self.active) or "none"

    def describe(self) -> str:
        """The start-up log line's text: ``active: a,b; off: c (why), d (why)``."""
        text = f"active: {self.label()}"
        if self.off:
            text += "; off: " + ", ".join(f"{path} ({why})" for path, why in self.off.items())
        return text


def probe(environ: Mapping[str, str] | None = None, facts: Facts | None = None) -> Capabilities:
    """Decide, once, which private paths this process uses.

    ``environ`` and ``facts`` default to the real ones; tests pass others to see each fallback.
    """
    facts = gather_facts() if facts is None else facts
    off = switched_off(os.environ if environ is None else environ)
    openssl: ossl.OpenSSL | None = None
    if any(path not in off for path in _CTYPES_PATHS):
        problem = _layout_problem(facts)
        if problem is None:
            openssl, problem = ossl.open_openssl(facts.libssl, facts.libcrypto, facts.ssl_version_number)
        if problem is not None:
            for path in _CTYPES_PATHS:
                off.setdefault(path, problem)
    for path, why in _python_paths_missing().items():
        off.setdefault(path, why)
    if "chain" not in off and hasattr(ssl.SSLSocket, "get_verified_chain"):
        off["chain"] = "not needed: public in this Python"
    active = tuple(path for path in PATHS if path not in off)
    return Capabilities(active, {path: off[path] for path in PATHS if path in off}, openssl)


_capabilities: Capabilities | None = None


def report() -> Capabilities:
    """This process's `Capabilities`, probed on first use (a bad ``TLSGATE_INTERNALS`` raises `ConfigError`)."""
    global _capabilities
    if _capabilities is None:
        _capabilities = probe()
    return _capabilities


def enabled(path: str) -> bool:
    """Whether ``path`` is in use in this process; False when the kill switch is unreadable (the safe side)."""
    try:
        return report().enabled(path)
    except ConfigError:
        return False


def why_off(path: str) -> str:
    """Why ``path`` is not in use here, for an error that needs it ("" when it is in use)."""
    try:
        caps = report()
    except ConfigError as err:
        return str(err)
    if caps.enabled(path):
        return "" if path != "verify" or _VERIFY is not None else "its OpenSSL symbols could not be bound"
    return caps.off.get(path, "not available")


def bind(path: str, binder: Callable[[ctypes.CDLL, ctypes.CDLL], _T]) -> _T | None:
    """``binder(libssl, libcrypto)`` when the ctypes ``path`` is in use; None (the caller falls back) otherwise."""
    try:
        caps = report()
    except ConfigError:
        return None
    if not caps.enabled(path) or caps.openssl is None:
        return None
    try:
        return binder(caps.openssl.libssl, caps.openssl.libcrypto)
    except AttributeError:  # a symbol this OpenSSL lacks
        return None


# --- the pure-Python private paths, each chosen once ----------------------------------------------------------


def _direct_handshake(tls: ssl.SSLSocket) -> None:
    # SSLSocket.do_handshake() re-sets the socket's timeout afterwards: an ioctl per call for nothing.
    sslobj = tls._sslobj  # type: ignore[attr-defined]
    if sslobj is None:
        # wrap_socket makes no SSL object for a socket that is no longer connected (a peer that reset before it
        # was wrapped); the public method then raises OSError(ENOTCONN), a failed handshake like any reset.
        tls.do_handshake()
        return
    sslobj.do_handshake()


def _public_handshake(tls: ssl.SSLSocket) -> None:
    tls.do_handshake()


do_handshake: Callable[[ssl.SSLSocket], None] = _direct_handshake if enabled("sslobj") else _public_handshake
"""One step of a non-blocking handshake on ``tls`` (raises ``SSLWantReadError`` and friends as usual)."""


def tls_reader(sock: socket.socket) -> Callable[[int, memoryview], int] | None:
    """The C ``read(size, buffer)`` of a TLS socket, or None (use ``recv_into``) for plain sockets or when off."""
    sslobj: Any = getattr(sock, "_sslobj", None) if enabled("sslobj") else None
    return sslobj.read if sslobj is not None else None


def tls_writer(sock: socket.socket) -> Callable[[memoryview], int]:
    """The fastest ``send``-like writer for ``sock``: the C ``write`` of a TLS socket when on, else ``send``."""
    sslobj: Any = getattr(sock, "_sslobj", None) if enabled("sslobj") else None
    return sslobj.write if sslobj is not None else sock.send


def raw_accept(listener: socket.socket) -> Callable[[], tuple[int, Any]]:
    """A function returning ``(fd, address)`` for the next connection on ``listener`` (raises like accept)."""
    if enabled("accept"):
        return listener._accept  # type: ignore[attr-defined,no-any-return]

    def accept() -> tuple[int, Any]:
        sock, address = listener.accept()
        return sock.detach(), address

    return accept


def verified_chain_getter(tls: object) -> Callable[[], Any] | None:
    """The verified chain reader of a finished handshake: public on 3.13+, the private one when on, else None."""
    public = getattr(tls, "get_verified_chain", None)
    if public is not None:
        return public  # type: ignore[no-any-return]
    if not enabled("chain"):
        return None
    return getattr(getattr(tls, "_sslobj", None), "get_verified_chain", None)


def log_startup() -> None:
    """Log the one start-up line ``internals active=... off=...``; `ConfigError` for a bad kill switch."""
    from tlsgate import logs

    caps = report()
    off = ", ".join(f"{path} ({why})" for path, why in caps.off.items()) or "none"
    logs.event("internals", active=caps.label(), off=off)


# --- verify: tlsgate's rules inside OpenSSL's certificate verification ---------------------------------------------
#
# Python's ssl has no verify callback, so a peer refused by tlsgate's own rules (identity, CRL) used to complete
# the handshake and then see a reset. With SSL_CTX_set_verify(ctx, mode, callback), OpenSSL asks us about each
# certificate of the chain it has built and verified; at depth 0 (the leaf, asked last) we run the same policy
# function the post-handshake check runs, and a refusal (0, with an X509 error set) makes OpenSSL fail the
# handshake and send the peer the alert that error maps to: bad_certificate, or certificate_revoked.
#
# _ssl never sets a verify callback of its own (SSL_CTX_set_verify(ctx, mode, NULL) at creation), and its
# verify_mode setter keeps whatever callback is installed (SSL_CTX_get_verify_callback, "keep current verify
# cb" in Modules/_ssl.c, 3.8-3.14), as does the post-handshake-auth set-up of a new socket. We still install
# last, only over an empty slot, and read the slot back.
#
# OpenSSL calls the callback inside SSL_do_handshake, which _ssl runs with the GIL released; a ctypes callback
# takes the GIL itself (PyGILState_Ensure) before running Python, and gives it back on return.


@dataclass(frozen=True)
class Refusal:
    """Why a peer check refused a certificate in the handshake: the rule and reason for the refusal log line."""

    rule: str
    reason: str
    identity: str = ""


PeerCheck = Callable[[bytes, tuple[bytes, ...]], Refusal | None]
"""``check(leaf_der, chain_der)`` -> None to accept, or a `Refusal`. Must be cheap and must not block."""

_X509_V_ERR_CERT_REVOKED = 23
_X509_V_ERR_CERT_REJECTED = 28
_X509_V_ERR_APPLICATION_VERIFICATION = 50
# The X509 errors our callback sets: a handshake that failed with one of these was refused by a PeerCheck.
REFUSAL_CODES = frozenset({_X509_V_ERR_CERT_REVOKED, _X509_V_ERR_CERT_REJECTED, _X509_V_ERR_APPLICATION_VERIFICATION})
_VERIFY = bind("verify", ossl.VerifyLib)
_X509_V_OK = 0
# SSL_CTX* -> (check, wants_chain, alone) of the context it belongs to; an entry leaves with its SSLContext
# (weakref.finalize), so an address OpenSSL reuses for another context never inherits a stale check.
_checks: dict[int, tuple[PeerCheck, bool, bool]] = {}
# Socket fd -> the refusal our callback just made there, taken by the engine when the handshake fails.
_refusals: dict[int, Refusal] = {}
_callback_failed = False


def _on_verify(preverify_ok: int, store: int | None) -> int:
    """OpenSSL's verify callback: its own verdict for every certificate, and tlsgate's rules on the leaf.

    For a context installed with ``alone`` (key pinning) OpenSSL's verdict is set aside: the check on the leaf
    decides by itself, whatever OpenSSL thought of the chain, the dates or the purpose.
    """
    global _callback_failed
    try:
        lib = _VERIFY
        if lib is None or not store:
            return preverify_ok
        ssl_pointer = lib.store_ex_data(store, lib.ssl_index())
        entry = _checks.get(lib.get_ssl_ctx(ssl_pointer) or 0) if ssl_pointer else None
        depth = lib.error_depth(store)
        if entry is None or not entry[2]:
            if not preverify_ok or depth != 0:
                return preverify_ok  # OpenSSL's verdict stands (a failure keeps its own error and alert)
            if entry is None:
                return 1  # a context without a check: the post-handshake check decides, as before
        elif depth != 0:
            # Pinning: whatever OpenSSL found above the leaf does not count. OpenSSL still comes to the leaf last
            # (internal_verify ends at depth 0 on every path that continues), where the pin decides.
            lib.set_error(store, _X509_V_OK)
            return 1
        check, wants_chain, alone = entry
        leaf = ossl.certificate_der(lib, lib.current_cert(store))
        chain: tuple[bytes, ...] = ()
        if wants_chain and (stack := lib.chain(store)):
            chain = tuple(ossl.certificate_der(lib, lib.stack_item(stack, n)) for n in range(lib.stack_size(stack)))
        refusal = check(leaf, chain)
        if refusal is None:
            if alone:
                # OpenSSL may have recorded "self-signed" or "expired" for this leaf; the pin overrules it, and the
                # session's verify result says so (SSL_get_verify_result).
                lib.set_error(store, _X509_V_OK)
            return 1
        _refusals[lib.get_fd(ssl_pointer)] = refusal
        lib.set_error(store, _X509_V_ERR_CERT_REVOKED if refusal.rule == "crl" else _X509_V_ERR_CERT_REJECTED)
        return 0
    except BaseException as err:  # nothing may escape into OpenSSL: refuse (fail closed), say so once
        try:
            if _VERIFY is not None and store:
                _VERIFY.set_error(store, _X509_V_ERR_APPLICATION_VERIFICATION)
            if not _callback_failed:
                _callback_failed = True
                from tlsgate import logs

                logs.event("verify callback failed", logging.ERROR, error=f"{type(err).__name__}: {err}"[:200])
        except BaseException:  # not even logging may raise into OpenSSL
            pass
        return 0


# Kept for the life of the process: OpenSSL holds a raw pointer to it.
_VERIFY_CALLBACK = ossl.VerifyCallback(_on_verify)
_VERIFY_CALLBACK_ADDRESS = ossl.address(_VERIFY_CALLBACK)


def _context_pointer(ctx: ssl.SSLContext) -> int | None:
    """The ``SSL_CTX*`` behind ``ctx`` for the verify path, or None (path off, or OpenSSL disagrees)."""
    return None if _VERIFY is None else ossl.context_pointer(_VERIFY, ctx)


def install_peer_check(ctx: ssl.SSLContext, check: PeerCheck, *, wants_chain: bool = True, alone: bool = False) -> bool:
    """Run ``check`` on the peer's leaf during every full handshake of ``ctx``; False where that cannot be done.

    Call it last, once the context's verification settings are final. A refused peer gets a TLS alert
    (bad_certificate; certificate_revoked for a ``crl`` refusal) and the handshake fails with
    ``ssl.SSLCertVerificationError`` whose ``verify_code`` is in `REFUSAL_CODES`; `take_refusal` then gives the
    rule and reason. ``wants_chain`` False passes ``check`` an empty chain and saves encoding it (the chain
    only matters to revocation checks). A resumed session is not verified again by OpenSSL: the caller's
    post-handshake check stays the second line for it (and for every context where this returns False).

    ``alone`` makes ``check`` the whole verification (``--allow-spki-pin``/``--verify-spki-pin``): OpenSSL's own
    verdict on the chain, the dates, the purpose and the host name is overruled, and only ``check`` on the leaf
    can refuse (the peer's proof that it holds the key is still OpenSSL's, as always). Such a context must not
    be used where this returns False: OpenSSL alone would refuse every self-signed peer, or, with verification
    off, accept every peer.
    """
    pointer = _context_pointer(ctx)
    if pointer is None or _VERIFY is None:
        return False
    installed = _VERIFY.get_verify_callback(pointer)
    if installed not in (None, _VERIFY_CALLBACK_ADDRESS):
        return False  # someone else's callback: do not replace it
    _checks[pointer] = (check, wants_chain, alone)
    weakref.finalize(ctx, _checks.pop, pointer, None)
    _VERIFY.set_verify(pointer, _VERIFY.get_verify_mode(pointer), _VERIFY_CALLBACK)
    if _VERIFY.get_verify_callback(pointer) != _VERIFY_CALLBACK_ADDRESS:
        _checks.pop(pointer, None)
        return False
    return True


def take_refusal(fd: int) -> Refusal | None:
    """The refusal the verify callback made on socket ``fd`` during its last handshake (once), or None."""
    return _refusals.pop(fd, None)
