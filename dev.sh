#!/usr/bin/env bash
# Developer entry point: ./dev.sh setup | demo | test | lint | screenshots
#
# Everything goes into ./.venv. When the venv has no torch, it is installed
# first from an explicit spec (TORCH_SPEC, default torch==2.13.0, from the
# index pip is configured with: on stock PyPI for Linux x86_64 that is a CUDA
# build) so the project's own `torch>=2.1` range installs nothing more. For a
# CPU build use TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu";
# for a CUDA one, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
#
# The JupyterLab panel (labextension/, TypeScript) is built with npm (Node 20+)
# before the package is installed, so the install ships the fresh build. The
# browser tests drive Debian's Chromium (/usr/bin/chromium, or $CHROMIUM);
# `test` installs it with apt when it is missing.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${CUMULUS_VENV:-.venv}"
PY="$VENV/bin/python"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
# pytest-xdist workers for `test`, each running whole files (the tests of a
# file share its server). On 2 cores, two cut the suite from about 30 to
# about 20 minutes (most tests wait on servers, jobs and browsers).
# `./dev.sh test -n 0` runs them in one process, e.g. for --pdb.
WORKERS="${CUMULUS_TEST_WORKERS:-2}"

pip_install() {
  # Quiet, but a failure still fails the script.
  "$PY" -m pip install -q "$@" 2> >(grep -v '^WARNING: Location' >&2)
}

node_modules() {
  if ! command -v npm >/dev/null; then
    echo "dev.sh: npm (Node 20 or newer) is needed to build the JupyterLab extension" >&2
    exit 1
  fi
  if [ ! -f labextension/node_modules/.package-lock.json ] ||
    [ labextension/package-lock.json -nt labextension/node_modules/.package-lock.json ]; then
    (cd labextension && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

build_labextension() {
  node_modules
  # `jupyter-builder` (from jupyterlab) bundles the extension; its chatter is
  # shown only when it fails.
  local log
  log="$(mktemp)"
  if ! (cd labextension && PATH="$(cd "../$VENV/bin" && pwd):$PATH" npm run build:prod) >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "dev.sh: building the JupyterLab extension (labextension/) failed" >&2
    exit 1
  fi
  rm -f "$log"
}

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  pip_install --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # TORCH_SPEC may hold several words
    pip_install $TORCH_SPEC
  fi
  pip_install "jupyterlab>=4.6,<5"
  build_labextension
  pip_install -e ".[test,dev,ray]"
  "$PY" -c "import cumulus_jupyter, torch, pytest_jupyter, ray" # fail here, not later
  if ! "$VENV/bin/jupyter" labextension list 2>&1 | grep -q "cumulus-jupyter"; then
    echo "dev.sh: the JupyterLab extension did not install" >&2
    exit 1
  fi
}

chromium() {
  [ -x "$CHROMIUM" ] && return
  echo "dev.sh: installing Debian's chromium for the browser tests" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

lint() {
  "$PY" -m ruff check .
  "$PY" -m ruff format --check .
  "$PY" -m mypy
  (cd labextension && npm run --silent lint)
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; "$PY" examples/demo.py ;;
  lint) setup; lint ;;
  test) setup; chromium; lint; shift; "$PY" -m pytest -n "$WORKERS" --dist loadfile --no-loadscope-reorder "$@" ;;
  screenshots) setup; chromium; "$PY" docs/screenshots.py ;;
  *) echo "usage: ./dev.sh setup|demo|test|lint|screenshots" >&2; exit 2 ;;
esac
