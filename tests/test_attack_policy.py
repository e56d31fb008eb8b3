"""Attacks on the access policy (security issue #13): certificates OpenSSL accepts and we cannot read, CAs
revoked above the leaf, ``policy check`` disagreeing with the handshake, several CNs, and SPIFFE IDs with dot
segments or percent-encoding. Each end-to-end test drives a real handshake on loopback."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tlsgate import policy as policy_module
from tlsgate.cli.policy import policy as policy_cli
from tlsgate.policy import IdentityRules, PeerIdentity, build_policy
from tlsgate.settings.config import server_access

from helpers import assert_cut, backend, identity_rules, port_of, tunnel, wait_until

NOW = datetime.now(UTC)
_KEY = ec.generate_private_key(ec.SECP256R1())  # one key for every leaf: generating keys is the slow part
bounded = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- a PKI that can build what trustme will not: odd SANs, name constraints, path lengths, bad EKUs ------------


@dataclass
class Ca:
    """A CA certificate and its key; issues leaves and sub-CAs with the extensions a real CA would add."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

    @property
    def hash(self) -> hashes.SHA256 | None:
        return None if isinstance(self.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()

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
        ed25519_key: bool = False,
    ) -> Ca:
        key = ed25519.Ed25519PrivateKey.generate() if ed25519_key else ec.generate_private_key(ec.SECP256R1())
        builder = _base(
            _name(name),
            self.cert.subject,
            key.public_key(),
            NOW - timedelta(days=2),
            not_after or NOW + timedelta(days=90),
        )
        builder = _ca_extensions(builder, key.public_key(), self.key.public_key(), path_length=path_length)
        if permitted_dns:
            constraints = x509.NameConstraints([x509.DNSName(d) for d in permitted_dns], None)
            builder = builder.add_extension(constraints, critical=True)
        return Ca(builder.sign(self.key, self.hash), key)

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
        builder = _base(
            subject, self.cert.subject, _KEY.public_key(), NOW - timedelta(days=1), NOW + timedelta(days=30)
        )
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
        return builder.sign(self.key, self.hash)

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
        return builder.sign(self.key, self.hash)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _base(
    subject: x509.Name, issuer: x509.Name, public_key: Any, start: datetime, end: datetime
) -> x509.CertificateBuilder:
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


def _ca_extensions(
    builder: x509.CertificateBuilder, public_key: Any, issuer_key: Any, *, path_length: int | None
) -> x509.CertificateBuilder:
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
        ctx = ssl.create_default_context(cafile=str(self.write("ca.pem", pem(self.root.cert))))
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
        tunnel(
            "client", target=f"localhost:{be.port}", cacert=str(site.dir / "ca.pem"), verify_cn=["localhost"]
        ) as cli,
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


def test_policy_check_gives_the_servers_verdict_on_an_unparseable_certificate(site: Site) -> None:
    bad = site.write("bad.pem", pem(site.root.leaf("alice", raw_san=ip_san(b"\x0a\x01\x02\x03\x04"))))
    result = policy_check("--cert", bad, "--cacert", site.write("ca.pem", pem(site.root.cert)), "--allow-cn", "alice")
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[:2] == ["DENY", "rule:   bad-cert"], result.output
    assert "  FAIL  certificate client certificate cannot be parsed" in result.output


def test_an_internal_error_while_checking_is_a_refusal_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: IdentityRules, peer: PeerIdentity, der: bytes | None = None) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(IdentityRules, "check", broken)
    cert = der(_ROOT.leaf("alice"))
    decision, _ = build_policy(server_access(allow_cn=["alice"])).check_peer(cert)
    assert (decision.allowed, decision.rule) == (False, "policy-error")
    assert "RuntimeError('a bug')" in decision.reason
    refused = identity_rules(cn=["alice"], flag_prefix="verify").check_certificate(cert)
    assert (refused.allowed, refused.rule) == (False, "policy-error")


# IP SANs are 4 or 16 bytes; every other length is one OpenSSL keeps as an opaque string and cryptography refuses.
bad_ip_payloads = st.binary(min_size=0, max_size=40).filter(lambda b: len(b) not in (4, 16))


@bounded
@given(payload=bad_ip_payloads)
@example(payload=b"\x0a\x01\x02\x03\x04")
def test_check_peer_refuses_any_malformed_ip_san(payload: bytes) -> None:
    root = _ROOT
    cert = der(root.leaf("alice", raw_san=ip_san(payload)))
    policy = build_policy(server_access(allow_cn=["alice"]))
    decision, identity = policy.check_peer(cert)
    assert (decision.allowed, decision.rule, identity) == (False, "bad-cert", None)
    assert decision.reason.startswith("client certificate cannot be parsed")
    rules = identity_rules(cn=["alice"], flag_prefix="verify")
    refused = rules.check_certificate(cert)
    assert (refused.allowed, refused.rule) == (False, "bad-cert")
    assert refused.reason.startswith("server certificate cannot be parsed")


def test_check_peer_refuses_bytes_that_are_not_a_certificate() -> None:
    decision, identity = build_policy(server_access(allow_all=True)).check_peer(b"\x30\x03\x02\x01\x01")
    assert (decision.allowed, decision.rule, identity) == (False, "bad-cert", None)
    assert identity_rules(cn=["x"], flag_prefix="verify").check_certificate(b"junk").rule == "bad-cert"


_ROOT = Ca.root("hypothesis root")


def policy_check(*args: str | Path) -> Result:
    return CliRunner().invoke(policy_cli, ["check", *map(str, args)])


# --- item 4: a CRL that revokes an intermediate CA ---------------------------------------------------------------


@pytest.fixture
def revoked_intermediate(site: Site) -> tuple[Ca, x509.Certificate, Path]:
    """root -> "issuing CA" -> alice, and a CRL from the root revoking the issuing CA (not alice)."""
    intermediate = site.root.sub_ca("issuing CA")
    alice = intermediate.leaf("alice")
    crl = site.write("crl.pem", site.root.crl(intermediate.cert).public_bytes(serialization.Encoding.PEM))
    return intermediate, alice, crl


@pytest.mark.asyncio
async def test_handshake_under_a_revoked_intermediate_is_refused_naming_it(
    site: Site, revoked_intermediate: tuple[Ca, x509.Certificate, Path], caplog: pytest.LogCaptureFixture
) -> None:
    intermediate, alice, crl = revoked_intermediate
    options = site.server_options("127.0.0.1:1", allow_cn=["alice"], crl=[str(crl)])
    async with tunnel(**options) as tun:
        await attempt(port_of(tun), site.client_context(alice, intermediate.cert))
        await wait_until(lambda: tun.stats.refused.get("crl") == 1)
    (refusal,) = tlsgate_events(caplog, "refused")
    assert refusal["rule"] == "crl"
    assert refusal["reason"].startswith("intermediate CN=issuing CA revoked (serial ")
    assert hex(intermediate.cert.serial_number) in refusal["reason"]


@pytest.mark.asyncio
async def test_handshake_under_a_sound_intermediate_still_passes_the_crl(site: Site) -> None:
    intermediate = site.root.sub_ca("issuing CA")
    other = site.root.sub_ca("another CA")
    crl = site.write("crl.pem", site.root.crl(other.cert).public_bytes(serialization.Encoding.PEM))
    async with (
        backend() as be,
        tunnel(**site.server_options(be.address, allow_cn=["alice"], crl=[str(crl)])) as tun,
    ):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port_of(tun), ssl=site.client_context(intermediate.leaf("alice"), intermediate.cert),
            server_hostname="localhost",
        )  # fmt: skip
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()


def _offer(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, bytes, ssl.SSLSession | None]:
    """One connection offering ``session``: resumed?, the echo of one byte (b"" when cut), the session to offer next."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        except ssl.SSLError:
            return False, b"", None  # refused inside the handshake, with an alert (a full handshake)
    with tls:
        reused = bool(tls.session_reused)
        try:
            tls.sendall(b"x")
            echo = tls.recv(1)  # the ticket arrives after the handshake; reading collects it
        except (ConnectionError, ssl.SSLError):
            echo = b""
        return reused, echo, tls.session


@pytest.mark.asyncio
async def test_a_session_resumed_after_its_intermediate_is_revoked_is_refused(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """A resumed session carries no chain; the chain its leaf was verified with is remembered and checked."""
    intermediate = site.root.sub_ca("issuing CA")
    crl = site.write("crl.pem", site.root.crl().public_bytes(serialization.Encoding.PEM))
    ctx = site.client_context(intermediate.leaf("alice"), intermediate.cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # one ticket per connection, taken at once: simplest to resume
    async with (
        backend() as be,
        tunnel(**site.server_options(be.address, allow_cn=["alice"], crl=[str(crl)])) as tun,
    ):
        port = port_of(tun)
        _, echo, session = await asyncio.to_thread(_offer, port, ctx, None)
        assert echo == b"x"
        crl.write_bytes(site.root.crl(intermediate.cert).public_bytes(serialization.Encoding.PEM))
        assert tun.server.reload()  # type: ignore[attr-defined]
        # Whether the ticket still resumes depends on whether its key covers the CRL; refused either way.
        _, echo, _ = await asyncio.to_thread(_offer, port, ctx, session)
        assert echo == b""
        await wait_until(lambda: tun.stats.refused.get("crl") == 1)
    (refusal,) = tlsgate_events(caplog, "refused")
    assert refusal["reason"].startswith("intermediate CN=issuing CA revoked")


def test_policy_check_refuses_a_leaf_under_a_revoked_intermediate(
    site: Site, revoked_intermediate: tuple[Ca, x509.Certificate, Path]
) -> None:
    intermediate, alice, crl = revoked_intermediate
    cert = site.write("alice-chain.pem", pem(alice, intermediate.cert))
    ca = site.write("ca.pem", pem(site.root.cert))
    result = policy_check("--cert", cert, "--cacert", ca, "--crl", crl, "--allow-cn", "alice")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[:2] == ["DENY", "rule:   crl"]
    assert lines[2].startswith("reason: intermediate CN=issuing CA revoked (serial ")
    assert any(line.startswith("  FAIL  revocation  intermediate CN=issuing CA revoked") for line in lines)
    assert "a CA of the chain is revoked by" in result.output


class _FakeTls:
    """Stands in for an SSLSocket on 3.11: the chain lives on the private ``_sslobj``; empty when resumed."""

    def __init__(self, chain: Sequence[bytes]) -> None:
        self._sslobj = self
        self._chain = [_Blob(c) for c in chain]

    def get_verified_chain(self) -> list[_Blob]:
        return self._chain


@dataclass
class _Blob:
    data: bytes

    def public_bytes(self, _encoding: int) -> bytes:
        return self.data


def test_a_resumed_session_is_checked_against_the_chain_its_leaf_was_verified_with(
    revoked_intermediate: tuple[Ca, x509.Certificate, Path],
) -> None:
    intermediate, alice, _ = revoked_intermediate
    full = (der(alice), der(intermediate.cert))
    assert policy_module.verified_chain(_FakeTls(full), der(alice)) == full  # type: ignore[arg-type]
    # OpenSSL keeps no chain in a session: the resumed connection gets the remembered one.
    assert policy_module.verified_chain(_FakeTls(()), der(alice)) == full  # type: ignore[arg-type]
    stranger = der(intermediate.leaf("mallory"))
    assert policy_module.verified_chain(_FakeTls(()), stranger) == (stranger,)  # type: ignore[arg-type]


# --- item 7: `policy check` and the handshake agree ---------------------------------------------------------------


def _chain_cases(root: Ca) -> dict[str, tuple[tuple[x509.Certificate, ...], str | None]]:
    """name -> (the chain the client sends, leaf first; the rule policy check must give, None for ALLOW)."""
    intermediate = root.sub_ca("issuing CA")
    constrained = root.sub_ca("example.org only", permitted_dns=["example.org"])
    no_sub_cas = root.sub_ca("no sub-CAs", path_length=0)
    below_limit = no_sub_cas.sub_ca("one too deep")
    expired = root.sub_ca("expired CA", not_after=NOW - timedelta(hours=1))
    edwards = root.sub_ca("Ed25519 CA", ed25519_key=True)
    return {
        "good, directly under the root": ((root.leaf("alice"),), None),
        "good, via an intermediate": ((intermediate.leaf("alice"), intermediate.cert), None),
        "good, no EKU and no SAN": ((root.leaf("alice", eku=()),), None),
        "good, within name constraints": ((constrained.leaf("alice", dns=["a.example.org"]), constrained.cert), None),
        "good, Ed25519 intermediate (cryptography's profile refuses it)": (
            (edwards.leaf("alice"), edwards.cert),
            None,
        ),
        "Ed25519 intermediate, EKU serverAuth only": (
            (edwards.leaf("alice", eku=[ExtendedKeyUsageOID.SERVER_AUTH]), edwards.cert),
            "untrusted",
        ),
        "EKU serverAuth only": ((root.leaf("alice", eku=[ExtendedKeyUsageOID.SERVER_AUTH]),), "untrusted"),
        "name constraints violated": ((constrained.leaf("alice", dns=["evil.test"]), constrained.cert), "untrusted"),
        "path length exceeded": ((below_limit.leaf("alice"), below_limit.cert, no_sub_cas.cert), "untrusted"),
        "expired intermediate": ((expired.leaf("alice"), expired.cert), "untrusted"),
    }


_CASES = list(_chain_cases(_ROOT))


@pytest.mark.asyncio
@pytest.mark.parametrize("case", _CASES)
async def test_policy_check_and_the_handshake_agree(site: Site, case: str) -> None:
    site.root = _ROOT
    chain, expected_rule = _chain_cases(_ROOT)[case]
    cert = site.write("client-chain.pem", pem(*chain))
    ca = site.write("ca.pem", pem(_ROOT.cert))
    verdict = policy_check("--cert", cert, "--cacert", ca, "--allow-cn", "alice")
    assert verdict.exit_code in (0, 1), verdict.output
    check_allows = verdict.exit_code == 0
    async with (
        backend() as be,
        tunnel(**site.server_options(be.address, allow_cn=["alice"])) as tun,
    ):
        ctx = site.client_context(*chain)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port_of(tun), ssl=ctx, server_hostname="localhost"
            )
            writer.write(b"ping")
            handshake_allows = await reader.read(4) == b"ping"
            writer.close()
        except (ssl.SSLError, ConnectionError):
            handshake_allows = False
        if not handshake_allows:
            await wait_until(lambda: sum(tun.stats.refused.values()) + tun.stats.handshake_errors >= 1)
    assert check_allows == handshake_allows, verdict.output
    assert check_allows == (expected_rule is None), verdict.output
    if expected_rule is not None:
        assert verdict.output.splitlines()[1] == f"rule:   {expected_rule}", verdict.output


# --- item 8: several CN attributes: only the last one counts, as in ghostunnel --------------------------------------

cn_values = st.text(alphabet="abelvi", min_size=1, max_size=5)


@bounded
@given(cns=st.lists(cn_values, min_size=1, max_size=4), allowed=cn_values)
@example(cns=["evil", "alice"], allowed="alice")
@example(cns=["alice", "evil"], allowed="alice")
def test_only_the_last_cn_is_matched_and_shown(cns: list[str], allowed: str) -> None:
    peer = PeerIdentity.from_certificate(_ROOT.leaf(cns))
    decision = identity_rules(cn=[allowed]).check(peer)
    assert decision.allowed == (cns[-1] == allowed), (cns, decision)
    assert peer.describe() == f"CN={cns[-1]}"
    assert peer.other_common_names == tuple(cns[:-1])
    if not decision.allowed:
        assert f"CN={cns[-1]} " in decision.reason and all(
            f"CN={cn} " not in decision.reason for cn in set(cns) - {cns[-1]}
        )


@pytest.mark.asyncio
async def test_a_subject_with_two_cns_is_admitted_and_logged_by_the_last(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        backend() as be,
        tunnel(**site.server_options(be.address, allow_cn=["alice"])) as tun,
    ):
        await attempt(port_of(tun), site.client_context(site.root.leaf(["alice", "evil"])))
        await wait_until(lambda: tun.stats.refused.get("identity") == 1)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port_of(tun), ssl=site.client_context(site.root.leaf(["evil", "alice"])),
            server_hostname="localhost",
        )  # fmt: skip
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
    (refusal,) = tlsgate_events(caplog, "refused")
    assert refusal["identity"] == "CN=evil" and refusal["rule"] == "identity"
    assert "CN=evil not allowed" in refusal["reason"]
    assert not any(fields.get("identity") == "CN=evil" for fields in tlsgate_events(caplog, "connected"))


def test_policy_check_shows_the_ignored_cns(site: Site) -> None:
    cert = site.write("two-cns.pem", pem(site.root.leaf(["evil", "alice"])))
    result = policy_check("--cert", cert, "--allow-cn", "evil")
    assert result.exit_code == 1, result.output
    assert "CN           alice (the last CN counts, as in ghostunnel; ignored: evil)" in result.output


# --- item 15a: SPIFFE IDs have no dot segments and no percent-encoding ---------------------------------------------

good_segments = st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
bad_segments = st.sampled_from(["..", ".", "%2F", "a%2Fb", "%2e%2e", "", "a b", "a?b", "a#b"])


@bounded
@given(segments=st.lists(good_segments | bad_segments, min_size=1, max_size=5))
@example(segments=["..", "admin"])
@example(segments=["a%2Fb"])
def test_spiffe_wildcards_never_match_dot_segments_or_percent_encoding(segments: list[str]) -> None:
    uri = "spiffe://example.org/ns/" + "/".join(segments)
    # One trailing slash is tolerated, as ghostunnel's patterns tolerate it: spiffe://example.org/ns/ matches ns/**.
    segments = segments[:-1] if segments[-1] == "" else segments
    valid = all(s and s not in (".", "..") and all(c.isalnum() or c in "._-" for c in s) for s in segments)
    deep = identity_rules(uri=["spiffe://example.org/ns/**"])
    one = identity_rules(uri=["spiffe://example.org/ns/*"])
    peer = PeerIdentity.from_certificate(_ROOT.leaf("x", uris=[uri]))
    assert deep.check(peer).allowed == valid, uri
    assert one.check(peer).allowed == (valid and len(segments) == 1), uri


def test_non_spiffe_uri_patterns_keep_ghostunnel_semantics() -> None:
    rules = identity_rules(uri=["https://example.org/ns/**"])
    peer = PeerIdentity.from_certificate(_ROOT.leaf("x", uris=["https://example.org/ns/a%2Fb"]))
    assert rules.check(peer).allowed


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("spiffe://example.org/ns/../**", "path segment '..' is not allowed"),
        ("spiffe://example.org/./api", "path segment '.' is not allowed"),
        ("spiffe://example.org/a%2Fb/*", "percent-encoding is not allowed"),
        ("spiffe://example.org//api", "path segment '' is not allowed"),
        ("spiffe://Example.org/api", "the trust domain 'Example.org' must be lowercase"),
    ],
)
def test_spiffe_patterns_with_dot_segments_or_percent_encoding_are_a_one_line_error(pattern: str, problem: str) -> None:
    result = policy_check("--allow-uri", pattern)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(f"tlsgate: error: --allow-uri: '{pattern}' is not a SPIFFE ID pattern: {problem}")
