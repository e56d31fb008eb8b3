"""tlsgate: a TLS-terminating secure tunnel with access policies."""

__version__ = "0.1.0"
