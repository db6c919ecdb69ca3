#!/usr/bin/env bash
# Set up (idempotent), then run the default federated job end to end as a Flower simulation.
# Extra arguments go to the launcher, e.g.: scripts/run.sh --preset digits-quick --num-sites 3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m simulations.launch "$@"
