"""check-config's one line per tunnel: what it listens on, where it forwards, and who gets through.

``describe_tunnel`` words a validated ``TunnelConfig`` the way a config file spells it (key names, rule values
as written), so ``tlsgate check-config`` shows an operator what the file will do, routes by server name included.
"""

from __future__ import annotations

from collections.abc import Sequence

from tlsgate.settings.config import TunnelConfig
from tlsgate.settings.patterns import UriPattern
from tlsgate.settings.routes import describe_routes

__all__ = ["describe_tunnel"]


def describe_tunnel(cfg: TunnelConfig) -> str:
    """One line for check-config: ``server 0.0.0.0:6380 -> localhost:6379, mTLS allow-ou eng``."""
    parts = [f"{cfg.mode} {cfg.listen} -> {cfg.target}" + (" over TLS" if cfg.target_tls else "")]
    if cfg.mode == "server":
        if cfg.disable_authentication:
            parts.append("TLS, no client certificate")
        else:
            rules = ["allow-all"] if cfg.allow_all else []
            rules += _identity_rules(cfg, "allow")
            rules += _rules(("allow-query", (cfg.allow_query,) if cfg.allow_query else ()))
            parts.append(" ".join(["mTLS", *rules]))
    else:
        rules = _identity_rules(cfg, "verify")
        rules += _rules(("verify-query", (cfg.verify_query,) if cfg.verify_query else ()))
        parts.append(" ".join(["mTLS" if cfg.cert or cfg.keystore else "TLS", *rules]))
        if cfg.proxy is not None:
            parts.append(f"via {cfg.proxy.shown}")  # never the URL's credentials
    parts += _rules(("allow-from", cfg.allow_from), ("deny-from", cfg.deny_from))
    if cfg.crl:
        parts.append(f"{len(cfg.crl)} CRL" + ("s" if len(cfg.crl) > 1 else ""))
    if cfg.proxy_mode:
        parts.append(f"PROXY v{cfg.proxy_protocol_version} {cfg.proxy_mode}")
    if cfg.target_http_headers:
        parts.append("X-Forwarded-* headers" + (" with the PEM" if cfg.target_http_cert else ""))
    return describe_routes(cfg, ", ".join(parts), describe_tunnel)


def _identity_rules(cfg: TunnelConfig, prefix: str) -> list[str]:
    """The value rules of ``--allow-*`` (server) or ``--verify-*`` (client), in the table's order."""
    kinds = ("cn", "ou", "dns", "ip", "uri", "spki_sha256", "spki_pin")
    return _rules(*((f"{prefix}-{kind.replace('_', '-')}", getattr(cfg, f"{prefix}_{kind}")) for kind in kinds))


def _rules(*pairs: tuple[str, Sequence[object]]) -> list[str]:
    return [f"{name} {','.join(_shown_rule(value) for value in values)}" for name, values in pairs if values]


def _shown_rule(value: object) -> str:
    """A parsed rule value as written in a file: a URI pattern's text, a key pin in hex, a network as CIDR."""
    if isinstance(value, UriPattern):
        return value.text
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
