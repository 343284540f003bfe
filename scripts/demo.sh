#!/usr/bin/env bash
# The README's main command: set up (idempotent), then run the demos:
#   1. the fused clip + sum + noise op on a CNN's per-sample gradients vs the Opacus-style path;
#   2. non-private vs DP-SGD training of a CT liver-segmentation U-Net on phantom CT sites.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python examples/fused_clip_demo.py
.venv/bin/python examples/dp_ct_segmentation.py "$@"
