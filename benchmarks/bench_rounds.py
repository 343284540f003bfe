"""Federated rounds benchmark: the local training of a round, non-private vs DP, for 3 or 10 sites.

Builds the demo's sites (configs/demo.toml as it stands: since issue 16 unet_tiny, 64x64 phantom
CT, Poisson E[B] = 32, Adam, 20 local steps; epsilon 8 per site for DP; --slices sets the
training slices per site) twice -- the non-private run's sites and the DP
run's -- and trains them round by round, interleaved: in each round every site trains once per
mode (np then DP for one site, DP then np for the next, ...), from each mode's own global model
(FedAvg of that mode's updates, weighted by samples). Reported per number of sites: the total
local-training seconds of each mode, DP / non-private over all rounds, in round 1 (first-call
costs: oneDNN primitives and fastdp's conv tuning for each new shape) and in the later rounds.

`--tuning own` gives every DP site's private model its own tuning table (what fastdp did before
"auto" tuning was shared by the private models of a process): an A/B of the shared table.

    python benchmarks/bench_rounds.py                           # 3 and 10 sites, 3 rounds (~10 min)
    python benchmarks/bench_rounds.py --sites 3 --rounds 2 --slices 200 --json rounds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, markdown_table  # noqa: E402

import fastdp  # noqa: E402
from fastdp.engine.rules.conv_tuner import SHARED_TABLE, TuningTable  # noqa: E402
from fastdp.experiment import load_config  # noqa: E402
from fastdp.experiment.builders import build_sites, find_run, model_factory  # noqa: E402
from fastdp.experiment.data import build_data  # noqa: E402
from fastdp.federated.simulation import initial_global_state  # noqa: E402
from fastdp.federated.site import floating_keys  # noqa: E402

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]


def site_names(n: int) -> list[str]:
    """The demo's three built-in sites, then generated profiles site_3, site_4, ..."""
    builtin = ["site_a", "site_b", "site_c"]
    return builtin[:n] + [f"site_{i}" for i in range(len(builtin), n)]


def fedavg(global_state: dict, updates: list) -> dict:
    """The global state plus the sample-weighted mean of the updates' deltas."""
    total = sum(u.num_samples for u in updates)
    new = dict(global_state)
    for k in floating_keys(global_state):
        new[k] = global_state[k] + sum(u.delta[k] * (u.num_samples / total) for u in updates)
    return new


def time_federation(n_sites: int, rounds: int, slices: int, tuning: str, seed: int) -> dict:
    """Per-round local-training seconds of each mode for n_sites sites, interleaved site by site."""
    cfg = load_config(
        ROOT / "configs" / "demo.toml",
        [
            f"data.sites={json.dumps(site_names(n_sites))}",
            f"data.slices_per_site={slices}",
            "data.val_slices_per_site=0",
            "data.test_slices=0",
            f"federated.rounds={rounds}",
            f"seed={seed}",
        ],
    )
    data = build_data(cfg.data, cfg.seed)
    SHARED_TABLE.clear()  # every federation starts untuned, as a fresh process would
    sites = {mode: build_sites(cfg, find_run(cfg, mode), data) for mode in ("nonprivate", "dp")}
    if tuning == "own":
        for site in sites["dp"]:
            site.model.conv_tuner.table = TuningTable()
    start = initial_global_state(model_factory(cfg), cfg.seed)
    state = {"nonprivate": start, "dp": {k: v.clone() for k, v in start.items()}}
    seconds = {mode: [] for mode in state}
    for r in range(rounds):
        spent = {mode: 0.0 for mode in state}
        updates = {mode: [] for mode in state}
        for k in range(n_sites):
            order = ("nonprivate", "dp") if (r * n_sites + k) % 2 == 0 else ("dp", "nonprivate")
            for mode in order:
                t0 = time.perf_counter()
                updates[mode].append(sites[mode][k].local_update(state[mode], round=r + 1))
                spent[mode] += time.perf_counter() - t0
        for mode in state:
            state[mode] = fedavg(state[mode], updates[mode])
            seconds[mode].append(spent[mode])
        print(
            f"  {n_sites} sites, round {r + 1}: non-private {spent['nonprivate']:.1f} s, DP {spent['dp']:.1f} s "
            f"(x{spent['dp'] / spent['nonprivate']:.2f})",
            file=sys.stderr,
            flush=True,
        )
    return {"sites": n_sites, "tuning": tuning, "seconds": seconds}


def summarise(result: dict) -> dict:
    np_s, dp_s = result["seconds"]["nonprivate"], result["seconds"]["dp"]
    later = slice(1, None)
    return {
        "sites": result["sites"],
        "tuning": result["tuning"],
        "nonprivate_s": sum(np_s),
        "dp_s": sum(dp_s),
        "ratio": sum(dp_s) / sum(np_s),
        "round1_ratio": dp_s[0] / np_s[0],
        "later_ratio": (sum(dp_s[later]) / sum(np_s[later])) if len(np_s) > 1 else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="3,10", help="comma-separated numbers of sites")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300, help="training slices per site")
    ap.add_argument("--tuning", default="shared", help="comma-separated of shared,own (see the docstring)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, results = [], []
    for n in [int(v) for v in args.sites.split(",")]:
        for tuning in args.tuning.split(","):
            res = summarise(time_federation(n, args.rounds, args.slices, tuning, args.seed))
            results.append(res)
            rows.append(
                [
                    n,
                    tuning,
                    f"{res['nonprivate_s']:.1f}",
                    f"{res['dp_s']:.1f}",
                    f"**{res['ratio']:.2f}**",
                    f"{res['round1_ratio']:.2f}",
                    f"{res['later_ratio']:.2f}",
                ]
            )
    info = machine_info("cpu")
    demo = load_config(ROOT / "configs" / "demo.toml")
    head = (
        f"Local training of federated rounds, DP vs non-private. Machine: {describe_machine(info)}; fastdp "
        f"{fastdp.__version__}. configs/demo.toml ({demo.model.name}, {demo.data.image_size}x{demo.data.image_size}, "
        f"E[B] = {demo.federated.batch_size}, {demo.federated.optimizer}, {demo.federated.local_steps} local steps, "
        f"epsilon {demo.dp.target_epsilon:g} per site), {args.slices} slices per site, {args.rounds} rounds, "
        "sites interleaved."
    )
    cols = ["sites", "conv tuning", "non-private s", "DP s", "DP x non-private", "round 1", "later rounds"]
    table = head + "\n\n" + markdown_table(cols, rows)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results, "markdown": table}, indent=1))


if __name__ == "__main__":
    main()
