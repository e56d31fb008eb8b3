"""Shared fixtures (a trustme PKI, a second loopback address, log capture, the event loops): fixtures only.

Plain functions that tests share live in helpers.py: a test module imports those from there, not from here."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from helpers import closed_port


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA(organization_name="tlsgate test CA")


@pytest.fixture
def other_ca() -> trustme.CA:
    return trustme.CA(organization_name="someone else's CA")


@pytest.fixture
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture
def pki_files(tmp_path: Path, ca: trustme.CA, server_cert: trustme.LeafCert) -> dict[str, Path]:
    """CA bundle, server cert/key and a client cert/key (CN=alice, OU=eng) written as PEM files."""
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    client = ca.issue_cert("alice@example.test", common_name="alice", organization_unit_name="eng")
    files["client_cert"] = tmp_path / "alice.pem"
    files["client_key"] = tmp_path / "alice.key"
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return files


@pytest.fixture
def loopback2() -> Iterator[str]:
    """127.0.0.2 as a second client source address (Linux routes all of 127/8 to lo)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 is not usable on this machine")
    yield "127.0.0.2"


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens, held for the whole test (see helpers.closed_port)."""
    with closed_port() as port:
        yield port


@pytest.fixture(autouse=True)
def _tlsgate_logs(caplog: pytest.LogCaptureFixture) -> None:
    """tlsgate's INFO events (connections, refusals) are what several tests assert on."""
    caplog.set_level(logging.INFO, logger="tlsgate")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Every async test runs on plain asyncio and on uvloop: tlsgate must work on both."""
    factories: dict[str, Callable[[], Any]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
