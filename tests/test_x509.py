"""tls/x509.py: the one reader of certificates, keys and CRLs, and the one SPKI computation.

The point of one reader is that the same file gets the same answer everywhere: the server flags
(`tlsgate.tls.contexts`), the CA and ``certs show`` (`tlsgate.pki`), and the policy pins. These tests read the
same files through each door and compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlsgate.errors import CertificateError
from tlsgate.pki import CertificateAuthority, describe_file, load_private_key
from tlsgate.policy import PeerIdentity
from tlsgate.tls import contexts
from tlsgate.tls.x509 import (
    PrivateKey,
    certificate_spki_der,
    load_certificates,
    parse_crls,
    public_key_sha256,
    spki_der,
    spki_sha256,
)

PASSWORD = b"correct horse"


@pytest.fixture(scope="module")
def leaf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and one leaf written twice: ``plain`` (key not encrypted) and ``locked`` (key under PASSWORD)."""
    root = tmp_path_factory.mktemp("x509")
    ca = CertificateAuthority.create(root / "ca")
    leaf = ca.issue("localhost")
    plain = leaf.write(root / "plain")
    locked = leaf.write(root / "locked", key_password=PASSWORD)
    return {"cert": plain["cert"], "plain": plain["key"], "locked": locked["key"], "ca_dir": root / "ca"}


def _server_error(cert: Path, key: Path, key_pass: bytes | None) -> str:
    with pytest.raises(CertificateError) as err:
        contexts.load_key_material(cert=str(cert), key=str(key), key_pass=key_pass)
    return str(err.value)


def _pki_error(key: Path, password: bytes | None) -> str:
    with pytest.raises(CertificateError) as err:
        load_private_key(key, password)
    return str(err.value)


@pytest.mark.parametrize(
    ("key", "password", "says"),
    [
        ("locked", b"wrong", "wrong password (--key-pass)"),
        ("locked", None, "is encrypted: give its password with --key-pass"),
        ("plain", b"unneeded", "the key is not encrypted, but --key-pass was given"),
    ],
)
def test_the_server_flags_and_the_certs_commands_say_the_same_about_a_key_password(
    leaf_files: dict[str, Path], key: str, password: bytes | None, says: str
) -> None:
    # Before tls/x509.py the server said "wrong passphrase" and refused a needless password, pki said
    # "wrong password" and ignored it.
    server = _server_error(leaf_files["cert"], leaf_files[key], password)
    pki = _pki_error(leaf_files[key], password)
    assert says in pki
    assert server == f"key {pki}"
    assert "\n" not in server


def test_a_ca_key_that_is_not_encrypted_refuses_a_ca_password(leaf_files: dict[str, Path]) -> None:
    with pytest.raises(CertificateError, match=r"ca\.key: the key is not encrypted, but --ca-pass was given$"):
        CertificateAuthority.load(leaf_files["ca_dir"], key_password=b"unneeded")


def test_a_pem_keystore_names_the_password_flag_that_was_given(leaf_files: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store.pem"
    store.write_bytes(leaf_files["cert"].read_bytes() + leaf_files["plain"].read_bytes())
    with pytest.raises(CertificateError) as err:
        contexts.load_key_material(keystore=str(store), storepass=b"unneeded")
    # It used to blame --key-pass, a flag the operator had not given.
    assert str(err.value) == f"keystore {store}: the key is not encrypted, but --storepass was given"


def test_certs_show_still_shows_an_unencrypted_key_given_a_store_password(leaf_files: dict[str, Path]) -> None:
    # ``show`` has one password for whatever the file holds; it is no reason to refuse a plain key.
    text = describe_file(leaf_files["plain"], password=b"for-some-keystore")
    assert "EC P-256" in text and "(encrypted)" not in text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_cut_short_key_is_refused_in_one_line_that_quotes_nothing_of_it(
    leaf_files: dict[str, Path], tmp_path: Path, data: st.DataObject
) -> None:
    """A key file cut anywhere between its BEGIN and its END line (a half-copied file, a full disk) is refused
    by both readers in one line that holds no PEM armour and no line of the key: servers log this on reload."""
    original = leaf_files["locked"].read_bytes()
    lines = original.splitlines(keepends=True)
    cut = data.draw(st.integers(min_value=len(lines[0]), max_value=len(original) - len(lines[-1]) - 1))
    broken = tmp_path / "cut.key"
    broken.write_bytes(original[:cut])
    body = [line.strip().decode() for line in lines[1:-1]]
    for message in (_pki_error(broken, PASSWORD), _server_error(leaf_files["cert"], broken, PASSWORD)):
        assert "cut short" in message
        assert "\n" not in message and "BEGIN" not in message and "PRIVATE KEY" not in message
        assert not any(line[:16] in message for line in body)


def _certificate(key: PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "pin")])
    now = datetime.now(UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, algorithm)
    )


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate,
        ed448.Ed448PrivateKey.generate,
    ],
    ids=["p256", "p384", "rsa2048", "ed25519", "ed448"],
)
def test_one_spki_hash_for_pins_keys_and_certificates(make_key: Callable[[], PrivateKey]) -> None:
    key = make_key()
    cert = _certificate(key)
    assert certificate_spki_der(cert) == spki_der(cert.public_key()) == spki_der(key.public_key())
    assert spki_sha256(cert) == public_key_sha256(key.public_key())
    assert spki_sha256(cert) == PeerIdentity.from_certificate(cert).spki_sha256


def test_a_pin_works_for_a_key_cryptography_cannot_load() -> None:
    """The hash is of the SPKI bytes as written, so an unknown key algorithm still has a pin (as in Go)."""
    der = _certificate(ec.generate_private_key(ec.SECP256R1())).public_bytes(Encoding.DER)
    ec_public_key_oid = bytes.fromhex("06072a8648ce3d0201")  # 1.2.840.10045.2.1
    unknown_oid = bytes.fromhex("06072a8648ce3d0209")  # the same length, assigned to nothing
    cert = x509.load_der_x509_certificate(der.replace(ec_public_key_oid, unknown_oid, 1))
    with pytest.raises(UnsupportedAlgorithm):
        cert.public_key()
    expected = PeerIdentity.from_certificate(cert).spki_sha256
    assert spki_sha256(cert) == expected == hashlib.sha256(certificate_spki_der(cert)).hexdigest()


def test_crls_are_read_from_pem_blocks_or_der(leaf_files: dict[str, Path], tmp_path: Path) -> None:
    ca = CertificateAuthority.load(leaf_files["ca_dir"])
    crl = ca.build_crl()
    pem, der = crl.public_bytes(Encoding.PEM), crl.public_bytes(Encoding.DER)
    assert [c.issuer for c in parse_crls(pem + pem)] == [crl.issuer, crl.issuer]
    assert parse_crls(der)[0].issuer == crl.issuer
    for not_a_crl in (b"", b"garbage", leaf_files["cert"].read_bytes()):
        with pytest.raises(ValueError):
            parse_crls(not_a_crl)
    assert load_certificates(leaf_files["cert"])[0].issuer == crl.issuer


def test_a_wrong_password_that_happens_to_pass_the_padding_check_is_still_a_wrong_password(
    leaf_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """About one wrong password in 256 decrypts to bytes with valid padding; cryptography then says the key data
    cannot be parsed, without the word "password". That is still a wrong password, and the flag must be named
    (test_a_wrong_password_error_names_the_flag_not_the_password failed now and then on exactly this)."""

    def garbage_after_decryption(data: bytes, password: bytes | None) -> object:
        raise ValueError("Could not deserialize key data. The data may be in an incorrect format")

    monkeypatch.setattr("tlsgate.tls.x509.load_pem_private_key", garbage_after_decryption)
    assert _pki_error(leaf_files["locked"], b"wrong").endswith("wrong password (--key-pass)")
    assert _server_error(leaf_files["cert"], leaf_files["locked"], b"wrong").endswith("wrong password (--key-pass)")
