"""The one place that builds ``ssl.SSLContext`` objects, and the loading of certificates and keystores.

Every hardened default sits next to its reason. Server, client and upstream contexts share ``_harden`` so a
change of policy (say, a new minimum version) happens once.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from tlsgate.errors import CertificateError
from tlsgate.tls import tickets
from tlsgate.tls.x509 import SIGNING_KEY_TYPES, PrivateKey, parse_certificates, parse_private_key, read_file, spki_der

# TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only. CBC suites (Lucky13, POODLE-style padding oracles) and
# static-RSA key exchange (no forward secrecy) are out. TLS 1.3 suites are all AEAD, so OpenSSL's defaults stay.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True)
class KeyMaterial:
    """A certificate chain and its private key, already decrypted and checked to belong together.

    Kept as PEM bytes so a context can be rebuilt on reload, and so a PKCS#12 keystore and a PEM pair end
    up in the same form. ``source`` names the files in error messages and logs.
    """

    chain_pem: bytes
    key_pem: bytes
    source: str
    leaf: x509.Certificate


def _read(path: str | Path, what: str) -> bytes:
    return read_file(path, f"{what} {path}")


def load_certificates(path: str | Path, what: str = "certificate") -> list[x509.Certificate]:
    """All certificates in a PEM bundle or one DER certificate; a one-line error for anything else."""
    return parse_certificates(_read(path, what), f"{what} {path}")


def _load_key(data: bytes, password: bytes | None, source: str, password_flag: str = "--key-pass") -> PrivateKey:
    # The one passphrase rule of tls/x509.py: a password for a key that is not encrypted is refused too.
    return parse_private_key(data, password, source=source, password_flag=password_flag)


def _material(certs: Sequence[x509.Certificate], key: PrivateKeyTypes, source: str) -> KeyMaterial:
    if not certs:
        raise CertificateError(f"{source}: no certificate found")
    if not isinstance(key, SIGNING_KEY_TYPES):
        raise CertificateError(f"{source}: unsupported private key type {type(key).__name__}")
    leaf = certs[0]
    if spki_der(key.public_key()) != spki_der(leaf.public_key()):
        raise CertificateError(f"{source}: the private key does not match the certificate")
    chain_pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyMaterial(chain_pem=chain_pem, key_pem=key_pem, source=source, leaf=leaf)


def load_key_material(
    *,
    cert: str | None = None,
    key: str | None = None,
    keystore: str | None = None,
    storepass: bytes | None = None,
    key_pass: bytes | None = None,
) -> KeyMaterial:
    """Load ``--cert``/``--key`` or ``--keystore`` (PEM bundle with cert and key, or PKCS#12)."""
    if keystore:
        data = _read(keystore, "keystore")
        if b"-----BEGIN" in data:
            certs = parse_certificates(data, f"keystore {keystore}")
            flag = "--key-pass" if key_pass else "--storepass"
            return _material(certs, _load_key(data, key_pass or storepass, f"keystore {keystore}", flag), keystore)
        try:
            p12_key, p12_cert, extra = pkcs12.load_key_and_certificates(data, storepass)
        except ValueError:
            if storepass is None:
                raise CertificateError(
                    f"keystore {keystore}: cannot open PKCS#12 (encrypted? give --storepass)"
                ) from None
            raise CertificateError(f"keystore {keystore}: wrong --storepass or not a PKCS#12 file") from None
        if p12_cert is None or p12_key is None:
            raise CertificateError(f"keystore {keystore}: PKCS#12 file holds no certificate and key pair")
        return _material([p12_cert, *extra], p12_key, keystore)
    if not cert or not key:
        raise CertificateError("give --cert and --key together, or --keystore")
    certs = load_certificates(cert)
    return _material(certs, _load_key(_read(key, "key"), key_pass, f"key {key}"), f"{cert} + {key}")


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path from which OpenSSL reads exactly ``data``, that never touches a disk where possible.

    ``load_cert_chain`` only takes paths, and ``load_verify_locations(cafile=...)`` is the loader that reads a
    bundle the way OpenSSL's tools do (``cadata`` parses PEM differently). On Linux a memfd is an anonymous
    in-memory file; elsewhere a file created 0600 in a private temp dir, removed as soon as OpenSSL has read it.
    """
    # Linux only: the memfd is reached through /proc/self/fd, which other systems with memfd_create may lack.
    if hasattr(os, "memfd_create") and sys.platform.startswith("linux"):
        fd = os.memfd_create("tlsgate-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="tlsgate-") as tmp:
        path = os.path.join(tmp, "key.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        yield path


def _harden(ctx: ssl.SSLContext) -> None:
    # TLS 1.0/1.1 are deprecated (RFC 8996): no AEAD, SHA-1 in the handshake.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    # CRIME: TLS compression leaks plaintext lengths. OpenSSL 3 has it off; say so explicitly anyway.
    ctx.options |= ssl.OP_NO_COMPRESSION
    # Renegotiation is a DoS lever (client-initiated renegotiation costs the server a full handshake) and
    # was the root of the 2009 prefix-injection bug; nothing a tunnel carries needs it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # A peer that ends its stream with a TCP FIN and no close_notify (a bare shutdown(SHUT_WR), as many clients
    # and servers do) is at the end of its stream, not in error. OpenSSL 3 otherwise turns that FIN into a fatal
    # error that also kills our direction, and the answer the other side is still sending is lost. Safe for a
    # tunnel: we carry TCP streams, whose end is a FIN anyway; a truncation is visible to the application
    # protocol exactly as it is over plain TCP (the relay already passes the FIN on as a FIN). ghostunnel (Go's
    # crypto/tls) and haproxy accept it the same way.
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF


def _load_ca(ctx: ssl.SSLContext, cafile: str, what: str) -> bytes:
    """Trust the certificates in ``cafile``; returns the bytes OpenSSL was given.

    The file is read once and OpenSSL loads those very bytes from memory: the session-ticket key is derived
    from them (see `tickets`), so a bundle rewritten between two reads cannot leave a context trusting one
    version under the key of another.
    """
    data = _read(cafile, what)
    parse_certificates(data, f"{what} {cafile}")  # a clear error for a garbage file, before OpenSSL's
    with _memory_file(data) as path:
        try:
            ctx.load_verify_locations(cafile=path)
        except ssl.SSLError as err:
            raise CertificateError(f"{what} {cafile}: OpenSSL cannot use it ({err.reason or err})") from None
    return data


def _load_chain(ctx: ssl.SSLContext, material: KeyMaterial) -> None:
    with _memory_file(material.chain_pem + material.key_pem) as path:
        try:
            ctx.load_cert_chain(path)
        except ssl.SSLError as err:
            raise CertificateError(f"{material.source}: OpenSSL cannot use it ({err.reason or err})") from None


def server_context(
    material: KeyMaterial,
    *,
    client_ca: str | None,
    require_client_cert: bool,
    alpn: Sequence[str] = (),
    crl: Sequence[str | Path] = (),
    session_tickets: str = "shared",
    pins: Sequence[str] = (),
) -> ssl.SSLContext:
    """A context for accepting TLS from clients; asks for (and verifies) a client certificate when told to.

    ``crl`` are the ``--crl`` files `tlsgate.policy` enforces on every connection. OpenSSL does not read them;
    they are here because the session-ticket key is derived from them (a CRL change must end resumption).

    ``session_tickets`` (``--session-tickets``): ``shared`` installs the process tree's derived ticket key
    (see `tickets`; where that cannot be done it is ``per-context``), ``per-context`` keeps OpenSSL's own
    random key of this context (a ticket resumes only on the worker and the configuration that issued it),
    and ``off`` issues no tickets at all, so every connection makes a full, verified handshake.

    ``pins`` (``--allow-spki-pin``, canonical spellings) asks for a client certificate with no CA at all: the
    caller must install a check that decides alone (`internals.install_peer_check` with ``alone``), or OpenSSL
    refuses every client. They join the admission bytes, so a change of pins ends resumption like a CA change.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    # The server's order of suites wins, so a client cannot steer us to its weakest acceptable choice.
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    # A fresh ECDHE key per handshake, so one leaked ephemeral key exposes one session only.
    ctx.options |= ssl.OP_SINGLE_ECDH_USE
    # One TLS 1.3 ticket is enough for resumption; OpenSSL's default of two costs an extra encryption and
    # an extra record on every new connection.
    ctx.num_tickets = 1
    if session_tickets == "off":
        # Both: OP_NO_TICKET stops TLS 1.2 tickets, num_tickets = 0 stops TLS 1.3's NewSessionTicket messages.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    _load_chain(ctx, material)
    # What decides who a full handshake admits, byte for byte; see tickets.py for why the key depends on it.
    admission: list[bytes] = []
    if client_ca:
        admission += [b"--cacert", _load_ca(ctx, client_ca, "--cacert")]
    for path in crl:
        admission += [b"--crl", _read(path, "--crl")]
    for pin in pins:
        admission += [b"--allow-spki-pin", pin.encode("ascii")]
    if require_client_cert:
        if not client_ca and not pins:
            raise CertificateError("client certificates are required but no --cacert was given to verify them")
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    # Last, once client verification is final: the ticket key is derived from it (see tickets.py). Tickets then
    # resume on every worker and across reloads; where that cannot be done, OpenSSL keeps its own random key.
    if session_tickets == "shared":
        tickets.apply(ctx, admission)
    return ctx


def quiet_undecodable_server_names() -> None:
    """Keep CPython from printing a traceback for every ClientHello whose server name is not ASCII.

    With an SNI callback set, ``_ssl`` decodes the name as ASCII before calling it (A-labels are ASCII); raw
    UTF-8 or garbage bytes fail that decode, and CPython hands the UnicodeDecodeError to ``sys.unraisablehook``
    (a multi-line "Exception ignored in: b'...'" on stderr, the client's bytes included) and fails the handshake
    with CALLBACK_FAILED. Any client could flood the log that way, so that one case is dropped here; the engine
    logs the failed handshake in its usual single line. Everything else still reaches the previous hook.
    Installed once per process, by whatever sets an SNI callback.
    """
    previous = sys.unraisablehook
    if getattr(previous, "tlsgate_sni", False):
        return

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        err = unraisable.exc_value
        if isinstance(err, UnicodeDecodeError) and err.encoding == "ascii" and isinstance(unraisable.object, bytes):
            return
        previous(unraisable)

    hook.tlsgate_sni = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def add_sni_certificates(default: ssl.SSLContext, by_name: dict[str, ssl.SSLContext]) -> None:
    """Serve ``by_name[server_name]`` to clients asking for that name; everyone else gets ``default``.

    Names are matched case-insensitively; ``*.example.com`` entries match one label, as certificates do.
    Session tickets need nothing here: OpenSSL uses the ticket key of the context a handshake started on
    (``default``), and every context from `server_context` carries the process's key anyway.
    """
    exact = {name.lower().rstrip("."): ctx for name, ctx in by_name.items() if not name.startswith("*.")}
    wildcard = {name[2:].lower().rstrip("."): ctx for name, ctx in by_name.items() if name.startswith("*.")}

    def pick(sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        if not server_name:
            return
        name = server_name.lower().rstrip(".")
        chosen = exact.get(name)
        if chosen is None and "." in name:
            chosen = wildcard.get(name.split(".", 1)[1])
        if chosen is not None:
            sslobj.context = chosen

    quiet_undecodable_server_names()
    default.sni_callback = pick


def client_context(
    *,
    cafile: str | None,
    material: KeyMaterial | None = None,
    check_hostname: bool = True,
    alpn: Sequence[str] = (),
    what: str = "--cacert",
    pinned: bool = False,
) -> ssl.SSLContext:
    """A context for connecting out over TLS: the server is verified against ``cafile`` or the system store.

    ``pinned`` (``--verify-spki-pin``) trusts no CA and checks no host name: the caller must install a check that
    decides alone (`internals.install_peer_check` with ``alone``), or OpenSSL refuses every server.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = check_hostname and not pinned
    ctx.verify_mode = ssl.CERT_REQUIRED
    # The name must be in subjectAltName: the Common Name fallback (RFC 6125 deprecates it; browsers, Go and
    # urllib3 dropped it) lets a certificate whose CN merely looks like a host name pass, e.g. a client
    # certificate from the same CA whose CN is "db.internal", and no name constraint on a CA covers the CN.
    ctx.hostname_checks_common_name = False
    # Under pins (ghostunnel's InsecureSkipVerify) no trust anchor at all: the pin is the only way in, and neither
    # --cacert nor the system store can add another.
    if cafile and not pinned:
        _load_ca(ctx, cafile, what)
    elif not pinned:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if material is not None:
        _load_chain(ctx, material)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


# OpenSSL verify messages for a client certificate, as the refusal rule and reason we log.
_CLIENT_VERIFY = {
    "certificate has expired": ("expired", "client certificate has expired"),
    "certificate is not yet valid": ("not-yet-valid", "client certificate is not yet valid"),
    "unable to get local issuer certificate": ("untrusted", "client certificate is not signed by a CA in --cacert"),
    "self-signed certificate": ("untrusted", "client certificate is self-signed and not in --cacert"),
    "self signed certificate": ("untrusted", "client certificate is self-signed and not in --cacert"),
    "certificate revoked": ("crl", "client certificate is revoked"),
    "unsupported certificate purpose": ("untrusted", "client certificate is not valid for client authentication"),
}
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"}
_OLD_TLS = {"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE", "VERSION_TOO_LOW"}


def describe_handshake_error(err: BaseException, side: str) -> tuple[str, str]:
    """``(rule, reason)`` for a failed handshake with the ``client`` or the ``target``.

    ``rule`` is ``handshake`` for protocol failures and a policy rule id (``expired``, ``untrusted``,
    ``no-client-cert``...) when the peer was refused for who it is.
    """
    if isinstance(err, ssl.SSLCertVerificationError):
        message = str(err.verify_message or err.reason or err)
        if side == "client":
            return _CLIENT_VERIFY.get(message, ("untrusted", f"client certificate rejected: {message}"))
        if err.verify_code == _X509_V_ERR_HOSTNAME_MISMATCH:
            # Most often a certificate with the name in its Common Name only: say where the name must be.
            message = f"{message.rstrip('.')} (names are matched in subjectAltName only, never the Common Name)"
        return "untrusted", f"target certificate rejected: {message}"
    # A FIN mid-handshake: SSLEOFError, or SSLZeroReturnError under OP_IGNORE_UNEXPECTED_EOF (see _harden).
    if isinstance(err, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "handshake", f"{side} closed the connection during the handshake"
    if isinstance(err, ssl.SSLError):
        reason = err.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no-client-cert", "no client certificate"
        if reason in _NOT_TLS:
            return "handshake", f"{side} did not speak TLS (plaintext or HTTP instead of a ClientHello?)"
        if reason in _OLD_TLS:
            return "handshake", f"{side} offered only TLS versions older than 1.2"
        if reason in ("NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_CIPHERS_AVAILABLE"):
            return "handshake", f"no cipher suite in common with the {side} (AEAD with ECDHE required)"
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"):
            return "handshake", f"{side} rejected our certificate ({reason.lower().replace('_', ' ')})"
        if reason == "UNEXPECTED_EOF_WHILE_READING":
            return "handshake", f"{side} closed the connection during the handshake"
        return "handshake", f"TLS error with {side}: {(reason or str(err)).lower().replace('_', ' ')}"
    if isinstance(err, ConnectionResetError):
        return "handshake", f"{side} reset the connection during the handshake"
    if isinstance(err, OSError):
        return "handshake", f"{side} connection failed during the handshake: {err.strerror or err}"
    return "handshake", str(err)
