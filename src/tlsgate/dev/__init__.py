"""``tlsgate dev``: https on localhost in front of a development server, with a local CA browsers can trust.

Read `front` first: it is what ``tlsgate dev --to 3000`` runs, and it shows how the other parts fit.

* `tlsgate.dev.ca` — **the local CA and its leaf.** `ensure_dev_ca` makes a name-constrained CA once in the
  user's data directory (`ca_root`) and reuses it; `ensure_dev_certificate` keeps a leaf for localhost,
  127.0.0.1, ::1 and any extra names next to it, reissuing it when it nears expiry or the names change.
* `tlsgate.dev.front` — **the front.** `DevSettings` (checked flags) and `DevFront`, a
  `~tlsgate.process.supervisor.Server` with one server-mode tunnel: TLS from the browser, plaintext to
  ``--to``, no client certificates; `bind_dev_listeners` binds ``localhost`` on both 127.0.0.1 and ::1.
* `tlsgate.dev.watch` — `TargetWatch` (sans-IO) and `watch_target`: tell the developer when the target is not
  listening yet, without repeating itself.
* `tlsgate.dev.stores` — **trust stores.** `trust` and `untrust` put the CA certificate in the system store
  (Debian-like) and NSS databases (Chromium, Firefox); each store answers with a `StoreResult`, and what
  cannot be done here comes back as the exact command to run. `TrustStores.discover` finds the stores, and
  environment variables redirect each one, so tests never touch the real ones.
* `tlsgate.dev.demo` — ``tlsgate demo`` (``make run``): a plaintext backend with a TLS front before it.

Data flow: flags -> `DevSettings` -> `DevFront` builds the CA and leaf (errors surface before anything
listens) -> `serve` binds, prints the banner (with a hint when `is_trusted` says no store has the CA yet),
watches the target, and runs the tunnel until stopped. Nothing here prints: messages go to a ``say``
callback the CLI supplies.

The names below are re-exported so ``from tlsgate.dev import DevFront, trust`` keeps working for tests and
library users; code inside ``src/`` imports from the defining module instead.
"""

from tlsgate.dev.ca import BASE_NAMES as BASE_NAMES
from tlsgate.dev.ca import CAROOT_ENV as CAROOT_ENV
from tlsgate.dev.ca import LEAF_BASENAME as LEAF_BASENAME
from tlsgate.dev.ca import LOCAL_DNS_SUFFIXES as LOCAL_DNS_SUFFIXES
from tlsgate.dev.ca import LOCAL_NETWORKS as LOCAL_NETWORKS
from tlsgate.dev.ca import RENEW_BEFORE as RENEW_BEFORE
from tlsgate.dev.ca import DevCertificate as DevCertificate
from tlsgate.dev.ca import ca_root as ca_root
from tlsgate.dev.ca import dev_ca_name as dev_ca_name
from tlsgate.dev.ca import dev_ca_warning as dev_ca_warning
from tlsgate.dev.ca import dev_name_constraints as dev_name_constraints
from tlsgate.dev.ca import ensure_dev_ca as ensure_dev_ca
from tlsgate.dev.ca import ensure_dev_certificate as ensure_dev_certificate
from tlsgate.dev.ca import is_local_name as is_local_name
from tlsgate.dev.ca import normalise_name as normalise_name
from tlsgate.dev.front import DEFAULT_LISTEN as DEFAULT_LISTEN
from tlsgate.dev.front import DevFront as DevFront
from tlsgate.dev.front import DevSettings as DevSettings
from tlsgate.dev.front import bind_dev_listeners as bind_dev_listeners
from tlsgate.dev.front import parse_target as parse_target
from tlsgate.dev.stores import ALREADY_PRESENT as ALREADY_PRESENT
from tlsgate.dev.stores import FAILED as FAILED
from tlsgate.dev.stores import INSTALLED as INSTALLED
from tlsgate.dev.stores import NOT_PRESENT as NOT_PRESENT
from tlsgate.dev.stores import REMOVED as REMOVED
from tlsgate.dev.stores import SKIPPED as SKIPPED
from tlsgate.dev.stores import SYSTEM_CA_FILE as SYSTEM_CA_FILE
from tlsgate.dev.stores import NssDb as NssDb
from tlsgate.dev.stores import StoreResult as StoreResult
from tlsgate.dev.stores import TrustStores as TrustStores
from tlsgate.dev.stores import is_trusted as is_trusted
from tlsgate.dev.stores import trust as trust
from tlsgate.dev.stores import trust_exit_code as trust_exit_code
from tlsgate.dev.stores import untrust as untrust
from tlsgate.dev.stores import untrust_exit_code as untrust_exit_code
from tlsgate.dev.watch import TargetWatch as TargetWatch
from tlsgate.dev.watch import probe_target as probe_target
from tlsgate.dev.watch import watch_target as watch_target

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
