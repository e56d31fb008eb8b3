"""Attacks on the access policy (security issue #13): certificates OpenSSL accepts and we cannot read, CAs
revoked above the leaf, ``policy check`` disagreeing with the handshake, several CNs, and SPIFFE IDs with dot
segments or percent-encoding. Each end-to-end test drives a real handshake on loopback."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import assert_cut, backend, port_of, tunnel, wait_until
from tlsgate.policy import IdentityRules, PeerIdentity, build_policy

NOW = datetime.now(UTC)
_KEY = ec.generate_private_key(ec.SECP256R1())  # one key for every leaf: generating keys is the slow part
bounded = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- a PKI that can build what trustme will not: odd SANs, name constraints, path lengths, bad EKUs ------------


@dataclass
class Ca:
    """A CA certificate and its key; issues leaves and sub-CAs with the extensions a real CA would add."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def root(cls, name: str = "attack root") -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        builder = _base(subject, subject, key.public_key(), NOW - timedelta(days=1), NOW + timedelta(days=365))
        builder = _ca_extensions(builder, key.public_key(), None, path_length=None)
        return cls(builder.sign(key, hashes.SHA256()), key)

    def sub_ca(
        self,
        name: str,
        *,
        path_length: int | None = None,
        not_after: datetime | None = None,
        permitted_dns: Sequence[str] = (),
    ) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _base(
            _name(name), self.cert.subject, key.public_key(), NOW - timedelta(days=2), not_after or NOW + timedelta(days=90)
        )
        builder = _ca_extensions(builder, key.public_key(), self.key.public_key(), path_length=path_length)
        if permitted_dns:
            constraints = x509.NameConstraints([x509.DNSName(d) for d in permitted_dns], None)
            builder = builder.add_extension(constraints, critical=True)
        return Ca(builder.sign(self.key, hashes.SHA256()), key)

    def leaf(
        self,
        cn: str | Sequence[str] = "alice",
        *,
        dns: Sequence[str] = (),
        uris: Sequence[str] = (),
        eku: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
        raw_san: bytes | None = None,
    ) -> x509.Certificate:
        cns = [cn] if isinstance(cn, str) else list(cn)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value) for value in cns])
        builder = _base(subject, self.cert.subject, _KEY.public_key(), NOW - timedelta(days=1), NOW + timedelta(days=30))
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
        )
        builder = builder.add_extension(_key_usage(ca=False), critical=True)
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if raw_san is not None:
            # cryptography will not encode a malformed SAN, but writes an unrecognised extension's bytes as given.
            builder = builder.add_extension(
                x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, raw_san), critical=False
            )
        elif dns or uris:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            names += [x509.UniformResourceIdentifier(u) for u in uris]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def crl(self, *revoked: x509.Certificate) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(NOW - timedelta(hours=1))
            .next_update(NOW + timedelta(days=7))
        )
        for cert in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(NOW)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(self.key, hashes.SHA256())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _base(subject: x509.Name, issuer: x509.Name, public_key: Any, start: datetime, end: datetime) -> Any:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _ca_extensions(builder: Any, public_key: Any, issuer_key: Any, *, path_length: int | None) -> Any:
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    builder = builder.add_extension(_key_usage(ca=True), critical=True)
    if issuer_key is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
    return builder


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def ip_san(payload: bytes) -> bytes:
    """A SubjectAltName holding one iPAddress entry ([7] IMPLICIT OCTET STRING) of any length, short-form DER."""
    entry = bytes([0x87, len(payload)]) + payload
    return bytes([0x30, len(entry)]) + entry


@dataclass
class Site:
    """Files for a server tunnel whose clients chain to ``root``; and a way to make a client context."""

    root: Ca
    dir: Path

    def server_options(self, target: str, **extra: Any) -> dict[str, Any]:
        server = self.root.leaf("localhost", dns=["localhost"], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        self.write("server.pem", pem(server))
        self.write("server.key", _key_pem())
        self.write("ca.pem", pem(self.root.cert))
        options: dict[str, Any] = {
            "target": target,
            "cert": [str(self.dir / "server.pem")],
            "key": [str(self.dir / "server.key")],
            "cacert": str(self.dir / "ca.pem"),
        }
        options.update(extra)
        return options

    def client_context(self, *chain: x509.Certificate) -> ssl.SSLContext:
        """A client presenting ``chain`` (leaf first, then the intermediates it sends)."""
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.pem"))
        path = self.write(f"client-{id(chain)}.pem", pem(*chain))
        ctx.load_cert_chain(path, self.write("client.key", _key_pem()))
        return ctx

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


def _key_pem() -> bytes:
    return _KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(Ca.root(), tmp_path)


def tlsgate_events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.name == "tlsgate" and r.getMessage() == name]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None or "Traceback" in r.getMessage()]


async def attempt(port: int, ctx: ssl.SSLContext) -> None:
    """Connect, send, read: the server must end the connection without a byte (TLS 1.3 learns it on read)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    except (ssl.SSLError, ConnectionError):
        return
    writer.write(b"secret")
    await assert_cut(reader)
    writer.close()


# --- item 2: a certificate OpenSSL accepts and cryptography cannot parse ---------------------------------------


@pytest.mark.asyncio
async def test_unparseable_client_certificate_is_one_refusal_not_a_busy_loop(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    bad = site.root.leaf("alice", raw_san=ip_san(b"\x0a\x01\x02\x03\x04"))
    async with backend() as be, tunnel(**site.server_options(be.address, allow_cn=["alice"])) as tun:
        await attempt(port_of(tun), site.client_context(bad))
        await wait_until(lambda: tun.stats.refused.get("bad-cert") == 1)
        assert be.connections == 0
    refusals = tlsgate_events(caplog, "refused")
    assert len(refusals) == 1, refusals
    assert refusals[0]["rule"] == "bad-cert"
    assert "cannot be parsed" in refusals[0]["reason"] and "IPv4 or IPv6" in refusals[0]["reason"]
    assert tracebacks(caplog) == []


@pytest.mark.asyncio
async def test_unparseable_target_certificate_in_client_mode_is_one_refusal(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    # The hostname check passes on the DNS SAN; --verify-cn then has to read the rest of the certificate.
    san = x509.SubjectAlternativeName([x509.DNSName("localhost")]).public_bytes()
    raw = bytes([0x30, len(san) - 2 + 7]) + san[2:] + bytes([0x87, 5]) + b"\x0a\x01\x02\x03\x04"
    bad = site.root.leaf("localhost", eku=[ExtendedKeyUsageOID.SERVER_AUTH], raw_san=raw)
    site.write("ca.pem", pem(site.root.cert))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(site.write("target.pem", pem(bad)), site.write("target.key", _key_pem()))
    async with (
        backend(ssl_ctx=server_ctx) as be,
        tunnel("client", target=f"localhost:{be.port}", cacert=str(site.dir / "ca.pem"), verify_cn=["localhost"]) as cli,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(cli))
        writer.write(b"ping")
        await assert_cut(reader)
        writer.close()
        await wait_until(lambda: cli.stats.target_errors == 1)
    refusals = tlsgate_events(caplog, "target refused")
    assert len(refusals) == 1, refusals
    assert refusals[0]["rule"] == "bad-cert"
    assert "cannot be parsed" in refusals[0]["reason"]
    assert tracebacks(caplog) == []


# IP SANs are 4 or 16 bytes; every other length is one OpenSSL keeps as an opaque string and cryptography refuses.
bad_ip_payloads = st.binary(min_size=0, max_size=40).filter(lambda b: len(b) not in (4, 16))


@bounded
@given(payload=bad_ip_payloads)
@example(payload=b"\x0a\x01\x02\x03\x04")
def test_check_peer_refuses_any_malformed_ip_san(payload: bytes) -> None:
    root = _ROOT
    cert = der(root.leaf("alice", raw_san=ip_san(payload)))
    policy = build_policy(allow_cn=["alice"])
    decision, identity = policy.check_peer(cert)
    assert (decision.allowed, decision.rule, identity) == (False, "bad-cert", None)
    assert decision.reason.startswith("client certificate cannot be parsed")
    rules = IdentityRules.parse(cn=["alice"], flag_prefix="verify")
    refused = rules.check_certificate(cert)
    assert (refused.allowed, refused.rule) == (False, "bad-cert")
    assert refused.reason.startswith("server certificate cannot be parsed")


def test_check_peer_refuses_bytes_that_are_not_a_certificate() -> None:
    decision, identity = build_policy(allow_all=True).check_peer(b"\x30\x03\x02\x01\x01")
    assert (decision.allowed, decision.rule, identity) == (False, "bad-cert", None)
    assert IdentityRules.parse(cn=["x"], flag_prefix="verify").check_certificate(b"junk").rule == "bad-cert"


_ROOT = Ca.root("hypothesis root")
