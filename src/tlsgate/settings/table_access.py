"""The "access rules" section of the settings table: who may connect (server mode) and whom we accept (client).

Identity rules by certificate (``allow-*`` for clients, ``verify-*`` for the server: CN, OU, DNS, IP, URI, SPKI
hash, Rego policy and query), the name a client checks the server's certificate against, and revocation (CRLs
and their age). The source-address rules (``allow-from``, ``deny-from``) sit in the listening section. This is
the table's largest section, so it has its own module; ``settings.table`` puts it in its place in the help
order. How the rules are applied lives in ``tlsgate.policy``.
"""

from __future__ import annotations

from tlsgate.settings.setting import Setting, duration_setting

__all__ = ["ACCESS_RULES"]

ACCESS_RULES = (
    Setting(
        "allow_all", "flag", "access rules", "Allow any client with a certificate signed by --cacert.", scope="server"
    ),
    Setting(
        "allow_cn",
        "names",
        "access rules",
        "Allow clients whose certificate has this Common Name (repeatable)",
        scope="server",
        metavar="CN",
    ),
    Setting(
        "allow_ou",
        "names",
        "access rules",
        "Allow clients whose certificate has this Organizational Unit (repeatable)",
        scope="server",
        metavar="OU",
    ),
    Setting(
        "allow_dns",
        "names",
        "access rules",
        "Allow clients whose certificate has this DNS SAN (repeatable)",
        scope="server",
        metavar="NAME",
        aliases=("--allow-dns-san",),
    ),
    Setting(
        "allow_ip",
        "ips",
        "access rules",
        "Allow clients whose certificate has this IP SAN (repeatable)",
        scope="server",
        metavar="IP",
        aliases=("--allow-ip-san",),
    ),
    Setting(
        "allow_uri",
        "uris",
        "access rules",
        "Allow clients with this URI SAN; '*' matches one path segment (repeatable)",
        scope="server",
        metavar="URI",
        aliases=("--allow-uri-san",),
    ),
    Setting(
        "allow_spki_sha256",
        "pins",
        "access rules",
        "Allow the client key with this SPKI SHA-256 (hex or base64), on top of the --cacert chain (repeatable)",
        scope="server",
        metavar="HASH",
    ),
    Setting(
        "allow_spki_pin",
        "key_pins",
        "access rules",
        "Allow clients by this key pin ALONE, sha256:<base64>: no CA, chain or dates checked (repeatable)",
        scope="server",
        metavar="PIN",
    ),
    Setting(
        "allow_policy",
        "bundle",
        "access rules",
        "Rego policy: a .rego file, bundle dir or .tar.gz (opa).",
        scope="server",
        metavar="BUNDLE",
    ),
    Setting(
        "allow_query",
        "text",
        "access rules",
        "Rego query that must be true, e.g. data.tlsgate.allow.",
        scope="server",
        metavar="QUERY",
    ),
    Setting(
        "crl",
        "files",
        "access rules",
        "Refuse client certificates revoked by this CRL (PEM or DER) (repeatable)",
        scope="server",
        metavar="FILE",
    ),
    duration_setting(
        "crl_max_age",
        "Refuse to start or reload with a --crl issued longer ago than this [0: no limit].",
        section="access rules",
        scope="server",
    ),
    Setting(
        "override_server_name",
        "server_name",
        "access rules",
        "Verify the server as NAME (and send it as SNI).",
        scope="client",
        metavar="NAME",
    ),
    Setting(
        "verify_cn", "names", "access rules", "Server certificate must have this CN.", scope="client", metavar="CN"
    ),
    Setting(
        "verify_ou", "names", "access rules", "Server certificate must have this OU.", scope="client", metavar="OU"
    ),
    Setting(
        "verify_dns",
        "names",
        "access rules",
        "Server certificate must have this DNS SAN.",
        scope="client",
        metavar="NAME",
        aliases=("--verify-dns-san",),
    ),
    Setting(
        "verify_ip",
        "ips",
        "access rules",
        "Server certificate must have this IP SAN.",
        scope="client",
        metavar="IP",
        aliases=("--verify-ip-san",),
    ),
    Setting(
        "verify_uri",
        "uris",
        "access rules",
        "Server certificate must have this URI SAN.",
        scope="client",
        metavar="URI",
        aliases=("--verify-uri-san",),
    ),
    Setting(
        "verify_spki_sha256",
        "pins",
        "access rules",
        "Pin the server's key (SPKI SHA-256), on top of the CA and name checks.",
        scope="client",
        metavar="HASH",
    ),
    Setting(
        "verify_spki_pin",
        "key_pins",
        "access rules",
        "Know the server by this key pin ALONE, sha256:<base64>: no CA or name checked (repeatable)",
        scope="client",
        metavar="PIN",
    ),
    Setting(
        "verify_policy",
        "bundle",
        "access rules",
        "Rego policy the server's certificate must pass (opa).",
        scope="client",
        metavar="BUNDLE",
    ),
    Setting(
        "verify_query",
        "text",
        "access rules",
        "Rego query that must be true, e.g. data.tlsgate.allow.",
        scope="client",
        metavar="QUERY",
    ),
)
