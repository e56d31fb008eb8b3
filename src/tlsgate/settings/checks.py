"""The rules that involve several settings of one tunnel, for flags and files alike: `cross_checks`.

One setting at a time is ``settings.convert``'s job; here are ghostunnel's refusals of contradicting or unsafe
combinations (a keystore and a --cert, an identity rule with --disable-authentication, a plaintext target on
another machine...), worded with the flags' names; ``settings.file.key_names`` rewords them for a file. Each
function returns every broken rule as one line, so the user sees all there is to change at once.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tlsgate.errors import shown
from tlsgate.settings.access import ServerAccess, identity_problems
from tlsgate.settings.table import UNSAFE_CIPHER_SUITES

if TYPE_CHECKING:
    from tlsgate.settings.config import TunnelConfig

__all__ = ["cross_checks", "target_status_problems"]


def target_status_problems(url: str) -> list[str]:
    """``--target-status``: an ``http://`` or ``https://`` URL with a host (ghostunnel's rule, plus the host,
    which is the Host header and, for https, the name the target's certificate must have)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return [f"--target-status {shown(url)}: should start with http:// or https://"]
    if not url.isascii() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        # The URL becomes a request line and a Host header: a space or line break would forge another one.
        return [f"--target-status {shown(url)}: spaces, control and non-ASCII characters must be percent-encoded"]
    host = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    if not host:
        return [f"--target-status {shown(url)}: give a URL with a host, such as http://localhost:8080/health"]
    return []


def cross_checks(cfg: TunnelConfig, *, require_client_identity: bool = False) -> list[str]:
    """Every rule that involves several settings, for flags and files alike, worded with the flags' names.

    ghostunnel's safety checks for unsafe listen/target are here, and its refusals of contradicting flags;
    ``settings.file.key_names`` rewords the messages for a file. One message per broken rule, so the user sees
    what to change. The rules on a server's identity flags are ``settings.access.identity_problems``, which
    ``settings.config.server_access`` applies for library callers too.
    """
    problems: list[str] = []
    values = any((cfg.allow_cn, cfg.allow_ou, cfg.allow_dns, cfg.allow_ip, cfg.allow_uri, cfg.allow_spki_sha256))
    rego = cfg.allow_policy is not None or cfg.allow_query is not None
    identity = cfg.allow_all or values or rego or bool(cfg.allow_spki_pin)
    has_pem = bool(cfg.cert or cfg.key)
    if cfg.keystore and has_pem:
        problems.append("give either --keystore or --cert/--key, not both")
    if len(cfg.cert) != len(cfg.key):
        problems.append(f"--cert given {len(cfg.cert)} time(s) but --key {len(cfg.key)}: they go in pairs")
    if cfg.mode == "server":
        if not cfg.keystore and not has_pem:
            problems.append("server mode needs a certificate: --cert and --key, or --keystore")
        problems += identity_problems(ServerAccess.of(cfg))
        if not cfg.disable_authentication and not cfg.cacert and not cfg.allow_spki_pin:
            problems.append("client certificates are verified against --cacert; give it (or --disable-authentication)")
        if cfg.disable_authentication and not cfg.listen.is_loopback and not cfg.unsafe_listen:
            problems.append(
                f"--listen {cfg.listen} is reachable from other machines and no client certificate is required; "
                "add --unsafe-listen if that is what you want"
            )
        if not cfg.target_tls and not cfg.target.is_loopback and not cfg.unsafe_target:
            problems.append(
                f"--target {cfg.target} is not on this machine and the hop is plaintext; use --target-tls, "
                "or add --unsafe-target if the network in between is trusted"
            )
        if cfg.target_status is not None:
            problems += target_status_problems(cfg.target_status)
        if cfg.target_http_cert and not cfg.target_http_headers:
            problems.append("--target-http-cert needs --target-http-headers: it adds to the header that one sets")
        if cfg.target_http_headers and any(p not in ("http/1.1", "http/1.0") for p in cfg.alpn):
            problems.append(
                "--target-http-headers rewrites HTTP/1.x only: offer only http/1.1 (or no --alpn), since a client "
                "that picks another protocol is refused"
            )
        if cfg.target_http_headers and (cfg.protocol or cfg.target_protocol):
            problems.append(
                f"--target-http-headers rewrites HTTP requests; a {cfg.protocol or cfg.target_protocol} tunnel has none"
            )
        verify = any(
            (cfg.verify_cn, cfg.verify_ou, cfg.verify_dns, cfg.verify_ip, cfg.verify_uri, cfg.verify_spki_sha256)
        )
        if verify or cfg.verify_policy or cfg.verify_query or cfg.verify_spki_pin:
            problems.append("--verify-* flags are for client mode; server mode uses --allow-*")
    else:
        if identity or cfg.crl or cfg.crl_max_age:
            problems.append("--allow-*/--crl flags are for server mode; client mode uses --verify-*")
        has_certificate = bool(cfg.keystore or cfg.cert or cfg.key)
        # ghostunnel's client mode needs a certificate unless told not to present one, and refuses both at once: a
        # certificate silently presented after --disable-authentication would be a surprise. We follow it.
        if cfg.disable_authentication and has_certificate:
            problems.append("--disable-authentication presents no certificate: drop --keystore/--cert/--key")
        if require_client_identity and not cfg.disable_authentication and not has_certificate:
            problems.append(
                "client mode needs a certificate: --cert and --key, or --keystore, or --disable-authentication"
            )
        if (cfg.verify_policy is None) != (cfg.verify_query is None):
            # ghostunnel silently ignores one without the other, which would leave the server unchecked.
            problems.append("--verify-policy and --verify-query go together: give both, or neither")
        if not cfg.listen.is_loopback and not cfg.unsafe_listen:
            problems.append(
                f"--listen {cfg.listen} exposes a plaintext port to other machines; add --unsafe-listen if intended"
            )
        problems += _verify_pin_problems(cfg)
        if cfg.proxy is not None and cfg.target.is_unix:
            # ghostunnel fails at every connection here ("only tcp"); a proxy opens TCP connections only.
            problems.append(f"--proxy reaches a HOST:PORT target; --target {cfg.target} is a unix socket")
        # A pinned server is known by its key, not its name: nothing to verify the name against.
        if cfg.target.is_unix and not cfg.override_server_name and not cfg.verify_spki_pin:
            problems.append("a unix: target in client mode needs --override-server-name to verify the server")
    unsafe = [name for name in cfg.cipher_suites if name in UNSAFE_CIPHER_SUITES]
    if unsafe and not cfg.allow_unsafe_cipher_suites:
        # ghostunnel says "invalid cipher suite option" without the flag; we say which flag unlocks it.
        problems.append(f"--cipher-suites {unsafe[0]} is unsafe (CBC): add --allow-unsafe-cipher-suites to use it")
    if cfg.timeouts.connect == 0:
        # ghostunnel refuses it too: a target that never answers would hold the connection, and its slot, forever.
        problems.append("--connect-timeout must not be 0 (a target that never answers would be waited for forever)")
    if cfg.target_tls and cfg.mode == "client":
        problems.append("--target-tls is for server mode; client mode always speaks TLS to the target")
    if (cfg.target_cert is None) != (cfg.target_key is None):
        problems.append("--target-cert and --target-key go together")
    if (cfg.target_cacert or cfg.target_server_name or cfg.target_cert) and not cfg.target_tls:
        problems.append("--target-cacert/--target-server-name/--target-cert need --target-tls")
    if cfg.protocol and cfg.mode == "client":
        problems.append(
            f"--protocol is for server mode; a client-mode tunnel answers the application's {cfg.protocol} "
            f"requests itself with --target-protocol {cfg.protocol}"
        )
    if cfg.target_protocol and cfg.mode == "server" and not cfg.target_tls:
        problems.append(
            f"--target-protocol {cfg.target_protocol} asks the target for TLS: give --target-tls too "
            "(a plaintext target needs no request)"
        )
    if cfg.accept_proxy_from and cfg.mode != "server":
        problems.append("--accept-proxy-from is for server mode")
    if cfg.proxy_protocol and cfg.proxy_protocol_mode is not None:
        # As in ghostunnel, which refuses both at once rather than pick one.
        problems.append(
            "--proxy-protocol and --proxy-protocol-mode are mutually exclusive (--proxy-protocol is "
            "--proxy-protocol-mode conn)"
        )
    elif cfg.proxy_mode in ("tls", "tls-full") and cfg.proxy_protocol_version == 1:
        problems.append(
            f"--proxy-protocol-mode {cfg.proxy_mode} needs --proxy-protocol-version 2: a v1 header has no room for TLVs"
        )
    if cfg.crl_max_age and not cfg.crl and cfg.mode == "server":
        problems.append("--crl-max-age limits the age of --crl files: give --crl too")
    problems += _unix_listener_checks(cfg)
    return problems


def _unix_listener_checks(cfg: TunnelConfig) -> list[str]:
    """Address rules never silently go unapplied: a unix peer has no IP address for them to match.

    On a unix listener they are allowed only with ``--accept-proxy-from unix``, where they apply to the client
    address each PROXY header carries (a header without one is refused).
    """
    problems: list[str] = []
    if cfg.listen.is_activated:
        return problems  # a systemd: socket's family is known only once we hold it: Server.start checks it
    if not cfg.listen.is_unix:
        if cfg.proxy_from_unix:
            problems.append(f"--accept-proxy-from unix is for a unix: --listen; {cfg.listen} takes CIDRs")
        return problems
    for network in cfg.proxy_source_networks:
        problems.append(
            f"--accept-proxy-from {network}: peers of a unix: listener have no IP address; "
            "use --accept-proxy-from unix to require a PROXY header from them"
        )
    if (cfg.allow_from or cfg.deny_from) and not cfg.proxy_from_unix:
        hint = (
            "; add --accept-proxy-from unix to apply them to the client address in a PROXY header"
            if cfg.mode == "server"
            else ""
        )
        problems.append(
            f"--allow-from/--deny-from cannot apply to --listen {cfg.listen}: its peers have no IP address "
            f"(remove them{hint})"
        )
    return problems


def _verify_pin_problems(cfg: TunnelConfig) -> list[str]:
    """Client mode: ``--verify-spki-pin`` excludes the other ways of checking the server (ghostunnel's rule), but
    not ``--disable-authentication``, which only says we present no certificate of our own."""
    if not cfg.verify_spki_pin:
        return []
    others = [
        "--" + key.replace("_", "-")
        for key in ("verify_cn", "verify_ou", "verify_dns", "verify_ip", "verify_uri", "verify_spki_sha256")
        if getattr(cfg, key)
    ]
    if cfg.verify_policy is not None or cfg.verify_query is not None:
        others.append("--verify-policy")
    if not others:
        return []
    return [
        f"--verify-spki-pin and {others[0]} are mutually exclusive: a pinned key authenticates the server alone "
        "(as in ghostunnel); to pin a key on top of the CA and name checks, use --verify-spki-sha256"
    ]
