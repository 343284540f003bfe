"""The DP training-time penalty: fastdp vs the microbatch-of-one loop the paper used vs Opacus.

Runs benchmarks/bench_step.py (all modes interleaved in one process, medians, peak memory) on
the paper's input size and prints its table: step time and memory of each DP mode as a multiple
of non-private training of the same U-Net on the same batch.

    python examples/dp_time_penalty.py                      # 256x256, B=16, on the GPU if there is one
    python examples/dp_time_penalty.py --size 128 --batch 32 --device cpu --reps 3

On a 2-core CPU the 256x256 table takes several minutes (the microbatch loop and Opacus are slow).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="slice side (the paper: 256)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--modes",
        default="nonprivate,fastdp,microbatch,opacus-hooks,opacus-functorch",
        help="bench_step modes (Opacus modes need `pip install opacus`)",
    )
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    cmd = [
        sys.executable,
        str(BENCH),
        "--device",
        args.device,
        "--sizes",
        str(args.size),
        "--batches",
        str(args.batch),
        "--reps",
        str(args.reps),
        "--modes",
        args.modes,
    ]
    if args.json:
        cmd += ["--json", args.json]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
