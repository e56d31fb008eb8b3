"""``/_status``: is every tunnel's target up, and ghostunnel's JSON document that says so (200 or 503).

``check_backend`` connects to a target (and, with ``--target-status URL``, GETs that URL over the same
connection); ``status_document`` turns a snapshot and those answers into the body and HTTP code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import socket
import ssl
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from tlsgate import __version__
from tlsgate.errors import ConfigError
from tlsgate.settings.addresses import parse_address
from tlsgate.status.model import Snapshot, TunnelView

# A target's status line must fit in this, as a request must on the status port (a status line is a few bytes).
_MAX_ANSWER = 8192
# A backend that does not accept a TCP connection this fast counts as down. Kept under a second so /_status
# answers within Kubernetes' default probe timeout (1s) even when the backend hangs.
_BACKEND_TIMEOUT = 0.8


async def check_backend(view: TunnelView) -> str | None:
    """None if the target is up, else why not; the whole check takes at most _BACKEND_TIMEOUT.

    Up means: it accepts a TCP (or unix socket) connection, and with ``--target-status URL`` it also answers a
    GET of that URL, sent over that same connection, with 200 (ghostunnel's check: the URL names what to ask
    for and the Host header, the target where to ask). A tunnel with routes by server name is up when every
    route's target is (``--target-status`` asks the default target only), checked side by side. Behind a client
    ``--proxy``, the proxy is what must accept: the target's name may resolve only there, and the view carries no
    credentials to ask it with.
    """
    if not view.route_targets:
        return await _check_target(view, view.target, bool(view.target_status))
    names = list(view.route_targets)
    answers = await asyncio.gather(
        *(
            _check_target(view, view.route_targets[name], name == "default" and bool(view.target_status))
            for name in names
        )
    )
    problems = [f"route {name}: {answer}" for name, answer in zip(names, answers, strict=True) if answer is not None]
    return "; ".join(problems) or None


async def _check_target(view: TunnelView, target: str, ask_status: bool) -> str | None:
    try:
        async with asyncio.timeout(_BACKEND_TIMEOUT):
            if view.proxy:
                target = f"{target} via {view.proxy}"
                proxy = urlsplit(view.proxy)
                address = parse_address(f"{proxy.netloc}", name="proxy")
            else:
                address = parse_address(target, name="target")
            if address.is_unix:
                reader, writer = await asyncio.open_unix_connection(address.path, limit=_MAX_ANSWER)
            else:
                reader, writer = await asyncio.open_connection(address.host, address.port, limit=_MAX_ANSWER)
            try:
                if ask_status:
                    return await _get_target_status(view, reader, writer)
                return None
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"{target}: no answer within {_BACKEND_TIMEOUT}s"
    except ConfigError as err:
        return str(err)
    except ssl.SSLError as err:
        why = getattr(err, "verify_message", None) or err.reason or str(err)
        return f"{target}: TLS handshake for --target-status failed: {why}"
    except OSError as err:
        # asyncio and uvloop word a refused connect differently; the errno says the same thing on both.
        if isinstance(err, socket.gaierror) or not err.errno:
            return f"{target}: {err.strerror or err}"
        return f"{target}: {os.strerror(err.errno)}"
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return f"{target}: --target-status: no HTTP answer"


async def _get_target_status(
    view: TunnelView, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> str | None:
    """GET ``view.target_status`` over the open connection to the target; None on 200, else why not.

    An ``https://`` URL is TLS on that connection, verified as Go's default client does for ghostunnel: the
    certificate must chain to the system store (or to ``--target-cacert`` when the tunnel has one) and name the
    URL's host. Redirects are not followed: only 200 means up, as in ghostunnel.
    """
    parts = urlsplit(view.target_status)
    host = parts.hostname or ""
    if parts.scheme.lower() == "https":
        ctx = ssl.create_default_context(cafile=view.target_status_cafile or None)
        await writer.start_tls(ctx, server_hostname=host)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc.rpartition('@')[2]}\r\n"
        f"User-Agent: tlsgate/{__version__}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    writer.write(request.encode("ascii", "replace"))
    await writer.drain()
    line = await reader.readuntil(b"\n")
    match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r?\n", line)
    if match is None:
        return f"{view.target}: --target-status: no HTTP answer"
    code = int(match.group(1))
    return None if code == 200 else f"target returned status: {code}"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).astimezone().isoformat()


def status_document(snapshot: Snapshot, backend_errors: list[str | None]) -> tuple[int, dict[str, Any]]:
    """ghostunnel's /_status body and HTTP code: 200 when listening and every backend answers, else 503.

    With several tunnels the top-level listen/forward addresses are the first tunnel's (as ghostunnel has one),
    ``backend_ok`` covers all of them, and ``tunnels`` lists each one.
    """
    tunnels = snapshot.tunnels
    several = len(tunnels) > 1
    # A retiring tunnel is listed, but it takes no new connections: its backend no longer decides health.
    problems = [
        f"tunnel {view.label}: {error}" if several else error
        for view, error in zip(tunnels, backend_errors, strict=True)
        if error is not None and not view.retiring
    ]
    active = [view for view in tunnels if not view.retiring]
    if not active:
        problems.append("no tunnel is running")
    backend_ok = not problems
    ok = backend_ok and snapshot.state == "listening"
    first = active[0] if active else None
    doc: dict[str, Any] = {
        "ok": ok,
        "status": "ok" if ok else "critical",
        "listen_address": ",".join(first.listen) if first else "",
        "forward_address": first.target if first else "",
        "backend_ok": backend_ok,
        "backend_status": "ok" if backend_ok else "critical",
        "backend_error": "; ".join(problems),
        "time": datetime.now().astimezone().isoformat(),
        "hostname": socket.gethostname(),
        "message": snapshot.state,
        "revision": __version__,
        "compiler": f"{platform.python_implementation()} {platform.python_version()}",
        "last_reload": _iso(max((v.last_reload for v in active), default=time.time())),
    }
    if several:
        doc["tunnels"] = [
            {
                "name": view.label,
                "state": view.state,
                "mode": view.mode,
                "listen_address": ",".join(view.listen),
                "forward_address": view.target,
                "backend_ok": error is None,
                "backend_status": "ok" if error is None else "critical",
                "backend_error": error or "",
                "open": view.open,
                "last_reload": _iso(view.last_reload),
            }
            for view, error in zip(tunnels, backend_errors, strict=True)
        ]
    if snapshot.workers is not None:
        doc["workers"] = snapshot.workers
    return (200 if ok else 503), doc
