"""SPKI pins as ghostunnel's ``--allow-spki-pin`` and ``--verify-spki-pin`` take them: ``sha256:<base64>``.

A pin is a hash of the peer's public key: the DER SubjectPublicKeyInfo exactly as its leaf certificate encodes
it (RFC 7469 section 2.4, Go's ``RawSubjectPublicKeyInfo``). Under these two flags the pin is the *whole*
authentication, in the style of RFC 7858 section 4.2 (out-of-band key pinning): a peer whose key matches is
accepted with a self-signed certificate, an expired one, or one for another name; a peer whose key does not
match is refused whatever CA signed it. The peer still proves in the handshake that it holds the private key
(its CertificateVerify is checked by OpenSSL as always), so a pin admits the key's holder, not whoever copies
the certificate.

That differs from tlsgate's own ``--allow-spki-sha256``, which is one more identity rule on top of a verified
chain: the certificate must also chain to ``--cacert``, be within its dates and not be revoked.

The accepted spelling is ghostunnel's (``auth.ParseSPKIPins``), so a command line moves over unchanged:

* ``<algo>:<digest>``, split at the first colon; ``algo`` is ``sha256``, ``sha384`` or ``sha512``, in any case;
* ``digest`` is standard base64 (``+`` and ``/``, with ``=`` padding, as Go's ``base64.StdEncoding``; line
  breaks inside are skipped, as Go's decoder does) and decodes to exactly the hash's size (32, 48, 64 bytes).

Anything else is refused at start with a one-line error: hex (that is ``--allow-spki-sha256``'s form),
URL-safe base64, missing padding, curl's ``sha256//`` form, a missing or unknown algorithm.

The settings converter (``settings.convert``, kind ``key_pins``) parses each pin once, when the flag or file key
is read, so a bad pin is refused in one wording for flags, files and library callers; `tlsgate.policy.identity`
matches with a `PinSet` of them. `KeyPin.parse` takes text, `PinSet.match` the SPKI bytes: no I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tlsgate.errors import ConfigError, shown

__all__ = ["HASH_SIZES", "KeyPin", "PinSet"]

HASH_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}
"""The algorithms a pin may name, with their digest sizes in bytes (ghostunnel's ``supportedSPKIPinHashes``)."""

_STANDARD_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2}:?)+")


@dataclass(frozen=True, slots=True)
class KeyPin:
    """One pin: a hash algorithm and the digest of the pinned key's DER SubjectPublicKeyInfo."""

    algorithm: str
    digest: bytes

    @classmethod
    def parse(cls, flag: str, text: str) -> KeyPin:
        """``sha256:<base64>`` (or sha384, sha512) as ghostunnel reads it; `ConfigError` names the flag and why."""
        quoted = shown(text)
        algorithm, colon, encoded = text.partition(":")
        if not colon:
            curl = "; curl's sha256//<base64> is written sha256:<base64> here" if "//" in text else ""
            raise ConfigError(f"{flag}: {quoted} is not <algo>:<base64-digest> (like sha256:{_EXAMPLE}{curl})")
        algorithm = algorithm.lower()
        size = HASH_SIZES.get(algorithm)
        if size is None:
            raise ConfigError(
                f"{flag}: {quoted}: unsupported hash algorithm {shown(algorithm)} (sha256, sha384 or sha512)"
            )
        # Go's decoder skips CR and LF wherever they are; nothing else outside the alphabet is allowed.
        encoded = encoded.replace("\r", "").replace("\n", "")
        digest = _standard_base64(encoded)
        if digest is None:
            raise ConfigError(f"{flag}: {quoted}: the digest is not standard base64{_hint(encoded, size)}")
        if len(digest) != size:
            looks_hex = _HEX.fullmatch(encoded) is not None
            raise ConfigError(
                f"{flag}: {quoted}: a {algorithm} digest is {size} bytes, this one decodes to {len(digest)}"
                + (_HEX_HINT if looks_hex else "")
            )
        return cls(algorithm, digest)

    @classmethod
    def of(cls, spki_der: bytes, algorithm: str = "sha256") -> KeyPin:
        """The pin of a key, from its DER SubjectPublicKeyInfo."""
        return cls(algorithm, hashlib.new(algorithm, spki_der).digest())

    def __str__(self) -> str:
        """The canonical spelling, ``sha256:<base64>``: what logs show and the ticket key is derived from."""
        return f"{self.algorithm}:{base64.b64encode(self.digest).decode('ascii')}"

    def short(self) -> str:
        """A pin cut for a log line: the algorithm and the first 12 base64 characters."""
        return str(self)[: len(self.algorithm) + 13] + "…"


_HEX_HINT = " (that is hex: give the digest in base64, or use --allow-spki-sha256/--verify-spki-sha256 for hex)"
_EXAMPLE = "6zBD98ApGytcvZY2eXzyFoG4MstM4r85fkM0+EXmue4="


def _standard_base64(text: str) -> bytes | None:
    """Go's ``base64.StdEncoding.DecodeString``: the standard alphabet, ``=`` padding required; None if not."""
    if len(text) % 4 or not _STANDARD_BASE64.fullmatch(text):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _hint(encoded: str, size: int) -> str:
    """Why a digest did not decode, for the mistakes people make: hex, URL-safe base64, no padding."""
    if _HEX.fullmatch(encoded) and len(encoded.replace(":", "")) == 2 * size:
        return _HEX_HINT
    if "-" in encoded or "_" in encoded:
        return " (URL-safe base64: use + and / instead of - and _)"
    if len(encoded) % 4 and re.fullmatch(r"[A-Za-z0-9+/]+", encoded):
        return " (the = padding is missing)"
    return " (A-Z, a-z, 0-9, + and /, padded with =)"


@dataclass(frozen=True, slots=True)
class PinSet:
    """The pins of one flag, repeated: a key matching any one of them is accepted (a current and a backup key)."""

    pins: tuple[KeyPin, ...] = ()

    @classmethod
    def parse(cls, flag: str, texts: Iterable[str]) -> PinSet:
        """Every value of ``flag``; the first bad one is the `ConfigError`, as ghostunnel rejects the whole set."""
        return cls(tuple(KeyPin.parse(flag, text) for text in texts))

    def __bool__(self) -> bool:
        return bool(self.pins)

    def match(self, spki_der: bytes) -> KeyPin | None:
        """The pin ``spki_der`` matches, or None. Each algorithm is hashed once; digests compare in constant time."""
        if not spki_der:
            return None
        digests: dict[str, bytes] = {}
        for pin in self.pins:
            digest = digests.get(pin.algorithm)
            if digest is None:
                digest = digests[pin.algorithm] = hashlib.new(pin.algorithm, spki_der).digest()
            if hmac.compare_digest(digest, pin.digest):
                return pin
        return None

    def describe(self, limit: int = 4) -> str:
        """The pins in one line, each cut short: ``sha256:6zBD98ApGytc…, sha384:…``."""
        shown_pins = [pin.short() for pin in self.pins[:limit]]
        more = f", +{len(self.pins) - limit} more" if len(self.pins) > limit else ""
        return ", ".join(shown_pins) + more

    def canonical(self) -> tuple[str, ...]:
        """Every pin in its canonical spelling, sorted and without repeats: what decides admission, as bytes."""
        return tuple(sorted({str(pin) for pin in self.pins}))
