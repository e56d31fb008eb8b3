"""TLS: SSL contexts, session tickets, close_notify, and the one guarded door into CPython/OpenSSL internals."""
