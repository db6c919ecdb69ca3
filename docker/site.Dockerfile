# syntax=docker/dockerfile:1
# A fedgen site: Flower's official SuperNode image plus fedgen's pinned dependencies and the
# site's warm worker (client/worker.py, client/wake.py, common/flwr_runtime.py: the only fedgen code in the
# image). One image, two containers per site (compose.yaml): `supernode ...` starts Flower's
# SuperNode (with shorter fixed polls) in process isolation, `run ...` the worker that runs
# every ClientApp task in one long-lived process. The ClientApp itself is not in the image: it
# arrives in the FAB of each run (`flwr run`). No keys, certificates, secrets or data are
# baked in: they are mounted at run time (see compose.yaml). Runs as Flower's non-root user
# "app" (uid 49999).
#
#   docker build -f docker/site.Dockerfile --build-context app=. -t fedgen/site:0.1.0 docker/
#   GPU site: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG FLWR_VERSION=1.41.0
ARG PYTHON_TAG=py3.11-ubuntu24.04
FROM flwr/supernode:${FLWR_VERSION}-${PYTHON_TAG}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY --chown=49999:49999 requirements.txt /app/requirements.txt
# torch from the chosen index first (CPU by default), then the rest from PyPI.
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && python -m pip install --no-cache-dir -r /app/requirements.txt \
    && mkdir -p /app/ledger /app/data
# The worker's modules from the repository (the named build context "app"); root-owned, read-only.
# hadolint does not know named build contexts (compose `additional_contexts`, `--build-context`):
# hadolint ignore=DL3022
COPY --from=app client/__init__.py client/wake.py client/worker.py /app/client/
# hadolint ignore=DL3022
COPY --from=app common/__init__.py common/flwr_runtime.py /app/common/

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2
USER 49999
VOLUME ["/app/ledger"]
ENTRYPOINT ["python", "-m", "client.worker"]
