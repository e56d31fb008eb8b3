"""The local development CA and the leaf it issues for ``tlsgate dev``: where they live, what names they cover.

`ensure_dev_ca` makes the CA once in `ca_root` (``$TLSGATE_CAROOT``, else ``$XDG_DATA_HOME/tlsgate``, else
``~/.local/share/tlsgate``) and reuses it afterwards. The CA is name-constrained (`dev_name_constraints`) to
local names and loopback addresses, so its unencrypted key is worth nothing for any public site.
`ensure_dev_certificate` keeps the leaf (``dev.pem`` / ``dev.key`` next to the CA) for localhost, 127.0.0.1,
::1 and the extra ``--name`` values (`normalise_name` checks and canonicalises them), reissuing it when it
nears expiry, was signed by another CA, or its names changed.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tlsgate.errors import CertificateError, ConfigError, shown
from tlsgate.pki.ca import CertificateAuthority
from tlsgate.tls.x509 import certificate_spki_der, load_certificates, load_private_key, spki_der

CAROOT_ENV = "TLSGATE_CAROOT"
BASE_NAMES = ("localhost", "127.0.0.1", "::1")
"""The names every dev certificate carries: what people type to reach their own machine."""
LOCAL_DNS_SUFFIXES = ("localhost", "test", "local", "internal", "home.arpa")
"""DNS names the local CA may vouch for: each of these and every name under it. All are set aside for local
or private use (RFC 6761: localhost, test; RFC 6762: local; ICANN: internal; RFC 8375: home.arpa), so no public
site can have one, and a certificate for one is worth nothing to someone who steals the CA key."""
LOCAL_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
"""IP addresses the local CA may vouch for: loopback only, the only addresses `tlsgate dev` listens on."""
LEAF_BASENAME = "dev"
# A month's margin means a front started today still has a valid certificate in every session this month,
# and the renewal happens at a start-up (when the developer is watching) rather than mid-session.
RENEW_BEFORE = timedelta(days=30)

_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
CA_NAME_PREFIX = "tlsgate development CA"  # also the NSS nickname of a CA without a Common Name
_MAX_CN = 64  # X.509's upper bound for a Common Name


# --------------------------------------------------------------------------------------------------------------
# Where the CA lives


def ca_root(environ: Mapping[str, str] | None = None) -> Path:
    """The directory of the local CA: ``$TLSGATE_CAROOT``, else ``$XDG_DATA_HOME/tlsgate``, else
    ``~/.local/share/tlsgate``.

    ``TLSGATE_CAROOT`` plays the part of mkcert's ``CAROOT``: point it at a shared directory to use one CA
    from several accounts or containers. The XDG spec says a relative ``XDG_DATA_HOME`` must be ignored.
    """
    env = os.environ if environ is None else environ
    override = env.get(CAROOT_ENV, "")
    if override:
        return Path(override).expanduser()
    data_home = env.get("XDG_DATA_HOME", "")
    if data_home and os.path.isabs(data_home):
        return Path(data_home) / "tlsgate"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "share" / "tlsgate"


def dev_ca_name() -> str:
    """``tlsgate development CA user@host``: the name people see in their browser's certificate viewer.

    The account and host make it clear whose CA it is when several show up in one trust store.
    """
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no passwd entry, as in some containers
        user = "user"
    return f"{CA_NAME_PREFIX} {user}@{socket.gethostname()}"[:_MAX_CN]


def dev_name_constraints() -> x509.NameConstraints:
    """The local CA's name constraints: `LOCAL_DNS_SUFFIXES` and `LOCAL_NETWORKS`, nothing else.

    The CA is installed in the system and browser trust stores and its key sits unencrypted on disk, so
    whoever copies ``ca.key`` could otherwise sign a certificate for any bank this machine would accept.
    With the constraint, browsers and OpenSSL refuse any leaf it signs for another name. A DNS constraint
    ``test`` covers ``test`` and every name ending in ``.test`` (RFC 5280, 4.2.1.10).
    """
    permitted: list[x509.GeneralName] = [x509.DNSName(suffix) for suffix in LOCAL_DNS_SUFFIXES]
    permitted += [x509.IPAddress(network) for network in LOCAL_NETWORKS]
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None)


def is_local_name(name: str) -> bool:
    """Whether ``name`` (normalised: an IP address, or a lowercase A-label, maybe ``*.`` in front) is one the
    local CA may vouch for."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        host = name.removeprefix("*.")
        return any(host == suffix or host.endswith("." + suffix) for suffix in LOCAL_DNS_SUFFIXES)
    return any(address in network for network in LOCAL_NETWORKS)


def dev_ca_warning(ca: CertificateAuthority) -> str | None:
    """A warning when ``ca`` has no name constraints (one made before tlsgate added them), else None.

    Such a CA keeps working: replacing it silently would leave the old one trusted in every store it was
    installed in, and the user's other tools pointed at a file that changed. The warning says how to replace
    it; until then its key can sign certificates for any name.
    """
    try:
        ca.certificate.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return (
            f"the local CA in {ca.directory} predates name constraints: its key could sign certificates for any "
            f"site; replace it with `tlsgate dev untrust`, then delete {ca.directory}, then `tlsgate dev trust`"
        )
    return None


def ensure_dev_ca(directory: Path) -> tuple[CertificateAuthority, bool]:
    """The local CA in ``directory``, created on first use; also says whether it was just created.

    The CA key is kept unencrypted (like mkcert's): a password asked for at every ``tlsgate dev`` would be
    typed so often it protects nothing. The directory is owner-only, the CA's name says whose it is, and its
    name constraints (`dev_name_constraints`) keep the key from vouching for any public name. A CA from an
    older tlsgate, without them, is used as it is; `dev_ca_warning` says so.
    """
    if not CertificateAuthority.exists(directory):
        try:
            ca = CertificateAuthority.create(directory, name=dev_ca_name(), name_constraints=dev_name_constraints())
            return ca, True
        except CertificateError:
            # Another tlsgate dev started at the same instant and won the race; use its CA.
            if not CertificateAuthority.exists(directory):
                raise
    ca = CertificateAuthority.load(directory)
    if ca.certificate.not_valid_after_utc <= datetime.now(UTC):
        raise CertificateError(
            f"the local CA in {directory} has expired; run `tlsgate dev untrust`, delete {directory}, "
            "then `tlsgate dev trust` to make and trust a new one"
        )
    return ca, False


# --------------------------------------------------------------------------------------------------------------
# Names and the leaf


def normalise_name(value: str) -> str:
    """An extra name for the certificate in the form it is stored: an IP address, or a DNS name as a
    lowercase A-label (``Café.localhost`` -> ``xn--caf-dma.localhost``). ``*.`` in front makes a wildcard
    for one label.

    Raises `ConfigError` for anything else, for a wildcard right under a top-level name (``*.localhost``):
    browsers refuse those, so the certificate would not help; and for a name outside the local set the CA is
    constrained to (`is_local_name`), which no browser would accept from it.
    """
    text = value.strip()
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        pass
    else:
        return _local(address, value)
    wildcard = text.startswith("*.")
    host = text[2:] if wildcard else text
    host = host.removesuffix(".")
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        ascii_host = ""
    labels = ascii_host.split(".")
    if not ascii_host or len(ascii_host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f"--name {value!r}: not a DNS name (dot-separated labels of letters, digits and hyphens, "
            "like myapp.localhost; '*.' allowed in front)"
        )
    if labels[-1].isdigit():
        raise ConfigError(f"--name {shown(value)}: not a DNS name, and not an IP address either")
    if wildcard and len(labels) < 2:
        raise ConfigError(
            f"--name {value!r}: browsers refuse a wildcard right under a top-level name; "
            f"use a deeper one like '*.myapp.{ascii_host}'"
        )
    return _local("*." + ascii_host if wildcard else ascii_host, value)


def _local(name: str, value: str) -> str:
    if not is_local_name(name):
        suffixes = ", ".join(f".{suffix}" for suffix in LOCAL_DNS_SUFFIXES)
        raise ConfigError(
            f"--name {value!r}: not a local name; the local CA vouches only for localhost, 127.0.0.0/8, ::1 "
            f"and names ending in {suffixes} (like myapp.localhost)"
        )
    return name


def _wanted_sans(names: Iterable[str]) -> set[x509.GeneralName]:
    sans: set[x509.GeneralName] = set()
    for name in (*BASE_NAMES, *names):
        try:
            sans.add(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.add(x509.DNSName(name))
    return sans


def _sans_of(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


@dataclass(frozen=True)
class DevCertificate:
    """The leaf a dev front presents, where its files are, and why it was (re)issued this time.

    ``issued_because`` is None when the certificate on disk was good and reused.
    """

    certificate: x509.Certificate
    cert_path: Path
    key_path: Path
    ca_cert_path: Path
    issued_because: str | None

    @property
    def spki_sha256_base64(self) -> str:
        """The base64 SHA-256 of the leaf's public key: what Chromium's ``--ignore-certificate-errors-spki-list``
        takes, and what HPKP-style pins look like."""
        return base64.b64encode(hashlib.sha256(certificate_spki_der(self.certificate)).digest()).decode("ascii")


def _why_reissue(
    ca: CertificateAuthority, cert_path: Path, key_path: Path, wanted: set[x509.GeneralName], now: datetime
) -> str | None:
    """Why the leaf on disk will not do, or None when it will."""
    if not cert_path.exists() or not key_path.exists():
        return "first use"
    try:
        leaf = load_certificates(cert_path)[0]
        key = load_private_key(key_path, None)
    except CertificateError as err:
        return f"the old one was unreadable ({err})"
    try:
        leaf.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return "the local CA changed"
    if spki_der(key.public_key()) != spki_der(leaf.public_key()):
        return "its key file did not match"
    left = leaf.not_valid_after_utc - now
    if left <= timedelta(0):
        return "the old one expired"
    if left < RENEW_BEFORE:
        return f"the old one expires in {max(1, left.days)} day(s)"
    if _sans_of(leaf) != wanted:
        return "the names changed"
    return None


def ensure_dev_certificate(
    ca: CertificateAuthority, names: Sequence[str] = (), *, now: datetime | None = None
) -> DevCertificate:
    """The leaf for localhost, 127.0.0.1, ::1 and ``names`` (already normalised), kept next to the CA as
    ``dev.pem`` / ``dev.key`` / ``dev-chain.pem``.

    It is reissued when missing or unreadable, when signed by another CA, when it expires within
    `RENEW_BEFORE` of ``now``, or when its names differ from those asked for (extra names dropped from the
    command line are dropped from the certificate too, so it says exactly what this front serves).
    """
    outside = [name for name in names if not is_local_name(name)]
    if outside:
        raise ConfigError(f"not local names, which the local CA cannot vouch for: {', '.join(outside)}")
    moment = now or datetime.now(UTC)
    cert_path = ca.directory / f"{LEAF_BASENAME}.pem"
    key_path = ca.directory / f"{LEAF_BASENAME}.key"
    wanted = _wanted_sans(names)
    reason = _why_reissue(ca, cert_path, key_path, wanted, moment)
    if reason is None:
        leaf = load_certificates(cert_path)[0]
    else:
        dns = [n for n in (*BASE_NAMES, *names) if not _is_ip(n)]
        ips = [n for n in (*BASE_NAMES, *names) if _is_ip(n)]
        issued = ca.issue("localhost", dns=list(dict.fromkeys(dns)), ips=list(dict.fromkeys(ips)), server=True)
        issued.write(ca.directory, LEAF_BASENAME, force=True)
        leaf = issued.certificate
    return DevCertificate(leaf, cert_path, key_path, ca.cert_path, reason)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
