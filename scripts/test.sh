#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite (unit, contract, integration).
# Two pytest-xdist workers (FEDGEN_TEST_WORKERS to change; 0 runs in this process), each given
# whole test files: a file's module fixtures (one Flower job serving several tests) run once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${FEDGEN_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
