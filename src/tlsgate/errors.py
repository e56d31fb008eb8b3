"""One exception root for everything tlsgate reports to a person.

Each subclass says whose fault it was, so the CLI can map it to an exit code and a one-line message
without a traceback. Messages name the flag, file or value and, where it helps, the expected form.
"""

from __future__ import annotations


class TlsgateError(Exception):
    """Base of every error tlsgate raises on purpose. ``str(err)`` is the whole message for the user."""


class ConfigError(TlsgateError):
    """A flag, config key or value is wrong: the user must change how tlsgate is started (exit 2)."""


class CertificateError(ConfigError):
    """A certificate, key, keystore, CA bundle or CRL cannot be read or does not fit (exit 2)."""


class StartupError(TlsgateError):
    """The configuration is valid but the world refused it: port in use, socket path not writable (exit 2)."""
