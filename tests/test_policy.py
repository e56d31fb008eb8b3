"""The access policy as plain values: addresses, identities, revocation and validity in, Decisions out."""

from __future__ import annotations

import base64
import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import click
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from tlsgate.cli.support import access_options
from tlsgate.errors import CertificateError, ConfigError
from tlsgate.policy import (
    Decision,
    PeerIdentity,
    Policy,
    RevocationList,
    build_policy,
    check_validity,
    verify_chain,
)
from tlsgate.settings.config import server_access

from helpers import address_rules, identity_rules

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


# --- a small PKI built with cryptography (trustme has no URI SANs, CRLs or Ed25519) ---------------------------


@dataclass
class Issuer:
    """A CA certificate and its key, able to issue leaves, intermediates and CRLs."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    @classmethod
    def from_trustme(cls, ca: trustme.CA) -> Issuer:
        key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
        return cls(x509.load_pem_x509_certificate(ca.cert_pem.bytes()), key)

    @classmethod
    def root(
        cls,
        name: str,
        key: CertificateIssuerPrivateKeyTypes | None = None,
        not_after: datetime = NOW + timedelta(days=3650),
    ) -> Issuer:
        key = key or ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = _builder(subject, subject, key.public_key(), NOW - timedelta(days=1), not_after)
        cert = cert.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        return cls(cert.sign(key, _hash(key)), key)

    def intermediate(self, name: str, *, not_after: datetime = NOW + timedelta(days=365)) -> Issuer:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = _builder(subject, self.cert.subject, key.public_key(), NOW - timedelta(days=1), not_after)
        cert = cert.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        return Issuer(cert.sign(self.key, _hash(self.key)), key)

    def issue(
        self,
        *,
        cn: str | None = "alice",
        ou: Sequence[str] = (),
        dns: Sequence[str] = (),
        uris: Sequence[str] = (),
        ips: Sequence[str] = (),
        serial: int | None = None,
        not_before: datetime = NOW - timedelta(days=1),
        not_after: datetime = NOW + timedelta(days=30),
        key: ec.EllipticCurvePrivateKey | None = None,
        is_ca: bool = False,
    ) -> x509.Certificate:
        attributes = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit) for unit in ou]
        if cn is not None:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        key = key or ec.generate_private_key(ec.SECP256R1())
        builder = _builder(x509.Name(attributes), self.cert.subject, key.public_key(), not_before, not_after, serial)
        builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.IPAddress(ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, _hash(self.key))

    def crl(
        self, revoked: Sequence[tuple[int, datetime, x509.ReasonFlags | None]] = ()
    ) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(NOW - timedelta(days=1))
            .next_update(NOW + timedelta(days=7))
        )
        for serial, when, reason in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(self.key, _hash(self.key))


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: Any,
    not_before: datetime,
    not_after: datetime,
    serial: int | None = None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def peer(cert: x509.Certificate) -> PeerIdentity:
    return PeerIdentity.from_certificate(cert)


def spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def save_crl(path: Path, crl: x509.CertificateRevocationList, encoding: str = "pem") -> Path:
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM if encoding == "pem" else serialization.Encoding.DER))
    return path


@pytest.fixture
def issuer(ca: trustme.CA) -> Issuer:
    return Issuer.from_trustme(ca)


@pytest.fixture
def other_issuer(other_ca: trustme.CA) -> Issuer:
    return Issuer.from_trustme(other_ca)


# --- source addresses ----------------------------------------------------------------------------------------


@dataclass
class AddressCase:
    allow: Sequence[str]
    deny: Sequence[str]
    source: str
    allowed: bool
    rule: str
    reason: str = ""


ADDRESS_CASES = {
    "no rules allow any source": AddressCase([], [], "203.0.113.9", True, "any-address"),
    "in allow-from": AddressCase(["10.0.0.0/8"], [], "10.1.2.3", True, "allow-from", "source in allow-from 10.0.0.0/8"),
    "outside allow-from": AddressCase(
        ["10.0.0.0/8"], [], "11.0.0.1", False, "allow-from", "source 11.0.0.1 not in allow-from (10.0.0.0/8)"
    ),
    "deny wins over allow": AddressCase(
        ["10.0.0.0/8"], ["10.0.0.0/24"], "10.0.0.7", False, "deny-from", "source 10.0.0.7 in deny-from 10.0.0.0/24"
    ),
    "allowed next to a denied subnet": AddressCase(["10.0.0.0/8"], ["10.0.0.0/24"], "10.0.1.7", True, "allow-from"),
    "deny-only refuses the denied": AddressCase([], ["192.168.0.0/16"], "192.168.4.4", False, "deny-from"),
    "deny-only allows the rest": AddressCase(
        [], ["192.168.0.0/16"], "8.8.8.8", True, "deny-from", "source not in deny-from"
    ),
    "bare IPv4 is a /32": AddressCase(["10.0.0.7"], [], "10.0.0.7", True, "allow-from", "10.0.0.7/32"),
    "bare IPv4 excludes its neighbour": AddressCase(["10.0.0.7"], [], "10.0.0.8", False, "allow-from"),
    "IPv6 network": AddressCase(["2001:db8::/32"], [], "2001:db8:1::5", True, "allow-from", "2001:db8::/32"),
    "IPv6 outside": AddressCase(["2001:db8::/32"], [], "2001:db9::1", False, "allow-from"),
    "bare IPv6 is a /128": AddressCase(["::1"], [], "::1", True, "allow-from", "::1/128"),
    "IPv4 source against IPv6-only rules": AddressCase(["2001:db8::/32"], [], "10.0.0.1", False, "allow-from"),
    "IPv4-mapped source matches IPv4 rule": AddressCase(["10.0.0.0/8"], [], "::ffff:10.0.0.7", True, "allow-from"),
    "IPv4-mapped source is denied by IPv4 rule": AddressCase([], ["10.0.0.0/8"], "::ffff:10.0.0.7", False, "deny-from"),
    "rule in mapped form matches plain IPv4": AddressCase([], ["::ffff:10.0.0.0/104"], "10.9.9.9", False, "deny-from"),
    "scoped link-local source": AddressCase(["fe80::/10"], [], "fe80::1%eth0", True, "allow-from"),
    "most specific allow network is named": AddressCase(
        ["10.0.0.0/8", "10.1.0.0/16"], [], "10.1.2.3", True, "allow-from", "10.1.0.0/16"
    ),
    "unreadable source fails closed": AddressCase(
        ["10.0.0.0/8"], [], "", False, "address", "source '' is not an IP address"
    ),
}


@pytest.mark.parametrize("case", ADDRESS_CASES.values(), ids=ADDRESS_CASES.keys())
def test_address_rules(case: AddressCase) -> None:
    decision = address_rules(case.allow, case.deny).check(case.source)
    assert (decision.allowed, decision.rule) == (case.allowed, case.rule), decision
    assert case.reason in decision.reason


def test_empty_address_rules_short_circuit_to_one_shared_decision() -> None:
    rules = address_rules()
    assert not rules.active
    assert rules.check("10.0.0.1") is rules.check("2001:db8::1") is address_rules().check("x")


def test_accepted_sources_reuse_decisions_instead_of_allocating() -> None:
    rules = address_rules(["10.0.0.0/8"], ["10.0.0.0/24"])
    assert rules.check("10.1.1.1") is rules.check("10.2.2.2")
    deny_only = address_rules([], ["10.0.0.0/24"])
    assert deny_only.check("192.0.2.1") is deny_only.check("192.0.2.2")


@pytest.mark.parametrize(
    ("allow", "deny", "message"),
    [
        (["10.0.0.300/8"], [], "--allow-from: '10.0.0.300/8' is not a network (use CIDR like 10.0.0.0/8)"),
        ([], ["banana"], "--deny-from: 'banana' is not a network (use CIDR like 10.0.0.0/8)"),
        (["10.0.0.7/8"], [], "--allow-from: '10.0.0.7/8' has host bits set (did you mean 10.0.0.0/8?)"),
        (["2001:db8::/200"], [], "--allow-from: '2001:db8::/200' is not a network"),
    ],
)
def test_malformed_networks_name_the_flag_and_value(allow: list[str], deny: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        address_rules(allow, deny)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


# --- identity ------------------------------------------------------------------------------------------------


@dataclass
class IdentityCase:
    rules: dict[str, Any]
    cert: dict[str, Any]
    allowed: bool
    rule: str
    reason: str = ""


IDENTITY_CASES = {
    "CN matches": IdentityCase({"cn": ["alice"]}, {"cn": "alice"}, True, "allow-cn", "CN=alice matched allow-cn"),
    "CN is exact": IdentityCase({"cn": ["alice"]}, {"cn": "Alice"}, False, "identity"),
    "wrong CN lists the allowed values": IdentityCase(
        {"cn": ["alice"], "ou": ["eng"]},
        {"cn": "bob", "ou": ["sales"]},
        False,
        "identity",
        "CN=bob, OU=sales not allowed (allowed: CN alice; OU eng)",
    ),
    "one of several OUs matches": IdentityCase(
        {"ou": ["eng"]}, {"cn": "bob", "ou": ["sales", "eng"]}, True, "allow-ou", "OU=eng matched allow-ou"
    ),
    "missing OU is said": IdentityCase(
        {"cn": ["alice"], "ou": ["eng"]},
        {"cn": "bob"},
        False,
        "identity",
        "CN=bob not allowed (no OU; allowed: CN alice; OU eng)",
    ),
    "DNS SAN matches": IdentityCase(
        {"dns": ["db.example.org"]}, {"dns": ["db.example.org"]}, True, "allow-dns", "DNS SAN db.example.org"
    ),
    "DNS SAN ignores case and the root dot": IdentityCase(
        {"dns": ["DB.example.org."]}, {"dns": ["db.EXAMPLE.org"]}, True, "allow-dns"
    ),
    "DNS SAN is not a CN": IdentityCase({"dns": ["alice"]}, {"cn": "alice"}, False, "identity", "no DNS SAN"),
    "URI exact": IdentityCase(
        {"uri": ["spiffe://example.org/api"]}, {"uris": ["spiffe://example.org/api"]}, True, "allow-uri"
    ),
    "URI trailing slash is optional": IdentityCase(
        {"uri": ["spiffe://example.org/api"]}, {"uris": ["spiffe://example.org/api/"]}, True, "allow-uri"
    ),
    "URI mismatch names the SAN": IdentityCase(
        {"uri": ["spiffe://x/z"]},
        {"cn": None, "uris": ["spiffe://x/y"]},
        False,
        "identity",
        "URI SAN spiffe://x/y not allowed (allowed: URI spiffe://x/z)",
    ),
    "no URI SAN at all": IdentityCase(
        {"uri": ["spiffe://x/*"]}, {}, False, "identity", "certificate with no URI SAN not allowed"
    ),
    "* matches one segment": IdentityCase(
        {"uri": ["spiffe://example.org/ns/*/sa/api"]},
        {"uris": ["spiffe://example.org/ns/prod/sa/api"]},
        True,
        "allow-uri",
        "matched allow-uri spiffe://example.org/ns/*/sa/api",
    ),
    "* does not match two segments": IdentityCase(
        {"uri": ["spiffe://example.org/*/api"]}, {"uris": ["spiffe://example.org/a/b/api"]}, False, "identity"
    ),
    "* does not match an empty segment": IdentityCase(
        {"uri": ["spiffe://example.org/*/api"]}, {"uris": ["spiffe://example.org//api"]}, False, "identity"
    ),
    "* can stand for the trust domain": IdentityCase(
        {"uri": ["spiffe://*/api"]}, {"uris": ["spiffe://other.org/api"]}, True, "allow-uri"
    ),
    "** matches everything below": IdentityCase(
        {"uri": ["spiffe://example.org/ns/**"]}, {"uris": ["spiffe://example.org/ns/a/b/c"]}, True, "allow-uri"
    ),
    "** matches the prefix itself": IdentityCase(
        {"uri": ["spiffe://example.org/ns/**"]}, {"uris": ["spiffe://example.org/ns"]}, True, "allow-uri"
    ),
    "** does not match a longer segment": IdentityCase(
        {"uri": ["spiffe://example.org/ns/**"]}, {"uris": ["spiffe://example.org/nsx"]}, False, "identity"
    ),
    "pattern dots are literal": IdentityCase(
        {"uri": ["spiffe://example.org/a.b"]}, {"uris": ["spiffe://example.org/axb"]}, False, "identity"
    ),
    "allow-all takes any certificate": IdentityCase(
        {"allow_all": True}, {"cn": "mallory"}, True, "allow-all", "CN=mallory allowed by allow-all"
    ),
    "verify prefix names verify rules": IdentityCase(
        {"cn": ["db.internal"], "flag_prefix": "verify"}, {"cn": "db.internal"}, True, "verify-cn"
    ),
    "no verify rules leave the server to the hostname check": IdentityCase(
        {"flag_prefix": "verify"}, {"cn": "anything"}, True, "no-verify-rules"
    ),
    "no allow rules refuse everyone": IdentityCase({}, {"cn": "alice"}, False, "identity"),
}


@pytest.mark.parametrize("case", IDENTITY_CASES.values(), ids=IDENTITY_CASES.keys())
def test_identity_rules(issuer: Issuer, case: IdentityCase) -> None:
    decision = identity_rules(**case.rules).check(peer(issuer.issue(**case.cert)))
    assert (decision.allowed, decision.rule) == (case.allowed, case.rule), decision
    assert case.reason in decision.reason


def _pin_forms(digest: bytes) -> dict[str, str]:
    return {
        "lower hex": digest.hex(),
        "upper hex": digest.hex().upper(),
        "colon hex": ":".join(f"{b:02X}" for b in digest),
        "base64": base64.b64encode(digest).decode(),
        "url-safe base64 unpadded": base64.urlsafe_b64encode(digest).decode().rstrip("="),
        "curl pin": "sha256//" + base64.b64encode(digest).decode(),
    }


@pytest.mark.parametrize("form", _pin_forms(b"\0" * 32).keys())
def test_spki_pin_is_accepted_in_every_common_spelling(issuer: Issuer, form: str) -> None:
    cert = issuer.issue(cn="pinned")
    pin = _pin_forms(spki_sha256(cert))[form]
    rules = identity_rules(spki_sha256=[pin])
    decision = rules.check(peer(cert))
    assert (decision.allowed, decision.rule) == (True, "allow-spki-sha256")
    assert not rules.check(peer(issuer.issue(cn="pinned"))).allowed  # same name, other key


def test_peer_identity_hashes_the_spki_as_the_certificate_encodes_it(issuer: Issuer) -> None:
    cert = issuer.issue()
    assert peer(cert).spki_sha256 == spki_sha256(cert).hex()


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"spki_sha256": ["abc"]}, "--allow-spki-sha256: 'abc' is not a SHA-256 hash"),
        ({"spki_sha256": ["ab" * 33]}, "--allow-spki-sha256: "),
        ({"spki_sha256": ["zz"], "flag_prefix": "verify"}, "--verify-spki-sha256: 'zz' is not a SHA-256 hash"),
        ({"uri": ["spiffe://x/**/y"]}, "--allow-uri: 'spiffe://x/**/y': '**' may only be the last segment"),
        ({"uri": ["spiffe://x/svc-*"]}, "--allow-uri: 'spiffe://x/svc-*': '*' must be a whole path segment"),
        ({"uri": ["example.org/api"]}, "--allow-uri: 'example.org/api' is not a URI"),
        ({"cn": [""]}, "--allow-cn: empty value"),
        ({"ou": [" "], "flag_prefix": "verify"}, "--verify-ou: empty value"),
    ],
)
def test_malformed_identity_rules_name_the_flag_and_value(rules: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        identity_rules(**rules)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        ({"cn": "alice", "uris": ["spiffe://x/y"]}, "CN=alice"),
        ({"cn": None, "uris": ["spiffe://x/y"]}, "URI=spiffe://x/y"),
        ({"cn": None, "dns": ["db.example.org"]}, "DNS=db.example.org"),
        ({"cn": None, "ips": ["10.0.0.7"]}, "IP=10.0.0.7"),
    ],
)
def test_describe_names_the_peer_briefly(issuer: Issuer, cert: dict[str, Any], expected: str) -> None:
    assert peer(issuer.issue(**cert)).describe() == expected


def test_describe_stays_short_for_long_names(issuer: Issuer) -> None:
    text = peer(issuer.issue(cn=None, uris=["spiffe://example.org/" + "x" * 300])).describe()
    assert len(text) <= 100
    assert text.startswith("URI=spiffe://example.org/xxx")


def test_from_der_is_cached_for_reconnecting_clients(issuer: Issuer) -> None:
    data = der(issuer.issue(ou=["eng"], dns=["a.example"], ips=["::1"]))
    first = PeerIdentity.from_der(data)
    assert PeerIdentity.from_der(bytes(bytearray(data))) is first
    assert first.organizational_units == ("eng",)
    assert first.ip_addresses == ("::1",)
    assert first.not_after.tzinfo is not None


def test_garbage_der_is_a_certificate_error() -> None:
    with pytest.raises(CertificateError, match=r"not a DER X\.509 certificate"):
        PeerIdentity.from_der(b"\x30\x03\x02\x01\x00")


# --- revocation ----------------------------------------------------------------------------------------------


def test_revoked_leaf_is_refused_with_serial_date_and_reason(tmp_path: Path, issuer: Issuer) -> None:
    cert = issuer.issue(serial=0x1F)
    crl = issuer.crl([(0x1F, datetime(2026, 5, 1, tzinfo=UTC), x509.ReasonFlags.key_compromise)])
    revocation = RevocationList.load([save_crl(tmp_path / "crl.pem", crl)], [issuer.cert])
    assert revocation.check(peer(cert)) == Decision(False, "crl", "revoked (serial 0x1f, 2026-05-01, keyCompromise)")
    assert revocation.revoked_by(peer(cert)) == str(tmp_path / "crl.pem")


def test_revocation_without_reason_code(tmp_path: Path, issuer: Issuer) -> None:
    crl = issuer.crl([(0x1F, datetime(2026, 5, 1, tzinfo=UTC), None)])
    revocation = RevocationList.load([save_crl(tmp_path / "crl.der", crl, "der")], [issuer.cert])
    decision = revocation.check(peer(issuer.issue(serial=0x1F)))
    assert decision is not None
    assert decision.reason == "revoked (serial 0x1f, 2026-05-01)"


def test_unrevoked_leaf_passes(tmp_path: Path, issuer: Issuer) -> None:
    crl = issuer.crl([(0x1F, NOW, None)])
    revocation = RevocationList.load([save_crl(tmp_path / "crl.pem", crl)], [issuer.cert])
    assert revocation.check(peer(issuer.issue(serial=0x20))) is None


def test_same_serial_from_another_issuer_is_not_revoked(tmp_path: Path, issuer: Issuer, other_issuer: Issuer) -> None:
    crl = issuer.crl([(0x1F, NOW, None)])
    revocation = RevocationList.load([save_crl(tmp_path / "crl.pem", crl)], [issuer.cert, other_issuer.cert])
    assert revocation.check(peer(other_issuer.issue(serial=0x1F))) is None


def test_several_crl_files_and_several_crls_in_one_pem(tmp_path: Path, issuer: Issuer, other_issuer: Issuer) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(
        issuer.crl([(1, NOW, None)]).public_bytes(serialization.Encoding.PEM)
        + other_issuer.crl([(2, NOW, None)]).public_bytes(serialization.Encoding.PEM)
    )
    third = save_crl(tmp_path / "third.der", issuer.crl([(3, NOW, None)]), "der")
    revocation = RevocationList.load([both, str(third)], [issuer.cert, other_issuer.cert])
    assert len(revocation.sources) == 3
    assert revocation.check(peer(issuer.issue(serial=1))) is not None
    assert revocation.check(peer(other_issuer.issue(serial=2))) is not None
    assert revocation.check(peer(issuer.issue(serial=3))) is not None
    assert revocation.check(peer(issuer.issue(serial=2))) is None


def test_crl_from_another_ca_is_refused_at_load(tmp_path: Path, issuer: Issuer, other_issuer: Issuer) -> None:
    path = save_crl(tmp_path / "crl.pem", other_issuer.crl())
    with pytest.raises(CertificateError) as err:
        RevocationList.load([path], [issuer.cert])
    assert str(err.value).startswith(f"{path}: not signed by any CA in --cacert")


def test_crl_with_the_right_name_but_a_forged_signature_is_refused(tmp_path: Path, issuer: Issuer) -> None:
    forger = Issuer(issuer.cert, ec.generate_private_key(ec.SECP256R1()))
    path = save_crl(tmp_path / "crl.pem", forger.crl([(5, NOW, None)]))
    with pytest.raises(CertificateError, match="not signed by any CA in --cacert"):
        RevocationList.load([path], [issuer.cert])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--crl: cannot read {path}: No such file or directory"),
        (b"hello", "--crl: {path} is not a CRL"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "--crl: {path} is not a CRL"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "--crl: {path} is not a CRL"),
    ],
)
def test_unusable_crl_files_are_certificate_errors(
    tmp_path: Path, issuer: Issuer, content: bytes | None, message: str
) -> None:
    path = tmp_path / "crl.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CertificateError) as err:
        RevocationList.load([path], [issuer.cert])
    assert str(err.value).startswith(message.format(path=path))
    assert "\n" not in str(err.value)


# --- validity and the whole policy ---------------------------------------------------------------------------


def test_validity_names_the_date(issuer: Issuer) -> None:
    expired = peer(
        issuer.issue(not_before=datetime(2025, 1, 1, tzinfo=UTC), not_after=datetime(2026, 1, 1, tzinfo=UTC))
    )
    assert check_validity(expired, now=NOW) == Decision(
        False, "expired", "client certificate expired 2026-01-01 00:00 UTC"
    )
    future = peer(
        issuer.issue(not_before=datetime(2027, 3, 4, 5, 6, tzinfo=UTC), not_after=datetime(2028, 1, 1, tzinfo=UTC))
    )
    decision = check_validity(future, now=NOW, role="server")
    assert decision == Decision(False, "not-yet-valid", "server certificate not valid until 2027-03-04 05:06 UTC")
    assert check_validity(peer(issuer.issue()), now=NOW).allowed


def _policy(issuer: Issuer, tmp_path: Path, revoked: Sequence[int] = (), **flags: Any) -> Policy:
    crl = save_crl(tmp_path / "crl.pem", issuer.crl([(s, NOW - timedelta(hours=1), None) for s in revoked]))
    flags.setdefault("allow_cn", ["alice"])
    return build_policy(server_access(crl=[str(crl)], **flags), ca_certs=[issuer.cert])


@dataclass
class PeerCase:
    cert: dict[str, Any] | None
    rule: str
    reason: str
    revoked: Sequence[int] = ()
    flags: dict[str, Any] = field(default_factory=dict)


PEER_CASES = {
    "allowed": PeerCase({"cn": "alice"}, "allow-cn", "CN=alice matched allow-cn"),
    "no certificate": PeerCase(None, "no-client-cert", "no client certificate"),
    "expired": PeerCase({"not_after": NOW - timedelta(days=1)}, "expired", "client certificate expired"),
    "not yet valid": PeerCase({"not_before": NOW + timedelta(days=1)}, "not-yet-valid", "not valid until"),
    "revoked": PeerCase({"serial": 0x1F}, "crl", "revoked (serial 0x1f", revoked=[0x1F]),
    "expired beats revoked": PeerCase(
        {"serial": 0x1F, "not_after": NOW - timedelta(days=1)}, "expired", "expired", revoked=[0x1F]
    ),
    "revoked beats identity": PeerCase({"cn": "bob", "serial": 0x1F}, "crl", "revoked", revoked=[0x1F]),
    "wrong identity": PeerCase({"cn": "bob"}, "identity", "CN=bob not allowed (allowed: CN alice)"),
    "authentication disabled": PeerCase(
        None, "no-authentication", "--disable-authentication", flags={"disable_authentication": True, "allow_cn": []}
    ),
}


@pytest.mark.parametrize("case", PEER_CASES.values(), ids=PEER_CASES.keys())
def test_check_peer(tmp_path: Path, issuer: Issuer, case: PeerCase) -> None:
    if case.flags.get("disable_authentication"):
        policy = build_policy(server_access(disable_authentication=True))
    else:
        policy = _policy(issuer, tmp_path, case.revoked, **case.flags)
    leaf = der(issuer.issue(**case.cert)) if case.cert is not None else None
    decision, identity = policy.check_peer(leaf, now=NOW)
    assert decision.rule == case.rule, decision
    assert case.reason in decision.reason
    assert decision.allowed == (case.rule in ("allow-cn", "no-authentication"))
    assert (identity is None) == (leaf is None)


def test_client_mode_names_the_server(issuer: Issuer) -> None:
    policy = Policy(address_rules(), identity_rules(cn=["db"], flag_prefix="verify"), RevocationList())
    assert policy.check_peer(None)[0] == Decision(False, "no-server-cert", "no server certificate")
    expired = der(issuer.issue(cn="db", not_after=NOW - timedelta(days=1)))
    assert policy.check_peer(expired, now=NOW)[0].reason.startswith("server certificate expired")


def test_check_peer_uses_the_clock_when_no_time_is_given(issuer: Issuer) -> None:
    policy = build_policy(server_access(allow_cn=["alice"]))
    fresh = issuer.issue(
        not_before=datetime.now(UTC) - timedelta(hours=1), not_after=datetime.now(UTC) + timedelta(hours=1)
    )
    assert policy.check_peer(der(fresh))[0].allowed
    assert (
        policy.check_peer(
            der(issuer.issue(not_before=datetime(2000, 1, 1, tzinfo=UTC), not_after=datetime(2001, 1, 1, tzinfo=UTC)))
        )[0].rule
        == "expired"
    )


@pytest.mark.parametrize(
    ("source", "cn", "address_ok", "peer_ok"),
    [
        ("10.1.2.3", "alice", True, True),
        ("10.1.2.3", "bob", True, False),
        ("192.0.2.1", "alice", False, True),
        ("192.0.2.1", "bob", False, False),
    ],
)
def test_address_and_identity_must_both_pass(
    issuer: Issuer, source: str, cn: str, address_ok: bool, peer_ok: bool
) -> None:
    policy = build_policy(server_access(allow_cn=["alice"], allow_from=["10.0.0.0/8"]))
    assert policy.check_address(source).allowed is address_ok
    assert policy.check_peer(der(issuer.issue(cn=cn)), now=NOW)[0].allowed is peer_ok


# --- build_policy: ghostunnel's rules on which flags go together ---------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {},
            "server mode needs one of --allow-all, --allow-cn, --allow-ou, --allow-dns, --allow-ip, --allow-uri, "
            "--allow-spki-sha256, --allow-spki-pin, --allow-policy/--allow-query, or --disable-authentication",
        ),
        ({"allow_from": ["10.0.0.0/8"]}, "server mode needs one of --allow-all"),
        ({"disable_authentication": True, "allow_cn": ["alice"]}, "--disable-authentication contradicts --allow-cn"),
        ({"disable_authentication": True, "allow_all": True}, "--disable-authentication contradicts --allow-all"),
        ({"disable_authentication": True, "crl": ["crl.pem"]}, "--disable-authentication contradicts --crl"),
        ({"allow_all": True, "allow_ou": ["eng"]}, "--allow-all and --allow-ou are mutually exclusive"),
        ({"allow_cn": ["alice"], "allow_from": ["10.0.0.300/8"]}, "--allow-from: '10.0.0.300/8' is not a network"),
        ({"allow_uri": ["spiffe://x/**/y"]}, "--allow-uri: "),
        ({"allow_cn": ["alice"], "crl": ["/nonexistent/crl.pem"]}, "--crl: cannot read /nonexistent/crl.pem"),
    ],
)
def test_build_policy_refuses_flag_combinations(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_policy(server_access(**flags))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_build_policy_accepts_the_usual_shapes() -> None:
    assert build_policy(server_access(allow_all=True, allow_from=["10.0.0.0/8"])).identity is not None
    open_door = build_policy(server_access(disable_authentication=True, deny_from=["192.0.2.0/24"]))
    assert open_door.identity is None
    assert not open_door.check_address("192.0.2.9").allowed
    assert "authentication disabled" in open_door.summary()


def test_build_policy_takes_the_access_options_as_they_come_from_click() -> None:
    @click.command()
    @access_options
    def command(**opts: Any) -> None:
        pass

    option_names = {param.name for param in command.params}
    assert option_names <= set(inspect.signature(server_access).parameters)
    context = command.make_context("check", ["--allow-cn", "alice", "--allow-from", "10.0.0.0/8"])
    policy = build_policy(server_access(**context.params))
    assert policy.check_address("10.0.0.1").allowed


# --- chain verification (policy check) -----------------------------------------------------------------------


def test_leaf_signed_by_a_ca_in_the_bundle(issuer: Issuer, other_issuer: Issuer) -> None:
    decision = verify_chain(issuer.issue(), [], [other_issuer.cert, issuer.cert], now=NOW)
    assert (decision.allowed, decision.rule) == (True, "chain")


def test_leaf_from_another_ca_is_untrusted(issuer: Issuer) -> None:
    stranger = Issuer.root("other CA")
    decision = verify_chain(stranger.issue(), [], [issuer.cert], now=NOW)
    assert decision == Decision(False, "untrusted", "issuer CN=other CA is not in --cacert")


def test_chain_through_an_intermediate(issuer: Issuer) -> None:
    middle = issuer.intermediate("team CA")
    leaf = middle.issue()
    decision = verify_chain(leaf, [middle.cert], [issuer.cert], now=NOW)
    assert decision.allowed
    assert "via CN=team CA" in decision.reason
    assert verify_chain(leaf, [], [issuer.cert], now=NOW).reason == "issuer CN=team CA is not in --cacert"


def test_same_name_different_key_is_untrusted() -> None:
    real, impostor = Issuer.root("corp CA"), Issuer.root("corp CA")
    decision = verify_chain(impostor.issue(), [], [real.cert], now=NOW)
    assert not decision.allowed
    assert "did not sign" in decision.reason


def test_expired_intermediate_and_ca_are_untrusted(issuer: Issuer) -> None:
    middle = issuer.intermediate("old team CA", not_after=NOW - timedelta(days=1))
    decision = verify_chain(middle.issue(), [middle.cert], [issuer.cert], now=NOW)
    assert decision.reason.startswith("intermediate CN=old team CA expired")
    old_root = Issuer.root("old CA", not_after=NOW + timedelta(days=1))
    decision = verify_chain(old_root.issue(), [], [old_root.cert], now=NOW + timedelta(days=2))
    assert decision.reason.startswith("CA CN=old CA expired")


def test_an_intermediate_must_be_a_ca(issuer: Issuer) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    not_a_ca = issuer.issue(cn="leafy", key=key)
    leaf = Issuer(not_a_ca, key).issue()
    decision = verify_chain(leaf, [not_a_ca], [issuer.cert], now=NOW)
    assert decision.reason == "intermediate CN=leafy is not a CA certificate"


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), id="rsa"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, id="ed25519"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
    ],
)
def test_signatures_of_every_key_type_are_checked(tmp_path: Path, key: Any) -> None:
    root = Issuer.root("typed CA", key())
    assert verify_chain(root.issue(), [], [root.cert], now=NOW).allowed
    crl = save_crl(tmp_path / "crl.pem", root.crl([(7, NOW, None)]))
    assert RevocationList.load([crl], [root.cert]).check(peer(root.issue(serial=7))) is not None


def test_no_ca_bundle_means_untrusted(issuer: Issuer) -> None:
    assert verify_chain(issuer.issue(), [], [], now=NOW).rule == "untrusted"
