"""``--status``: /_status for load balancers, /_metrics (ghostunnel's JSON) and /metrics (Prometheus) for people.

Addresses follow ghostunnel: ``http://HOST:PORT``, ``https://HOST:PORT``, ``unix:PATH``, ``systemd:NAME`` and a
bare ``HOST:PORT``, which is HTTPS with a tunnel's certificate (client mode's too), plain HTTP when no tunnel has
one. The status port never asks for a client certificate (a load balancer's probe has none).

Modules, in the order data flows through them:

- ``model``: what is measured. ``view_of`` turns a running Tunnel into a ``TunnelView`` (plain data, JSON across
  processes); a ``StatusSource`` (``ServerSource`` here, the ``--workers`` parent's sum in
  ``tlsgate.process.workers``) answers each request with a ``Snapshot``.
- ``health``: ``/_status``. Checks every target (TCP connect, or ``--target-status`` GET) and builds ghostunnel's
  JSON document, 200 or 503.
- ``exposition``: ``/_metrics`` and ``/metrics`` from one table of metrics (JSON list and Prometheus text).
- ``pprof``: ``/debug/pprof/`` (``--enable-pprof``): stacks and a cProfile window.
- ``http``: the server itself (``serve_status``, ``start_status_server``): listening, request parsing, routes,
  the HTTPS certificate that follows the tunnel's reloads, ``POST /_shutdown``.

Parsing and judging the ``--status`` setting lives lower, in ``tlsgate.settings.status``, so settings can check it
before anything listens. A newcomer reads ``model`` first, then ``http``.
"""

from tlsgate.settings.status import StatusAddress as StatusAddress
from tlsgate.settings.status import check_status_setting as check_status_setting
from tlsgate.settings.status import exposed_status_warning as exposed_status_warning
from tlsgate.settings.status import parse_status_address as parse_status_address
from tlsgate.settings.status import status_certificate_config as status_certificate_config
from tlsgate.settings.status import status_option_problems as status_option_problems
from tlsgate.status.exposition import HANDSHAKE_BUCKETS as HANDSHAKE_BUCKETS
from tlsgate.status.exposition import json_metrics as json_metrics
from tlsgate.status.exposition import prometheus_name as prometheus_name
from tlsgate.status.exposition import prometheus_text as prometheus_text
from tlsgate.status.exposition import timer_entries as timer_entries
from tlsgate.status.health import check_backend as check_backend
from tlsgate.status.health import status_document as status_document
from tlsgate.status.http import StatusServer as StatusServer
from tlsgate.status.http import serve_status as serve_status
from tlsgate.status.http import start_status_server as start_status_server
from tlsgate.status.model import ServerSource as ServerSource
from tlsgate.status.model import Snapshot as Snapshot
from tlsgate.status.model import StatusSource as StatusSource
from tlsgate.status.model import TunnelView as TunnelView
from tlsgate.status.model import merge_views as merge_views
from tlsgate.status.model import view_of as view_of
from tlsgate.status.model import views_of as views_of
from tlsgate.status.pprof import profile_window as profile_window
from tlsgate.status.pprof import stack_dump as stack_dump
