"""``tlsgate dev``: https on localhost in front of a development server, with a local CA browsers can trust.

Three parts, each usable on its own:

* **The local CA and its leaf.** `ensure_dev_ca` makes a CA once in the user's data directory (`ca_root`:
  ``$TLSGATE_CAROOT``, else ``$XDG_DATA_HOME/tlsgate``, else ``~/.local/share/tlsgate``) and reuses it;
  `ensure_dev_certificate` keeps a leaf for localhost, 127.0.0.1, ::1 and any extra names next to it,
  reissuing it when it nears expiry or when the names asked for change. The CA is what you trust once
  (``tlsgate dev trust``); every leaf it signs is then accepted without warnings.
* **The front.** `DevFront` is a `~tlsgate.process.supervisor.Server` with one server-mode tunnel: TLS from the
  browser, plaintext to ``--to``, no client certificates. ``localhost`` is bound on both 127.0.0.1 and ::1
  whatever the hosts file says, because browsers resolve ``localhost`` (and ``*.localhost``) to both on their
  own. A `TargetWatch` tells the developer when the target is not listening yet, without repeating itself.
* **Trust stores.** `trust` and `untrust` put the CA certificate where browsers and tools look: the system
  store on Debian-like systems, NSS databases (Chromium, Firefox) through ``certutil``. Each store reports
  what happened in a `StoreResult`; what cannot be done here comes back as the exact command to run.
  `TrustStores.discover` finds the stores, and environment variables redirect each one, so tests never touch
  the real ones.

Nothing here prints: messages go to a ``say`` callback the CLI supplies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import getpass
import hashlib
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tlsgate.errors import CertificateError, ConfigError, StartupError, shown
from tlsgate.pki import CertificateAuthority, load_certificates, load_private_key
from tlsgate.process.supervisor import ProcessOptions, Server
from tlsgate.settings.addresses import Address, parse_address
from tlsgate.settings.config import tunnel_config

__all__ = [
    "ALREADY_PRESENT",
    "BASE_NAMES",
    "CAROOT_ENV",
    "DEFAULT_LISTEN",
    "FAILED",
    "INSTALLED",
    "LEAF_BASENAME",
    "LOCAL_DNS_SUFFIXES",
    "LOCAL_NETWORKS",
    "NOT_PRESENT",
    "REMOVED",
    "RENEW_BEFORE",
    "SKIPPED",
    "SYSTEM_CA_FILE",
    "DevCertificate",
    "DevFront",
    "DevSettings",
    "NssDb",
    "StoreResult",
    "TargetWatch",
    "TrustStores",
    "bind_dev_listeners",
    "ca_root",
    "dev_ca_name",
    "dev_ca_warning",
    "dev_name_constraints",
    "ensure_dev_ca",
    "ensure_dev_certificate",
    "is_local_name",
    "is_trusted",
    "normalise_name",
    "parse_target",
    "probe_target",
    "trust",
    "trust_exit_code",
    "untrust",
    "untrust_exit_code",
    "watch_target",
]

CAROOT_ENV = "TLSGATE_CAROOT"
DEFAULT_LISTEN = "localhost:8443"
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

_LOCALHOST_NAMES = ("localhost", "localhost.")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_CA_NAME_PREFIX = "tlsgate development CA"
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
    return f"{_CA_NAME_PREFIX} {user}@{socket.gethostname()}"[:_MAX_CN]


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
        der = self.certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


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
    spki = Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
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


# --------------------------------------------------------------------------------------------------------------
# Settings


def parse_target(text: str) -> Address:
    """``--to``: a bare port means this machine (``localhost:PORT``), else ``HOST:PORT``, ``[v6]:PORT`` or
    ``unix:PATH``.

    A bare port becomes ``localhost`` rather than 127.0.0.1 so each connection tries every address localhost
    has: some dev servers (Vite on recent Node, for one) listen on ::1 only.
    """
    value = text.strip()
    if value.isascii() and value.isdigit():
        port = int(value)
        if not 1 <= port <= 65535:
            raise ConfigError(f"--to {shown(text)}: port out of range (1-65535)")
        return Address(host="localhost", port=port)
    if not value.startswith("unix:") and ":" not in value:
        raise ConfigError(f"--to {shown(text)}: expected a port (3000), HOST:PORT (127.0.0.1:3000) or unix:PATH")
    target = parse_address(value, name=f"--to {text!r}")
    if not target.is_unix and (not target.host or target.port == 0):
        raise ConfigError(f"--to {shown(text)}: give a host and a port other than 0, like 127.0.0.1:3000")
    return target


def _parse_listen(text: str) -> Address:
    listen = parse_address(text, name="--listen")
    if listen.is_unix:
        raise ConfigError(
            f"--listen {shown(text)}: browsers cannot open unix sockets; give HOST:PORT like localhost:8443"
        )
    if not listen.host or not listen.is_loopback:
        raise ConfigError(
            f"--listen {text!r}: tlsgate dev serves this machine only (localhost, 127.0.0.1 or [::1]); "
            "use `tlsgate server` to publish a service to other machines"
        )
    return listen


@dataclass(frozen=True)
class DevSettings:
    """Everything a dev front needs, validated once: `from_flags` turns command-line text into this."""

    target: Address
    listen: Address = field(default_factory=lambda: Address(host="localhost", port=8443))
    names: tuple[str, ...] = ()
    ca_dir: Path = field(default_factory=ca_root)
    # How often a target that is not up yet is tried again; reminders are much rarer (see TargetWatch).
    probe_interval: float = 1.0

    @classmethod
    def from_flags(
        cls,
        *,
        to: str,
        listen: str = DEFAULT_LISTEN,
        names: Sequence[str] = (),
        ca_dir: Path | None = None,
    ) -> DevSettings:
        normalised = [normalise_name(name) for name in names]
        extra = tuple(n for n in dict.fromkeys(normalised) if n not in BASE_NAMES)
        return cls(
            target=parse_target(to),
            listen=_parse_listen(listen),
            names=extra,
            ca_dir=ca_dir if ca_dir is not None else ca_root(),
        )


# --------------------------------------------------------------------------------------------------------------
# Listening


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_error(listen: Address, host: str, port: int, err: OSError) -> StartupError:
    where = str(Address(host=host, port=port))
    if err.errno == errno.EADDRINUSE:
        return StartupError(
            f"--listen {listen}: {where} is already in use by another program; "
            f"pick another port, like --listen {listen.host}:{port + 1 if port < 65535 else 8443}"
        )
    if err.errno == errno.EACCES:
        return StartupError(f"--listen {listen}: {where}: permission denied (ports below 1024 need root)")
    return StartupError(f"--listen {listen}: cannot listen on {where} ({err.strerror or err})")


def bind_dev_listeners(listen: Address) -> list[socket.socket]:
    """Listening sockets for the front: 127.0.0.1 and ::1 for ``localhost`` (on one port), else the one address.

    Browsers resolve ``localhost`` to both addresses themselves and may try either first, so both must reach
    this front; another program on either one would silently take some of the browser's requests, so that
    is an error too. A machine without IPv6 gets 127.0.0.1 alone. Port 0 picks a free port for both.
    """
    hosts = ["127.0.0.1", "::1"] if listen.host.lower() in _LOCALHOST_NAMES else [listen.host]
    attempts = 20 if listen.port == 0 and len(hosts) > 1 else 1
    for attempt in range(attempts):
        sockets: list[socket.socket] = []
        port = listen.port
        try:
            for host in hosts:
                try:
                    sock = _bind(host, port)
                except OSError as err:
                    if host == "::1" and len(hosts) > 1 and err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        continue  # no IPv6 here, so no browser will try ::1 either
                    if err.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                        raise _Retry from None  # port 0: the port free on 127.0.0.1 was taken on ::1
                    raise _bind_error(listen, host, port, err) from None
                sockets.append(sock)
                port = int(sock.getsockname()[1])
            return sockets
        except BaseException as err:
            for sock in sockets:
                sock.close()
            if not isinstance(err, _Retry):
                raise
    raise StartupError(f"--listen {listen}: found no port free on both 127.0.0.1 and ::1")  # pragma: no cover


class _Retry(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------
# Watching the target


class TargetWatch:
    """What to tell the developer about a target that does not answer yet; sans-IO, fed with probe results.

    The first failed probe says so at once. While the target stays down, reminders come at growing gaps
    (``first_reminder``, then twice that, up to ``max_gap``) so a terminal left open for an hour shows a
    handful of lines, not thousands. The first success after a failure says so once and ends the watch:
    from then on the tunnel's own log reports any connection the target refuses.
    """

    def __init__(self, target: str, *, first_reminder: float = 30.0, max_gap: float = 600.0) -> None:
        self.target = target
        self.first_reminder = first_reminder
        self.max_gap = max_gap
        self.done = False
        self._down_since: float | None = None
        self._gap = first_reminder
        self._next_reminder = 0.0

    def observe(self, up: bool, now: float) -> str | None:
        """Record one probe at monotonic time ``now``; returns the line to show, if any."""
        if self.done:
            return None
        if up:
            self.done = True
            if self._down_since is None:
                return None
            return f"{self.target} answers now; requests go through"
        if self._down_since is None:
            self._down_since = now
            self._next_reminder = now + self._gap
            return f"nothing listens on {self.target} yet; tlsgate keeps going and will connect when it does"
        if now < self._next_reminder:
            return None
        waited = _span(now - self._down_since)
        self._gap = min(self._gap * 2, self.max_gap)
        self._next_reminder = now + self._gap
        return f"still nothing listens on {self.target} (waiting {waited}); start it and reload the page"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{round(seconds)}s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds / 3600)} h"


async def probe_target(target: Address, timeout: float = 2.0) -> bool:
    """True when something accepts a connection at ``target`` (every address a host name has is tried)."""
    try:
        async with asyncio.timeout(timeout):
            if target.is_unix:
                _, writer = await asyncio.open_unix_connection(target.path)
            else:
                _, writer = await asyncio.open_connection(target.host, target.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def watch_target(
    target: Address, say: Callable[[str], None], *, interval: float = 1.0, watch: TargetWatch | None = None
) -> None:
    """Probe ``target`` every ``interval`` seconds until it answers, passing `TargetWatch`'s lines to ``say``."""
    watch = watch or TargetWatch(str(target))
    loop = asyncio.get_running_loop()
    while not watch.done:
        message = watch.observe(await probe_target(target, timeout=max(interval, 1.0)), loop.time())
        if message:
            say(message)
        if not watch.done:
            await asyncio.sleep(interval)


# --------------------------------------------------------------------------------------------------------------
# The front


class DevFront(Server):
    """A `Server` with one tunnel named ``dev``: TLS with the dev certificate on ``settings.listen``,
    plaintext to ``settings.target``, no client certificates.

    Building it makes the CA and the leaf when needed (so errors in them surface before anything listens);
    `serve` binds, says where to point the browser, watches the target, and runs until stopped.
    """

    def __init__(
        self,
        settings: DevSettings,
        say: Callable[[str], None] = lambda _line: None,
        *,
        stores: TrustStores | None = None,
    ) -> None:
        self.settings = settings
        self.say = say
        self.ca, self.ca_created = ensure_dev_ca(settings.ca_dir)
        self.certificate = ensure_dev_certificate(self.ca, settings.names)
        self._stores = stores
        cfg = tunnel_config(
            "server",
            {
                "listen": str(settings.listen),
                "target": str(settings.target),
                "cert": [str(self.certificate.cert_path)],
                "key": [str(self.certificate.key_path)],
                "disable_authentication": True,
                # Dev servers in containers and VMs sit on private addresses; the hop is the developer's call.
                "unsafe_target": True,
                # Ctrl-C should give the prompt back at once, not after in-flight long polls finish.
                "shutdown_timeout": "2s",
            },
            name="dev",
        )
        super().__init__([cfg], ProcessOptions())
        self._watcher: asyncio.Task[None] | None = None

    def start(self, listeners: dict[str, list[socket.socket]] | None = None) -> None:
        if listeners is not None:
            super().start(listeners)
            return
        sockets = bind_dev_listeners(self.settings.listen)
        try:
            super().start({"dev": sockets})
        except BaseException:
            for sock in sockets:
                sock.close()
            raise

    @property
    def port(self) -> int:
        """The port the front listens on (the real one when ``--listen`` asked for port 0)."""
        return int(self.tunnels["dev"].listeners[0].getsockname()[1])

    def urls(self) -> list[str]:
        """Where to point a browser: localhost, then each extra name that is not a wildcard."""
        port = self.port
        hosts = ["localhost", *(f"[{n}]" if ":" in n else n for n in self.settings.names if not n.startswith("*."))]
        return [f"https://{host}:{port}/" for host in hosts]

    def banner(self) -> list[str]:
        tunnel = self.tunnels["dev"]
        lines = [f"tlsgate dev: https in front of {self.settings.target}", ""]
        lines += [f"  {url}" for url in self.urls()]
        lines += ["", f"listening on {', '.join(tunnel.addresses)}"]
        cert = self.certificate
        if cert.issued_because is not None:
            lines.append(f"issued a new certificate ({cert.issued_because}): {cert.cert_path}")
        if self.ca_created:
            lines.append(f"created a local CA in {self.ca.directory}")
        if (warning := dev_ca_warning(self.ca)) is not None:
            lines.append(f"warning: {warning}")
        if not is_trusted(self.ca.cert_path, self._stores or TrustStores.discover()):
            lines.append("browsers do not trust the local CA yet: run `tlsgate dev trust` once")
        lines.append("Press Ctrl-C to stop.")
        return lines

    async def serve(self, ready: Callable[[Server], Awaitable[None] | None] | None = None) -> int:
        async def announce(server: Server) -> None:
            for line in self.banner():
                self.say(line)
            self._watcher = asyncio.create_task(
                watch_target(self.settings.target, self.say, interval=self.settings.probe_interval)
            )
            if ready is not None:
                result = ready(server)
                if asyncio.iscoroutine(result):
                    await result

        try:
            return await super().serve(announce)
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher


# --------------------------------------------------------------------------------------------------------------
# Trust stores

SYSTEM_CA_FILE = "tlsgate-dev.crt"
_DEBIAN_CA_DIR = Path("/usr/local/share/ca-certificates")
_CHROMIUM_BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "brave-browser")
# "C,," is NSS's trust string for "a CA trusted to issue TLS server certificates" (and nothing else).
_NSS_TRUST = "C,,"
_COMMAND_TIMEOUT = 60.0
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)

INSTALLED = "installed"
ALREADY_PRESENT = "already present"
REMOVED = "removed"
NOT_PRESENT = "not present"
SKIPPED = "skipped"
FAILED = "failed"


@dataclass(frozen=True)
class StoreResult:
    """What one trust store did: ``outcome`` is one of installed, already present, removed, not present,
    skipped or failed; ``reason`` says why; ``commands`` are what to run by hand to finish the job."""

    store: str
    outcome: str
    reason: str = ""
    commands: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        head = f"{self.store}: {self.outcome}" + (f" ({self.reason})" if self.reason else "")
        if not self.commands:
            return [head]
        return [head + "; to do it by hand:", *(f"    {command}" for command in self.commands)]


@dataclass(frozen=True)
class NssDb:
    """One NSS certificate database (a directory with ``cert9.db``): Chromium's, or a Firefox profile.

    ``create`` makes it when missing: Chromium would make the same empty database on its first start, and
    making it now means the CA is trusted from that first start on.
    """

    path: Path
    label: str
    create: bool = False


@dataclass(frozen=True)
class TrustStores:
    """Where `trust` and `untrust` look. `discover` fills it from the machine; tests build one by hand.

    ``system_dir`` is the Debian-style anchor directory (None when this is not such a system) and
    ``update_command`` what rebuilds the system bundle after a change there. ``certutil`` is None when
    NSS's tool is not installed.
    """

    platform: str
    system_dir: Path | None
    update_command: tuple[str, ...]
    nss_dbs: tuple[NssDb, ...]
    certutil: str | None

    @classmethod
    def discover(cls, environ: Mapping[str, str] | None = None, *, platform: str | None = None) -> TrustStores:
        """The stores of this machine and user, each overridable from the environment:

        ``TLSGATE_SYSTEM_CA_DIR`` the anchor directory (empty: no system store), ``TLSGATE_UPDATE_CA_COMMAND``
        the command run after changing it, ``TLSGATE_NSS_DBS`` the NSS databases (``os.pathsep``-separated;
        empty: none), ``TLSGATE_CERTUTIL`` the certutil binary (empty: not installed). ``HOME`` decides
        where the per-user databases are looked for.
        """
        env = os.environ if environ is None else environ
        plat = platform or sys.platform
        home = Path(env.get("HOME") or str(Path.home()))

        system_dir: Path | None = None
        update: tuple[str, ...] = ()
        if "TLSGATE_SYSTEM_CA_DIR" in env:
            system_dir = Path(env["TLSGATE_SYSTEM_CA_DIR"]) if env["TLSGATE_SYSTEM_CA_DIR"] else None
        elif plat.startswith("linux") and _DEBIAN_CA_DIR.is_dir() and shutil.which("update-ca-certificates"):
            system_dir = _DEBIAN_CA_DIR
        if "TLSGATE_UPDATE_CA_COMMAND" in env:
            update = tuple(shlex.split(env["TLSGATE_UPDATE_CA_COMMAND"]))
        elif system_dir is not None:
            update = ("update-ca-certificates",)

        if "TLSGATE_NSS_DBS" in env:
            dbs = tuple(
                NssDb(Path(p), f"NSS db {p}", create=True) for p in env["TLSGATE_NSS_DBS"].split(os.pathsep) if p
            )
        else:
            dbs = _discover_nss_dbs(home, plat)
        certutil = (env["TLSGATE_CERTUTIL"] or None) if "TLSGATE_CERTUTIL" in env else shutil.which("certutil")
        return cls(plat, system_dir, update, dbs, certutil)


def _discover_nss_dbs(home: Path, platform: str) -> tuple[NssDb, ...]:
    if not platform.startswith("linux"):
        return ()  # Chrome and Safari use the OS store there; Firefox profiles elsewhere are left to the user
    dbs: list[NssDb] = []
    chromium = home / ".pki" / "nssdb"
    if (chromium / "cert9.db").exists() or any(shutil.which(name) for name in _CHROMIUM_BINARIES):
        dbs.append(NssDb(chromium, f"NSS db {chromium} (Chromium, Chrome)", create=True))
    for base in (home / ".mozilla" / "firefox", home / "snap" / "firefox" / "common" / ".mozilla" / "firefox"):
        for db in sorted(base.glob("*/cert9.db")):
            dbs.append(NssDb(db.parent, f"NSS db {db.parent} (Firefox profile {db.parent.name})"))
    return tuple(dbs)


def _nickname(ca_cert: x509.Certificate) -> str:
    """The name the CA goes by in NSS databases: its Common Name, so a replaced CA replaces its entry."""
    names = ca_cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(names[0].value) if names else _CA_NAME_PREFIX


def _run(command: Sequence[str]) -> tuple[int, str, bytes]:
    """Run a helper tool: its exit status, its last line of error output (or why it did not run), its output."""
    try:
        done = subprocess.run(
            list(command), capture_output=True, timeout=_COMMAND_TIMEOUT, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError:
        return 127, f"{command[0]} not found", b""
    except subprocess.TimeoutExpired:
        return 124, f"{command[0]} did not finish in {_COMMAND_TIMEOUT:.0f}s", b""
    except OSError as err:
        return 126, f"{command[0]}: {err.strerror or err}", b""
    lines = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
    return done.returncode, lines[-1] if lines else f"exit status {done.returncode}", done.stdout


def _pem(ca_cert_path: Path) -> tuple[x509.Certificate, bytes]:
    cert = load_certificates(ca_cert_path)[0]
    return cert, cert.public_bytes(Encoding.PEM)


# -- the system store -------------------------------------------------------------------------------------------


def _system_label(stores: TrustStores) -> str:
    return f"system store ({stores.system_dir})" if stores.system_dir else "system store"


def _manual_system(stores: TrustStores, ca_path: Path, cert: x509.Certificate, *, install: bool) -> StoreResult:
    """The system store of a machine tlsgate cannot change itself: the commands that do it there."""
    name = _nickname(cert)
    if stores.platform == "darwin":
        keychain = "/Library/Keychains/System.keychain"
        command = (
            f"sudo security add-trusted-cert -d -r trustRoot -k {keychain} {shlex.quote(str(ca_path))}"
            if install
            else f"sudo security delete-certificate -c {shlex.quote(name)} {keychain}"
        )
        return StoreResult("macOS system keychain", SKIPPED, "needs an administrator password", (command,))
    if stores.platform in ("win32", "cygwin"):
        serial = f"{cert.serial_number:x}"
        command = (
            f"certutil -addstore -f ROOT {ca_path}" if install else f"certutil -delstore ROOT {serial}"
        )  # an elevated prompt; `certutil -user ...` changes the current user's store without one
        return StoreResult("Windows root store", SKIPPED, "needs an elevated (administrator) prompt", (command,))
    anchor = "/etc/pki/ca-trust/source/anchors/tlsgate-dev.pem"
    quoted = shlex.quote(str(ca_path))
    commands = (
        (f"Fedora/RHEL: sudo cp {quoted} {anchor} && sudo update-ca-trust", f"Arch: sudo trust anchor --store {quoted}")
        if install
        else (f"Fedora/RHEL: sudo rm {anchor} && sudo update-ca-trust", f"Arch: sudo trust anchor --remove {quoted}")
    )
    return StoreResult("system store", SKIPPED, "not a Debian-like system: no update-ca-certificates", commands)


def _trust_system(stores: TrustStores, ca_path: Path) -> StoreResult:
    cert, pem = _pem(ca_path)
    if stores.system_dir is None:
        return _manual_system(stores, ca_path, cert, install=True)
    label = _system_label(stores)
    target = stores.system_dir / SYSTEM_CA_FILE
    quoted = shlex.quote(str(ca_path))
    update = " ".join(stores.update_command) or "update-ca-certificates"
    by_hand = (f"sudo install -m 644 {quoted} {shlex.quote(str(target))} && sudo {update}",)
    try:
        if target.read_bytes() == pem:
            return StoreResult(label, ALREADY_PRESENT)
        replacing = True
    except FileNotFoundError:
        replacing = False
    except OSError as err:
        return StoreResult(label, FAILED, f"cannot read {target}: {err.strerror or err}")
    if not os.access(stores.system_dir, os.W_OK):
        return StoreResult(label, SKIPPED, f"needs root to write {stores.system_dir}", by_hand)
    try:
        previous = target.read_bytes() if replacing else None
        tmp = target.with_name(f".{SYSTEM_CA_FILE}.tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except OSError as err:
        return StoreResult(label, FAILED, f"cannot write {target}: {err.strerror or err}", by_hand)
    if stores.update_command:
        status, detail, _ = _run(stores.update_command)
        if status != 0:
            # Put the store back as it was, so files and bundle never disagree.
            with contextlib.suppress(OSError):
                if previous is None:
                    target.unlink()
                else:
                    target.write_bytes(previous)
            return StoreResult(label, FAILED, f"{update} failed: {detail}", by_hand)
    return StoreResult(label, INSTALLED, "replaced an older tlsgate CA" if replacing else "")


def _untrust_system(stores: TrustStores, ca_path: Path) -> StoreResult:
    cert, _ = _pem(ca_path)
    if stores.system_dir is None:
        return _manual_system(stores, ca_path, cert, install=False)
    label = _system_label(stores)
    target = stores.system_dir / SYSTEM_CA_FILE
    if not target.exists():
        return StoreResult(label, NOT_PRESENT)
    update = " ".join(stores.update_command) or "update-ca-certificates"
    by_hand = (f"sudo rm {shlex.quote(str(target))} && sudo {update}",)
    if not os.access(stores.system_dir, os.W_OK):
        return StoreResult(label, SKIPPED, f"needs root to change {stores.system_dir}", by_hand)
    try:
        target.unlink()
    except OSError as err:
        return StoreResult(label, FAILED, f"cannot remove {target}: {err.strerror or err}", by_hand)
    if stores.update_command:
        status, detail, _ = _run(stores.update_command)
        if status != 0:
            return StoreResult(label, FAILED, f"removed {target} but {update} failed: {detail}", (f"sudo {update}",))
    return StoreResult(label, REMOVED)


# -- NSS databases ----------------------------------------------------------------------------------------------


def _nss_entries(certutil: str, db: Path, nickname: str) -> list[bytes]:
    """The PEM certificates ``db`` keeps under ``nickname``; none when it has no such entry."""
    status, _, output = _run([certutil, "-L", "-d", f"sql:{db}", "-n", nickname, "-a"])
    if status != 0:  # certutil's answer to "no such nickname" is a failure status
        return []
    return [match.group(0) for match in _PEM_CERT.finditer(output)]


def _no_certutil(stores: TrustStores) -> StoreResult:
    labels = ", ".join(db.label for db in stores.nss_dbs)
    return StoreResult(
        "NSS (Chromium, Firefox)",
        SKIPPED,
        f"certutil is not installed, so {labels} cannot be changed",
        ("sudo apt-get install libnss3-tools   # then run the same tlsgate dev command again",),
    )


def _no_nss_db() -> StoreResult:
    return StoreResult(
        "NSS (Chromium, Firefox)",
        SKIPPED,
        "no Chromium or Firefox certificate database found; run this again after their first start",
    )


def _same_cert(pem_a: bytes, pem_b: bytes) -> bool:
    try:
        return x509.load_pem_x509_certificate(pem_a) == x509.load_pem_x509_certificate(pem_b)
    except ValueError:
        return False


def _trust_nss(certutil: str, db: NssDb, ca_path: Path) -> StoreResult:
    cert, pem = _pem(ca_path)
    nickname = _nickname(cert)
    where = f"sql:{db.path}"
    if not (db.path / "cert9.db").exists():
        if not db.create:
            return StoreResult(db.label, SKIPPED, "no cert9.db there")
        try:
            db.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            return StoreResult(db.label, FAILED, f"cannot create {db.path}: {err.strerror or err}")
        status, detail, _ = _run([certutil, "-N", "-d", where, "--empty-password"])
        if status != 0:
            return StoreResult(db.label, FAILED, f"cannot create the database: {detail}")
    entries = _nss_entries(certutil, db.path, nickname)
    if entries and all(_same_cert(entry, pem) for entry in entries):
        return StoreResult(db.label, ALREADY_PRESENT)
    for _ in entries:  # an older CA under the same name: take it out so the name means this CA
        _run([certutil, "-D", "-d", where, "-n", nickname])
    status, detail, _ = _run([certutil, "-A", "-d", where, "-t", _NSS_TRUST, "-n", nickname, "-i", str(ca_path)])
    if status != 0:
        return StoreResult(db.label, FAILED, f"certutil -A: {detail}")
    return StoreResult(db.label, INSTALLED, "replaced an older tlsgate CA" if entries else "")


def _untrust_nss(certutil: str, db: NssDb, ca_path: Path) -> StoreResult:
    cert, _ = _pem(ca_path)
    nickname = _nickname(cert)
    if not (db.path / "cert9.db").exists():
        return StoreResult(db.label, NOT_PRESENT, "no database there")
    entries = _nss_entries(certutil, db.path, nickname)
    if not entries:
        return StoreResult(db.label, NOT_PRESENT)
    detail = ""
    for _ in entries:
        status, detail, _ = _run([certutil, "-D", "-d", f"sql:{db.path}", "-n", nickname])
        if status != 0:
            return StoreResult(db.label, FAILED, f"certutil -D: {detail}")
    return StoreResult(db.label, REMOVED)


# -- together ---------------------------------------------------------------------------------------------------


def trust(ca_cert_path: Path, stores: TrustStores) -> list[StoreResult]:
    """Install the CA certificate in every store of ``stores``; one `StoreResult` per store, in order."""
    results = [_trust_system(stores, ca_cert_path)]
    if not stores.nss_dbs:
        results.append(_no_nss_db())
    elif stores.certutil is None:
        results.append(_no_certutil(stores))
    else:
        results += [_trust_nss(stores.certutil, db, ca_cert_path) for db in stores.nss_dbs]
    return results


def untrust(ca_cert_path: Path, stores: TrustStores) -> list[StoreResult]:
    """Remove the CA certificate from every store of ``stores``; one `StoreResult` per store, in order."""
    results = [_untrust_system(stores, ca_cert_path)]
    if stores.nss_dbs and stores.certutil is None:
        results.append(_no_certutil(stores))
    elif stores.certutil is not None:
        results += [_untrust_nss(stores.certutil, db, ca_cert_path) for db in stores.nss_dbs]
    return results


def trust_exit_code(results: Sequence[StoreResult]) -> int:
    """0 when at least one store now holds the CA (something will trust it), else 1."""
    return 0 if any(r.outcome in (INSTALLED, ALREADY_PRESENT) for r in results) else 1


def untrust_exit_code(results: Sequence[StoreResult]) -> int:
    """0 when no store is left holding the CA as far as tlsgate can tell; 1 when one failed or needs a hand."""
    return 1 if any(r.outcome == FAILED or r.commands for r in results) else 0


def is_trusted(ca_cert_path: Path, stores: TrustStores) -> bool:
    """Whether some store already has the CA: a quick read-only check for the start-up hint."""
    try:
        _, pem = _pem(ca_cert_path)
    except CertificateError:
        return False
    if stores.system_dir is not None:
        with contextlib.suppress(OSError):
            if (stores.system_dir / SYSTEM_CA_FILE).read_bytes() == pem:
                return True
    if stores.certutil is None:
        return False
    nickname = _nickname(x509.load_pem_x509_certificate(pem))
    for db in stores.nss_dbs:
        if (db.path / "cert9.db").exists():
            entries = _nss_entries(stores.certutil, db.path, nickname)
            if any(_same_cert(entry, pem) for entry in entries):
                return True
    return False
