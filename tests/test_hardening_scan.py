"""A TLS scan of a running `tlsgate server` with sslyze, as an outside auditor would run it.

sslyze pins its own cryptography (<47) and brings its own OpenSSL build (nassl) that can still speak SSL 2/3
and every legacy suite, which is what makes it a fair judge. So it lives in its own virtualenv, `.venv-scan`
(made by `make` or, failing that, by the fixture below), and runs as a subprocess writing `--json_out`.
The test is skipped only when sslyze truly cannot be installed, with pip's own words as the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from helpers import backend, tlsgate_server

REPO = Path(__file__).resolve().parents[1]
SCAN_VENV = REPO / ".venv-scan"
SSLYZE = "sslyze>=6,<7"

# What the scan may find accepted: TLS 1.2 only with ECDHE and an AEAD cipher; TLS 1.3's suites are all AEAD.
TLS12_ALLOWED = re.compile(r"^TLS_ECDHE_(ECDSA|RSA)_WITH_(AES_(128|256)_GCM_SHA(256|384)|CHACHA20_POLY1305_SHA256)$")
TLS13_ALLOWED = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
STRONG_CURVES = {"X25519", "X448", "secp256r1", "secp384r1", "secp521r1"}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time: several pytest runs may want the scan venv at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def sslyze() -> Path:
    """The sslyze command: $TLSGATE_SSLYZE, else .venv-scan/bin/sslyze, built here when missing."""
    if os.environ.get("TLSGATE_SSLYZE"):
        return Path(os.environ["TLSGATE_SSLYZE"])
    exe = SCAN_VENV / "bin" / "sslyze"
    with _locked(REPO / ".pytest_cache" / "venv-scan.lock"):
        if not exe.exists():
            steps = [
                [sys.executable, "-m", "venv", "--clear", str(SCAN_VENV)],
                [str(SCAN_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", SSLYZE],
            ]
            for step in steps:
                try:
                    done = subprocess.run(step, capture_output=True, text=True, timeout=170, check=False)
                except subprocess.TimeoutExpired:
                    pytest.skip(f"sslyze could not be installed: {' '.join(step)} took over 170 s")
                if done.returncode != 0:
                    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
                    pytest.skip(f"sslyze could not be installed ({' '.join(step[-2:])}):\n{tail}")
    return exe


async def scan(sslyze: Path, port: int, out: Path, *commands: str) -> dict[str, Any]:
    """Run sslyze against 127.0.0.1:port and return the scan results of its JSON report, by command."""
    proc = await asyncio.create_subprocess_exec(
        str(sslyze), "--quiet", "--json_out", str(out), *commands, f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 150)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode(errors="replace")
    report = json.loads(out.read_text())
    (server,) = report["server_scan_results"]
    assert server["connectivity_status"] == "COMPLETED", server.get("connectivity_error_trace")
    assert server["scan_status"] == "COMPLETED"
    return {"connectivity": server["connectivity_result"], **server["scan_result"]}


def result(report: dict[str, Any], command: str) -> dict[str, Any]:
    entry = report[command]
    assert entry["status"] == "COMPLETED", (command, entry.get("error_reason"), entry.get("error_trace"))
    return dict(entry["result"])


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.asyncio(loop_factories=["asyncio"])
@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
async def test_sslyze_finds_only_tls12_and_13_with_ecdhe_and_aead(
    key_type: str, sslyze: Path, tmp_path: Path, ca: trustme.CA
) -> None:
    """The default server (mutual TLS) as sslyze sees it, with an ECDSA and with an RSA certificate: no SSL 2/3,
    TLS 1.0/1.1; TLS 1.2 only ECDHE+AEAD; no compression; no client-initiated renegotiation (secure renegotiation
    advertised, RFC 5746); no 0-RTT; extended master secret; TLS_FALLBACK_SCSV; strong curves only."""
    kind = trustme.KeyType.RSA if key_type == "rsa" else trustme.KeyType.ECDSA
    issuer = trustme.CA(key_type=kind) if key_type == "rsa" else ca
    leaf = issuer.issue_cert("localhost", "127.0.0.1", key_type=kind)
    alice = issuer.issue_cert("alice.test", common_name="alice", key_type=kind)
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "alice", "alice_key")}
    issuer.cert_pem.write_to_path(str(files["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    alice.cert_chain_pems[0].write_to_path(str(files["alice"]))
    alice.private_key_pem.write_to_path(str(files["alice_key"]))

    async with (
        backend() as be,
        tlsgate_server(
            [
                "--listen", "127.0.0.1:0", "--target", be.address, "--cert", str(files["cert"]),
                "--key", str(files["key"]), "--cacert", str(files["ca"]), "--allow-cn", "alice",
            ]
        ) as server,
    ):  # fmt: skip
        anonymous = await scan(sslyze, server.port, tmp_path / "anonymous.json", "--tlsv1_2")
        report = await scan(
            sslyze, server.port, tmp_path / "full.json",
            "--cert", str(files["alice"]), "--key", str(files["alice_key"]),
            "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3", "--compression", "--reneg",
            "--fallback", "--heartbleed", "--openssl_ccs", "--robot", "--elliptic_curves", "--ems", "--early_data",
        )  # fmt: skip

    assert anonymous["connectivity"]["client_auth_requirement"] == "REQUIRED"  # mutual TLS by default
    assert report["connectivity"]["highest_tls_version_supported"] == "TLS_1_3"

    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"):
        found = result(report, old)
        assert not found["is_tls_version_supported"], old
        assert found["accepted_cipher_suites"] == [], old

    tls12 = result(report, "tls_1_2_cipher_suites")
    names12 = {s["cipher_suite"]["name"] for s in tls12["accepted_cipher_suites"]}
    assert names12 and all(TLS12_ALLOWED.match(name) for name in names12), names12
    assert all(f"_{key_type.upper()}_" in name for name in names12), names12
    tls13 = result(report, "tls_1_3_cipher_suites")
    names13 = {s["cipher_suite"]["name"] for s in tls13["accepted_cipher_suites"]}
    assert names13 and names13 <= TLS13_ALLOWED, names13
    for accepted in tls12["accepted_cipher_suites"] + tls13["accepted_cipher_suites"]:
        assert accepted["ephemeral_key"]["type_name"] == "ECDH", accepted  # forward secrecy, elliptic curves

    assert result(report, "tls_compression")["supports_compression"] is False
    reneg = result(report, "session_renegotiation")
    assert reneg["is_vulnerable_to_client_renegotiation_dos"] is False
    assert reneg["client_renegotiations_success_count"] == 0
    assert reneg["supports_secure_renegotiation"] is True
    assert result(report, "tls_1_3_early_data")["supports_early_data"] is False
    assert result(report, "tls_extended_master_secret")["supports_ems_extension"] is True
    assert result(report, "tls_fallback_scsv")["supports_fallback_scsv"] is True
    assert result(report, "heartbleed")["is_vulnerable_to_heartbleed"] is False
    assert result(report, "openssl_ccs_injection")["is_vulnerable_to_ccs_injection"] is False
    assert result(report, "robot")["robot_result"].startswith("NOT_VULNERABLE")
    curves = {curve["name"] for curve in result(report, "elliptic_curves")["supported_curves"]}
    assert curves and curves <= STRONG_CURVES, curves
