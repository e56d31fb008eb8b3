"""The log lines operators read: one per connection, one per refusal, as text or JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tlsgate import logs

from helpers import backend, client_context, server_opts, tls_connect, tunnel, wait_until


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    saved = (logs.LOGGER.handlers[:], logs.LOGGER.propagate, logs.LOGGER.level, logs.STATE.quiet)
    yield stream
    logs.LOGGER.handlers[:], logs.LOGGER.propagate, level, logs.STATE.quiet = saved
    logs.LOGGER.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    logs.flush_logs()
    return [line for line in stream.getvalue().splitlines() if line]


@pytest.mark.asyncio
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_one_line_per_connection_and_per_refusal(
    fmt: str, captured: io.StringIO, pki_files: dict[str, Path], ca: trustme.CA, other_ca: trustme.CA
) -> None:
    logs.setup_logging(fmt, stream=captured)
    alice = ca.issue_cert("alice.test", common_name="alice")
    async with (
        backend() as be,
        tunnel(
            **server_opts(
                pki_files,
                be.address,
                allow_cn=["alice"],
            )
        ) as tun,
    ):
        target = be.address
        reader, writer = await tls_connect(tun, client_context(ca, alice))
        writer.write(b"12345")
        assert await reader.readexactly(5) == b"12345"
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: tun.stats.closed == 1)
        try:
            r2, w2 = await tls_connect(tun, client_context(ca, other_ca.issue_cert("x", common_name="alice")))
            await r2.read()
            w2.close()
        except (ConnectionError, OSError):
            pass
        await wait_until(lambda: sum(tun.stats.refused.values()) == 1)
    out = lines(captured)
    closed = [line for line in out if "closed" in line and "bytes_in" in line]
    refused = [line for line in out if "refused" in line]
    assert len(closed) == 1 and len(refused) == 1, out
    if fmt == "json":
        doc = json.loads(closed[0])
        assert doc["event"] == "closed"
        assert doc["identity"] == "CN=alice"
        assert doc["bytes_in"] == 5 and doc["bytes_out"] == 5
        assert doc["target"] == target
        assert doc["peer"].startswith("127.0.0.1:")
        assert doc["duration"].endswith("s") and doc["end"]
        refusal = json.loads(refused[0])
        assert refusal["rule"] == "untrusted"
        assert "not signed by a CA in --cacert" in refusal["reason"]
    else:
        for field in ("peer=127.0.0.1:", 'identity="CN=alice"', f"target={target}", "bytes_in=5", "bytes_out=5"):
            assert field in closed[0]
        assert 'reason="client certificate is not signed by a CA in --cacert"' in refused[0]


def test_quiet_silences_a_class_of_lines(captured: io.StringIO) -> None:
    logs.setup_logging("text", quiet=["conns"], stream=captured)
    logs.event("closed", category="conns", peer="x")
    logs.event("refused", category="conn-errs", peer="y")
    assert [line.split(None, 2)[2] for line in lines(captured)] == ["refused peer=y"]
    logs.setup_logging("text", quiet=["all"], stream=captured)
    logs.event("refused", category="conn-errs", peer="z")
    logs.event("reload failed", logging.ERROR, error="boom")
    logs.flush_logs()
    assert "peer=z" not in captured.getvalue() and "boom" in captured.getvalue()


def test_a_broken_log_stream_never_raises(captured: io.StringIO) -> None:
    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    logs.setup_logging("text", stream=Full())
    before = logs.STATE.dropped_lines
    logs.event("closed", peer="x")
    logs.flush_logs()
    assert logs.STATE.dropped_lines == before + 1


def test_warnings_are_written_at_once(captured: io.StringIO) -> None:
    logs.setup_logging("text", stream=captured)
    logs.event("closed", peer="buffered")
    assert "buffered" not in captured.getvalue()
    logs.event("target unreachable", logging.WARNING, peer="urgent")
    assert "buffered" in captured.getvalue() and "urgent" in captured.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_direct_lines_match_record_lines(captured: io.StringIO, fmt: str) -> None:
    """event() formats straight into our handler; via a LogRecord (another handler attached) the line is the same."""
    logs.setup_logging(fmt, stream=captured)
    fields = {"peer": "127.0.0.1:5", "reason": "a b", "empty": "", "n": 3, "none": None}
    logs.event("closed", **fields)
    other = logging.NullHandler()
    logs.LOGGER.addHandler(other)  # two destinations: the LogRecord path
    try:
        logs.event("closed", **fields)
    finally:
        logs.LOGGER.removeHandler(other)
    direct, via_record = lines(captured)
    if fmt == "json":
        a, b = json.loads(direct), json.loads(via_record)
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
        assert a["reason"] == "a b" and a["n"] == 3 and "none" not in a
    else:
        assert direct.split(" ", 1)[1] == via_record.split(" ", 1)[1]  # all but the timestamp
        assert 'reason="a b"' in direct and "empty=" not in direct and "none" not in direct


def test_process_tags_are_added_to_every_line(captured: io.StringIO) -> None:
    logs.setup_logging("text", stream=captured)
    logs.STATE.tags["worker"] = 1
    try:
        logs.event("closed", peer="x")
        logs.event("worker died; restarting", logging.ERROR, worker=0)  # an explicit field wins
    finally:
        logs.STATE.tags.clear()
    first, second = lines(captured)
    assert first.endswith("peer=x worker=1") and second.endswith("worker=0")


def test_caplog_sees_events_after_setup_logging(captured: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    logs.setup_logging("text", stream=captured)
    logs.LOGGER.addHandler(caplog.handler)
    try:
        logs.event("closed", peer="seen")
    finally:
        logs.LOGGER.removeHandler(caplog.handler)
    assert [getattr(r, "fields", {}).get("peer") for r in caplog.records] == ["seen"]
    assert "peer=seen" in "\n".join(lines(captured))
