"""Every tlsgate setting, declared once, read from the command line or a TOML file, and checked: layer 1.

The command-line flags and the TOML keys are both read through one table, so a key and a flag cannot drift.
The shape follows mitmproxy's ``optmanager`` (options declared once, every source read through the
declarations) and black's ``read_pyproject_toml`` (a file feeds the same names the flags have).

Read first: ``setting`` (what one knob is: name, flag, kind, scope, section, help, secret, environment variable),
then ``table`` (every knob, in help order; the access rules section is ``table_access``). Then how values flow:

- ``config``: ``tunnel_config(mode, options)`` turns a mapping of flag names to raw values (click's, or a
  file's) into a typed, frozen ``TunnelConfig``, collecting every problem into one ``ConfigErrors``; it uses
  ``convert`` (one converter per kind) and ``checks`` (the rules that involve several settings).
- ``file``: reads a ``tlsgate run`` TOML file ([process], [defaults], [[tunnel]]) through ``config``, with
  paths made relative to the file, ``listens`` refusing two tunnels on one address and ``process_options``
  holding the [process] table's ``ProcessOptions``.
- Values with their own syntax: ``addresses`` (HOST:PORT, unix:, systemd:), ``durations`` (10s, 5m),
  ``secrets`` (pass:, env:, file: passwords, never echoed), ``values`` (networks, IP addresses, SHA-256 key
  pins) and ``patterns`` (URI patterns, SPIFFE IDs). The config holds these parsed, and ``tlsgate.policy``
  takes them as they are: a bad access rule is refused once, here, in one wording for flags and files.
- ``access``: a server's access settings as one value (``ServerAccess``, what ``policy.build_policy`` takes)
  and the rules on which identity flags go together; ``config.server_access`` makes one from raw values for
  library callers and ``tlsgate policy check``, with the flags' messages.

Nothing here opens a socket or parses a certificate: files are only checked to exist. Parsing them needs the
engine, a higher layer; ``tlsgate.process.check`` does that for ``run``, ``check-config`` and reloads.
This package imports only ``tlsgate.errors`` and ``tlsgate.logs``.
"""

from tlsgate.settings.setting import SECTIONS as SECTIONS
from tlsgate.settings.setting import Kind as Kind
from tlsgate.settings.setting import Scope as Scope
from tlsgate.settings.setting import Setting as Setting
from tlsgate.settings.table import CIPHER_SUITES as CIPHER_SUITES
from tlsgate.settings.table import ENV_FLAGS as ENV_FLAGS
from tlsgate.settings.table import SETTINGS as SETTINGS
from tlsgate.settings.table import TLS_VERSIONS as TLS_VERSIONS
from tlsgate.settings.table import UNSAFE_CIPHER_SUITES as UNSAFE_CIPHER_SUITES
from tlsgate.settings.table import process_settings as process_settings
from tlsgate.settings.table import setting as setting
from tlsgate.settings.table import tunnel_settings as tunnel_settings
