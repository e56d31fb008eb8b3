"""Routes by server name (issue #16 part 1): one listener, a route per set of server names, each with its own
certificate, access rules and target; names no route claims go to the tunnel's own --target or are refused
with the reason in the log.

The name rules are sans-IO and tested with plain strings (hypothesis for the wildcard family); everything else
runs real TLS on loopback, port 0, with Python's ssl, curl --resolve and openssl s_client -servername as the
clients. Every wait is on an event or a bounded poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsgate.cli import cli
from tlsgate.errors import ConfigError
from tlsgate.pki import CertificateAuthority
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.config import ConfigErrors, TunnelConfig, tunnel_config
from tlsgate.settings.routes import NameTable, normalise_route_name, parse_route_flag
from tlsgate.status import ServerSource, prometheus_text

from helpers import (
    WorkersProcess,
    backend,
    eventually,
    invoke,
    port_of,
    refused,
    request,
    run_tlsgate,
    running_server,
    status_address,
    threaded_echo_server,
    tunnel,
    wait_until,
)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def binary(name: str) -> str:
    """A client binary the tests drive; .ci/run installs it, so a missing one fails rather than skips."""
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (.ci/run installs it)"
    return path


# -- names: sans-IO -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("api.example.com", "api.example.com"),
        ("API.Example.COM", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("*.Example.com", "*.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("_acme.example.com", "_acme.example.com"),
    ],
)
def test_route_names_are_kept_as_the_client_hello_carries_them(given_name: str, expected: str) -> None:
    assert normalise_route_name(given_name) == expected


@pytest.mark.parametrize(
    ("given_name", "problem"),
    [
        ("127.0.0.1", "is an IP address"),
        ("::1", "is an IP address"),
        ("[::1]", "is an IP address"),
        ("a.*.example.com", "a wildcard is"),
        ("*foo.example.com", "a wildcard is"),
        ("*", "a wildcard is"),
        ("*.com", "two labels"),
        ("straße.example", "write its A-label"),
        ("exa mple.com", "not a valid host name"),
        ("-bad.example.com", "not a valid host name"),
        ("a..b", "not a valid host name"),
        ("", "expected a host name"),
        ("x" * 64 + ".example.com", "not a valid host name"),
        ("*.10.0.1", "last label is all digits"),
    ],
)
def test_route_names_no_client_could_send_are_refused_in_one_line(given_name: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        normalise_route_name(given_name)
    message = str(caught.value)
    assert problem in message and "\n" not in message


def table() -> NameTable[str]:
    return NameTable([("api.example.com", "api"), ("*.example.com", "wild"), ("*.api.example.com", "api-wild")])


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("api.example.com", "api"),  # exact wins over *.example.com
        ("API.EXAMPLE.COM", "api"),
        ("api.example.com.", "api"),
        ("www.example.com", "wild"),
        ("v1.api.example.com", "api-wild"),
        ("example.com", None),  # a wildcard needs one label in front
        ("a.b.example.com", None),  # ... and only one
        ("127.0.0.1", None),  # RFC 6066: no IP literals in SNI
        ("::1", None),
        ("[::1]", None),
        ("www.example.123", None),  # an all-digit last label is an IP's, not a TLD's
        ("", None),
        (None, None),
        ("bücher.example.com", None),  # not an A-label: CPython never hands us one
    ],
)
def test_server_names_match_case_insensitively_exact_first_and_wildcards_one_label_deep(
    sni: str | None, expected: str | None
) -> None:
    assert table().match(sni) == expected


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_TLD = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)  # never all digits: that is an IP address


@given(
    domain=st.lists(_LABEL, min_size=1, max_size=3).flatmap(lambda labels: _TLD.map(lambda tld: [*labels, tld])),
    extra=st.lists(_LABEL, min_size=0, max_size=3),
)
def test_a_wildcard_claims_exactly_one_more_label(domain: list[str], extra: list[str]) -> None:
    names = NameTable([(normalise_route_name("*." + ".".join(domain)), "wild")])
    sni = ".".join([*extra, *domain])
    assert (names.match(sni) == "wild") == (len(extra) == 1)
    assert (names.match(sni.upper() + ".") == "wild") == (len(extra) == 1)


def test_two_routes_cannot_claim_one_name() -> None:
    with pytest.raises(ConfigError, match="claimed by two routes"):
        NameTable([("a.example.com", 1), ("a.example.com", 2)])


@pytest.mark.parametrize(
    "value", ["api.example.com", "=127.0.0.1:80", "api.example.com=", "api.example.com 127.0.0.1:80"]
)
def test_a_route_flag_without_names_or_target_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"expected NAME\[,NAME...\]=HOST:PORT"):
        parse_route_flag(value)


def test_a_route_flag_takes_several_names() -> None:
    assert parse_route_flag("API.example.com,*.api.example.com=127.0.0.1:8080") == (
        ("api.example.com", "*.api.example.com"),
        "127.0.0.1:8080",
    )


# -- a PKI with one certificate per route --------------------------------------------------------------------------


@dataclass
class Pki:
    ca: CertificateAuthority
    files: dict[str, dict[str, str]]  # name -> {"cert": ..., "key": ...}

    def client(self, name: str | None = "alice", *, check_hostname: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.check_hostname = check_hostname
        if name is not None:
            ctx.load_cert_chain(self.files[name]["cert"], self.files[name]["key"])
        return ctx

    def server(self, name: str) -> dict[str, Any]:
        return {"cert": [self.files[name]["cert"]], "key": [self.files[name]["key"]]}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority.create(tmp_path / "ca")
    files: dict[str, dict[str, str]] = {}
    for name, dns in (
        ("default", ["localhost"]),
        ("api", ["api.example.com", "*.api.example.com"]),
        ("admin", ["admin.example.com"]),
        ("idn", ["xn--bcher-kva.example"]),
    ):
        written = ca.issue(name, dns=dns).write(tmp_path, name)
        files[name] = {"cert": str(written["cert"]), "key": str(written["key"])}
    for name, ous in (("alice", ["eng"]), ("bob", ["sales"])):
        written = ca.issue(name, ous=ous, client=True, server=False).write(tmp_path, name)
        files[name] = {"cert": str(written["cert"]), "key": str(written["key"])}
    return Pki(ca, files)


def tagged(tag: bytes) -> Any:
    """A backend that says who it is, then echoes until EOF or "quit": the test learns which target it reached."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(tag + b"\n")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
            if data.endswith(b"quit\n"):  # openssl s_client waits for the server to close first
                break

    return handle


@dataclass
class Targets:
    default: Any
    api: Any
    admin: Any
    idn: Any


@contextlib.asynccontextmanager
async def targets() -> AsyncIterator[Targets]:
    async with (
        backend(tagged(b"default")) as default,
        backend(tagged(b"api")) as api,
        backend(tagged(b"admin")) as admin,
        backend(tagged(b"idn")) as idn,
    ):
        yield Targets(default, api, admin, idn)


def options(pki: Pki, be: Targets, *, default: bool = True, **extra: Any) -> dict[str, Any]:
    """A server tunnel: localhost's certificate and OU=eng for names no route claims (when ``default``), routes
    api (its own certificate, inherits OU=eng), admin (its own certificate, CN=bob only) and bücher.example."""
    opts: dict[str, Any] = {
        **pki.server("default"),
        "cacert": str(pki.ca.cert_path),
        "allow_ou": ["eng"],
        "shutdown_timeout": "5s",
        "route": [
            {"name": "api", "server-names": ["api.example.com", "*.api.example.com"], "target": be.api.address,
             **pki.server("api")},
            {"name": "admin", "server-names": "admin.example.com", "target": be.admin.address,
             "allow-cn": ["bob"], **pki.server("admin")},
            {"name": "idn", "server-names": ["bücher.example"], "target": be.idn.address, **pki.server("idn")},
        ],
    }  # fmt: skip
    if default:
        opts["target"] = be.default.address
    opts.update(extra)
    return opts


async def reach(port: int, ctx: ssl.SSLContext, server_name: str) -> tuple[bytes, dict[str, Any], Stream]:
    """Connect with SNI ``server_name`` ("" for none): the backend's tag, the server's certificate, the stream."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name), 30
    )
    tag = await asyncio.wait_for(reader.readline(), 30)
    tls = writer.get_extra_info("ssl_object")
    return tag.strip(), tls.getpeercert(), (reader, writer)


async def close(stream: Stream) -> None:
    stream[1].close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await stream[1].wait_closed()


def dns_names(cert: dict[str, Any]) -> set[str]:
    return {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == "refused"]


# -- one listener, many routes ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_each_route_gets_its_own_certificate_and_target(pki: Pki) -> None:
    async with targets() as be, tunnel(**options(pki, be)) as tun:
        port = port_of(tun)
        for name, tag, san in (
            ("api.example.com", b"api", "api.example.com"),
            ("v2.api.example.com", b"api", "*.api.example.com"),
            ("admin.example.com", b"admin", None),  # alice is refused there: checked below
            ("localhost", b"default", "localhost"),
            ("xn--bcher-kva.example", b"idn", "xn--bcher-kva.example"),
        ):
            ctx = pki.client("bob" if name.startswith("admin") else "alice")
            got, cert, stream = await reach(port, ctx, name)
            assert got == tag, name
            if san is not None:
                assert san in dns_names(cert)
            await close(stream)
        assert (be.api.connections, be.admin.connections, be.default.connections, be.idn.connections) == (2, 1, 1, 1)


@pytest.mark.asyncio
async def test_a_routes_own_rules_refuse_in_the_handshake_before_its_target_sees_a_byte(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with targets() as be, tunnel(**options(pki, be)) as tun:
        # Refused inside the handshake (the route's context carries the route's check): an alert, not a reset.
        with pytest.raises(ssl.SSLError, match=r"(?i)bad.certificate"):
            await reach(port_of(tun), pki.client("alice"), "admin.example.com")
        # bob is not OU=eng: the route api inherits the tunnel's rule and refuses him.
        with pytest.raises(ssl.SSLError, match=r"(?i)bad.certificate"):
            await reach(port_of(tun), pki.client("bob"), "api.example.com")
        await wait_until(lambda: len(refusals(caplog)) == 2)
        assert be.admin.connections == 0 and be.api.connections == 0
        lines = refusals(caplog)
        assert [(line["route"], line["rule"]) for line in lines] == [("admin", "identity"), ("api", "identity")]
        assert tun.stats.route_counts["admin"]["refused"] == 1


def resumed_on(port: int, ctx: ssl.SSLContext, name: str, session: ssl.SSLSession | None) -> tuple[bool, Any, bytes]:
    """One connection with SNI ``name`` offering ``session``: resumed?, the session to offer next, what came back."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=name, session=session) as tls,
    ):
        try:
            got = tls.recv(64)  # the backend's tag; TLS 1.3 session tickets arrive before it
        except (ssl.SSLError, ConnectionError):
            got = b""
        return bool(tls.session_reused), tls.session, got


@pytest.mark.asyncio
async def test_a_session_resumed_under_another_name_answers_to_that_routes_rules(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL does not verify a resumed session again, and TLS 1.3 lets a client offer a ticket from one name
    under another: alice's ticket from route api must not carry her past route admin's CN=bob rule."""
    async with targets() as be, tunnel(**options(pki, be)) as tun:
        ctx = pki.client("alice", check_hostname=False)
        port = port_of(tun)
        _, session, got = await asyncio.to_thread(resumed_on, port, ctx, "api.example.com", None)
        assert got == b"api\n" and session is not None
        reused, _, got = await asyncio.to_thread(resumed_on, port, ctx, "admin.example.com", session)
        assert got == b"" and be.admin.connections == 0
        await wait_until(lambda: any(line.get("route") == "admin" for line in refusals(caplog)))
        line = next(line for line in refusals(caplog) if line.get("route") == "admin")
        assert line["rule"] == "identity" and "alice" in line["reason"]
        # Resumed or not (OpenSSL may decline the ticket), the route's rule decided; say which path ran.
        print(f"resumed across routes: {reused}")


@pytest.mark.asyncio
async def test_unknown_name_without_a_default_target_is_refused_with_the_reason(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with targets() as be, tunnel(**options(pki, be, default=False)) as tun:
        with pytest.raises(ssl.SSLError, match=r"UNRECOGNIZED_NAME|unrecognized name"):
            await reach(port_of(tun), pki.client(), "other.example.com")
        with pytest.raises(ssl.SSLError):
            await reach(port_of(tun), pki.client(check_hostname=False), "")  # no SNI at all
        await wait_until(lambda: len(refusals(caplog)) == 2)
        reasons = [line["reason"] for line in refusals(caplog)]
        assert reasons == [
            "no route for server name 'other.example.com', and the tunnel has no default target",
            "no server name (SNI) sent, and the tunnel has no default target",
        ]
        assert all(line["rule"] == "route" for line in refusals(caplog))
        assert tun.stats.refused == {"route": 2}
        assert be.default.connections == 0
        # The routes themselves still work.
        tag, _, stream = await reach(port_of(tun), pki.client(), "api.example.com")
        assert tag == b"api"
        await close(stream)


@pytest.mark.asyncio
async def test_a_route_target_may_be_ipv6_or_a_unix_socket(pki: Pki, tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    served = asyncio.Event()

    async def on_unix(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await tagged(b"unix")(reader, writer)
        writer.close()
        served.set()

    unix = await asyncio.start_unix_server(on_unix, path)
    try:
        async with targets() as be, backend(tagged(b"v6"), host="::1") as v6:
            opts = options(pki, be)
            opts["route"][0] = {**opts["route"][0], "target": f"[::1]:{v6.port}"}
            opts["route"][1] = {**opts["route"][1], "target": f"unix:{path}"}
            async with tunnel(**opts) as tun:
                for name, ctx, tag in (
                    ("api.example.com", pki.client(), b"v6"),
                    ("admin.example.com", pki.client("bob"), b"unix"),
                ):
                    got, _, stream = await reach(port_of(tun), ctx, name)
                    assert got == tag
                    await close(stream)
                await asyncio.wait_for(served.wait(), 30)
    finally:
        unix.close()
        await unix.wait_closed()


@pytest.mark.asyncio
async def test_no_sni_and_unknown_names_go_to_the_default_target(pki: Pki) -> None:
    async with targets() as be, tunnel(**options(pki, be)) as tun:
        for name in ("", "other.example.com", "a.b.api.example.com"):
            tag, cert, stream = await reach(port_of(tun), pki.client(check_hostname=False), name)
            assert tag == b"default" and dns_names(cert) == {"localhost"}, name
            await close(stream)
        assert be.default.connections == 3 and be.api.connections == 0


@pytest.mark.asyncio
async def test_server_names_match_whatever_their_case_and_trailing_dot(pki: Pki) -> None:
    async with targets() as be, tunnel(**options(pki, be)) as tun:
        for name in ("API.Example.COM", "Admin.Example.Com"):
            ctx = pki.client("bob" if name.lower().startswith("admin") else "alice")
            tag, _, stream = await reach(port_of(tun), ctx, name)
            assert tag == name.split(".")[0].lower().encode()
            await close(stream)


def s_client(port: int, server_name: str, pki: Pki, client: str = "alice") -> subprocess.CompletedProcess[str]:
    """``openssl s_client -servername``: sends a line, prints the session and what came back."""
    return subprocess.run(
        [
            binary("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name,
            "-CAfile", str(pki.ca.cert_path), "-cert", pki.files[client]["cert"], "-key", pki.files[client]["key"],
            "-verify_return_error", "-ign_eof",
        ],
        input="hello\nquit\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.asyncio
async def test_openssl_s_client_servername_picks_the_route(pki: Pki) -> None:
    async with targets() as be, tunnel(**options(pki, be)) as tun:
        result = await asyncio.to_thread(s_client, port_of(tun), "api.example.com.", pki)
        assert "subject=CN = api" in result.stdout, result.stdout + result.stderr
        assert "api\nhello" in result.stdout
        assert be.api.connections == 1


@pytest.mark.asyncio
async def test_an_ip_literal_in_sni_matches_no_route(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """RFC 6066 forbids it, and curl never sends one; openssl s_client does if told to."""
    async with targets() as be, tunnel(**options(pki, be, default=False)) as tun:
        result = await asyncio.to_thread(s_client, port_of(tun), "127.0.0.1", pki)
        assert result.returncode != 0
        assert "unrecognized name" in result.stderr
        await wait_until(lambda: len(refusals(caplog)) == 1)
        assert refusals(caplog)[0]["reason"].startswith("no route for server name '127.0.0.1'")
        assert be.default.connections == 0


@pytest.mark.parametrize("routes", [True, False], ids=["routes", "sni-certificates"])
@pytest.mark.asyncio
async def test_a_server_name_that_is_not_ascii_is_refused_in_one_line_without_a_traceback(
    pki: Pki, routes: bool
) -> None:
    """CPython fails to decode raw UTF-8 in SNI before an SNI callback runs, and printed a traceback with the
    client's bytes for each such ClientHello: a log any client could flood. Routes set an SNI callback, and so
    do several --cert pairs (certificates by name) without routes."""
    async with backend(tagged(b"api")) as be:
        args = [
            "server", "--listen", "127.0.0.1:0", "--cacert", str(pki.ca.cert_path), "--allow-ou", "eng",
            "--cert", pki.files["default"]["cert"], "--key", pki.files["default"]["key"],
        ]  # fmt: skip
        if routes:
            args += ["--route", f"api.example.com={be.address}"]
        else:
            args += ["--cert", pki.files["api"]["cert"], "--key", pki.files["api"]["key"], "--target", be.address]
        async with run_tlsgate(args, listening=True) as server:
            for _ in range(3):
                result = await asyncio.to_thread(s_client, server.port, "bücher.example", pki)
                assert result.returncode != 0
            line = await server.wait_for_line("refused" if routes else "handshake failed", 3)
            if routes:
                assert "route" in line and "server name (SNI) is not ASCII" in line, line
            server.signal(signal.SIGTERM)
            assert await server.exit_code() == 0
        assert "Traceback" not in server.log and "Exception ignored" not in server.log, server.log
        assert "b\\xc3" not in server.log and be.connections == 0


def curl(port: int, url_host: str, pki: Pki) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            binary("curl"), "--silent", "--show-error", "--max-time", "30",
            "--resolve", f"{url_host.encode('idna').decode()}:{port}:127.0.0.1", "--cacert", str(pki.ca.cert_path),
            "--cert", pki.files["alice"]["cert"], "--key", pki.files["alice"]["key"],
            f"https://{url_host}:{port}/",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def http_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nhi\n")
    await writer.drain()


@pytest.mark.asyncio
async def test_curl_resolve_reaches_each_route_including_a_unicode_name(pki: Pki) -> None:
    async with backend(http_answer) as web, backend(http_answer) as idn:
        opts: dict[str, Any] = {
            **pki.server("default"), "cacert": str(pki.ca.cert_path), "allow_ou": ["eng"],
            "route": [
                {"name": "web", "server-names": "api.example.com", "target": web.address, **pki.server("api")},
                {"name": "idn", "server-names": "bücher.example", "target": idn.address, **pki.server("idn")},
            ],
            "target": web.address,
        }  # fmt: skip
        async with tunnel(**opts) as tun:
            # curl turns bücher.example into its A-label (libidn2) for DNS, SNI and the certificate check alike.
            for host, be in (("api.example.com", web), ("bücher.example", idn)):
                result = await asyncio.to_thread(curl, port_of(tun), host, pki)
                assert result.returncode == 0 and result.stdout == "hi\n", result.stderr
                assert be.connections >= 1
            assert tun.stats.route_counts["idn"]["established"] == 1


# -- config: routes in a file and on the command line ------------------------------------------------------------


def test_a_route_inherits_the_tunnels_settings_group_by_group(pki: Pki) -> None:
    cfg = tunnel_config(
        "server",
        {
            **pki.server("default"), "listen": "127.0.0.1:0", "target": "127.0.0.1:1",
            "cacert": str(pki.ca.cert_path), "allow_ou": ["eng"], "allow_from": ["127.0.0.0/8"],
            "route": [
                {"name": "a", "server-names": ["a.example.com"], "target": "127.0.0.1:2"},
                {"name": "b", "server-names": ["b.example.com"], "target": "127.0.0.1:3", "allow-cn": ["bob"],
                 **pki.server("api")},
            ],
        },
    )  # fmt: skip
    a, b = cfg.route
    assert (a.name, a.server_names, str(a.cfg.target)) == ("a", ("a.example.com",), "127.0.0.1:2")
    assert a.cfg.allow_ou == ("eng",) and a.cfg.cert == cfg.cert and a.cfg.allow_from == cfg.allow_from
    # b set a rule of its own: none of the tunnel's rules mix in.
    assert b.cfg.allow_cn == ("bob",) and b.cfg.allow_ou == () and b.cfg.cert == tuple(pki.server("api")["cert"])
    assert b.cfg.cacert == cfg.cacert and b.cfg.allow_from == cfg.allow_from and len(cfg.allow_from) == 1
    assert cfg.route_default


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ({"name": "x", "server-names": ["x.example.com"], "target": "127.0.0.1:2", "cacert": "ca.pem"},
         "route 'x': 'cacert' cannot be set per route: it is the tunnel's for every route"),
        ({"name": "x", "server-names": ["x.example.com"], "target": "127.0.0.1:2", "listen": "127.0.0.1:0"},
         "route 'x': 'listen' cannot be set per route (a route takes: server-names,"),
        ({"name": "x", "server-names": ["x.example.com"]}, "route 'x': target is required"),
        ({"name": "x", "target": "127.0.0.1:2"}, "route 'x': server-names is required"),
        ({"server-names": ["x.example.com"], "target": "127.0.0.1:2"}, "route #1: name is required"),
        ({"name": "default", "server-names": ["x.example.com"], "target": "127.0.0.1:2"}, "choose another"),
        ({"name": "x", "server-names": ["10.0.0.1"], "target": "127.0.0.1:2"}, "is an IP address"),
        ({"name": "x", "server-names": ["x.example.com"], "target": "192.0.2.1:2"},
         "route 'x': --target 192.0.2.1:2 is not on this machine"),
        ({"name": "x", "server-names": ["x.example.com"], "target": "127.0.0.1:2", "cert": "/nonexistent/x.pem",
          "key": "/nonexistent/x.key"}, "route 'x': --cert: /nonexistent/x.pem: no such file"),
        ({"name": "x", "server-names": ["x.example.com"], "target": "127.0.0.1:2", "allow-all": True,
          "allow-cn": ["bob"]}, "route 'x': --allow-all and --allow-cn are mutually exclusive"),
    ],
)  # fmt: skip
def test_a_bad_route_is_reported_in_one_line_naming_it(pki: Pki, route: dict[str, Any], problem: str) -> None:
    opts = {**pki.server("default"), "listen": "127.0.0.1:0", "target": "127.0.0.1:1", "cacert": str(pki.ca.cert_path),
            "allow_all": True}  # fmt: skip
    with pytest.raises(ConfigErrors) as caught:
        tunnel_config("server", {**opts, "route": [route]})
    assert any(p.startswith(problem) or problem in p for p in caught.value.problems), caught.value.problems


def test_two_routes_claiming_one_name_are_refused(pki: Pki) -> None:
    opts = {**pki.server("default"), "listen": "127.0.0.1:0", "target": "127.0.0.1:1", "cacert": str(pki.ca.cert_path),
            "allow_all": True}  # fmt: skip
    routes = [
        {"name": "a", "server-names": ["X.example.com"], "target": "127.0.0.1:2"},
        {"name": "b", "server-names": ["x.example.com."], "target": "127.0.0.1:3"},
    ]
    with pytest.raises(
        ConfigErrors, match=re.escape("route 'b': server name 'x.example.com' is claimed by route 'a' too")
    ):
        tunnel_config("server", {**opts, "route": routes})


def test_routes_refuse_pin_only_authentication(pki: Pki) -> None:
    """A pin-only client's certificate is never verified against the CA: resumed under another route's name,
    it would meet that route's CA-based rules unverified."""
    opts = {**pki.server("default"), "listen": "127.0.0.1:0", "target": "127.0.0.1:1", "allow_all": True,
            "cacert": str(pki.ca.cert_path)}  # fmt: skip
    pin = "a" * 64
    with pytest.raises(ConfigErrors, match="'allow-spki-pin' cannot be set per route: it is the tunnel's"):
        tunnel_config("server", {**opts, "route": [{"name": "x", "server-names": "x.example.com",
                                                    "target": "127.0.0.1:2", "allow-spki-pin": [pin]}]})  # fmt: skip
    tunnel_only = {k: v for k, v in opts.items() if k not in ("allow_all", "cacert")}
    with pytest.raises(ConfigErrors, match="routes cannot be combined with allow-spki-pin"):
        tunnel_config("server", {**tunnel_only, "allow_spki_pin": [pin], "route": ["x.example.com=127.0.0.1:2"]})


def test_routes_are_for_server_mode(pki: Pki) -> None:
    with pytest.raises(ConfigErrors, match="--route is for server mode"):
        tunnel_config(
            "client",
            {"listen": "127.0.0.1:0", "target": "127.0.0.1:1", "disable_authentication": True,
             "route": ["a.example.com=127.0.0.1:2"]},
        )  # fmt: skip


def test_without_its_own_target_a_tunnel_refuses_names_no_route_claims(pki: Pki) -> None:
    opts = {**pki.server("default"), "cacert": str(pki.ca.cert_path), "allow_all": True}
    cfg = tunnel_config("server", {**opts, "listen": "127.0.0.1:0", "route": ["a.example.com=127.0.0.1:2"]})
    assert not cfg.route_default and [r.name for r in cfg.route] == ["a.example.com"]
    with pytest.raises(ConfigErrors, match="--target is required"):
        tunnel_config("server", {**opts, "listen": "127.0.0.1:0"})


def test_the_route_flag_is_refused_in_one_line_with_exit_2(pki: Pki) -> None:
    base = ["server", "--listen", "127.0.0.1:0", "--cert", pki.files["default"]["cert"], "--key",
            pki.files["default"]["key"], "--cacert", str(pki.ca.cert_path), "--allow-all"]  # fmt: skip
    refused(invoke(cli, *base, "--route", "api.example.com"), "--route: expected NAME[,NAME...]=HOST:PORT")
    refused(invoke(cli, *base, "--route", "10.1.1.1=127.0.0.1:80"), "is an IP address")
    refused(invoke(cli, *base, "--route", "a.example.com=127.0.0.1:99999"), "--target")


def test_check_config_describes_routes(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        f"""
[[tunnel]]
name = "front"
mode = "server"
listen = "127.0.0.1:0"
cert = "{pki.files["default"]["cert"]}"
key = "{pki.files["default"]["key"]}"
cacert = "{pki.ca.cert_path}"
allow-ou = ["eng"]

[[tunnel.route]]
name = "api"
server-names = ["api.example.com", "*.api.example.com"]
target = "127.0.0.1:8080"
cert = "api.pem"
key = "api.key"
allow-cn = ["ci"]
""",
        encoding="utf-8",
    )
    # api.pem and api.key sit beside the file (the pki fixture wrote them there): relative to it, as the tunnel's.
    result = invoke(cli, "check-config", path)
    assert result.exit_code == 0, result.output
    assert "route api: api.example.com, *.api.example.com -> 127.0.0.1:8080" in result.output
    assert "names no route claims: refused" in result.output


# -- status, metrics, policy check --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_metrics_count_connections_per_route(pki: Pki) -> None:
    async with targets() as be, tunnel(**options(pki, be)) as tun:
        _, _, held = await reach(port_of(tun), pki.client(), "api.example.com")
        for name in ("api.example.com", "localhost"):
            _, _, stream = await reach(port_of(tun), pki.client(), name)
            await close(stream)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await reach(port_of(tun), pki.client("alice"), "admin.example.com")
        await wait_until(lambda: tun.stats.route_counts.get("admin", {}).get("refused") == 1)
        await wait_until(lambda: tun.stats.closed == 2)
        text = prometheus_text(await ServerSource(tun.server).snapshot(), "tlsgate")  # type: ignore[attr-defined]
        label = f'tunnel="{tun.label}"'
        assert f'tlsgate_route_connections_total{{{label},route="api"}} 2' in text
        assert f'tlsgate_route_connections_total{{{label},route="default"}} 1' in text
        assert f'tlsgate_route_refused_total{{{label},route="admin"}} 1' in text
        assert f'tlsgate_route_open_connections{{{label},route="api"}} 1' in text
        await close(held)


@pytest.mark.asyncio
async def test_status_is_up_only_when_every_routes_target_is(pki: Pki, dead_port: int) -> None:
    async with targets() as be:
        opts = options(pki, be, listen="127.0.0.1:0", default=False)
        opts["route"][2] = {**opts["route"][2], "target": f"127.0.0.1:{dead_port}"}
        cfg = tunnel_config("server", opts, name="front")
        async with running_server(Server([cfg], ProcessOptions(status="http://127.0.0.1:0"))) as server:
            code, _, body = await request(status_address(server), "/_status")
            assert code == 503, body
            doc = json.loads(body)
            assert doc["backend_error"].startswith(f"route idn: 127.0.0.1:{dead_port}: "), doc
            assert "route api" not in doc["backend_error"] and "route default" not in doc["backend_error"]
            assert doc["forward_address"] == "no default (routes: api,admin,idn)"


def test_workers_count_routes_together(pki: Pki, tmp_path: Path) -> None:
    """With --workers every worker builds the routes; the parent sums their per-route numbers."""
    with threaded_echo_server() as target:
        args = [
            "server", "--listen", "127.0.0.1:0", "--cacert", str(pki.ca.cert_path), "--allow-ou", "eng",
            "--cert", pki.files["default"]["cert"], "--key", pki.files["default"]["key"],
            "--cert", pki.files["api"]["cert"], "--key", pki.files["api"]["key"],
            "--route", f"api.example.com={target}", "--workers", "2",
        ]  # fmt: skip
        gate = WorkersProcess(args, tmp_path / "tlsgate.log")
        try:
            gate.wait_ready(2)
            ctx = pki.client()
            for _ in range(4):
                with (
                    socket.create_connection(("127.0.0.1", gate.port), timeout=30) as raw,
                    ctx.wrap_socket(raw, server_hostname="api.example.com") as tls,
                ):
                    tls.sendall(b"ping")
                    assert tls.recv(4) == b"ping"
            eventually(
                "4 connections on the route", lambda: gate.metric("tlsgate.route.api.example.com.established") == 4
            )
            assert gate.status()["forward_address"] == "no default (routes: api.example.com)"
        finally:
            gate.stop()


def test_policy_check_sni_explains_which_routes_rules_apply(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "tlsgate.toml"
    path.write_text(
        f"""
[[tunnel]]
name = "front"
mode = "server"
listen = "127.0.0.1:0"
target = "127.0.0.1:8000"
cert = "{pki.files["default"]["cert"]}"
key = "{pki.files["default"]["key"]}"
cacert = "{pki.ca.cert_path}"
allow-ou = ["eng"]
allow-from = ["127.0.0.0/8"]

[[tunnel.route]]
name = "admin"
server-names = ["admin.example.com"]
target = "127.0.0.1:8080"
allow-cn = ["bob"]
""",
        encoding="utf-8",
    )
    common = ("policy", "check", "--config", path, "--cert", pki.files["alice"]["cert"])
    denied = invoke(cli, *common, "--sni", "ADMIN.example.com")
    assert denied.exit_code == 1, denied.output
    assert denied.output.startswith("DENY\nrule:   identity\nreason: CN=alice not allowed (allowed: CN bob)\n")
    assert "route:  admin" in denied.output
    allowed = invoke(cli, *common, "--sni", "www.example.com")
    assert allowed.exit_code == 0, allowed.output
    assert "route:  default (no route claims www.example.com)" in allowed.output
    elsewhere = invoke(cli, *common, "--sni", "api.example.com", "--from", "10.1.2.3")  # every route's address rules
    assert elsewhere.exit_code == 1 and elsewhere.output.startswith("DENY\nrule:   allow-from\n"), elsewhere.output
    refused(invoke(cli, "policy", "check", "--sni", "a.example.com"), "--sni and --tunnel need --config FILE")
    refused(invoke(cli, *common, "--allow-cn", "x"), "--config takes the rules from the file: drop --allow-cn")
    refused(invoke(cli, *common, "--tunnel", "nope"), "--tunnel 'nope': no server tunnel of that name")
    path.write_text(path.read_text(encoding="utf-8").replace('target = "127.0.0.1:8000"\n', ""), encoding="utf-8")
    unrouted = invoke(cli, *common, "--sni", "www.example.com")
    assert unrouted.exit_code == 1
    assert unrouted.output == (
        "DENY\nrule:   route\n"
        "reason: no route for server name 'www.example.com', and the tunnel has no default target\n"
    )


# -- reload ---------------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def file_server(wanted: list[TunnelConfig]) -> AsyncIterator[Server]:
    """A Server in file mode: each reload reads ``wanted`` again, as ``tlsgate run`` re-reads its file."""
    async with Server(list(wanted), ProcessOptions(), load_configs=lambda: list(wanted)) as server:
        yield server


async def echoes(stream: Stream, payload: bytes = b"still here") -> bool:
    reader, writer = stream
    writer.write(payload)
    return await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload


@pytest.mark.asyncio
async def test_reload_adds_changes_and_removes_routes_keeping_connections_on_unchanged_ones(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with targets() as be:
        first = options(pki, be, listen="127.0.0.1:0")
        cfg = tunnel_config("server", first, name="front")
        wanted = [cfg]
        async with file_server(wanted) as server:
            tun = server.tunnels["front"]
            port = port_of(tun)
            _, _, on_api = await reach(port, pki.client("alice"), "api.example.com")
            _, _, on_admin = await reach(port, pki.client("bob"), "admin.example.com")
            _, _, on_idn = await reach(port, pki.client("alice"), "xn--bcher-kva.example")

            routes = [r for r in first["route"] if r["name"] != "idn"]  # idn removed
            routes[1] = {**routes[1], "allow-cn": ["carol"]}  # admin changed: bob no longer allowed
            routes.append(
                {"name": "new", "server-names": ["new.example.com"], "target": be.idn.address, **pki.server("admin")}
            )
            wanted[0] = tunnel_config("server", {**first, "route": routes}, name="front")
            assert server.reload()

            assert server.tunnels["front"] is tun, "a change of routes alone reloads the tunnel in place"
            assert port_of(server.tunnels["front"]) == port
            assert await echoes(on_api), "a connection on an unchanged route carries on"
            for stream in (on_admin, on_idn):
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
                    await echoes(stream)
            closed = {
                getattr(r, "fields", {}).get("route"): getattr(r, "fields", {}).get("reason")
                for r in caplog.records
                if r.getMessage() == "closed on recheck"
            }
            assert closed == {"idn": "route 'idn' was removed", "admin": closed["admin"]}
            assert "bob" in closed["admin"] or "CN" in closed["admin"]
            # The new route works, and the removed name now goes to the default target.
            tag, _, stream = await reach(port, pki.client(check_hostname=False), "new.example.com")
            assert tag == b"idn"
            await close(stream)
            tag, _, stream = await reach(port, pki.client(check_hostname=False), "xn--bcher-kva.example")
            assert tag == b"default"
            await close(stream)
            await close(on_api)
