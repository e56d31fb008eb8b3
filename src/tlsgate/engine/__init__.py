"""The engine: listeners, the per-connection set-up, the relay, PROXY protocol, and the runtime a tunnel runs on."""
