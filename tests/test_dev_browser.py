"""A real browser through `tlsgate dev`: headless Chromium loads a page from a demo backend via the dev front.

Chromium on Linux trusts what the NSS database in ``$HOME/.pki/nssdb`` trusts, so running it with a temporary
HOME checks `tlsgate dev trust` end to end: before it, Chromium refuses the certificate; after it, the page
loads with no flag that weakens verification. A third test uses Chromium's SPKI allow-list instead, which
needs no certutil. Chromium runs as a subprocess bounded by a timeout; the front and the backend run in the
test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tlsgate.dev import INSTALLED, SKIPPED, DevFront, DevSettings, NssDb, TrustStores, trust
from tlsgate.dev.demo import serve_demo_backend

CHROMIUM = Path("/usr/bin/chromium")
CERTUTIL = shutil.which("certutil")
MARKER = "Hello through tlsgate"  # the demo backend's heading

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium not installed (Debian: apt-get install chromium)"
    ),
    pytest.mark.asyncio,
]
needs_certutil = pytest.mark.skipif(
    CERTUTIL is None, reason="certutil not installed (Debian: apt-get install libnss3-tools)"
)

# What lets Chromium run headless as root in a container and keeps it off the network: no sandbox (needs
# user namespaces), no GPU, no QUIC, no first-run, update, sync or background fetches.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
BROWSER_TIMEOUT = 40.0


async def dump_dom(url: str, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """Chromium's DOM of ``url`` after load, and its log; HOME and the profile are fresh dirs in tmp_path."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    env = {**os.environ, "HOME": str(home)}
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *extra, "--dump-dom", url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT)
    except TimeoutError:
        # Its own session, so the renderer and GPU helpers it forked go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.communicate()
        raise AssertionError(f"chromium did not finish loading {url} in {BROWSER_TIMEOUT:.0f}s") from None
    return out.decode(errors="replace"), err.decode(errors="replace")


@contextlib.asynccontextmanager
async def dev_front(tmp_path: Path, *names: str) -> AsyncIterator[DevFront]:
    """A demo backend and a dev front before it (listening on localhost, both loopback addresses)."""
    backend = await serve_demo_backend()
    port = backend.sockets[0].getsockname()[1]
    settings = DevSettings.from_flags(to=str(port), listen="localhost:0", names=names, ca_dir=tmp_path / "caroot")
    no_stores = TrustStores(platform="linux", system_dir=None, update_command=(), nss_dbs=(), certutil=None)
    front = DevFront(settings, stores=no_stores)
    task = asyncio.create_task(front.serve())
    started = asyncio.create_task(front.started.wait())
    try:
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            started.cancel()
            task.result()
        yield front
    finally:
        front.stop()
        await asyncio.wait_for(task, 10)
        backend.close()
        await backend.wait_closed()


def chromium_nss_stores(tmp_path: Path) -> TrustStores:
    """Only the NSS database Chromium reads under the temporary HOME: no system store, no real profile."""
    db = NssDb(tmp_path / "home" / ".pki" / "nssdb", "Chromium (temporary HOME)", create=True)
    return TrustStores(platform="linux", system_dir=None, update_command=(), nss_dbs=(db,), certutil=CERTUTIL)


@needs_certutil
async def test_chromium_loads_the_page_once_tlsgate_dev_trust_put_the_ca_in_its_nss_db(tmp_path: Path) -> None:
    async with dev_front(tmp_path, "myapp.localhost") as front:
        url = f"https://localhost:{front.port}/"
        dom, log = await dump_dom(url, tmp_path)
        assert MARKER not in dom
        assert "ERR_CERT_AUTHORITY_INVALID" in log  # refused for the right reason: an unknown CA

        results = trust(front.ca.cert_path, chromium_nss_stores(tmp_path))
        assert [r.outcome for r in results] == [SKIPPED, INSTALLED], results

        dom, log = await dump_dom(url, tmp_path)
        assert MARKER in dom, log
        # Chromium resolves *.localhost to loopback itself; the extra --name is in the certificate.
        dom, log = await dump_dom(f"https://myapp.localhost:{front.port}/", tmp_path)
        assert MARKER in dom, log


async def test_chromium_loads_the_page_with_the_leaf_key_pinned(tmp_path: Path) -> None:
    async with dev_front(tmp_path) as front:
        pin = front.certificate.spki_sha256_base64
        dom, log = await dump_dom(
            f"https://localhost:{front.port}/", tmp_path, f"--ignore-certificate-errors-spki-list={pin}"
        )
        assert MARKER in dom, log
        assert "GET / HTTP/1.1" in dom
