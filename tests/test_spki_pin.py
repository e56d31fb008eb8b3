"""``--allow-spki-pin`` / ``--verify-spki-pin``: out-of-band key pinning with ghostunnel's meaning.

The pin alone authenticates the peer: a self-signed or expired certificate whose key is pinned gets through,
a certificate from a trusted CA whose key is not pinned does not, and the refusal is a TLS alert during the
handshake (the ``verify`` path of tlsgate.tls.internals overrules OpenSSL's own verdict for pinned contexts).
Without that path the flags refuse to start rather than accept unverified peers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.cli import cli
from tlsgate.cli.policy import policy
from tlsgate.engine.runtime import build_runtime
from tlsgate.errors import ConfigError
from tlsgate.policy.peer import PeerIdentity
from tlsgate.policy.policy import build_policy
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import TunnelConfig, server_access, tunnel_config
from tlsgate.settings.pins import KeyPin, PinSet
from tlsgate.tls import internals

from helpers import (
    backend,
    echo,
    invoke,
    port_of,
    refused,
    run_tlsgate,
    running_server,
    server_opts,
    tls_target,
    tunnel,
)

needs_verify_path = pytest.mark.skipif(not internals.enabled("verify"), reason="the verify path is off here")


# -- a self-signed peer ---------------------------------------------------------------------------------------------


@dataclass
class SelfSigned:
    """A self-signed leaf certificate with its key, written as PEM files, and the pin of its key."""

    cert: Path
    key: Path
    pem: bytes
    der: bytes
    pin: str  # sha256:<base64>, as ghostunnel's flags take it

    def client_context(self, server_ca: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(server_ca))
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def self_signed(
    directory: Path, name: str, *, expired: bool = False, rsa_key: bool = False, dns: str | None = None
) -> SelfSigned:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    start, end = (
        (now - timedelta(days=30), now - timedelta(days=1))
        if expired
        else (now - timedelta(hours=1), now + timedelta(days=1))
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    paths = directory / f"{name}.pem", directory / f"{name}.key"
    paths[0].write_bytes(pem)
    paths[1].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pin = "sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    return SelfSigned(paths[0], paths[1], pem, cert.public_bytes(serialization.Encoding.DER), pin)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


# -- the pin's spelling: exactly ghostunnel's (auth.ParseSPKIPins) -----------------------------------------------------

_DIGEST = bytes(range(32))
_B64 = base64.b64encode(_DIGEST).decode()
_URL_SAFE = base64.urlsafe_b64encode(bytes([0xFB]) * 32).decode()  # "-" and "_" where standard base64 has + and /


@pytest.mark.parametrize(
    "text",
    [f"sha256:{_B64}", f"SHA256:{_B64}", f"Sha256:{_B64}", f"sha256:{_B64[:20]}\n{_B64[20:]}", f"sha256:{_B64}\r\n"],
)
def test_the_pin_forms_ghostunnel_accepts_are_accepted(text: str) -> None:
    assert KeyPin.parse("--allow-spki-pin", text) == KeyPin("sha256", _DIGEST)


@pytest.mark.parametrize(("algorithm", "size"), [("sha256", 32), ("sha384", 48), ("sha512", 64)])
def test_each_sha2_size_is_accepted_and_prints_back_the_same(algorithm: str, size: int) -> None:
    text = f"{algorithm}:{base64.b64encode(bytes(size)).decode()}"
    assert str(KeyPin.parse("--verify-spki-pin", text)) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (_B64, "is not <algo>:<base64-digest>"),  # no algorithm
        (f"md5:{_B64}", "unsupported hash algorithm 'md5'"),
        (f"sha1:{_B64}", "unsupported hash algorithm 'sha1'"),
        (f"sha256:{_DIGEST.hex()}", "decodes to 48"),  # hex is valid base64 of the wrong size: said so
        (f"sha256:{':'.join(f'{b:02X}' for b in _DIGEST)}", "that is hex"),
        (f"sha256:{_URL_SAFE}", "URL-safe base64"),
        (f"sha256:{_B64.rstrip('=')}", "padding is missing"),
        (f"sha256//{_B64}", "curl's sha256//"),
        ("sha256:", "decodes to 0"),
        (f"sha256: {_B64}", "not standard base64"),
        (f"sha256:{base64.b64encode(bytes(31)).decode()}", "decodes to 31"),
        (f"sha512:{_B64}", "a sha512 digest is 64 bytes"),
        (f"sha256:{_B64}=", "not standard base64"),
    ],
)
def test_wrong_pin_encodings_are_refused_with_one_line_naming_the_flag(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as raised:
        KeyPin.parse("--allow-spki-pin", text)
    message = str(raised.value)
    assert message.startswith("--allow-spki-pin: ") and why in message, message
    assert "\n" not in message


@given(st.text(max_size=200))
def test_any_text_is_a_pin_or_a_one_line_config_error(text: str) -> None:
    try:
        pin = KeyPin.parse("--verify-spki-pin", text)
    except ConfigError as err:
        assert "\n" not in str(err) and len(str(err)) < 400
    else:
        assert KeyPin.parse("--verify-spki-pin", str(pin)) == pin


@given(st.sampled_from(["sha256", "sha384", "sha512"]), st.binary(min_size=1, max_size=600))
def test_a_key_matches_its_own_pin_in_every_algorithm_and_no_other(algorithm: str, spki: bytes) -> None:
    pin = KeyPin.of(spki, algorithm)
    assert PinSet.parse("--allow-spki-pin", [str(pin)]).match(spki) == pin
    assert PinSet((KeyPin.of(spki + b"\0", algorithm),)).match(spki) is None
    assert PinSet((pin,)).match(b"") is None


def test_any_one_of_several_pins_lets_the_key_in() -> None:
    current, backup = b"current key", b"backup key"
    pins = PinSet.parse("--allow-spki-pin", [str(KeyPin.of(current)), str(KeyPin.of(backup, "sha512"))])
    assert pins.match(current) is not None and pins.match(backup) is not None
    assert pins.match(b"someone else") is None


# -- the policy: the pin alone decides ------------------------------------------------------------------------------


def test_a_pinned_self_signed_and_expired_certificate_passes_the_policy_without_any_ca(tmp_path: Path) -> None:
    peer = self_signed(tmp_path, "pinned", expired=True)
    policy = build_policy(server_access(allow_spki_pin=[peer.pin]))
    decision, identity = policy.check_peer(peer.der)
    assert decision.allowed and decision.rule == "allow-spki-pin", decision
    assert identity is not None and identity.describe() == "CN=pinned"


def test_an_unpinned_certificate_is_refused_by_the_spki_pin_rule(tmp_path: Path, ca: trustme.CA) -> None:
    policy = build_policy(server_access(allow_spki_pin=[self_signed(tmp_path, "pinned").pin]))
    leaf = ca.issue_cert("alice.test", common_name="alice").cert_chain_pems[0].bytes()
    der = x509.load_pem_x509_certificate(leaf).public_bytes(serialization.Encoding.DER)
    decision, _ = policy.check_peer(der)
    assert not decision.allowed and decision.rule == "spki-pin"
    assert "CN=alice" in decision.reason and "matches no --allow-spki-pin" in decision.reason
    assert policy.check_peer(None)[0].rule == "no-client-cert"


def test_an_identity_built_by_hand_without_its_key_matches_no_pin(tmp_path: Path) -> None:
    peer = self_signed(tmp_path, "pinned")
    known = PeerIdentity.from_der(peer.der)
    by_hand = PeerIdentity(**{**{f: getattr(known, f) for f in known.__dataclass_fields__}, "spki_der": b""})
    rules = build_policy(server_access(allow_spki_pin=[peer.pin])).identity
    assert rules is not None and rules.check(known).allowed and not rules.check(by_hand).allowed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"allow_cn": ["alice"]}, "--allow-spki-pin and --allow-cn are mutually exclusive"),
        ({"allow_spki_sha256": ["00" * 32]}, "--allow-spki-pin and --allow-spki-sha256 are mutually exclusive"),
        ({"allow_all": True}, "--allow-spki-pin and --allow-all are mutually exclusive"),
        ({"disable_authentication": True}, "--disable-authentication contradicts --allow-spki-pin"),
        ({"crl": ["crl.pem"]}, "--allow-spki-pin and --crl are mutually exclusive"),
    ],
)
def test_pins_refuse_the_other_access_flags(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        server_access(allow_spki_pin=[f"sha256:{_B64}"], **extra)  # type: ignore[arg-type]


# -- server mode, end to end: the pin alone lets a client in, or refuses it with an alert ----------------------------


def pinned_server(pki_files: dict[str, Path], target: str, *pins: str, **extra: object) -> dict[str, object]:
    """A server tunnel with the test PKI's certificate and only pins for clients: no --cacert, as ghostunnel."""
    options = server_opts(pki_files, target, allow_spki_pin=list(pins), **extra)
    if "cacert" not in extra:
        del options["cacert"]
    return options


async def round_trip(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bytes:
    """``payload`` through a TLS connection to 127.0.0.1:``port``: what comes back before the end, or the error."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@needs_verify_path
@pytest.mark.asyncio
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_a_self_signed_client_whose_key_is_pinned_gets_through(
    pki_files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, version: ssl.TLSVersion
) -> None:
    peer = self_signed(tmp_path, "pinned")
    async with backend(echo) as be, tunnel("server", **pinned_server(pki_files, be.address, peer.pin)) as tun:
        ctx = peer.client_context(pki_files["ca"])
        ctx.maximum_version = version
        assert await round_trip(port_of(tun), ctx) == b"ping"
    assert be.connections == 1
    assert not events(caplog, "refused")


@needs_verify_path
@pytest.mark.asyncio
async def test_an_expired_pinned_client_gets_through_as_in_ghostunnel(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    # ghostunnel (RequireAnyClientCert + the pin): "validity period ... not verified".
    peer = self_signed(tmp_path, "expired", expired=True, rsa_key=True)
    async with backend(echo) as be, tunnel("server", **pinned_server(pki_files, be.address, peer.pin)) as tun:
        assert await round_trip(port_of(tun), peer.client_context(pki_files["ca"])) == b"ping"


@needs_verify_path
@pytest.mark.asyncio
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_an_unpinned_self_signed_client_is_refused_with_a_bad_certificate_alert(
    pki_files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, version: ssl.TLSVersion
) -> None:
    pinned, stranger = self_signed(tmp_path, "pinned"), self_signed(tmp_path, "stranger")
    async with backend(echo) as be, tunnel("server", **pinned_server(pki_files, be.address, pinned.pin)) as tun:
        ctx = stranger.client_context(pki_files["ca"])
        ctx.maximum_version = version
        # TLS 1.3: the client's handshake is done before the server reads its certificate; the alert is the
        # answer to its first read. TLS 1.2: the handshake itself fails.
        with pytest.raises(ssl.SSLError, match="BAD_CERTIFICATE"):
            await round_trip(port_of(tun), ctx)
    [line] = events(caplog, "refused")
    assert line.fields["rule"] == "spki-pin"  # type: ignore[attr-defined]
    assert "CN=stranger" in line.fields["reason"]  # type: ignore[attr-defined]
    assert be.connections == 0


@needs_verify_path
@pytest.mark.asyncio
async def test_a_client_of_a_trusted_ca_is_refused_when_its_key_is_not_pinned(
    pki_files: dict[str, Path], tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    # --cacert given as well: under pins it does not let anyone in (ghostunnel: "has no effect").
    options = pinned_server(pki_files, "127.0.0.1:1", self_signed(tmp_path, "pinned").pin, cacert=str(pki_files["ca"]))
    async with backend(echo) as be, tunnel("server", **{**options, "target": be.address}) as tun:
        alice = ssl.create_default_context(cafile=str(pki_files["ca"]))
        alice.load_cert_chain(pki_files["client_cert"], pki_files["client_key"])
        with pytest.raises(ssl.SSLError, match="BAD_CERTIFICATE"):
            await round_trip(port_of(tun), alice)
        assert be.connections == 0
    assert [r.fields["rule"] for r in events(caplog, "refused")] == ["spki-pin"]  # type: ignore[attr-defined]


@needs_verify_path
@pytest.mark.asyncio
async def test_a_client_without_a_certificate_is_refused(pki_files: dict[str, Path], tmp_path: Path) -> None:
    async with (
        backend(echo) as be,
        tunnel("server", **pinned_server(pki_files, be.address, self_signed(tmp_path, "pinned").pin)) as tun,
    ):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await round_trip(port_of(tun), ssl.create_default_context(cafile=str(pki_files["ca"])))
        assert be.connections == 0


@needs_verify_path
@pytest.mark.asyncio
async def test_openssl_s_client_with_a_pinned_self_signed_certificate(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    pinned, stranger = self_signed(tmp_path, "pinned"), self_signed(tmp_path, "stranger")
    async with backend(echo) as be, tunnel("server", **pinned_server(pki_files, be.address, pinned.pin)) as tun:
        outputs = {}
        for peer in (pinned, stranger):
            # The stranger keeps its stdin open (-ign_eof) so that it is there to read the alert, which comes after
            # its handshake on TLS 1.3; the pinned client quits at the end of its input (-no_ign_eof).
            eof = "-no_ign_eof" if peer is pinned else "-ign_eof"
            proc = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"127.0.0.1:{port_of(tun)}", "-CAfile", str(pki_files["ca"]),
                "-cert", str(peer.cert), "-key", str(peer.key), "-quiet", eof,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"hello-through-the-pin\n")
            await proc.stdin.drain()
            if peer is pinned:
                await asyncio.wait_for(proc.stdout.readuntil(b"hello-through-the-pin\n"), 30)
                proc.stdin.close()
            output = await asyncio.wait_for(proc.stdout.read(), 60)
            proc.stdin.close()
            await proc.wait()
            outputs[peer.cert.stem] = output.decode(errors="replace")
    assert "alert bad certificate" in outputs["stranger"], outputs["stranger"][-2000:]
    assert "alert" not in outputs["pinned"], outputs["pinned"][-2000:]


# -- client mode: --verify-spki-pin against a self-signed server -----------------------------------------------------


async def through_client_tunnel(port: int) -> bytes:
    """``ping`` through a client tunnel: what came back (nothing when the tunnel cut the connection)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionError:
        return b""
    writer.write(b"ping")
    try:
        return await asyncio.wait_for(reader.read(), 30)
    except ConnectionError:
        return b""
    finally:
        writer.close()


@needs_verify_path
@pytest.mark.asyncio
async def test_client_mode_reaches_a_self_signed_server_for_another_name_by_its_pin(tmp_path: Path) -> None:
    # Neither the chain (self-signed) nor the name (the target is "localhost", the certificate says elsewhere)
    # would pass; the pin alone does, as ghostunnel's InsecureSkipVerify + VerifyPeerCertificate.
    server = self_signed(tmp_path, "db.elsewhere.test", dns="db.elsewhere.test")
    async with (
        tls_target(server.server_context()) as target,
        tunnel(
            "client", target=f"localhost:{target.port}", disable_authentication=True, verify_spki_pin=[server.pin]
        ) as cli,
    ):
        assert await through_client_tunnel(port_of(cli)) == b"ping"
        assert await target.results.get() == "ok"


@needs_verify_path
@pytest.mark.asyncio
async def test_client_mode_refuses_an_unpinned_server_with_an_alert_it_sees(
    tmp_path: Path, pki_files: dict[str, Path], server_cert: trustme.LeafCert, caplog: pytest.LogCaptureFixture
) -> None:
    # The server's certificate comes from the CA in --cacert and names "localhost": the pin still decides.
    trusted = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(trusted)
    pin = self_signed(tmp_path, "the-real-server").pin
    async with (
        tls_target(trusted) as target,
        tunnel(
            "client", target=f"localhost:{target.port}", cacert=str(pki_files["ca"]), disable_authentication=True,
            verify_spki_pin=[pin],
        ) as cli,
    ):  # fmt: skip
        assert await through_client_tunnel(port_of(cli)) == b""
        assert await target.results.get() == "SSLV3_ALERT_BAD_CERTIFICATE"
    [line] = events(caplog, "target refused")
    assert line.fields["rule"] == "spki-pin"  # type: ignore[attr-defined]


# -- reload: the new pins apply, to new and resumed connections ------------------------------------------------------


@needs_verify_path
@pytest.mark.asyncio
async def test_reload_with_other_pins_turns_the_old_key_away_even_on_resumption(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    old, new = self_signed(tmp_path, "old"), self_signed(tmp_path, "new")
    async with backend(echo) as be:

        def config(pin: str) -> TunnelConfig:
            # The same name and listen address: the successor takes over the running tunnel's socket on reload.
            options = {"listen": "127.0.0.1:0", **pinned_server(pki_files, be.address, pin)}
            return tunnel_config("server", options, name="pinned")

        wanted = [config(old.pin)]
        server = Server(list(wanted), ProcessOptions(), load_configs=lambda: list(wanted))
        async with running_server(server):
            port = port_of(next(iter(server.tunnels.values())))
            old_ctx, new_ctx = old.client_context(pki_files["ca"]), new.client_context(pki_files["ca"])
            old_ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # a resumed session's refusal is then a handshake error
            _, session = await asyncio.to_thread(_resume, port, old_ctx, None)
            assert (await asyncio.to_thread(_resume, port, old_ctx, session))[0]  # resumption works before
            with pytest.raises(ssl.SSLError):
                await round_trip(port, new_ctx)

            wanted[:] = [config(new.pin)]
            assert server.reload()
            assert await round_trip(port, new_ctx) == b"ping"
            with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
                await asyncio.to_thread(_resume, port, old_ctx, session)
            with pytest.raises(ssl.SSLError):
                await round_trip(port, old.client_context(pki_files["ca"]))


def _resume(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession]:
    """One echo round trip offering ``session``: whether it was resumed, and the session to offer next."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(b"x")
        assert tls.recv(1) == b"x"
        assert tls.session is not None
        return bool(tls.session_reused), tls.session


# -- without the verify path: refuse to start, never accept unverified peers ------------------------------------------


def test_without_the_verify_path_pins_refuse_to_start(
    pki_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(internals, "_VERIFY", None)  # what TLSGATE_INTERNALS=-verify leaves
    pin = self_signed(tmp_path, "pinned").pin
    server = tunnel_config("server", {"listen": "127.0.0.1:0", **pinned_server(pki_files, "127.0.0.1:1", pin)})
    client = tunnel_config(
        "client",
        {"listen": "127.0.0.1:0", "target": "localhost:1", "disable_authentication": True, "verify_spki_pin": [pin]},
    )
    for cfg, flag in ((server, "--allow-spki-pin"), (client, "--verify-spki-pin")):
        with pytest.raises(ConfigError) as raised:
            build_runtime(cfg)
        assert str(raised.value).startswith(f"{flag} needs the in-handshake verify callback"), raised.value
        assert "\n" not in str(raised.value)


@pytest.mark.asyncio
async def test_the_kill_switch_makes_the_command_exit_2_with_one_line(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    pin = self_signed(tmp_path, "pinned").pin
    args = [
        "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--cert", str(pki_files["cert"]),
        "--key", str(pki_files["key"]), "--allow-spki-pin", pin,
    ]  # fmt: skip
    async with run_tlsgate(args, env={"TLSGATE_INTERNALS": "-verify"}) as proc:
        assert await proc.exit_code() == 2
    errors = [line for line in proc.lines if "error" in line]
    assert len(errors) == 1 and "--allow-spki-pin needs the in-handshake verify callback" in errors[0], proc.log
    assert "TLSGATE_INTERNALS=-verify" in errors[0]
    assert "Traceback" not in proc.log


# -- the command line: one-line errors, exit 2 -----------------------------------------------------------------------


def _run(*args: str) -> Result:
    return invoke(cli, *args)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--allow-spki-pin", "sha256:abc"], "--allow-spki-pin: 'sha256:abc': the digest is not standard base64"),
        (["--allow-spki-pin", f"sha256:{_DIGEST.hex()}"], "decodes to 48"),
        (["--allow-spki-pin", f"sha256:{_B64}", "--allow-cn", "alice"], "--allow-spki-pin and --allow-cn"),
        (["--allow-spki-pin", f"sha256:{_B64}", "--allow-policy", "x", "--allow-query", "y"], "--allow-policy"),
        (["--allow-spki-pin", f"sha256:{_B64}", "--disable-authentication"], "contradicts --allow-spki-pin"),
    ],
)
def test_bad_server_pin_flags_exit_2_with_one_line(pki_files: dict[str, Path], extra: list[str], message: str) -> None:
    base = ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1"]
    base += ["--cert", str(pki_files["cert"]), "--key", str(pki_files["key"])]
    refused(_run(*base, *extra), message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--verify-spki-pin", "sha1:abc="], "unsupported hash algorithm 'sha1'"),
        (["--verify-spki-pin", f"sha256:{_B64}", "--verify-cn", "db"], "--verify-spki-pin and --verify-cn"),
        (["--verify-spki-pin", f"sha256:{_B64}", "--verify-spki-sha256", "00" * 32], "--verify-spki-sha256"),
    ],
)
def test_bad_client_pin_flags_exit_2_with_one_line(extra: list[str], message: str) -> None:
    base = ["client", "--listen", "127.0.0.1:0", "--target", "localhost:1", "--disable-authentication"]
    refused(_run(*base, *extra), message)


# -- policy check explains the pin's verdict --------------------------------------------------------------------------


def test_policy_check_explains_a_pin_verdict(tmp_path: Path) -> None:
    pinned, stranger = self_signed(tmp_path, "pinned", expired=True), self_signed(tmp_path, "stranger")
    allowed = invoke(policy, "check", "--cert", pinned.cert, "--allow-spki-pin", pinned.pin)
    assert allowed.exit_code == 0, allowed.output
    assert allowed.output.startswith("ALLOW\nrule:   allow-spki-pin\n"), allowed.output
    assert "not checked: --allow-spki-pin authenticates by the pin alone" in allowed.output  # chain and dates
    assert "FAIL" not in allowed.output
    denied = invoke(policy, "check", "--cert", stranger.cert, "--allow-spki-pin", pinned.pin)
    assert denied.exit_code == 1, denied.output
    assert denied.output.startswith("DENY\nrule:   spki-pin\n"), denied.output
    assert f"SPKI pin     {stranger.pin}" in denied.output  # the certificate's own pin, to paste in a flag


# -- the verify callback with ``alone``: OpenSSL's verdict on the chain is overruled, the check decides -------------


def _memory_handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLError | None:
    """A TLS 1.2 handshake over memory BIOs (the refusal lands inside it); the server side's error, if any."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = set()
    for _ in range(8):
        for name, side in (("client", c), ("server", s)):
            try:
                side.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as err:
                if side is s:
                    return err
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert done == {"client", "server"}
    return None


def _pinned_context(pki_files: dict[str, Path], pin: str) -> ssl.SSLContext:
    from tlsgate.tls import contexts

    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    ctx = contexts.server_context(material, client_ca=None, require_client_cert=True, pins=[pin])
    pins = PinSet.parse("--allow-spki-pin", [pin])

    def check(leaf: bytes, chain: tuple[bytes, ...]) -> internals.Refusal | None:
        spki = PeerIdentity.from_der(leaf).spki_der
        return None if pins.match(spki) else internals.Refusal("spki-pin", "not pinned")

    assert internals.install_peer_check(ctx, check, wants_chain=False, alone=True)
    return ctx


def _tls12_client(pki_files: dict[str, Path], cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki_files["ca"]))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the client's certificate is checked inside the handshake
    ctx.load_cert_chain(cert, key)
    return ctx


@needs_verify_path
@pytest.mark.parametrize("kind", ["self-signed", "expired", "untrusted chain", "a CA certificate"])
def test_the_pin_overrules_whatever_openssl_found_wrong_with_the_chain(
    pki_files: dict[str, Path], tmp_path: Path, other_ca: trustme.CA, kind: str
) -> None:
    if kind == "untrusted chain":
        # A leaf under an intermediate under a root the server does not know, sent with its intermediate: errors
        # at depth 1 and 0 that OpenSSL reports one after the other.
        leaf = other_ca.create_child_ca().issue_cert("chained.test", common_name="chained")
        (tmp_path / "chain.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(tmp_path / "chain.key"))
        cert, key = tmp_path / "chain.pem", tmp_path / "chain.key"
        spki = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_key()
        der = spki.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        pin = str(KeyPin.of(der))
    elif kind == "a CA certificate":
        # ghostunnel's own test pins a self-signed root (CA:TRUE, no clientAuth) used as a client certificate.
        other_ca.cert_pem.write_to_path(str(tmp_path / "root.pem"))
        other_ca.private_key_pem.write_to_path(str(tmp_path / "root.key"))
        cert, key = tmp_path / "root.pem", tmp_path / "root.key"
        spki = x509.load_pem_x509_certificate(other_ca.cert_pem.bytes()).public_key()
        der = spki.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        pin = str(KeyPin.of(der, "sha512"))
    else:
        peer = self_signed(tmp_path, "peer", expired=kind == "expired")
        cert, key, pin = peer.cert, peer.key, peer.pin
    server = _pinned_context(pki_files, pin)
    assert _memory_handshake(_tls12_client(pki_files, cert, key), server) is None
    stranger = self_signed(tmp_path, "stranger", expired=kind == "expired")
    err = _memory_handshake(_tls12_client(pki_files, stranger.cert, stranger.key), server)
    assert isinstance(err, ssl.SSLCertVerificationError) and err.verify_code in internals.REFUSAL_CODES, err
    assert internals.take_refusal(-1) == internals.Refusal("spki-pin", "not pinned")  # memory BIO: no fd


@needs_verify_path
def test_a_pinned_context_cannot_be_entered_by_a_ca_signed_client_with_another_key(
    pki_files: dict[str, Path], tmp_path: Path
) -> None:
    # The context has no CA at all; a client that OpenSSL would trust elsewhere changes nothing.
    server = _pinned_context(pki_files, self_signed(tmp_path, "pinned").pin)
    err = _memory_handshake(_tls12_client(pki_files, pki_files["client_cert"], pki_files["client_key"]), server)
    assert isinstance(err, ssl.SSLCertVerificationError) and err.verify_code in internals.REFUSAL_CODES
    internals.take_refusal(-1)
