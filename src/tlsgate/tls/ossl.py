"""Every ctypes binding tlsgate has to OpenSSL, and the two reads of a C pointer out of a CPython object.

This is the only module that calls into OpenSSL through ``ctypes`` or reads memory at an offset. It knows
nothing about kill switches or policy: `tlsgate.tls.internals` decides, once, whether a path may use it, and
hands the opened libraries to the binding classes below (``internals.bind(path, VerifyLib)``). The users,
`tlsgate.tls.internals` (verify), `tlsgate.tls.closenotify` and `tlsgate.tls.tickets`, only call the typed
methods and functions here.

What is here, in the order a newcomer meets it:

* library resolution: `loaded_library` finds the libssl/libcrypto already mapped for ``_ssl``, and
  `open_openssl` opens them and checks their version is ``_ssl``'s, so a pointer means the same to both;
* symbol prototypes: one class per path (`VerifyLib`, `CloseNotifyLib`, `TicketLib`), each binding the
  symbols it needs (a missing symbol raises ``AttributeError`` and turns only that path off);
* pointer extraction: `context_pointer` (``SSL_CTX*`` behind an ``SSLContext``) and `ssl_pointer` (``SSL*``
  behind an ``SSLSocket``), each read at CPython's layout offset and trusted only once OpenSSL agrees with
  Python about what the object holds (options and verify mode; file descriptor and app data);
* buffer helpers that keep ``ctypes`` buffers out of the callers: `certificate_der`, `shutdown`, the
  ticket-key block and ticket application data.

The object-header facts these offsets rest on (plain ``PyObject_HEAD``, the same OpenSSL as ``_ssl``) are
checked once at start-up by `tlsgate.tls.internals.probe`; nothing here is used before that check passed.
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import ssl
from typing import Any, Protocol

POINTER_SIZE = ctypes.sizeof(ctypes.c_void_p)
# PyObject_HEAD (refcount, type) comes before the SSL_CTX pointer in PySSLContext (3.6-3.14).
CTX_OFFSET = 2 * POINTER_SIZE
# PyObject_HEAD (refcount, type) and the Socket weakref come before the SSL pointer in PySSLSocket.
SSL_OFFSET = 3 * POINTER_SIZE
# SSL_VERIFY_* bits as Python reports them through verify_mode.
VERIFY_MODES = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL, 3: ssl.CERT_REQUIRED}

SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
KEY_BLOCK = 80
"""OpenSSL's ticket-key block: 16 bytes key name, 32 bytes HMAC secret, 32 bytes AES key."""

VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
"""``int verify_cb(int preverify_ok, X509_STORE_CTX *store)``."""
GenerateTicket = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
"""``int gen_cb(SSL *s, void *arg)``."""
DecryptTicket = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p
)
"""``SSL_TICKET_RETURN dec_cb(SSL *s, SSL_SESSION *ss, const unsigned char *keyname, size_t keyname_length,
SSL_TICKET_STATUS status, void *arg)``."""


# --- library resolution ---------------------------------------------------------------------------------------


def loaded_library(stem: str) -> str | None:
    """The path of the already-loaded library whose file name starts with ``stem`` (the one ``_ssl`` uses)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith(stem + ".so"):
                    return path
    except OSError:
        return None
    return None


class OpenSSL:
    """The two libraries ``_ssl`` uses, opened through ctypes once their version matched ``_ssl``'s."""

    def __init__(self, libssl: ctypes.CDLL, libcrypto: ctypes.CDLL) -> None:
        self.libssl = libssl
        self.libcrypto = libcrypto


def open_openssl(
    libssl_path: str | None, libcrypto_path: str | None, version: int
) -> tuple[OpenSSL | None, str | None]:
    """The opened libraries, or None and why not (not shared, cannot open, or not ``version``, ``_ssl``'s)."""
    if libssl_path is None or libcrypto_path is None:
        return None, "OpenSSL is not a shared library here"
    try:
        # use_errno: after SSL_ERROR_SYSCALL the reason is in errno, which ctypes keeps only when asked to.
        libssl = ctypes.CDLL(libssl_path, use_errno=True)
        libcrypto = ctypes.CDLL(libcrypto_path, use_errno=True)
        loaded = int(_fn(libcrypto, "OpenSSL_version_num", ctypes.c_ulong)())
    except (OSError, AttributeError) as err:
        return None, f"cannot open OpenSSL ({err})"
    if loaded != version:
        return None, f"ctypes found OpenSSL {loaded:#x}, _ssl uses {version:#x}"
    return OpenSSL(libssl, libcrypto), None


# --- symbol prototypes, one class per path ----------------------------------------------------------------------


def _fn(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(lib, name)
    function.argtypes = list(argtypes)
    function.restype = restype
    return function


class VerifyLib:
    """The symbols of the ``verify`` path: a verify callback on ``SSL_CTX*``, and what it reads of the chain."""

    def __init__(self, libssl: ctypes.CDLL, libcrypto: ctypes.CDLL) -> None:
        vp, i = ctypes.c_void_p, ctypes.c_int
        self.set_verify = _fn(libssl, "SSL_CTX_set_verify", None, vp, i, VerifyCallback)
        self.get_verify_callback = _fn(libssl, "SSL_CTX_get_verify_callback", vp, vp)
        self.get_verify_mode = _fn(libssl, "SSL_CTX_get_verify_mode", i, vp)
        self.get_options = _fn(libssl, "SSL_CTX_get_options", ctypes.c_uint64, vp)
        self.ssl_index = _fn(libssl, "SSL_get_ex_data_X509_STORE_CTX_idx", i)
        self.get_ssl_ctx = _fn(libssl, "SSL_get_SSL_CTX", vp, vp)
        self.get_fd = _fn(libssl, "SSL_get_fd", i, vp)
        self.store_ex_data = _fn(libcrypto, "X509_STORE_CTX_get_ex_data", vp, vp, i)
        self.current_cert = _fn(libcrypto, "X509_STORE_CTX_get_current_cert", vp, vp)
        self.error_depth = _fn(libcrypto, "X509_STORE_CTX_get_error_depth", i, vp)
        self.set_error = _fn(libcrypto, "X509_STORE_CTX_set_error", None, vp, i)
        self.chain = _fn(libcrypto, "X509_STORE_CTX_get0_chain", vp, vp)
        self.stack_size = _fn(libcrypto, "OPENSSL_sk_num", i, vp)
        self.stack_item = _fn(libcrypto, "OPENSSL_sk_value", vp, vp, i)
        self.i2d = _fn(libcrypto, "i2d_X509", i, vp, ctypes.POINTER(ctypes.c_void_p))


class CloseNotifyLib:
    """The symbols of the ``closenotify`` path: one ``SSL_shutdown`` on the ``SSL*`` behind a socket."""

    def __init__(self, libssl: ctypes.CDLL, libcrypto: ctypes.CDLL) -> None:
        vp, i = ctypes.c_void_p, ctypes.c_int
        self.shutdown = _fn(libssl, "SSL_shutdown", i, vp)
        self.get_error = _fn(libssl, "SSL_get_error", i, vp, i)
        self.get_fd = _fn(libssl, "SSL_get_fd", i, vp)
        self.get_ex_data = _fn(libssl, "SSL_get_ex_data", vp, vp, i)
        self.clear_errors = _fn(libcrypto, "ERR_clear_error", None)


class TicketLib:
    """The symbols of the ``tickets`` path: ticket keys and ticket callbacks on ``SSL_CTX*``."""

    def __init__(self, libssl: ctypes.CDLL, libcrypto: ctypes.CDLL) -> None:
        vp, i = ctypes.c_void_p, ctypes.c_int
        self.ctrl = _fn(libssl, "SSL_CTX_ctrl", ctypes.c_long, vp, i, ctypes.c_long, vp)
        # uint64_t in OpenSSL 3 (unsigned long before: the same on 64-bit Linux; elsewhere the check fails).
        self.get_options = _fn(libssl, "SSL_CTX_get_options", ctypes.c_uint64, vp)
        self.get_verify_mode = _fn(libssl, "SSL_CTX_get_verify_mode", i, vp)
        self.set_ticket_callbacks = _fn(
            libssl, "SSL_CTX_set_session_ticket_cb", i, vp, GenerateTicket, DecryptTicket, vp
        )
        self.get_session = _fn(libssl, "SSL_get_session", vp, vp)
        self.set_ticket_appdata = _fn(
            libssl, "SSL_SESSION_set1_ticket_appdata", i, vp, ctypes.c_char_p, ctypes.c_size_t
        )
        self.get_ticket_appdata = _fn(
            libssl,
            "SSL_SESSION_get0_ticket_appdata",
            i,
            vp,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_size_t),
        )
        self.clear_errors = _fn(libcrypto, "ERR_clear_error", None)


# --- pointer extraction ----------------------------------------------------------------------------------------


class ContextSymbols(Protocol):
    """What `context_pointer` needs of a binding: the two ``SSL_CTX`` getters Python also reads."""

    def get_options(self, pointer: int, /) -> int: ...
    def get_verify_mode(self, pointer: int, /) -> int: ...


class SocketSymbols(Protocol):
    """What `ssl_pointer` needs of a binding: the ``SSL`` getters that tie a pointer to its socket."""

    def get_fd(self, pointer: int, /) -> int: ...
    def get_ex_data(self, pointer: int, index: int, /) -> int | None: ...


def context_pointer(lib: ContextSymbols, ctx: ssl.SSLContext) -> int | None:
    """The ``SSL_CTX*`` behind ``ctx``, or None unless OpenSSL agrees with Python about what it holds."""
    if not isinstance(ctx, _ssl._SSLContext) or type(ctx).__basicsize__ <= CTX_OFFSET:
        return None
    pointer = ctypes.c_void_p.from_address(id(ctx) + CTX_OFFSET).value
    if not pointer:
        return None
    # Python reads both of these from this very SSL_CTX: a 64-bit value and a small one must match.
    if lib.get_options(pointer) != int(ctx.options):
        return None
    if VERIFY_MODES.get(lib.get_verify_mode(pointer) & 3) != ctx.verify_mode:
        return None
    return pointer


def ssl_pointer(lib: SocketSymbols, sock: ssl.SSLSocket) -> int | None:
    """The ``SSL*`` behind ``sock``, or None unless OpenSSL ties it to this socket and this ``_sslobj``."""
    sslobj: Any = getattr(sock, "_sslobj", None)
    if sslobj is None or type(sslobj).__basicsize__ <= SSL_OFFSET:
        return None
    pointer = ctypes.c_void_p.from_address(id(sslobj) + SSL_OFFSET).value
    if not pointer or lib.get_fd(pointer) != sock.fileno():
        return None
    # _ssl stores its own object as the SSL's app data (ex_data index 0): a second, independent check.
    if lib.get_ex_data(pointer, 0) != id(sslobj):
        return None
    return pointer


def address(function: Any) -> int | None:
    """The C address of a ctypes callback (what OpenSSL hands back when asked which callback is installed)."""
    return ctypes.cast(function, ctypes.c_void_p).value


# --- calls that need ctypes buffers or errno ----------------------------------------------------------------------


def certificate_der(lib: VerifyLib, x509: int) -> bytes:
    """The DER encoding of the ``X509*`` at ``x509``; ``ValueError`` when OpenSSL cannot encode it."""
    size = lib.i2d(x509, None)
    if size <= 0:
        raise ValueError("i2d_X509 failed")
    buffer = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))
    if lib.i2d(x509, ctypes.byref(cursor)) != size:
        raise ValueError("i2d_X509 wrote another size")
    return buffer.raw


def shutdown(lib: CloseNotifyLib, pointer: int) -> tuple[int, int]:
    """``SSL_shutdown(pointer)`` once: its result, and errno as it was right after the call (0 if untouched)."""
    ctypes.set_errno(0)
    result = lib.shutdown(pointer)
    return int(result), ctypes.get_errno()  # errno before any other call into the library can change it


def ticket_key_size(lib: TicketLib, pointer: int) -> int:
    """What the "get keys" ctrl answers with no buffer: the size of the key block this OpenSSL uses."""
    return int(lib.ctrl(pointer, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, 0, None))


def get_ticket_keys(lib: TicketLib, pointer: int) -> bytes | None:
    """The context's ticket-key block, or None when OpenSSL refuses to give it."""
    block = ctypes.create_string_buffer(KEY_BLOCK)
    if lib.ctrl(pointer, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, KEY_BLOCK, block) != 1:
        return None
    return block.raw


def set_ticket_keys(lib: TicketLib, pointer: int, block: bytes) -> bool:
    """Install ``block`` (`KEY_BLOCK` bytes) as the context's ticket keys; False when OpenSSL refuses."""
    return bool(lib.ctrl(pointer, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, KEY_BLOCK, block) == 1)


def get_ticket_appdata(lib: TicketLib, session: int) -> bytes | None:
    """The application data ``session``'s ticket carries, or None when it carries none."""
    data, size = ctypes.c_void_p(), ctypes.c_size_t()
    if lib.get_ticket_appdata(session, ctypes.byref(data), ctypes.byref(size)) != 1 or not data.value:
        return None
    return ctypes.string_at(data.value, size.value)
