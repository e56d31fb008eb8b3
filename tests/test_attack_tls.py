"""Attacks on the TLS layer (security issue #13): tickets that outlive the trust that issued them, certificates
named only in their CN, and a development CA that could sign any name."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import datetime
import functools
import ipaddress
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlsgate import dev
from tlsgate.cli.dev import dev as dev_command
from tlsgate.engine.runtime import build_runtime
from tlsgate.errors import ConfigError
from tlsgate.pki import CertificateAuthority
from tlsgate.tls import contexts, ossl, tickets

from helpers import (
    backend,
    client_context,
    memory_handshake,
    port_of,
    resume_chain,
    revocable_client,
    server_opts,
    tunnel,
    wait_until,
)

TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]


@pytest.fixture(autouse=True)
def _fresh_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets, "_secret", None)


# -- item 1: the ticket key follows every certificate in --cacert and every --crl --------------------------------


def pinned_certificate(common_name: str) -> tuple[bytes, bytes]:
    """A self-signed CA:FALSE client certificate, as people put in a trust bundle to pin one client: (cert, key).

    OpenSSL accepts it because it is in the trust store itself; ``SSLContext.get_ca_certs()`` does not list it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def offer(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession) -> tuple[bool, bytes]:
    """One connection offering ``session``: (resumed?, the echoed byte, or b"" when refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                reused = bool(tls.session_reused)
                tls.sendall(b"x")
                return reused, tls.recv(1)
        except (ConnectionError, ssl.SSLError):
            return False, b""


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.asyncio
async def test_a_pinned_client_removed_from_cacert_can_neither_resume_nor_reconnect(
    pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    pin_pem, pin_key = pinned_certificate("pinned")
    (tmp_path / "pin.pem").write_bytes(pin_pem + pin_key)
    bundle = pki_files["ca"]
    only_ca = bundle.read_bytes()
    bundle.write_bytes(only_ca + pin_pem)
    pinned = client_context(ca)
    pinned.maximum_version = version
    pinned.load_cert_chain(tmp_path / "pin.pem")

    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_cn=["pinned"])) as tun:
        port = port_of(tun)
        reused, session = await asyncio.to_thread(resume_chain, port, pinned)
        assert not reused
        reused, session = await asyncio.to_thread(resume_chain, port, pinned, session)
        assert reused  # tickets work for it while it is trusted; a resumption hands it a fresh ticket

        bundle.write_bytes(only_ca)
        assert tun.server.reload()  # type: ignore[attr-defined]
        assert await asyncio.to_thread(offer, port, pinned, session) == (False, b"")
        assert await asyncio.to_thread(offer, port, pinned, None) == (False, b"")  # type: ignore[arg-type]
        assert tun.stats.refused.get("untrusted") == 2
        assert be.connections == 2  # only the two connections made while it was trusted


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.asyncio
async def test_a_crl_change_ends_resumption_for_everyone(tmp_path: Path, version: ssl.TLSVersion) -> None:
    """Revoking someone else still re-keys: a full handshake re-verifies the chain of every client once."""
    alice = revocable_client(tmp_path)
    alice.ctx.maximum_version = version
    async with backend() as be, tunnel(target=be.address, **alice.options) as tun:
        port = port_of(tun)
        _, session = await asyncio.to_thread(resume_chain, port, alice.ctx)
        reused, session = await asyncio.to_thread(resume_chain, port, alice.ctx, session)
        assert reused
        assert tun.server.reload()  # type: ignore[attr-defined]
        reused, session = await asyncio.to_thread(resume_chain, port, alice.ctx, session)
        assert reused  # an unchanged CRL keeps the key

        bob = alice.ca.issue("bob", client=True, server=False)
        alice.ca.revoke(bob.serial)
        alice.crl.write_bytes(alice.ca.build_crl().public_bytes(serialization.Encoding.PEM))
        assert tun.server.reload()  # type: ignore[attr-defined]
        assert await asyncio.to_thread(offer, port, alice.ctx, session) == (False, b"x")  # full handshake, allowed


@pytest.mark.asyncio
async def test_a_resumed_connection_still_meets_the_identity_rules_of_a_reload(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    """Identity rules do not change the ticket key (they are checked on every connection, resumed or not)."""
    alice = client_context(ca, ca.issue_cert("alice.test", common_name="alice"))
    async with backend() as be, tunnel(**server_opts(pki_files, be.address, allow_cn=["alice"])) as tun:
        port = port_of(tun)
        _, session = await asyncio.to_thread(resume_chain, port, alice)
        tun.reload(build_runtime(dataclasses.replace(tun.cfg, allow_cn=("bob",))))
        assert await asyncio.to_thread(offer, port, alice, session) == (True, b"")
        assert tun.stats.refused.get("identity") == 1


# A pool of trust anchors: two CAs, and two pinned CA:FALSE certificates `get_ca_certs()` does not show.
@functools.cache
def _anchor_pool() -> tuple[bytes, ...]:
    cas = [CertificateAuthority.create(Path(tempfile.mkdtemp()) / "ca").cert_pem for _ in range(2)]
    return (*cas, pinned_certificate("pin-a")[0], pinned_certificate("pin-b")[0])


def _ticket_key(ctx: ssl.SSLContext) -> bytes:
    pointer = tickets._ctx_pointer(ctx)
    assert pointer is not None and tickets._LIB is not None
    block = ctypes.create_string_buffer(ossl.KEY_BLOCK)
    assert tickets._LIB.ctrl(pointer, ossl.SSL_CTRL_GET_TLSEXT_TICKET_KEYS, ossl.KEY_BLOCK, block) == 1
    return block.raw


_bundles = st.lists(st.sampled_from(range(4)), min_size=1, max_size=4, unique=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=_bundles, second=_bundles)
def test_the_ticket_key_differs_exactly_when_the_trust_bundle_does(
    pki_files: dict[str, Path], first: list[int], second: list[int]
) -> None:
    pool = _anchor_pool()
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    with tempfile.TemporaryDirectory() as tmp:
        keys = []
        for i, chosen in enumerate((first, second)):
            bundle = Path(tmp) / f"bundle{i}.pem"
            bundle.write_bytes(b"".join(pool[j] for j in chosen))
            keys.append(_ticket_key(contexts.server_context(material, client_ca=str(bundle), require_client_cert=True)))
    assert (keys[0] == keys[1]) == (first == second)


def test_the_ticket_key_follows_each_crl_file(pki_files: dict[str, Path], tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    crl = tmp_path / "crl.pem"

    def key(*crls: Path) -> bytes:
        return _ticket_key(
            contexts.server_context(material, client_ca=str(ca.cert_path), require_client_cert=True, crl=crls)
        )

    crl.write_bytes(ca.build_crl().public_bytes(serialization.Encoding.PEM))
    empty = key(crl)
    assert key(crl) == empty
    assert key() != empty
    ca.revoke(ca.issue("bob", client=True, server=False).serial)
    crl.write_bytes(ca.build_crl().public_bytes(serialization.Encoding.PEM))
    assert key(crl) != empty


# -- item 14: the target's name must be in subjectAltName, never only in the Common Name ----------------------


def cn_only_target(tmp_path: Path, common_name: str) -> tuple[Path, ssl.SSLContext]:
    """A CA file, and a server context for a certificate from that CA naming ``common_name`` in its CN only."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CN-only test CA")])
    now = datetime.datetime.now(datetime.UTC)

    def builder(subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_cert = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, chain = tmp_path / "cn-only-ca.pem", tmp_path / "cn-only.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain)
    return ca_file, ctx


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.name == "tlsgate" and r.getMessage() == name]


@pytest.mark.parametrize("mode", ["client", "server --target-tls"])
@pytest.mark.asyncio
async def test_a_target_named_only_in_its_common_name_is_refused(
    pki_files: dict[str, Path], ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    heard: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers at once, so that a tunnel which wrongly connects ends the test with a failure, not a wait.
        writer.write(b"target speaking")
        heard.append(await reader.read(6))

    ca_file, target_ctx = cn_only_target(tmp_path, "localhost")
    async with backend(record, ssl_ctx=target_ctx) as be:
        if mode == "client":
            gate = tunnel("client", target=f"localhost:{be.port}", cacert=str(ca_file))
        else:
            gate = tunnel(
                target=f"localhost:{be.port}",
                cert=[str(pki_files["cert"])],
                key=[str(pki_files["key"])],
                disable_authentication=True,
                target_tls=True,
                target_cacert=str(ca_file),
            )
        async with gate as tun:
            if mode == "client":
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tun))
            else:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port_of(tun), ssl=client_context(ca), server_hostname="localhost"
                )
            writer.write(b"secret")
            try:
                assert await reader.read(100) == b""  # the end, not the target's greeting
            except (ConnectionError, ssl.SSLError):
                pass
            writer.close()
            await wait_until(lambda: tun.stats.target_errors == 1)
    assert heard == []  # the target saw a handshake at most, never the client's bytes
    [failure] = [e for e in events(caplog, "handshake failed") if e.get("side") == "target"]
    assert failure["rule"] == "untrusted"
    assert "Hostname mismatch" in str(failure["reason"])
    assert "subjectAltName only, never the Common Name" in str(failure["reason"])


# -- item 15c: the dev CA is name-constrained to local names, and `dev --name` keeps to them ---------------------


@pytest.fixture
def no_trust_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The dev CA under tmp_path, and no real trust store within reach of `tlsgate dev trust`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TLSGATE_CAROOT", str(tmp_path / "caroot"))
    monkeypatch.setenv("TLSGATE_SYSTEM_CA_DIR", "")
    monkeypatch.setenv("TLSGATE_UPDATE_CA_COMMAND", "")
    monkeypatch.setenv("TLSGATE_NSS_DBS", "")
    monkeypatch.setenv("TLSGATE_CERTUTIL", "")
    return tmp_path / "caroot"


def test_the_dev_ca_is_name_constrained_to_local_names(tmp_path: Path) -> None:
    ca, created = dev.ensure_dev_ca(tmp_path / "caroot")
    assert created
    extension = ca.certificate.extensions.get_extension_for_class(x509.NameConstraints)
    assert extension.critical  # RFC 5280: a verifier that cannot enforce it must refuse the CA
    assert extension.value.excluded_subtrees is None
    assert set(extension.value.permitted_subtrees or ()) == {
        x509.DNSName("localhost"),
        x509.DNSName("test"),
        x509.DNSName("local"),
        x509.DNSName("internal"),
        x509.DNSName("home.arpa"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
        x509.IPAddress(ipaddress.ip_network("::1/128")),
    }
    assert dev.dev_ca_warning(ca) is None
    assert dev.ensure_dev_ca(tmp_path / "caroot")[0].certificate == ca.certificate  # made once, then reused


@pytest.mark.parametrize("name", ["evil.com", "localhost.evil.com", "192.168.1.10", "fe80::1", "*.myapp.com"])
def test_dev_name_outside_the_local_names_is_one_line_exit_2(no_trust_stores: Path, name: str) -> None:
    result = CliRunner().invoke(dev_command, ["--to", "3000", "--name", name])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"tlsgate: error: --name {name!r}: not a local name"), line
    assert not no_trust_stores.exists()  # refused before any CA was made


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_local_suffix = st.sampled_from(dev.LOCAL_DNS_SUFFIXES)
# Public suffixes, and names that merely contain a local one without ending in it.
_other_suffix = st.sampled_from(
    ["com", "org", "dev", "app", "io", "localhost.com", "test.net", "home.arpa.example", "internal.example",
     "xlocalhost", "testing", "locals", "arpa", "my-test"]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(labels=st.lists(_label, max_size=3), local=_local_suffix, other=_other_suffix, wildcard=st.booleans())
def test_dev_names_are_accepted_exactly_under_the_local_suffixes(
    labels: list[str], local: str, other: str, wildcard: bool
) -> None:
    prefix = ("*." if wildcard and labels else "") + "".join(f"{label}." for label in labels)
    assert dev.normalise_name(prefix + local) == prefix + local
    with pytest.raises(ConfigError, match="not a local name"):
        dev.normalise_name(prefix + other)


@settings(max_examples=200, deadline=None)
@given(address=st.ip_addresses())
def test_dev_ip_names_are_accepted_exactly_on_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if (address.version == 4 and address in ipaddress.ip_network("127.0.0.0/8")) or str(address) == "::1":
        assert dev.normalise_name(str(address)) == str(address)
    else:
        with pytest.raises(ConfigError, match="not a local name"):
            dev.normalise_name(str(address))


def test_a_leaf_for_a_public_name_from_the_dev_ca_key_fails_verification_by_openssl(tmp_path: Path) -> None:
    """Someone who copied the dev CA's key signs whatever they like; OpenSSL, with the CA as its only trust
    anchor, refuses every leaf that names anything outside the constraints, even next to a local name."""
    ca, _ = dev.ensure_dev_ca(tmp_path / "caroot")
    cases = {
        "evil.com": ca.issue("evil.com", dns=["evil.com"]),
        "10.0.0.1": ca.issue("10.0.0.1", ips=["10.0.0.1"]),
        "localhost": ca.issue("localhost", dns=["localhost", "evil.com"]),  # one bad name spoils the lot
    }
    for server_name, issued in cases.items():
        files = issued.write(tmp_path, server_name.replace(".", "-"))
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            tls_handshake(files["cert"], files["key"], ca.cert_path, server_name)
        assert info.value.verify_message == "permitted subtree violation", info.value
    # The certificate `tlsgate dev` issues, and any other local name, verify as before.
    for server_name, issued in {
        "localhost": ca.issue("localhost", dns=["localhost", "myapp.test"], ips=["127.0.0.1", "::1"]),
        "db.home.arpa": ca.issue("db.home.arpa"),
        # Not CN=127.0.0.2: with no DNS SAN OpenSSL takes a host-like CN for a DNS name and checks it too.
        "127.0.0.2": ca.issue("localhost", ips=["127.0.0.2"]),
    }.items():
        files = issued.write(tmp_path, server_name.replace(".", "-") + "-ok")
        tls_handshake(files["cert"], files["key"], ca.cert_path, server_name)


def tls_handshake(cert: Path, key: Path, ca_file: Path, server_name: str) -> None:
    """A TLS handshake over loopback: a server presenting ``cert``, a client trusting only ``ca_file``."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    with server.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError) as err:
                    errors.append(err)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(10)


def test_a_dev_ca_from_before_name_constraints_is_kept_with_a_warning(no_trust_stores: Path) -> None:
    old = CertificateAuthority.create(no_trust_stores, name=dev.dev_ca_name())
    ca, created = dev.ensure_dev_ca(no_trust_stores)
    assert not created and ca.certificate == old.certificate  # still the CA the user's stores trust
    warning = dev.dev_ca_warning(ca)
    assert warning is not None and "predates name constraints" in warning and "tlsgate dev untrust" in warning

    result = CliRunner().invoke(dev_command, ["trust"])
    assert f"warning: {warning}" in result.stderr.splitlines()


# -- item 1, continued: a chain of resumptions ends MAX_AUTHENTICATION_AGE after the full handshake -------------


@pytest.mark.parametrize("version", TLS_VERSIONS)
def test_a_chain_of_resumptions_ends_a_fixed_time_after_the_full_handshake(
    pki_files: dict[str, Path], ca: trustme.CA, monkeypatch: pytest.MonkeyPatch, version: ssl.TLSVersion
) -> None:
    """TLS 1.3 hands out a fresh ticket on every resumption; the stamp inside dates the last full handshake."""
    clock = [1_900_000_000.0]
    monkeypatch.setattr(tickets, "_now", lambda: clock[0])
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    server = contexts.server_context(material, client_ca=str(pki_files["ca"]), require_client_cert=True)
    client = client_context(ca, ca.issue_cert("alice.test", common_name="alice"))
    client.maximum_version = version
    limit = tickets.MAX_AUTHENTICATION_AGE

    session, reused = memory_handshake(client, server)
    assert not reused
    for elapsed in (limit / 2, limit - 60):  # each resumption gets a new ticket (TLS 1.3) or keeps the old one
        clock[0] = 1_900_000_000.0 + elapsed
        session, reused = memory_handshake(client, server, session)
        assert reused, elapsed
    clock[0] = 1_900_000_000.0 + limit + 1
    session, reused = memory_handshake(client, server, session)
    assert not reused  # a full handshake: the client certificate was verified again
    clock[0] += limit - 60
    assert memory_handshake(client, server, session)[1]  # and the clock starts over from that handshake


def test_a_failing_clock_costs_resumption_not_the_handshake(
    pki_files: dict[str, Path], ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing raised in a ticket callback reaches OpenSSL: no stamp, or no way to read the time, means no
    resumption, and the handshake itself goes on."""
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    server = contexts.server_context(material, client_ca=None, require_client_cert=False)
    client = client_context(ca)
    session, _ = memory_handshake(client, server)

    def broken() -> float:
        raise OSError("no clock")

    with monkeypatch.context() as patch:
        patch.setattr(tickets, "_now", broken)
        session, reused = memory_handshake(client, server, session)
        assert not reused
    assert not memory_handshake(client, server, session)[1]  # that ticket was issued without a stamp


def test_no_shared_key_without_the_age_bound(
    pki_files: dict[str, Path], ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where OpenSSL refuses the ticket callbacks, the context keeps OpenSSL's own random key: a shared key
    without the bound would let TLS 1.3 chains run on forever across workers and reloads."""
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    shared = contexts.server_context(material, client_ca=None, require_client_cert=False)
    client = client_context(ca)
    session, _ = memory_handshake(client, shared)
    real = tickets._LIB

    class RefusesCallbacks:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def set_ticket_callbacks(self, *args: object) -> int:
            return 0

    monkeypatch.setattr(tickets, "_LIB", RefusesCallbacks())
    alone = contexts.server_context(material, client_ca=None, require_client_cert=False)
    monkeypatch.setattr(tickets, "_LIB", real)
    assert _ticket_key(alone) != _ticket_key(shared)
    assert not memory_handshake(client, alone, session)[1]
    assert memory_handshake(client, shared, session)[1]
