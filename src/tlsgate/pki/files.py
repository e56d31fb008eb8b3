"""Writing certificate and key files with the right modes: 0600 for secrets, 0644 for what is shared.

Files are created with their final mode by ``os.open`` itself, never replaced without ``force``, and then
replaced atomically, so a reader sees the old file or the new one and no other user ever sees a secret.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tlsgate.errors import CertificateError


def write_private_file(path: Path, data: bytes, *, force: bool) -> None:
    """Write a secret (a private key, a keystore) readable by its owner only.

    The file is created with mode 0600 by ``os.open`` itself, so there is no moment when another user could
    open it. An existing file is replaced only with ``force``, and then atomically: a reader sees the old
    file or the new one, never half of each.
    """
    _write_file(path, data, mode=0o600, force=force)


def write_public_file(path: Path, data: bytes, *, force: bool) -> None:
    """Write something meant to be shared (a certificate, a chain, a CRL) with mode 0644; see `write_private_file`."""
    _write_file(path, data, mode=0o644, force=force)


def _write_file(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not force:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                raise CertificateError(f"{path} already exists; pass --force to replace it") from None
            with os.fdopen(fd, "wb") as out:
                # The umask may have narrowed the mode; certificates should still be readable by everyone.
                _set_mode(out.fileno(), mode)
                out.write(data)
            return
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                _set_mode(out.fileno(), mode)
                out.write(data)
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
    except OSError as err:
        raise CertificateError(f"{path}: cannot write ({err.strerror or err})") from None


def _set_mode(fd: int, mode: int) -> None:
    # Windows has no os.fchmod before Python 3.13, and no POSIX modes to set: the file's ACL decides there.
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)


def refuse_existing(paths: Iterable[Path], *, force: bool) -> None:
    """Unless ``force``, raise `CertificateError` naming the first of ``paths`` that exists.

    Checking every target before writing any means a refused run leaves no half-written set of files behind.
    """
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise CertificateError(f"{path} already exists; pass --force to replace it")


def make_private_dir(directory: Path) -> None:
    # A new folder that will hold private keys is made owner-only; an existing folder is left as it is.
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise CertificateError(f"{directory} exists and is not a directory") from None
    except OSError as err:
        raise CertificateError(f"{directory}: cannot create ({err.strerror or err})") from None
