"""What TLS and SuperNode authentication cost a Flower round: the same run on a secure and an insecure LocalFederation.

Both federations run the same small experiment (3 phantom sites, a 4-channel depth-2 U-Net,
64x64, 2 local steps per round) one after the other, alternating secure/insecure for
``--repeats`` pairs. Reported per mode: start-up (first process start to the first round),
the median round time over rounds 2..R (round 1 includes every SuperNode's first ClientApp),
and the whole run; and the secure/insecure ratios. The round time on Flower is dominated by
Flower's process per message (import torch and fastdp, build the site) and the nodes' 3 s
polling, not by the training: the point is the difference TLS + auth make.

    python benchmarks/bench_flower.py                  # 2 pairs of 4-round runs
    python benchmarks/bench_flower.py --rounds 6 --repeats 3 --json flower.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import warnings
from pathlib import Path

from fastdp.experiment import ExperimentConfig
from fastdp.flower import launch_local, run_config_for
from fastdp.flower.launcher import InsecureFederationWarning


def experiment(rounds: int) -> ExperimentConfig:
    """The small federated run both federations train (non-private: the round is Flower's, not DP's)."""
    return ExperimentConfig.from_dict(
        {
            "name": "bench-flower",
            "seed": 0,
            "threads": 1,
            "modes": ["nonprivate"],
            "data": {"image_size": 64, "slices_per_site": 40, "val_slices_per_site": 8, "test_slices": 24},
            "model": {"name": "unet_small", "kwargs": {"base_channels": 4, "depth": 2}},
            "federated": {"rounds": rounds, "local_steps": 2, "batch_size": 8, "lr": 0.1, "optimizer": "sgd"},
            "attack": {"enabled": False},
        }
    )


def one_run(rounds: int, insecure: bool, work: Path) -> dict:
    """Seconds: start-up, each round, the whole run, for one federation."""
    cfg = experiment(rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureFederationWarning)
        run = launch_local(
            run_config=run_config_for(cfg, "nonprivate"),
            work_dir=work,
            insecure=insecure,
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            timeout=1800,
        )
    round_s = [r["wall_s"] for r in run.history["rounds"]]
    return {"startup_s": run.wall_s - sum(round_s), "round_s": round_s, "wall_s": run.wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="secure/insecure pairs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 includes first-call costs)")
    results: dict[str, list[dict]] = {"secure": [], "insecure": []}
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        for rep in range(args.repeats):
            order = ("secure", "insecure") if rep % 2 == 0 else ("insecure", "secure")
            for mode in order:
                res = one_run(args.rounds, mode == "insecure", Path(tmp) / f"{mode}-{rep}")
                results[mode].append(res)
                print(
                    f"{mode:8s} rep {rep}: start-up {res['startup_s']:.1f} s, rounds "
                    + ", ".join(f"{s:.1f}" for s in res["round_s"])
                    + f" s, run {res['wall_s']:.1f} s",
                    flush=True,
                )

    def summary(mode: str) -> dict:
        runs = results[mode]
        return {
            "startup_s": statistics.median(r["startup_s"] for r in runs),
            "round_s": statistics.median(s for r in runs for s in r["round_s"][1:]),
            "wall_s": statistics.median(r["wall_s"] for r in runs),
        }

    sec, ins = summary("secure"), summary("insecure")
    print(f"\nFlower 1.42 on {platform.processor() or platform.machine()}, {args.rounds} rounds x {args.repeats} runs")
    print("\n| | start-up (s) | round, median of rounds 2.. (s) | whole run (s) |")
    print("|---|---|---|---|")
    print(f"| TLS + SuperNode auth | {sec['startup_s']:.1f} | {sec['round_s']:.1f} | {sec['wall_s']:.1f} |")
    print(f"| insecure | {ins['startup_s']:.1f} | {ins['round_s']:.1f} | {ins['wall_s']:.1f} |")
    print(
        f"| ratio | {sec['startup_s'] / ins['startup_s']:.2f}x | {sec['round_s'] / ins['round_s']:.2f}x "
        f"| {sec['wall_s'] / ins['wall_s']:.2f}x |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "secure": sec, "insecure": ins}, indent=2))


if __name__ == "__main__":
    main()
