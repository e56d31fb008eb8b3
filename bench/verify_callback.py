#!/usr/bin/env python3
"""What the in-handshake verify callback (tlsgate.tls.internals, path ``verify``) adds to a full mTLS handshake.

Full TLS 1.3 handshakes with a client certificate over memory BIOs (no sockets, no event loop: only the TLS and
policy work), against two server contexts from `contexts.server_context` that differ only in the callback; the
policy is ``--allow-cn alice``, the check `Policy.check_peer` the engine runs after the handshake anyway.
Rounds alternate the two contexts so drift hits both alike; the figure is the median per handshake.

    .venv/bin/python bench/verify_callback.py              # 7 rounds of 300 handshakes each
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import ssl

from tlsgate.engine import runtime
from tlsgate.policy import build_policy
from tlsgate.settings.config import server_access
from tlsgate.tls import contexts, internals


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    while not all(done):
        for i, side in enumerate((c, s)):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300, help="handshakes per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as tmp:
        ca_file, server_file = Path(tmp, "ca.pem"), Path(tmp, "server.pem")
        ca.cert_pem.write_to_path(str(ca_file))
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(server_file))
        material = contexts.load_key_material(cert=str(server_file), key=str(server_file))
        plain = contexts.server_context(
            material, client_ca=str(ca_file), require_client_cert=True, session_tickets="off"
        )
        hooked = contexts.server_context(
            material, client_ca=str(ca_file), require_client_cert=True, session_tickets="off"
        )
    policy = build_policy(server_access(allow_cn=["alice"]))
    if not internals.install_peer_check(hooked, runtime._client_check(policy)):
        raise SystemExit("the verify path is off here (TLSGATE_INTERNALS?): nothing to measure")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    ca.issue_cert("alice.test", common_name="alice").configure_cert(client)
    times: dict[str, list[float]] = {"without callback": [], "with callback": []}
    for _ in range(args.rounds):
        for name, server in (("without callback", plain), ("with callback", hooked)):
            start = time.perf_counter()
            for _ in range(args.n):
                handshake(client, server)
            times[name].append((time.perf_counter() - start) / args.n * 1e6)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(", ".join(f"{name} {value:.1f} µs" for name, value in medians.items()) + " per full handshake (median)")
    print(f"the callback adds {medians['with callback'] - medians['without callback']:.1f} µs per full handshake")


if __name__ == "__main__":
    main()
