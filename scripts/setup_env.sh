#!/usr/bin/env bash
# Creates .venv (if missing), installs the pinned CPU torch and fastdp's dependencies, and
# builds fastdp's compiled core against that torch. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[fastdp] creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
# torch is pinned: an unpinned torch would download a multi-GB CUDA build here.
$PIP install -q --upgrade pip
$PIP install -q "torch==${FASTDP_TORCH_VERSION:-2.13.0}"
$PIP install -q setuptools wheel ninja numpy
echo "[fastdp] building the compiled core (first build takes about a minute)"
# --no-build-isolation: compile against the torch installed above, not a fresh download.
$PIP install -q --no-build-isolation -e ".[test,data,dev,flower]"
.venv/bin/python -c "import fastdp; assert fastdp.compiled_available(), fastdp.compiled_error(); print('[fastdp] compiled core OK')"
