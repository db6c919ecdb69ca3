#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite (unit, contract, integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
