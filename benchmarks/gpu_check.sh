#!/usr/bin/env bash
# The GPU checks, on a host with an NVIDIA GPU, in under 8 minutes:
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
#
# PY=python3    use an interpreter that already has a CUDA torch, this package
#               (pip install -e .), pytest-jupyter[server] and pytest-timeout:
#               no setup, nothing downloaded (a host without internet).
# TORCH_SPEC    what pip installs when the environment's torch has no CUDA
#               (default: the CUDA 12.4 wheels of download.pytorch.org).
# CUMULUS_VENV  the environment set up otherwise (default .venv, as ./dev.sh).
# GPU_CHECK_MB  the checkpoint benchmark's model size (default 64; 500 makes the
#               1.56 GB checkpoint of the asynchronous-save goal).
# GPU_CHECK_SECONDS  the whole run's time limit (default 470).
#
# Exits non-zero when the host has no usable GPU, the setup fails, a GPU test
# fails or is skipped, the benchmark fails, or time runs out.
set -euo pipefail
cd "$(dirname "$0")/.."

# One deadline for the whole run; each step gets what is left before its own.
END=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
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
  # --system-site-packages: a torch with CUDA already on the host is reused.
  [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
  PY="$VENV/bin/python"
  if ! "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
    # A CPU build may be there (./dev.sh installs one): replace it.
    # shellcheck disable=SC2086  # TORCH_SPEC may hold several words
    run_by $((END - 270)) "$PY" -m pip install -q --force-reinstall \
      ${TORCH_SPEC:-torch --index-url https://download.pytorch.org/whl/cu124}
  fi
  # The server and the test tools only: SKIP_JUPYTER_BUILDER skips the npm
  # build of the JupyterLab panel, which nothing here uses.
  SKIP_JUPYTER_BUILDER=1 run_by $((END - 270)) "$PY" -m pip install -q -e . \
    "pytest>=7" "pytest-jupyter[server]>=0.7" "pytest-timeout>=2.1" "numpy>=1.23"
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
