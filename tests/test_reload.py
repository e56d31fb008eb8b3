"""Reload (SIGHUP, SIGUSR1, --timed-reload): new certificates and policies apply to new connections only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trustme

from helpers import (
    assert_cut,
    backend,
    client_context,
    revocable_client,
    server_opts,
    tls_connect,
    try_client,
    tunnel,
    wait_until,
)

pytestmark = pytest.mark.asyncio


async def test_ca_bundle_reload_turns_a_refused_client_into_an_allowed_one_and_back(
    pki_files: dict[str, Path], ca: trustme.CA, other_ca: trustme.CA
) -> None:
    alice = ca.issue_cert("alice.test", common_name="alice")
    outsider = other_ca.issue_cert("alice.other.test", common_name="alice")
    bundle = pki_files["ca"]
    original = bundle.read_bytes()
    async with (
        backend() as be,
        tunnel(**server_opts(pki_files, be.address, cacert=str(bundle), allow_cn=["alice"])) as tun,
    ):
        server = tun.server  # type: ignore[attr-defined]
        # A long-lived connection that must survive every reload.
        reader, writer = await tls_connect(tun, client_context(ca, alice))
        assert not await try_client(tun, client_context(ca, outsider))

        bundle.write_bytes(original + other_ca.cert_pem.bytes())
        assert server.reload()
        assert await try_client(tun, client_context(ca, outsider))

        bundle.write_bytes(original)
        assert server.reload()
        assert not await try_client(tun, client_context(ca, outsider))

        for round_ in range(3):
            writer.write(b"still here %d" % round_)
            assert await reader.readexactly(12) == b"still here %d" % round_
        writer.close()
        await writer.wait_closed()
        assert tun.stats.reloads == 2


async def test_crl_reload_refuses_a_newly_revoked_client(tmp_path: Path) -> None:
    alice = revocable_client(tmp_path)
    ctx = alice.ctx
    # --recheck-on-reload=false: today's behaviour, the revoked client's open connection is left alone
    # (tests/test_recheck.py covers the default, which closes it).
    async with backend() as be, tunnel(target=be.address, recheck_on_reload=False, **alice.options) as tun:
        reader, writer = await tls_connect(tun, ctx)
        writer.write(b"1")
        assert await reader.readexactly(1) == b"1"

        alice.revoke()
        assert tun.server.reload()  # type: ignore[attr-defined]
        assert not await try_client(tun, ctx)
        assert tun.stats.refused.get("crl") == 1
        # Established before the revocation, and the re-check is off: reload does not cut it.
        writer.write(b"2")
        assert await reader.readexactly(1) == b"2"
        writer.close()
        await writer.wait_closed()


async def test_failed_reload_keeps_the_running_policy(
    pki_files: dict[str, Path], ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
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
        pki_files["key"].write_text("garbage\n")
        assert not tun.server.reload()  # type: ignore[attr-defined]
        assert tun.stats.reload_errors == 1
        assert await try_client(tun, client_context(ca, alice))
    assert any("reload failed" in r.getMessage() for r in caplog.records)


async def test_certificate_rotation_on_reload(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with (
        backend() as be,
        tunnel(
            target=be.address, cert=[str(pki_files["cert"])], key=[str(pki_files["key"])], disable_authentication=True
        ) as tun,
    ):
        _, w1 = await tls_connect(tun, client_context(ca))
        first = w1.get_extra_info("ssl_object").getpeercert(binary_form=True)
        rotated = ca.issue_cert("localhost", "127.0.0.1")
        rotated.cert_chain_pems[0].write_to_path(str(pki_files["cert"]))
        rotated.private_key_pem.write_to_path(str(pki_files["key"]))
        assert tun.server.reload()  # type: ignore[attr-defined]
        _, w2 = await tls_connect(tun, client_context(ca))
        second = w2.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert first != second
        for w in (w1, w2):
            w.close()
            await w.wait_closed()
        await wait_until(lambda: tun.stats.closed == 2)


async def test_address_refusal_after_reload_is_immediate(pki_files: dict[str, Path], ca: trustme.CA) -> None:
    async with (
        backend() as be,
        tunnel(
            **server_opts(pki_files, be.address, disable_authentication=True),
            deny_from=["127.0.0.0/8"],
        ) as tun,
    ):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(tun.addresses[0].rsplit(":", 1)[1]))
        except ConnectionResetError:
            pass  # the reset can beat the connect() completion: refused before a single byte, as intended
        else:
            await assert_cut(reader)
            writer.close()
        await wait_until(lambda: tun.stats.refused == {"deny-from": 1})


async def test_timed_reload_picks_up_a_new_ca_bundle(
    pki_files: dict[str, Path], ca: trustme.CA, other_ca: trustme.CA
) -> None:
    outsider = other_ca.issue_cert("bob.other.test", common_name="bob")
    async with (
        backend() as be,
        tunnel(
            **server_opts(
                pki_files,
                be.address,
                allow_cn=["bob"],
                timed_reload="1s",  # the shortest interval allowed
            )
        ) as tun,
    ):
        assert not await try_client(tun, client_context(ca, outsider))
        pki_files["ca"].write_bytes(pki_files["ca"].read_bytes() + other_ca.cert_pem.bytes())
        before = tun.stats.reloads
        await wait_until(lambda: tun.stats.reloads >= before + 1, attempts=2000)
        assert await try_client(tun, client_context(ca, outsider))
