# tlsgate in a container: `docker build -t tlsgate .` then, for example,
#   docker run --rm -p 8443:8443 -p 9090:9090 -v "$PWD/certs:/etc/tlsgate:ro" tlsgate \
#     server --listen :8443 --target app:8080 --unsafe-target \
#     --cert /etc/tlsgate/server.pem --key /etc/tlsgate/server.key --cacert /etc/tlsgate/ca.pem --allow-all \
#     --status http://:9090
# See docs/operations.md ("Containers") for signals, health checks and certificate rotation.

# The version the test suite runs on; tlsgate supports 3.11 and later.
ARG PYTHON_VERSION=3.11

# Build stage: compilers and pip caches stay here; only the installed tree is copied on.
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# [speed] adds uvloop (wheels exist for the slim image's glibc, so nothing is compiled).
RUN pip install --no-cache-dir --no-compile --root-user-action=ignore --prefix=/install ".[speed]"

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /install /usr/local
# Byte-compile once at build time: the root filesystem can then be mounted read-only.
RUN python -m compileall -q /usr/local/lib \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tlsgate
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric user, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# Ports are chosen on the command line; these are the ones the examples use (tunnel, status).
EXPOSE 8443 9090
# Exec form: tlsgate is PID 1 and gets SIGTERM (drain) and SIGHUP (reload) itself. It installs handlers for
# both, which PID 1 needs (the kernel ignores unhandled signals for it), and reaps its own --workers.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tlsgate"]
CMD ["--help"]
