"""One exception root for everything tlsgate reports to a person.

Each subclass says whose fault it was, so the CLI can map it to an exit code and a one-line message
without a traceback. Messages name the flag, file or value and, where it helps, the expected form.
"""

from __future__ import annotations

import reprlib


class TlsgateError(Exception):
    """Base of every error tlsgate raises on purpose. ``str(err)`` is the whole message for the user."""


class ConfigError(TlsgateError):
    """A flag, config key or value is wrong: the user must change how tlsgate is started (exit 2)."""


class CertificateError(ConfigError):
    """A certificate, key, keystore, CA bundle or CRL cannot be read or does not fit (exit 2)."""


class StartupError(TlsgateError):
    """The configuration is valid but the world refused it: port in use, socket path not writable (exit 2)."""


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 2, 4, 4


def shown(value: object) -> str:
    """``value`` as an error message may quote it: one line, about 60 characters at most, never raising.

    repr escapes newlines, control and bidi characters; reprlib cuts long strings and deep or long lists in the
    middle, so a 1 MB string or an array nested 2,000 deep quoted back stays a short line. Every message that
    quotes what a user typed goes through this, so no input can make an error line long.
    """
    try:
        return _SHOWN.repr(value)
    except Exception:  # a recursion or an odd __repr__: naming the type is still useful
        return f"a {type(value).__name__}"
