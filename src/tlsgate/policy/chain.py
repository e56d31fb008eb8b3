"""Certificate chains: the chain OpenSSL verified for a live connection, and chain verification for ``policy check``.

`verified_chain` reads the chain of a finished handshake (leaf first, DER) for the CRL check, and remembers it
by leaf, because a resumed session carries only the leaf. `verify_client_chain` answers "would the handshake
accept this client certificate?" with cryptography's RFC 5280 verifier, relaxed where OpenSSL is, and
`verify_chain`, a simple issuer walk, explains a refusal in plain words. The server itself never calls the
last two: OpenSSL verifies during the handshake.
"""

from __future__ import annotations

import _ssl
import functools
import hashlib
import re
import ssl
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from tlsgate.policy.decision import Decision, readable_name, shorten, utc, when
from tlsgate.policy.peer import PARSE_ERRORS, parse_problem
from tlsgate.tls import internals

# --- the verified chain of a live connection ----------------------------------------------------------------

_CHAIN_MEMORY = 1024
_remembered_chains: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()


def verified_chain(tls: ssl.SSLSocket, leaf_der: bytes) -> tuple[bytes, ...]:
    """The chain OpenSSL verified for the peer of ``tls``, leaf first, as DER; ``(leaf_der,)`` when unknown.

    The one place the engine hands policy a live socket: it reads a property of the finished handshake, no I/O.
    Python has it publicly from 3.13 (``SSLSocket.get_verified_chain``, DER bytes); 3.10-3.12 have it only on the
    private ``_sslobj`` (``_ssl.Certificate`` objects), used here guarded so a future Python degrades to the
    leaf alone instead of failing.

    A resumed session has no chain: OpenSSL keeps only the leaf in a session, and does not verify again. So the
    chain of each full handshake is remembered by leaf (a bounded, per-process memory), and a resumed session
    gets the chain its leaf was last verified with. A session resumed in a process that never saw its full
    handshake (another worker) gets only the leaf: docs/access-control.md ("Revocation") says so.
    """
    key = hashlib.sha256(leaf_der).digest()
    chain = _read_verified_chain(tls)
    if len(chain) > 1 and chain[0] == leaf_der:
        _remembered_chains[key] = chain
        _remembered_chains.move_to_end(key)
        if len(_remembered_chains) > _CHAIN_MEMORY:
            _remembered_chains.popitem(last=False)
        return chain
    return _remembered_chains.get(key) or (leaf_der,)


def _read_verified_chain(tls: ssl.SSLSocket) -> tuple[bytes, ...]:
    getter = internals.verified_chain_getter(tls)
    if getter is None:
        return ()
    try:
        items = getter() or ()
        return tuple(item if isinstance(item, bytes) else item.public_bytes(_ssl.ENCODING_DER) for item in items)
    except (AttributeError, TypeError, ValueError, ssl.SSLError):
        return ()


# --- chain (for policy check) --------------------------------------------------------------------------------

_MAX_CHAIN = 8


def verify_client_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    ca_certs: Sequence[x509.Certificate],
    *,
    now: datetime | None = None,
) -> tuple[Decision, tuple[x509.Certificate, ...]]:
    """Would the handshake accept leaf as a client certificate? The decision, and the chain built (leaf first).

    The verdict comes from cryptography's RFC 5280 path builder, which checks what the handshake checks and
    `verify_chain` does not: extended key usage (clientAuth), name constraints, path lengths. It is told to be
    as lenient as OpenSSL where the Web PKI profile it defaults to is stricter (see `_openssl_like_policies`), so
    that ``policy check`` and the handshake agree. `verify_chain` then only explains a refusal in our words.
    The chain is empty when verification fails.
    """
    now = utc(now)
    if not ca_certs:
        return Decision(False, "untrusted", "no CA certificate to check against (give --cacert)"), ()
    ca_policy, ee_policy = _openssl_like_policies()
    verifier = (
        PolicyBuilder()
        .store(Store(list(ca_certs)))
        .time(now)
        .max_chain_depth(_MAX_CHAIN)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        # Not a verdict on the chain: cryptography could not run. Our walk is all that is left.
        return _walk_only(leaf, intermediates, ca_certs, now, f"cryptography cannot verify it: {parse_problem(err)}")
    except VerificationError as err:
        problem = _verification_problem(err)
        if _FORBIDDEN_ALGORITHM.search(problem):
            # The Web PKI profile allows only a few key and signature algorithms; OpenSSL also takes Ed25519 and
            # Ed448, which tlsgate's own CA can issue. For such a chain only our walk can judge.
            return _walk_only(leaf, intermediates, ca_certs, now, "cryptography's verifier refuses its algorithms")
        explained = verify_chain(leaf, intermediates, ca_certs, now=now)
        if explained.allowed and not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            # The handshake names an out-of-date leaf "expired" (or "not yet valid"), and so do we.
            if now > leaf.not_valid_after_utc:
                return Decision(False, "expired", f"client certificate expired {when(leaf.not_valid_after_utc)}"), ()
            until = when(leaf.not_valid_before_utc)
            return Decision(False, "not-yet-valid", f"client certificate not valid until {until}"), ()
        if not explained.allowed:
            return explained, ()
        return Decision(False, "untrusted", problem), ()
    chain = tuple(verified.chain)
    via = [readable_name(c.subject) for c in chain[1:-1]]
    reason = f"signed by {readable_name(chain[-1].subject)}" + (f" via {', '.join(via)}" if via else "")
    return Decision(True, "chain", reason), chain


def _walk_only(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    ca_certs: Sequence[x509.Certificate],
    now: datetime,
    why: str,
) -> tuple[Decision, tuple[x509.Certificate, ...]]:
    """The verdict of `verify_chain` and the leaf's EKU, saying what went unchecked and why."""
    explained = verify_chain(leaf, intermediates, ca_certs, now=now)
    if not explained.allowed:
        return explained, ()
    if (eku := _client_auth_problem(leaf)) is not None:
        return Decision(False, "untrusted", eku), ()
    return Decision(True, "chain", f"{explained.reason} (name constraints and path lengths unchecked: {why})"), ()


@functools.cache
def _openssl_like_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """Web PKI extension rules, relaxed where OpenSSL's client-certificate check (purpose ``sslclient``) is.

    OpenSSL accepts a client certificate without a SubjectAltName or an AuthorityKeyIdentifier, or with a
    critical ExtendedKeyUsage, and a CA certificate without KeyUsage (but with KeyUsage, it must allow
    certificate signing). cryptography's defaults refuse all four. Found by running the same certificates
    through both; tests/test_attack_policy.py keeps them in step.
    """
    ca = ExtensionPolicy.webpki_defaults_ca().may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
    ee = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _client_auth_usage)
    )
    return ca, ee


_FORBIDDEN_ALGORITHM = re.compile(r"Forbidden (?:public key|signature) algorithm")


def _client_auth_usage(_policy: object, cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None) -> None:
    # Replacing the default EKU rule (which also wants the extension non-critical, as trustme does not make it)
    # drops its check too, so here it is: with an EKU, it must name clientAuth, as OpenSSL requires.
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise ValueError(f"{readable_name(cert.subject)}: extended key usage does not include clientAuth")


def _client_auth_problem(leaf: x509.Certificate) -> str | None:
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, *PARSE_ERRORS):
        return None  # unreadable extensions are the certificate step's refusal ("bad-cert"), as in the server
    if ExtendedKeyUsageOID.CLIENT_AUTH in usage:
        return None
    return f"{readable_name(leaf.subject)}: extended key usage does not include clientAuth"


def _ca_key_usage(_policy: object, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    if usage is not None and not usage.key_cert_sign:
        raise ValueError(f"{readable_name(cert.subject)}: KeyUsage does not allow signing certificates")


def _verification_problem(err: VerificationError) -> str:
    """cryptography's message without the certificate repr it appends."""
    text = str(err).split(" (encountered processing", 1)[0]
    return shorten(text.removeprefix("validation failed: "), 200)


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    ca_certs: Sequence[x509.Certificate],
    *,
    now: datetime | None = None,
) -> Decision:
    """Is leaf signed, through the given intermediates, by one of ca_certs, with every issuer within its dates?

    Only an explanation: `verify_client_chain` gives the verdict, and calls this to say in plain words which
    link is missing when it can. The leaf's own dates are left to `check_validity`. It does not check key
    usage, name constraints or path lengths, so it must never be the only check.
    """
    now = utc(now)
    if not ca_certs:
        return Decision(False, "untrusted", "no CA certificate to check against (give --cacert)")
    current = leaf
    path: list[str] = []
    for _ in range(_MAX_CHAIN):
        anchors = [ca for ca in ca_certs if ca.subject == current.issuer]
        for ca in anchors:
            if _signed_by(current, ca):
                expired = _outside_validity(ca, now, "CA")
                if expired:
                    return Decision(False, "untrusted", expired)
                via = f" via {', '.join(path)}" if path else ""
                return Decision(True, "chain", f"signed by {readable_name(ca.subject)}{via}")
        issuers = [c for c in intermediates if c.subject == current.issuer and c is not current]
        issuer = next((c for c in issuers if _signed_by(current, c)), None)
        if issuer is None:
            if anchors or issuers:
                return Decision(
                    False,
                    "untrusted",
                    f"{readable_name(current.subject)} names issuer {readable_name(current.issuer)}, "
                    "but that certificate's key did not sign it (a different CA with the same name?)",
                )
            return Decision(False, "untrusted", f"issuer {readable_name(current.issuer)} is not in --cacert")
        if not _is_ca(issuer):
            return Decision(False, "untrusted", f"intermediate {readable_name(issuer.subject)} is not a CA certificate")
        expired = _outside_validity(issuer, now, "intermediate")
        if expired:
            return Decision(False, "untrusted", expired)
        path.append(readable_name(issuer.subject))
        current = issuer
    return Decision(False, "untrusted", f"no path to --cacert within {_MAX_CHAIN} certificates")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _outside_validity(cert: x509.Certificate, now: datetime, role: str) -> str | None:
    if now > cert.not_valid_after_utc:
        return f"{role} {readable_name(cert.subject)} expired {when(cert.not_valid_after_utc)}"
    if now < cert.not_valid_before_utc:
        return f"{role} {readable_name(cert.subject)} not valid until {when(cert.not_valid_before_utc)}"
    return None
