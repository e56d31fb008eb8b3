"""Passwords from the command line without putting them on the command line.

Anything on a command line is visible to every local user through ``ps`` and ``/proc/*/cmdline``, and often
lands in shell history. So every password flag (``--key-pass``, ``--storepass``, ``--ca-pass`` ...) takes one
of these forms:

``env:VAR``
    the value of environment variable ``VAR`` (visible only to the process owner and root);
``file:PATH``
    the contents of ``PATH``, without its final newline (so ``echo secret > pw`` works);
``pass:TEXT``
    ``TEXT`` itself, for a password that happens to start with ``env:`` or ``file:``;
anything else
    the password itself: convenient for tests, not for production.

The forms are the ones ``openssl -passin`` understands, so they are familiar to anyone who made a key before.
"""

from __future__ import annotations

import os
from pathlib import Path

from tlsgate.errors import ConfigError

__all__ = ["resolve_secret"]


def resolve_secret(value: str, *, flag: str) -> bytes:
    """Turn a password flag's value into the password bytes (UTF-8), following the forms above.

    Errors are one line and name the flag: ``--key-pass env:KEY_PASS: environment variable KEY_PASS is not
    set``. An empty password is refused, since encrypting with it would protect nothing.
    """
    if value.startswith("env:"):
        name = value[len("env:") :]
        if not name:
            raise ConfigError(f"{flag} env:: name the environment variable, e.g. {flag} env:TLSGATE_KEY_PASS")
        secret = os.environ.get(name)
        if secret is None:
            raise ConfigError(f"{flag} {value}: environment variable {name} is not set")
        where = f"environment variable {name}"
    elif value.startswith("file:"):
        path = Path(value[len("file:") :]).expanduser()
        try:
            secret = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{flag} {value}: no such file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{flag} {value}: the file is not UTF-8 text") from None
        except ValueError:  # a NUL byte in the path, possible from a config file
            raise ConfigError(f"{flag} {value}: not a valid file path") from None
        except OSError as err:
            raise ConfigError(f"{flag} {value}: cannot read ({err.strerror or err})") from None
        # Editors and `echo` end files with a newline that is not part of the password; only one is removed.
        secret = secret.removesuffix("\n").removesuffix("\r")
        where = f"file {path}"
    elif value.startswith("pass:"):
        secret = value[len("pass:") :]
        where = "the command line"
    else:
        secret = value
        where = "the command line"
    if not secret:
        raise ConfigError(f"{flag}: the password from {where} is empty")
    return secret.encode("utf-8")
