#!/usr/bin/env bash
# Developer entry point: ./dev.sh setup | demo | test | lint
#
# Everything goes into ./.venv. torch is installed first from an explicit pin
# (TORCH_SPEC, a CPU build by default) so the project's own `torch>=2.1`
# range never pulls a multi-GB CUDA build; set TORCH_SPEC to what your host
# needs, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")"

VENV="${CUMULUS_VENV:-.venv}"
PY="$VENV/bin/python"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  if ! "$PY" -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # TORCH_SPEC may hold several words
    "$PY" -m pip install -q $TORCH_SPEC 2>&1 | grep -v '^WARNING: Location' || true
  fi
  "$PY" -m pip install -q -e ".[test,dev]" 2>&1 | grep -v '^WARNING: Location' || true
  "$PY" -c "import cumulus_jupyter, torch, pytest_jupyter" # fail here, not later
}

lint() {
  "$PY" -m ruff check .
  "$PY" -m ruff format --check .
  "$PY" -m mypy
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; "$PY" examples/demo.py ;;
  lint) setup; lint ;;
  test) setup; lint; shift; "$PY" -m pytest "$@" ;;
  *) echo "usage: ./dev.sh setup|demo|test|lint" >&2; exit 2 ;;
esac
