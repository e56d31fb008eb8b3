"""TLS: how tlsgate builds its SSL contexts, and the few things Python's ``ssl`` module cannot do on its own.

Layer 2: it may import `tlsgate.settings`, `tlsgate.errors` and `tlsgate.logs`, nothing above. Its modules:

* `contexts`: the one place that builds ``ssl.SSLContext`` objects (server, client, upstream) with every
  hardened default next to its reason, and the loading of certificates, keys and keystores. Read it first.
* `tickets`: one session-ticket key per process tree, derived per trust configuration, and a bound on how
  long a chain of TLS 1.3 resumptions lasts. `contexts` applies it to every server context.
* `closenotify`: a TLS half-close (close_notify without reading), used by the engine's relay.
* `internals`: the guarded door into private CPython/OpenSSL API. It probes once at start-up (object header,
  OpenSSL version, the ``TLSGATE_INTERNALS`` kill switch), says which *paths* are on, hands the pure-Python
  fast paths to the engine (``do_handshake``, ``tls_reader``, ``raw_accept``, ...) and runs tlsgate's peer
  check inside the handshake (the ``verify`` path, `internals.install_peer_check`).
* `ossl`: every ctypes binding to OpenSSL (library resolution, symbol prototypes per path, reading the
  ``SSL_CTX*``/``SSL*`` pointer out of a Python object, ctypes buffers). Nothing else in tlsgate uses ctypes
  on OpenSSL; `internals`, `tickets` and `closenotify` only call its typed functions.

How it fits together: `internals.probe` decides whether the ctypes paths may run and opens OpenSSL through
`ossl.open_openssl`; each user then binds its symbols with ``internals.bind(path, ossl.SomethingLib)``, which
gives None (and the user falls back to public API) when that path is off. `contexts` builds a context,
`tickets.apply` and `internals.install_peer_check` (called by the engine's runtime) finish it, and the
engine's connections use `internals` and `closenotify` per handshake and per close.
"""
