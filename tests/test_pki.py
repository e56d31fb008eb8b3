"""The built-in CA: what it puts in certificates, that real TLS stacks accept them, and how it refuses bad input."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from tlsgate.errors import CertificateError, ConfigError
from tlsgate.pki import (
    CertificateAuthority,
    IssuedCert,
    default_basename,
    describe_file,
    load_certificates,
    load_private_key,
    parse_serial,
    spki_sha256,
    write_private_file,
    write_public_file,
)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return tmp_path / "ca"


@pytest.fixture
def local_ca(ca_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.create(ca_dir)


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


# --------------------------------------------------------------------------------------------------------------
# The CA certificate


def test_new_ca_is_a_self_signed_p256_ca_with_critical_constraints(local_ca: CertificateAuthority) -> None:
    cert = local_ca.certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "tlsgate local CA"
    cert.verify_directly_issued_by(cert)

    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign and usage.value.digital_signature
    assert not usage.value.key_encipherment
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_ca_is_valid_for_ten_years_by_default(local_ca: CertificateAuthority) -> None:
    cert = local_ca.certificate
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3650, hours=1)
    assert cert.not_valid_before_utc <= datetime.now(UTC)


def test_ca_files_key_is_owner_only_and_record_starts_empty(local_ca: CertificateAuthority, ca_dir: Path) -> None:
    assert local_ca.cert_path == ca_dir / "ca.pem"
    assert mode(ca_dir / "ca.key") == 0o600
    assert mode(ca_dir / "ca.pem") == 0o644
    state = json.loads((ca_dir / "ca.json").read_text())
    assert state == {"format": "tlsgate-ca/1", "crl_number": 0, "issued": {}, "revoked": {}}
    assert load_certificates(ca_dir / "ca.pem") == [local_ca.certificate]
    assert CertificateAuthority.exists(ca_dir)


def test_rsa_ca_has_the_requested_key_size_and_name(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "rsa", rsa_bits=2048, name="Example Ops CA", days=30)
    key = ca.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    assert ca.name == "Example Ops CA"
    assert ca.certificate.not_valid_after_utc - ca.certificate.not_valid_before_utc <= timedelta(days=30, hours=1)


def test_existing_ca_is_not_replaced_without_force(local_ca: CertificateAuthority, ca_dir: Path) -> None:
    with pytest.raises(CertificateError, match=r"ca\.pem already exists; pass --force"):
        CertificateAuthority.create(ca_dir)
    replaced = CertificateAuthority.create(ca_dir, force=True)
    assert replaced.certificate != local_ca.certificate
    assert CertificateAuthority.load(ca_dir).certificate == replaced.certificate


def test_encrypted_ca_key_opens_only_with_its_password(ca_dir: Path) -> None:
    CertificateAuthority.create(ca_dir, key_password=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in (ca_dir / "ca.key").read_bytes()
    with pytest.raises(CertificateError, match=r"ca\.key: wrong password \(--ca-pass\)"):
        CertificateAuthority.load(ca_dir, key_password=b"battery staple")
    with pytest.raises(CertificateError, match=r"ca\.key is encrypted: give its password with --ca-pass"):
        CertificateAuthority.load(ca_dir)
    assert CertificateAuthority.load(ca_dir, key_password=b"correct horse").issue("localhost")


def test_loading_a_missing_ca_directory_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"no such CA directory; create one with `tlsgate certs ca --out "):
        CertificateAuthority.load(tmp_path / "nope")


def test_loading_a_directory_without_a_ca_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"has no CA \(ca\.pem not found\)"):
        CertificateAuthority.load(tmp_path)


def test_a_leaf_certificate_cannot_act_as_ca(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf = local_ca.issue("localhost")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "ca.pem").write_bytes(leaf.cert_pem)
    (fake / "ca.key").write_bytes(leaf.private_key_pem())
    with pytest.raises(
        CertificateError, match=r"ca\.pem is not a CA certificate \(its BasicConstraints say ca=False\)"
    ):
        CertificateAuthority.load(fake)


def test_a_ca_key_that_belongs_to_another_certificate_is_refused(local_ca: CertificateAuthority, ca_dir: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    (ca_dir / "ca.key").write_bytes(other.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(CertificateError, match=r"ca\.key is not the key of .*ca\.pem"):
        CertificateAuthority.load(ca_dir)


def test_a_damaged_ca_record_is_reported_when_the_ca_is_opened(local_ca: CertificateAuthority, ca_dir: Path) -> None:
    (ca_dir / "ca.json").write_text("{not json")
    with pytest.raises(CertificateError, match=r"ca\.json: not valid JSON"):
        CertificateAuthority.load(ca_dir)
    (ca_dir / "ca.json").write_text('{"format": "something else"}')
    with pytest.raises(CertificateError, match=r"ca\.json: not a tlsgate CA record"):
        CertificateAuthority.load(ca_dir)


def test_a_ca_made_elsewhere_is_adopted_and_its_record_created(tmp_path: Path, ca: trustme.CA) -> None:
    ca_dir = tmp_path / "imported"
    ca_dir.mkdir()
    ca.cert_pem.write_to_path(str(ca_dir / "ca.pem"))
    ca.private_key_pem.write_to_path(str(ca_dir / "ca.key"))
    imported = CertificateAuthority.load(ca_dir)
    leaf = imported.issue("localhost")
    leaf.certificate.verify_directly_issued_by(imported.certificate)
    assert imported.issued_serials() == {leaf.serial}


# --------------------------------------------------------------------------------------------------------------
# Leaf certificates


def test_server_certificate_has_server_eku_sans_and_leaf_constraints(local_ca: CertificateAuthority) -> None:
    leaf = local_ca.issue("web", dns=["localhost", "*.example.test"], ips=["127.0.0.1", "::1"])
    cert = leaf.certificate
    assert cert.subject.rfc4514_string() == "CN=web"
    assert cert.issuer == local_ca.certificate.subject
    assert sans(cert) == [
        x509.DNSName("localhost"),
        x509.DNSName("*.example.test"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(ca=False, path_length=None)
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and not usage.value.key_encipherment and not usage.value.key_cert_sign
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca_ski = ext(local_ca.certificate, x509.SubjectKeyIdentifier).value
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        leaf.private_key.public_key()
    )
    assert leaf.chain == [cert, local_ca.certificate]


def test_server_certificate_verifies_against_the_ca_for_its_names(local_ca: CertificateAuthority) -> None:
    leaf = local_ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"])
    policy = PolicyBuilder().store(Store([local_ca.certificate])).time(datetime.now(UTC))
    chain = policy.build_server_verifier(x509.DNSName("localhost")).verify(leaf.certificate, [])
    assert chain == [leaf.certificate, local_ca.certificate]
    by_ip = policy.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    assert by_ip.verify(leaf.certificate, [])


def test_client_certificate_verifies_as_a_client_and_carries_its_ous(local_ca: CertificateAuthority) -> None:
    leaf = local_ca.issue("alice", ous=["eng", "ops"], uris=["spiffe://example.test/alice"], client=True, server=False)
    cert = leaf.certificate
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == ["eng", "ops"]
    assert sans(cert) == [x509.DNSName("alice"), x509.UniformResourceIdentifier("spiffe://example.test/alice")]
    verifier = PolicyBuilder().store(Store([local_ca.certificate])).build_client_verifier()
    verified = verifier.verify(cert, [])
    assert verified.chain == [cert, local_ca.certificate]


def test_client_and_server_flags_together_give_both_usages(local_ca: CertificateAuthority) -> None:
    cert = local_ca.issue("both.test", client=True, server=True).certificate
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("localhost", x509.DNSName("localhost")),
        ("API.Example.Test", x509.DNSName("api.example.test")),
        ("*.example.test", x509.DNSName("*.example.test")),
        ("café.test", x509.DNSName("xn--caf-dma.test")),
        ("10.1.2.3", x509.IPAddress(ipaddress.ip_address("10.1.2.3"))),
        ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
    ],
)
def test_the_name_becomes_the_san_when_no_dns_or_ip_is_given(
    local_ca: CertificateAuthority, name: str, expected: x509.GeneralName
) -> None:
    assert sans(local_ca.issue(name).certificate) == [expected]


def test_explicit_dns_names_replace_the_name_as_san(local_ca: CertificateAuthority) -> None:
    assert sans(local_ca.issue("frontend", dns=["www.example.test"]).certificate) == [x509.DNSName("www.example.test")]


def test_client_certificate_for_a_person_may_have_no_san(local_ca: CertificateAuthority) -> None:
    cert = local_ca.issue("Alice Smith", client=True, server=False).certificate
    assert cert.subject.rfc4514_string() == "CN=Alice Smith"
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_server_certificate_without_any_host_name_is_refused(local_ca: CertificateAuthority) -> None:
    with pytest.raises(ConfigError, match=r"--name 'My Server' is neither a DNS name nor an IP address"):
        local_ca.issue("My Server")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dns": ["bad_name.test"]}, r"--dns 'bad_name.test': not a valid DNS name"),
        ({"dns": ["exa mple.test"]}, r"--dns 'exa mple.test': not a valid DNS name"),
        ({"dns": ["-lead.test"]}, r"--dns '-lead.test': not a valid DNS name"),
        ({"dns": ["a..b"]}, r"--dns 'a..b': not a valid DNS name"),
        ({"dns": ["10.0.0.256"]}, r"--dns '10.0.0.256': not a valid DNS name"),
        ({"dns": ["foo.*.test"]}, r"--dns 'foo.\*.test': not a valid DNS name"),
        ({"dns": ["x" * 64 + ".test"]}, r"not a valid DNS name"),
        ({"ips": ["1.2.3.999"]}, r"--ip '1.2.3.999': not an IP address"),
        ({"ips": ["fe80::1%eth0"]}, r"--ip 'fe80::1%eth0': not an IP address"),
        ({"ips": ["localhost"]}, r"--ip 'localhost': not an IP address"),
        ({"uris": ["not a uri"]}, r"--uri 'not a uri': not an absolute URI"),
        ({"uris": ["/relative/path"]}, r"--uri '/relative/path': not an absolute URI"),
        ({"ous": ["x" * 65]}, r"--ou 'x+\.\.\.x+': must be 1 to 64 characters"),
        ({"days": 0}, r"--days 0: a certificate must be valid for at least 1 day"),
        ({"server": False, "client": False}, r"--server, --client or both"),
        ({"rsa_bits": 1024}, r"--rsa 1024: RSA keys must have at least 2048 bits"),
    ],
)
def test_bad_names_and_options_are_refused_with_the_flag_and_value(
    local_ca: CertificateAuthority, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        local_ca.issue("svc.test", **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    assert local_ca.issued_serials() == set()


def test_too_long_common_name_is_refused(local_ca: CertificateAuthority) -> None:
    with pytest.raises(ConfigError, match=r"--name '.+': must be 1 to 64 characters"):
        local_ca.issue("a" * 65, dns=["ok.test"])


def test_rsa_leaf_key_also_allows_key_encipherment(local_ca: CertificateAuthority) -> None:
    leaf = local_ca.issue("legacy.test", rsa_bits=2048)
    assert isinstance(leaf.private_key, rsa.RSAPrivateKey) and leaf.private_key.key_size == 2048
    usage = ext(leaf.certificate, x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment


def test_leaf_validity_defaults_to_825_days_and_never_outlives_the_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "short", days=100)
    cert = ca.issue("localhost").certificate
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc
    long_ca = CertificateAuthority.create(tmp_path / "long")
    cert = long_ca.issue("localhost").certificate
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=825)


def test_serials_are_large_random_and_recorded(local_ca: CertificateAuthority, ca_dir: Path) -> None:
    serials = {local_ca.issue(f"host{i}.test").serial for i in range(5)}
    assert len(serials) == 5
    assert all(serial.bit_length() > 63 for serial in serials)
    assert local_ca.issued_serials() == serials
    # A second CA object on the same directory sees the same record: the file is the truth, not the object.
    assert CertificateAuthority.load(ca_dir).issued_serials() == serials
    issued = json.loads((ca_dir / "ca.json").read_text())["issued"]
    assert {entry["subject"] for entry in issued.values()} == {f"CN=host{i}.test" for i in range(5)}


# --------------------------------------------------------------------------------------------------------------
# Files


def test_written_files_have_the_right_contents_and_modes(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf = local_ca.issue("localhost")
    out = tmp_path / "out"
    paths = leaf.write(out)
    assert paths == {"cert": out / "localhost.pem", "key": out / "localhost.key", "chain": out / "localhost-chain.pem"}
    assert load_certificates(paths["cert"]) == [leaf.certificate]
    assert load_certificates(paths["chain"]) == [leaf.certificate, local_ca.certificate]
    assert mode(paths["key"]) == 0o600
    assert mode(paths["cert"]) == 0o644
    key = load_private_key(paths["key"], None)
    assert key.public_key() == leaf.private_key.public_key()


def test_existing_files_are_not_overwritten_without_force(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    (tmp_path / "localhost-chain.pem").write_text("keep me")
    leaf = local_ca.issue("localhost")
    with pytest.raises(CertificateError, match=r"localhost-chain\.pem already exists; pass --force to replace it"):
        leaf.write(tmp_path)
    # All targets are checked before any is written.
    assert not (tmp_path / "localhost.pem").exists()
    assert not (tmp_path / "localhost.key").exists()
    assert (tmp_path / "localhost-chain.pem").read_text() == "keep me"
    leaf.write(tmp_path, force=True)
    assert load_certificates(tmp_path / "localhost-chain.pem")[0] == leaf.certificate


def test_forced_private_file_is_owner_only_even_over_a_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "secret.key"
    target.write_text("old")
    target.chmod(0o644)
    with pytest.raises(CertificateError, match=r"secret\.key already exists"):
        write_private_file(target, b"new", force=False)
    write_private_file(target, b"new", force=True)
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no temporary file left behind


def test_writing_into_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CertificateError, match=r"cannot write"):
        write_public_file(blocker / "x.pem", b"data", force=False)


def test_wildcard_names_get_file_friendly_basenames(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    assert default_basename("*.example.test") == "_wildcard.example.test"
    assert default_basename("../../etc/passwd") == "_.._etc_passwd"
    assert default_basename("Alice Smith") == "Alice_Smith"
    paths = local_ca.issue("*.example.test").write(tmp_path)
    assert paths["cert"].name == "_wildcard.example.test.pem"


def test_encrypted_key_round_trips_and_a_wrong_password_is_one_line(
    local_ca: CertificateAuthority, tmp_path: Path
) -> None:
    leaf = local_ca.issue("localhost")
    paths = leaf.write(tmp_path, key_password=b"s3cret")
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in paths["key"].read_bytes()
    key = load_private_key(paths["key"], b"s3cret")
    assert key.public_key() == leaf.private_key.public_key()
    with pytest.raises(CertificateError, match=r"localhost\.key: wrong password \(--key-pass\)$"):
        load_private_key(paths["key"], b"nope")
    with pytest.raises(CertificateError, match=r"localhost\.key is encrypted: give its password with --key-pass"):
        load_private_key(paths["key"], None)
    # Python's ssl reads the same file with the same password.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(paths["chain"], paths["key"], password=b"s3cret")


def test_a_password_for_an_unencrypted_key_is_refused(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    # One passphrase rule for every key tlsgate reads (tls/x509.py), the server flags' and ghostunnel's.
    paths = local_ca.issue("localhost").write(tmp_path)
    with pytest.raises(CertificateError, match=r"localhost\.key: the key is not encrypted, but --key-pass was given$"):
        load_private_key(paths["key"], b"unneeded")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", r"not a private key"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", r"not a private key \(no PRIVATE KEY"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", r"not a private key"),
    ],
)
def test_files_that_are_not_keys_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(CertificateError, match=message):
        load_private_key(path, None)


def test_key_can_be_read_from_a_combined_cert_and_key_file(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf = local_ca.issue("localhost")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(leaf.cert_pem + leaf.private_key_pem())
    assert load_private_key(combined, None).public_key() == leaf.private_key.public_key()


def test_pkcs12_round_trip_with_and_without_a_password(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf = local_ca.issue("alice", client=True, server=False)
    paths = leaf.write(tmp_path, p12=True, p12_password=b"storepass")
    assert mode(paths["p12"]) == 0o600
    store = pkcs12.load_pkcs12(paths["p12"].read_bytes(), b"storepass")
    assert store.cert is not None and store.cert.certificate == leaf.certificate
    assert store.cert.friendly_name == b"alice"
    assert [extra.certificate for extra in store.additional_certs] == [local_ca.certificate]
    assert store.key is not None and store.key.public_key() == leaf.private_key.public_key()
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(paths["p12"].read_bytes(), b"wrong")

    open_store = pkcs12.load_pkcs12(leaf.pkcs12(), None)
    assert open_store.cert is not None and open_store.cert.certificate == leaf.certificate


def test_a_store_password_alone_asks_for_a_p12(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    paths = local_ca.issue("localhost").write(tmp_path, p12_password=b"pw")
    assert paths["p12"] == tmp_path / "localhost.p12"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", r"not a certificate \(expected PEM or DER\)"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", r"certificate 1 in the file is damaged"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", r"no certificate in this file \(found: "),
    ],
)
def test_files_that_are_not_certificates_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(CertificateError, match=message):
        load_certificates(path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"missing\.pem: no such file"):
        load_certificates(tmp_path / "missing.pem")
    with pytest.raises(CertificateError, match=r"is a directory, not a file"):
        load_private_key(tmp_path, None)


def test_der_certificates_load(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    path = tmp_path / "ca.der"
    path.write_bytes(local_ca.certificate.public_bytes(Encoding.DER))
    assert load_certificates(path) == [local_ca.certificate]


def test_spki_sha256_is_the_hash_of_the_der_subject_public_key_info(local_ca: CertificateAuthority) -> None:
    cert = local_ca.issue("localhost").certificate
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert spki_sha256(cert) == hashlib.sha256(der).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Real TLS


def server_context(files: dict[str, Path], ca_pem: Path, *, password: bytes | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files["chain"], files["key"], password=password)
    ctx.load_verify_locations(ca_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(files: dict[str, Path], ca_pem: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    ctx.load_cert_chain(files["chain"], files["key"])
    return ctx


async def echo_peer_cn(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> bytes:
    """Run one mTLS exchange on loopback: the server answers with the client certificate's CN."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        cn = dict(item for rdn in peer["subject"] for item in rdn)["commonName"]
        writer.write(cn.encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=hostname)
            try:
                return await reader.read()
            finally:
                writer.close()
                await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_issued_certificates_complete_a_mutual_tls_handshake(
    local_ca: CertificateAuthority, tmp_path: Path
) -> None:
    server_files = local_ca.issue("localhost", ips=["127.0.0.1"], dns=["localhost"]).write(
        tmp_path, key_password=b"server-pass"
    )
    client_files = local_ca.issue("alice", client=True, server=False).write(tmp_path)
    server_ctx = server_context(server_files, local_ca.cert_path, password=b"server-pass")
    client_ctx = client_context(client_files, local_ca.cert_path)
    assert await echo_peer_cn(server_ctx, client_ctx, "localhost") == b"alice"
    assert await echo_peer_cn(server_ctx, client_ctx, "127.0.0.1") == b"alice"


@pytest.mark.asyncio
async def test_client_refuses_a_server_certificate_for_another_name(
    local_ca: CertificateAuthority, tmp_path: Path
) -> None:
    server_files = local_ca.issue("localhost").write(tmp_path)
    client_files = local_ca.issue("alice", client=True, server=False).write(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch|doesn.t match"):
        await echo_peer_cn(
            server_context(server_files, local_ca.cert_path),
            client_context(client_files, local_ca.cert_path),
            "other.test",
        )


def memory_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake through memory buffers, so the server side's own verification error reaches the test."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(client_in, client_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, endpoint in (("client", client), ("server", server)):
            if not done[side]:
                with contextlib.suppress(ssl.SSLWantReadError):
                    endpoint.do_handshake()
                    done[side] = True
            server_in.write(client_out.read())
            client_in.write(server_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_openssl_refuses_a_client_revoked_by_the_crl(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    server_files = local_ca.issue("localhost").write(tmp_path)
    alice_files = local_ca.issue("alice", client=True, server=False).write(tmp_path)
    mallory = local_ca.issue("mallory", client=True, server=False)
    mallory_files = mallory.write(tmp_path)
    local_ca.revoke(mallory.serial, reason="keyCompromise")
    crl_path = tmp_path / "crl.pem"
    crl_path.write_bytes(local_ca.build_crl().public_bytes(Encoding.PEM))

    server_ctx = server_context(server_files, local_ca.cert_path)
    server_ctx.load_verify_locations(crl_path)
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    memory_handshake(server_ctx, client_context(alice_files, local_ca.cert_path), "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate revoked"):
        memory_handshake(server_ctx, client_context(mallory_files, local_ca.cert_path), "localhost")


# --------------------------------------------------------------------------------------------------------------
# Revocation and CRLs


def test_revoked_serial_is_in_a_crl_signed_by_the_ca(local_ca: CertificateAuthority) -> None:
    keep = local_ca.issue("keep.test")
    drop = local_ca.issue("drop.test")
    revocation, new = local_ca.revoke(drop.serial, reason="keyCompromise")
    assert new and revocation.serial == drop.serial and revocation.reason is x509.ReasonFlags.key_compromise

    crl = local_ca.build_crl(days=7)
    assert crl.is_signature_valid(local_ca.certificate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == local_ca.certificate.subject
    entry = crl.get_revoked_certificate_by_serial_number(drop.serial)
    assert entry is not None
    assert entry.revocation_date_utc == revocation.revoked_at
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(keep.serial) is None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(local_ca.certificate, x509.SubjectKeyIdentifier).value.digest
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1


def test_crl_numbers_grow_and_revocations_survive_reloading(local_ca: CertificateAuthority, ca_dir: Path) -> None:
    leaf = local_ca.issue("gone.test")
    local_ca.revoke(leaf.serial)
    first = local_ca.build_crl()
    reloaded = CertificateAuthority.load(ca_dir)
    second = reloaded.build_crl()
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for c in (first, second)]
    assert numbers == [1, 2]
    entry = second.get_revoked_certificate_by_serial_number(leaf.serial)
    assert entry is not None
    # No reason given: the entry has no reason extension at all, as RFC 5280 prefers over "unspecified".
    with pytest.raises(x509.ExtensionNotFound):
        entry.extensions.get_extension_for_class(x509.CRLReason)


def test_revoking_twice_keeps_the_first_revocation(local_ca: CertificateAuthority) -> None:
    serial = local_ca.issue("twice.test").serial
    first, new = local_ca.revoke(serial, reason="superseded")
    again, new_again = local_ca.revoke(serial, reason="keyCompromise")
    assert new and not new_again
    assert again == first
    assert [r.serial for r in local_ca.revocations()] == [serial]


def test_revoking_a_serial_this_ca_never_issued_is_refused(local_ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError, match=r"serial abc123 is not in .*ca\.json: this CA did not issue it"):
        local_ca.revoke(0xABC123)


def test_revoking_a_certificate_from_another_ca_is_refused(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    stranger = CertificateAuthority.create(tmp_path / "stranger").issue("x.test")
    with pytest.raises(CertificateError, match=r"was not issued by the CA in"):
        local_ca.revoke(stranger.certificate)


def test_a_certificate_with_this_cas_signature_can_be_revoked_without_a_record(
    local_ca: CertificateAuthority, ca_dir: Path
) -> None:
    leaf = local_ca.issue("lost.test")
    (ca_dir / "ca.json").unlink()  # e.g. an imported CA whose old records are gone
    revocation, new = local_ca.revoke(leaf.certificate, reason="cessationOfOperation")
    assert new and revocation.serial == leaf.serial


def test_unknown_revocation_reasons_are_refused(local_ca: CertificateAuthority) -> None:
    serial = local_ca.issue("r.test").serial
    with pytest.raises(ConfigError, match=r"--reason 'stolen': expected one of unspecified, keyCompromise"):
        local_ca.revoke(serial, reason="stolen")


@pytest.mark.parametrize(
    ("text", "serial"), [("ab:cd:ef", 0xABCDEF), ("0xABCDEF", 0xABCDEF), ("abcdef", 0xABCDEF), (" 10 ", 16)]
)
def test_serials_are_read_as_show_prints_them(text: str, serial: int) -> None:
    assert parse_serial(text) == serial


@pytest.mark.parametrize("text", ["xyz", "", "0"])
def test_bad_serials_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="serial"):
        parse_serial(text)


# --------------------------------------------------------------------------------------------------------------
# describe_file (`certs show`)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_show_describes_a_server_certificate(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf = local_ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], uris=["spiffe://example.test/web"])
    path = write(tmp_path / "localhost.pem", leaf.cert_pem)
    now = leaf.certificate.not_valid_after_utc - timedelta(days=12)
    text = describe_file(path, now=now)
    lines = text.splitlines()
    assert lines[0] == f"certificate in {path}"
    assert "  subject:      CN=localhost" in lines
    assert "  issuer:       CN=tlsgate local CA" in lines
    assert f"  serial:       {leaf.serial:x}" in lines
    assert "  SANs:         DNS:localhost, IP:127.0.0.1, URI:spiffe://example.test/web" in lines
    assert "  status:       valid, expires in 12 days" in lines
    assert "  key:          EC P-256" in lines
    assert f"  SPKI sha256:  {spki_sha256(leaf.certificate)}" in lines
    assert "  EKU:          serverAuth" in lines
    assert "  key usage:    digitalSignature" in lines
    assert "  CA:           no" in lines


def test_show_says_expired_and_not_yet_valid(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    old = local_ca.issue("old.test", not_before=now - timedelta(days=10), days=7)
    path = write(tmp_path / "old.pem", old.cert_pem)
    assert "  status:       EXPIRED 3 days ago" in describe_file(path, now=now).splitlines()
    future = local_ca.issue("future.test", not_before=now + timedelta(days=2))
    path = write(tmp_path / "future.pem", future.cert_pem)
    status = [line for line in describe_file(path, now=now).splitlines() if "status" in line]
    assert status == [f"  status:       not valid until {(now + timedelta(days=2)):%Y-%m-%d %H:%M:%S} UTC (in 2 days)"]


def test_show_describes_each_certificate_of_a_chain(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    paths = local_ca.issue("localhost").write(tmp_path)
    text = describe_file(paths["chain"])
    assert f"certificate 1 of 2 in {paths['chain']}" in text
    assert f"certificate 2 of 2 in {paths['chain']}" in text
    assert "  CA:           yes (path length 0)" in text
    assert "  key usage:    digitalSignature, keyCertSign, cRLSign" in text


def test_show_names_key_types(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    rsa_leaf = local_ca.issue("rsa.test", rsa_bits=2048)
    assert "  key:          RSA 2048" in describe_file(write(tmp_path / "rsa.pem", rsa_leaf.cert_pem))
    ed_key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")])
    now = datetime.now(UTC)
    ed_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ed_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(ed_key, None)
    )
    text = describe_file(write(tmp_path / "ed.der", ed_cert.public_bytes(Encoding.DER)))
    assert "  key:          Ed25519" in text
    assert "  EKU:          none" in text


def test_show_opens_pkcs12_with_its_password(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    paths = local_ca.issue("alice", client=True, server=False).write(tmp_path, p12_password=b"pw")
    text = describe_file(paths["p12"], password=b"pw")
    assert text.startswith(f"PKCS#12 keystore {paths['p12']}")
    assert "  private key:  EC P-256, matches certificate 1" in text
    assert "  subject:      CN=alice" in text
    assert "  EKU:          clientAuth" in text
    with pytest.raises(CertificateError, match=r"alice\.p12: cannot open this PKCS#12 file \(wrong --storepass"):
        describe_file(paths["p12"], password=b"nope")
    with pytest.raises(CertificateError, match=r"it may need --storepass"):
        describe_file(paths["p12"])


def test_show_describes_keys_without_revealing_them(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf = local_ca.issue("localhost")
    plain = write(tmp_path / "plain.key", leaf.private_key_pem())
    text = describe_file(plain)
    assert "  key:          EC P-256" in text
    assert f"  SPKI sha256:  {spki_sha256(leaf.certificate)}" in text
    locked = write(tmp_path / "locked.key", leaf.private_key_pem(b"pw"))
    assert "encrypted (give --key-pass to see its type)" in describe_file(locked)
    assert "  key:          EC P-256 (encrypted)" in describe_file(locked, password=b"pw")


def test_show_describes_a_crl(local_ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf = local_ca.issue("gone.test")
    local_ca.revoke(leaf.serial, reason="keyCompromise")
    crl = local_ca.build_crl(days=30)
    for path in (
        write(tmp_path / "crl.pem", crl.public_bytes(Encoding.PEM)),
        write(tmp_path / "crl.der", crl.public_bytes(Encoding.DER)),
    ):
        text = describe_file(path, now=crl.last_update_utc)
        assert f"CRL in {path}" in text
        assert "  issuer:       CN=tlsgate local CA" in text
        assert "  CRL number:   1" in text
        assert "(in 30 days)" in text
        assert "  revoked:      1" in text
        assert f"    {leaf.serial:x}  revoked " in text
        assert text.rstrip().endswith("keyCompromise")
    stale = describe_file(tmp_path / "crl.pem", now=crl.last_update_utc + timedelta(days=32))
    assert "(STALE since 2 days)" in stale


def test_show_refuses_garbage_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"junk\.bin: not a certificate, CRL, private key or PKCS#12 file") as e:
        describe_file(write(tmp_path / "junk.bin", b"\x00\x01garbage"))
    assert "\n" not in str(e.value)
    with pytest.raises(
        CertificateError, match=r"no certificate, CRL or private key in this file \(found: PUBLIC KEY\)"
    ):
        describe_file(write(tmp_path / "pub.pem", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"))


# --------------------------------------------------------------------------------------------------------------
# The library is easy to drive from code (as `tlsgate dev` does)


def open_or_create(directory: Path) -> CertificateAuthority:
    if CertificateAuthority.exists(directory):
        return CertificateAuthority.load(directory)
    return CertificateAuthority.create(directory, name="tlsgate dev CA")


def test_create_or_load_from_code(tmp_path: Path) -> None:
    first = open_or_create(tmp_path / "dev-ca")
    second = open_or_create(tmp_path / "dev-ca")
    assert first.certificate == second.certificate
    leaf = second.issue("localhost", ips=["127.0.0.1", "::1"])
    assert isinstance(leaf, IssuedCert)
    assert leaf.name == "localhost"
    assert leaf.chain_pem == leaf.cert_pem + second.cert_pem
