"""The private CPython/OpenSSL paths behind `tlsgate.tls.internals`: the probe, the kill switch, each fallback."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from tlsgate.errors import ConfigError
from tlsgate.settings.config import tunnel_config
from tlsgate.status import Snapshot, prometheus_text
from tlsgate.tls import closenotify, contexts, internals, ossl, tickets

from helpers import backend, client_context, server_opts, tls_connect, tunnel

REAL = internals.gather_facts()


def test_every_path_is_active_on_this_cpython_with_a_shared_openssl() -> None:
    caps = internals.probe({})
    assert set(caps.active) >= {"closenotify", "tickets", "verify", "sslobj", "accept"}
    assert caps.openssl is not None


@pytest.mark.parametrize(
    ("changed", "why"),
    [
        ({"ssl_version_number": REAL.ssl_version_number ^ 0x10}, "ctypes found OpenSSL"),
        ({"libssl": None}, "OpenSSL is not a shared library here"),
        ({"gil_disabled": True}, "free-threaded build"),
        ({"trace_refs": True, "header_size": 32}, "Py_TRACE_REFS build"),
        ({"header_size": 24}, "object header of 24 bytes"),
        ({"implementation": "PyPy"}, "not CPython 3.11-3.14"),
        ({"version": (3, 15)}, "not CPython 3.11-3.14"),
    ],
)
def test_a_foreign_openssl_or_object_header_turns_the_ctypes_paths_off_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, changed: dict[str, object], why: str
) -> None:
    caps = internals.probe({}, dataclasses.replace(REAL, **changed))  # type: ignore[arg-type]
    for path in ("closenotify", "tickets", "verify"):
        assert path not in caps.active and caps.off[path].startswith(why)
    assert caps.openssl is None
    assert "sslobj" in caps.active  # the pure-Python paths do not depend on the C layout
    # The fallback: nothing binds, so closenotify uses unwrap() and tickets keep OpenSSL's own key.
    monkeypatch.setattr(internals, "_capabilities", caps)
    assert internals.bind("closenotify", ossl.CloseNotifyLib) is None
    assert internals.bind("tickets", ossl.TicketLib) is None
    assert internals.bind("verify", ossl.VerifyLib) is None
    internals.log_startup()
    [line] = [r for r in caplog.records if r.getMessage() == "internals"]
    assert why in line.fields["off"]  # type: ignore[attr-defined]
    assert "closenotify" not in line.fields["active"].split(",")  # type: ignore[attr-defined]


def test_the_kill_switch_turns_named_paths_off_and_says_so() -> None:
    caps = internals.probe({"TLSGATE_INTERNALS": "-tickets, -accept"})
    assert caps.off["tickets"] == "TLSGATE_INTERNALS=-tickets"
    assert caps.off["accept"] == "TLSGATE_INTERNALS=-accept"
    assert "closenotify" in caps.active and "sslobj" in caps.active
    assert caps.describe().startswith("active: closenotify,verify,sslobj")


def test_off_leaves_only_the_public_api_and_the_old_close_notify_switch_still_works() -> None:
    assert internals.probe({"TLSGATE_INTERNALS": "off"}).label() == "none"
    caps = internals.probe({"TLSGATE_CLOSE_NOTIFY": "unwrap"})
    assert caps.off["closenotify"] == "TLSGATE_CLOSE_NOTIFY=unwrap"
    assert "tickets" in caps.active


@pytest.mark.parametrize("value", ["tickets", "-ticket", "-closenotify,+accept", "all"])
def test_a_kill_switch_value_it_does_not_understand_is_an_error_not_ignored(value: str) -> None:
    with pytest.raises(ConfigError, match=r"TLSGATE_INTERNALS=.*not '-PATH'"):
        internals.probe({"TLSGATE_INTERNALS": value})


def test_a_bad_kill_switch_stops_the_cli_with_one_line_and_exit_2(pki_files: dict[str, Path]) -> None:
    args = [sys.executable, "-m", "tlsgate", "server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1"]
    args += ["--cert", str(pki_files["cert"]), "--key", str(pki_files["key"]), "--cacert", str(pki_files["ca"])]
    args += ["--allow-all"]
    env = {"TLSGATE_INTERNALS": "-everything", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "TLSGATE_INTERNALS=-everything" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_kill_switch_reaches_every_module_in_a_fresh_process() -> None:
    code = (
        "from tlsgate.tls import closenotify, internals, tickets; from tlsgate.engine import relay, tunnel;"
        "print(closenotify.available(), tickets.available(), internals.do_handshake.__name__,"
        " internals.report().label(), internals._VERIFY)"
    )
    env = {"TLSGATE_INTERNALS": "off", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False", "_public_handshake", "none", "None"]


def test_metrics_build_info_names_the_active_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals, "_capabilities", internals.probe({"TLSGATE_INTERNALS": "-tickets"}))
    text = prometheus_text(Snapshot([], "listening"), "tlsgate")
    [line] = [line for line in text.splitlines() if line.startswith("tlsgate_build_info{")]
    assert 'internals="closenotify,verify,sslobj,accept' in line


@pytest.fixture
def public_api_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as TLSGATE_INTERNALS=off would have started it."""
    monkeypatch.setattr(internals, "_capabilities", internals.probe({"TLSGATE_INTERNALS": "off"}))
    monkeypatch.setattr(internals, "do_handshake", internals._public_handshake)
    monkeypatch.setattr(closenotify, "_LIB", None)
    monkeypatch.setattr(tickets, "_LIB", None)
    monkeypatch.setattr(internals, "_VERIFY", None)


async def _answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(4000))
    await writer.drain()
    writer.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("public_api_only")
async def test_with_every_path_off_a_tunnel_still_relays_and_closes_with_close_notify(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    async with (
        backend(_answer_and_close) as be,
        tunnel("server", **server_opts(pki_files, be.address, allow_cn=["alice"])) as tun,
    ):
        alice = client_context(ca, ca.issue_cert("alice.test", common_name="alice"))
        reader, writer = await tls_connect(tun, alice)
        writer.write(b"ping" * 1000)
        await writer.drain()
        # The target's FIN reaches the client as close_notify (unwrap() here): a clean end of stream.
        assert await reader.read() == b"ping" * 1000
        writer.close()


# -- --session-tickets ------------------------------------------------------------------------------------------


def _exchange(client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
    """A TLS exchange over memory BIOs; the client reads one record, which brings it any ticket."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    s.write(b"hello")
    c_in.write(s_out.read())
    assert c.read(5) == b"hello"
    return c


def _server(pki_files: dict[str, Path], mode: str) -> ssl.SSLContext:
    material = contexts.load_key_material(cert=str(pki_files["cert"]), key=str(pki_files["key"]))
    return contexts.server_context(material, client_ca=None, require_client_cert=False, session_tickets=mode)


def test_session_tickets_off_issues_no_ticket_on_tls13_or_tls12(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    server = _server(pki_files, "off")
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        client = client_context(ca)
        client.maximum_version = version
        session = _exchange(client, server).session
        assert session is None or not session.has_ticket, version


def test_session_tickets_per_context_resumes_only_on_the_issuing_context(
    pki_files: dict[str, Path], ca: trustme.CA
) -> None:
    first, second = _server(pki_files, "per-context"), _server(pki_files, "per-context")
    client = client_context(ca)
    session = _exchange(client, first).session
    assert session is not None and session.has_ticket
    assert _exchange(client, first, session).session_reused
    assert not _exchange(client, second, session).session_reused


def test_session_tickets_shared_resumes_on_another_context(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    first, second = _server(pki_files, "shared"), _server(pki_files, "shared")
    client = client_context(ca)
    session = _exchange(client, first).session
    assert session is not None
    assert _exchange(client, second, session).session_reused


def test_session_tickets_takes_three_values_as_flag_and_key(pki_files: dict[str, Path]) -> None:
    opts = server_opts(pki_files, "127.0.0.1:1", allow_all=True, listen="127.0.0.1:0")
    assert tunnel_config("server", {**opts, "session-tickets": "off"}).session_tickets == "off"
    assert tunnel_config("server", opts).session_tickets == "shared"
    with pytest.raises(ConfigError, match="--session-tickets: expected one of shared, per-context, off"):
        tunnel_config("server", {**opts, "session_tickets": "sometimes"})


def test_log_startup_is_one_line(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals, "_capabilities", internals.probe({}))
    with caplog.at_level(logging.INFO, logger="tlsgate"):
        internals.log_startup()
    assert [r.getMessage() for r in caplog.records] == ["internals"]
