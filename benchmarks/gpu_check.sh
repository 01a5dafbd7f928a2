#!/usr/bin/env bash
# The GPU checks, on a host with an NVIDIA GPU, in under 8 minutes (10 with
# GPU_CHECK_LATENCY=1):
#   1. tests/gpu: a share is a CUDA memory cap, CUDA's RNG resumes bitwise, an
#      async save of CUDA tensors equals a blocking one, nvidia-smi detection;
#   2. benchmarks/checkpoint.py with its model, optimizer state and training
#      step on the GPU;
#   3. with GPU_CHECK_CONTROL_PLANE=1, benchmarks/control_plane.py (3 rounds,
#      about 2 minutes on 16 cores): the status latency under load there;
#   or, with GPU_CHECK_LATENCY=1, instead of 2 and 3: benchmarks/latency.py
#      (GPU_CHECK_ROUNDS rounds, default 5), every row of the control-latency
#      goals, its checkpoint row with the 500 MB model's state on the GPU.
#
#   benchmarks/gpu_check.sh
#   benchmarks/gpu_check.sh --download-wheels DIR [PYTHON_VERSION]
#
# The second form runs on a machine with internet access, for a GPU host
# without it: it downloads into DIR the wheels of everything the checks
# install but torch (this package's requirements, the test tools, the build
# backend), for the host's Python (PYTHON_VERSION, e.g. 3.12; default this
# machine's) on x86-64 Linux. Copy DIR to the host and run the checks there
# with GPU_CHECK_WHEELS=DIR.
#
# PY=python3    use an interpreter that already has a CUDA torch, this package
#               (pip install -e .), pytest-jupyter[server] and pytest-timeout:
#               no setup, nothing downloaded.
# GPU_CHECK_WHEELS=DIR  install from the wheels in DIR alone (no index, nothing
#               downloaded); torch is not installed: python3's own (a CUDA
#               build, in a virtual environment or not) is used.
# TORCH_SPEC    what pip installs when the environment's torch has no CUDA
#               (default: the CUDA 12.4 wheels of download.pytorch.org).
# CUMULUS_VENV  the environment set up otherwise (default .venv, as ./dev.sh).
# GPU_CHECK_MB  the checkpoint benchmark's model size (default 64; 500 makes the
#               1.56 GB checkpoint of the asynchronous-save goal).
# GPU_CHECK_SECONDS  the whole run's time limit (default 470; 570 with
#               GPU_CHECK_LATENCY=1: latency.py took 5 min 40 s on 2 cores).
#
# Exits non-zero when the host has no usable GPU, the setup fails, a GPU test
# fails or is skipped, the benchmark fails, or time runs out.
set -euo pipefail
cd "$(dirname "$0")/.."

# What is installed besides torch and this package's own requirements: the
# test tools, and the build backend (an offline install builds without
# isolation, so it must be there; SKIP_JUPYTER_BUILDER leaves out the npm
# build of the JupyterLab panel, which nothing here uses).
TOOLS=("pytest>=7" "pytest-jupyter[server]>=0.7" "pytest-timeout>=2.1" "numpy>=1.23")
BUILD=("hatchling>=1.21" "hatch-jupyter-builder>=0.9" "editables")

if [ "${1:-}" = "--download-wheels" ]; then
  dir="${2:?usage: benchmarks/gpu_check.sh --download-wheels DIR [PYTHON_VERSION]}"
  version="${3:-$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
  # This package's requirements but torch (the host has its CUDA build).
  # Read into a variable first: a failure inside `< <(...)` would go unseen.
  listed="$(python3 -c '
import re, tomllib
with open("pyproject.toml", "rb") as f:
    needs = tomllib.load(f)["project"]["dependencies"]
print("\n".join(n for n in needs if re.split(r"[^A-Za-z0-9_.-]", n)[0].lower() != "torch"))
')" || {
    echo "gpu_check: could not read the requirements in pyproject.toml (python3 3.11+ reads it)" >&2
    exit 1
  }
  mapfile -t needs <<<"$listed"
  # pip matches each manylinux tag exactly: name every glibc from 2.17 to 2.28.
  platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64
    --platform manylinux2014_x86_64)
  for n in $(seq 17 28); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip download -q -d "$dir" --only-binary=:all: --implementation cp \
    --python-version "$version" "${platforms[@]}" "${needs[@]}" "${TOOLS[@]}" "${BUILD[@]}"
  echo "gpu_check: wheels for Python $version in $dir ($(du -sh "$dir" | cut -f1));" \
    "on the GPU host: GPU_CHECK_WHEELS=$dir benchmarks/gpu_check.sh"
  exit 0
fi

# One deadline for the whole run; each step gets what is left before its own.
if [ "${GPU_CHECK_LATENCY:-0}" = 1 ]; then limit=570; else limit=470; fi
END=$((SECONDS + ${GPU_CHECK_SECONDS:-$limit}))
run_by() { # run_by DEADLINE CMD...: CMD, stopped if still running at DEADLINE
  local left=$(($1 - SECONDS))
  shift
  if [ "$left" -le 0 ]; then
    echo "gpu_check: no time left for: $*" >&2
    return 124
  fi
  timeout --kill-after=10 "$left" "$@"
}

# Without a driver nothing below can pass: say so before downloading anything.
if ! nvidia-smi -L; then
  echo "gpu_check: nvidia-smi does not answer: this host has no usable NVIDIA GPU" >&2
  exit 1
fi

if [ -z "${PY:-}" ]; then
  VENV="${CUMULUS_VENV:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    # --system-site-packages: a torch with CUDA already on the host is reused.
    # No pip of its own: its Python's ensurepip may install an older
    # setuptools than the host's torch requires, hiding the host's.
    python3 -m venv --system-site-packages --without-pip "$VENV"
    # That shows the base interpreter's packages only: where python3 is itself
    # a virtual environment's (a host whose torch lives in one), a .pth file
    # adds its packages too, after the new environment's own.
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
      >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/host-python.pth"
  fi
  PY="$VENV/bin/python"
  # pip is python3's own, seen through those paths; bootstrapped only if it has none.
  "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip -q
  if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    # Nothing from an index: the wheels given, and the packages already there.
    offline=(-q --no-index --find-links "$GPU_CHECK_WHEELS")
    run_by $((END - 270)) "$PY" -m pip install "${offline[@]}" "${BUILD[@]}"
    SKIP_JUPYTER_BUILDER=1 run_by $((END - 270)) "$PY" -m pip install "${offline[@]}" \
      --no-build-isolation -e . "${TOOLS[@]}"
  else
    if ! "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
      # A CPU build may be there (./dev.sh installs one): replace it.
      # shellcheck disable=SC2086  # TORCH_SPEC may hold several words
      run_by $((END - 270)) "$PY" -m pip install -q --force-reinstall \
        ${TORCH_SPEC:-torch --index-url https://download.pytorch.org/whl/cu124}
    fi
    SKIP_JUPYTER_BUILDER=1 run_by $((END - 270)) "$PY" -m pip install -q -e . "${TOOLS[@]}"
  fi
fi
"$PY" -c 'import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}")'

status=0
report="$(mktemp -d)/gpu-tests.xml"
# --timeout: a stuck test fails and its fixtures still stop the server and its jobs.
run_by $((END - 90)) "$PY" -m pytest tests/gpu -v -rs --timeout=150 --junitxml="$report" ||
  status=1
# pytest passes with skipped tests; here a skipped test is a check that did not run.
"$PY" - "$report" <<'EOF' || status=1
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    sys.exit("gpu_check: pytest wrote no report: the GPU tests did not finish")
suites = [root] if root.tag == "testsuite" else list(root)
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
if skipped or not tests:
    sys.exit(f"gpu_check: {skipped} of {tests} GPU tests were skipped: they did not run")
EOF

if [ "${GPU_CHECK_LATENCY:-0}" = 1 ]; then
  # Every row, each beside its baseline; it runs control_plane.py and
  # checkpoint.py (500 MB, state on the GPU) itself. Verdicts are printed:
  # its goals are not tests.
  run_by "$END" "$PY" benchmarks/latency.py --rounds "${GPU_CHECK_ROUNDS:-5}" || status=1
else
  # The model, Adam state and inputs on the GPU, so every save copies them
  # off it. 64 MB and 3 rounds keep it to well under a minute.
  run_by "$END" "$PY" benchmarks/checkpoint.py --device cuda \
    --mb "${GPU_CHECK_MB:-64}" --repeat 3 || status=1
  if [ "${GPU_CHECK_CONTROL_PLANE:-0}" = 1 ]; then
    # The test tools' server launcher and load clients (tests/) drive a real
    # server; its verdict line is printed, its goal is not a test.
    run_by "$END" "$PY" benchmarks/control_plane.py --rounds 3 || status=1
  fi
fi

if [ "$status" -eq 0 ]; then
  echo "gpu_check: all GPU checks passed"
else
  echo "gpu_check: FAILED (see above)" >&2
fi
exit "$status"
