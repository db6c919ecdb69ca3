# syntax=docker/dockerfile:1
# The SuperLink: Flower's official image, unchanged but for one thing: /app/state exists and
# belongs to Flower's non-root user "app" (uid 49999), so the named volume mounted there
# (compose.yaml: superlink-state) is writable and the SuperLink's state (registered node
# keys, runs) survives restarts. No certificates or secrets are baked in.
#
#   docker build -f superlink.Dockerfile -t fedgen/superlink:0.1.0 docker/
ARG FLWR_VERSION=1.41.0
FROM flwr/superlink:${FLWR_VERSION}

WORKDIR /app
RUN mkdir -p /app/state
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
USER 49999
VOLUME ["/app/state"]
ENTRYPOINT ["flower-superlink"]
