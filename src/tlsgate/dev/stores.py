"""Trust stores: putting the local CA certificate where browsers and tools look, and taking it out again.

`trust` and `untrust` handle the system store on Debian-like systems (an anchor file plus
``update-ca-certificates``) and NSS databases (Chromium, Firefox) through ``certutil``. Each store reports
what happened in a `StoreResult`; what cannot be done here (macOS, Windows, other Linux families, no root)
comes back as the exact command to run by hand. `TrustStores.discover` finds the stores of this machine, and
environment variables redirect each one, so tests never touch the real ones. `is_trusted` is the read-only
check behind the front's "run `tlsgate dev trust` once" hint.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tlsgate.dev.ca import CA_NAME_PREFIX
from tlsgate.errors import CertificateError
from tlsgate.tls.x509 import load_certificates

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
    return str(names[0].value) if names else CA_NAME_PREFIX


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
