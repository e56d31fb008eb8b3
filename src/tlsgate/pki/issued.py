"""`IssuedCert`: a freshly issued leaf in memory (certificate, key, chain) that writes itself out as files.

`IssuedCert.write` makes ``NAME.pem``, ``NAME.key`` (0600), ``NAME-chain.pem`` and, when asked,
``NAME.p12``, refusing to touch anything when one of them exists and ``force`` is not given.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    KeySerializationEncryption,
    NoEncryption,
    PrivateFormat,
    pkcs12,
)

from tlsgate.pki.files import make_private_dir, refuse_existing, write_private_file, write_public_file
from tlsgate.pki.names import common_name, default_basename
from tlsgate.tls.x509 import PrivateKey


def _encryption(password: bytes | None) -> KeySerializationEncryption:
    # BestAvailableEncryption is PKCS#8 with PBKDF2 and AES-256-CBC: what OpenSSL and Python's ssl read.
    return BestAvailableEncryption(password) if password else NoEncryption()


def encode_private_key(key: PrivateKey, password: bytes | None) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, _encryption(password))


class IssuedCert:
    """A freshly issued leaf certificate with its private key, in memory until you `write` it.

    ``chain`` is the leaf followed by the CA certificate: what a server sends so peers can link the leaf to
    a CA they trust. (Sending the root itself is harmless; peers ignore it and use their own copy.)
    """

    def __init__(self, certificate: x509.Certificate, private_key: PrivateKey, chain: list[x509.Certificate]):
        self.certificate = certificate
        self.private_key = private_key
        self.chain = chain

    @property
    def name(self) -> str:
        """The Common Name the certificate was issued for."""
        return common_name(self.certificate.subject) or ""

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        return b"".join(cert.public_bytes(Encoding.PEM) for cert in self.chain)

    def private_key_pem(self, password: bytes | None = None) -> bytes:
        """The key as PKCS#8 PEM, encrypted with ``password`` when one is given."""
        return encode_private_key(self.private_key, password)

    def pkcs12(self, password: bytes | None = None, *, friendly_name: str | None = None) -> bytes:
        """A PKCS#12 keystore (``.p12``/``.pfx``) holding the key, the leaf and the CA certificate.

        PKCS#12 bundles everything a TLS endpoint needs in one file, which Java, Windows and browsers import
        directly. With a password the store uses AES-256 and PBKDF2; without one it is not encrypted at all,
        so treat it like a bare private key.
        """
        name = (friendly_name or self.name or "tlsgate").encode()
        return pkcs12.serialize_key_and_certificates(
            name, self.private_key, self.certificate, self.chain[1:], _encryption(password)
        )

    @staticmethod
    def file_paths(out_dir: Path, basename: str, *, p12: bool = False) -> dict[str, Path]:
        """The files `write` makes, by role (``cert``, ``key``, ``chain``, maybe ``p12``); check them with
        `refuse_existing` before issuing so a refused run does not record a serial for nothing."""
        paths = {
            "cert": out_dir / f"{basename}.pem",
            "key": out_dir / f"{basename}.key",
            "chain": out_dir / f"{basename}-chain.pem",
        }
        if p12:
            paths["p12"] = out_dir / f"{basename}.p12"
        return paths

    def write(
        self,
        out_dir: Path,
        basename: str | None = None,
        *,
        key_password: bytes | None = None,
        p12_password: bytes | None = None,
        p12: bool = False,
        force: bool = False,
    ) -> dict[str, Path]:
        """Write ``BASENAME.pem`` (leaf), ``BASENAME.key`` (0600), ``BASENAME-chain.pem`` (leaf + CA) and,
        with ``p12`` or a ``p12_password``, ``BASENAME.p12``. Returns the paths by role:
        ``cert``, ``key``, ``chain`` and maybe ``p12``.

        Nothing is written when any target exists and ``force`` is false, so a refused run changes nothing.
        """
        stem = basename or default_basename(self.name)
        paths = self.file_paths(out_dir, stem, p12=p12 or bool(p12_password))
        refuse_existing(paths.values(), force=force)
        make_private_dir(out_dir)
        write_private_file(paths["key"], self.private_key_pem(key_password), force=force)
        write_public_file(paths["cert"], self.cert_pem, force=force)
        write_public_file(paths["chain"], self.chain_pem, force=force)
        if "p12" in paths:
            write_private_file(paths["p12"], self.pkcs12(p12_password, friendly_name=stem), force=force)
        return paths
