"""The engine: the listeners, each connection's set-up, the byte relay, and the PROXY protocol.

What runs where, in the order a connection meets it:

* ``sockets``: binds the listeners (TCP, unix, systemd-activated) and formats ``host:port``;
  ``activation``: the sockets a systemd ``.socket`` unit passed us, by name.
* ``tunnel``: ``Tunnel``, one listener and its connections: accepts, caps concurrency, counts (``stats``),
  reloads, re-checks open connections, sweeps idle ones, drains on shutdown. Start reading here.
* ``setup`` and ``setupcore``: ``Setup``, the per-connection state machine from accept to relay: address
  rules, the PROXY header we receive, the client's TLS handshake, identity rules, the target lookup and
  connect, the target's TLS handshake, the PROXY header we send. ``setup.py`` draws its phases;
  ``setupcore.py`` holds the state and the machinery (readiness, deadline, guard, abort); ``setupvia.py`` the
  client ``--proxy`` steps, over ``viaproxy`` (the HTTP CONNECT and SOCKS5 handshakes, sans-IO).
* ``relay``: ``Relay``, the byte pump between the two sockets once set-up is done: half-close, back-pressure.
  ``httprelay``: ``HttpRelay``, the same pump for ``--target-http-headers``, rewriting each HTTP/1.x request
  head with ``httpid`` (sans-IO, h11) while ``httpwatch`` follows the responses; ``xfcc`` builds the headers.
* ``recheck``: ``Origin`` (what set-up learnt about the peers) and ``recheck`` (the new rules' verdict on an
  open connection after a reload). ``peer``: small socket facts all of the above share.
* ``runtime``: ``Runtime``, what a tunnel runs on (SSL contexts, policy, PROXY sources), rebuilt on reload.
* ``stats``: ``Stats``, the counters the status port exposes.
* ``proxyproto`` (the parser, and the codec's public API), ``proxyencode`` (the header we send) and
  ``proxywire`` (constants and types both share): PROXY v1/v2, sans-IO, tested with plain values.
* ``postgres`` (sans-IO: PostgreSQL's SSLRequest, GSSENCRequest and direct TLS, as a server and as a client)
  and ``starttls`` (its few socket calls): ``--protocol postgres`` and ``--target-protocol postgres``, the
  opening ``Setup`` runs before a TLS handshake (docs/postgres.md).

Data flows one way: listener socket -> ``Tunnel._accept`` -> ``Setup`` steps -> ``Relay`` -> ``Tunnel``'s
bookkeeping when it closes. Every callback the engine gives the event loop is guarded: a bug cuts one
connection and is counted, never reaches the loop.
"""
