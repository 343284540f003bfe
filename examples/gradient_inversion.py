"""Gradient inversion on a fastdp site's update: non-private vs DP, scored against trivial guesses.

The global model is a U-Net (unet_small; untrained by default: the round-1 model); one site holds
1 or 4 phantom CT slices and sends its update (fastdp.federated.Site.local_update, SGD) without DP and with DP-SGD
at several noise multipliers. The server attacks each update with the same settings and the
reconstructions are scored (body SSIM, PSNR) next to guesses that need no gradient.

    python examples/gradient_inversion.py                      # about a minute: the default demo
    python examples/gradient_inversion.py --batch-sizes 1 --steps 300 --slices 4   # the sweep's best pixel setting
    python examples/gradient_inversion.py --mode retrieval --references 512 --batch-sizes 1 --slices 6

Writes attack_B{B}.png, attack_results.json (per slice) and summary.json into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fastdp.attacks import run_attack_experiment
from fastdp.attacks.experiment import pretrain
from fastdp.data import PhantomDataset
from fastdp.models import build_model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="unet_small")
    ap.add_argument("--size", type=int, default=64, help="slice side in pixels")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 1.0], help="DP noise multipliers (C = 1)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--mode", choices=["retrieval", "pixels"], default="pixels")
    ap.add_argument("--references", type=int, default=256, help="attacker's public reference slices")
    ap.add_argument("--top-k", type=int, default=3, help="retrieved slices averaged")
    ap.add_argument("--steps", type=int, default=50, help="pixel-attack optimisation steps")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--tv-weight", type=float, default=0.5)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--objective", choices=["cosine", "l2"], default="cosine")
    ap.add_argument("--optimizer", choices=["adam", "lbfgs"], default="adam")
    ap.add_argument("--noise-std", type=float, default=0.05, help="pixel noise added to candidates (0: off)")
    ap.add_argument("--unknown-mask", action="store_true", help="optimise the mask jointly")
    ap.add_argument("--local-steps", type=int, default=1, help="site's local SGD steps (unrolled by the attack)")
    ap.add_argument("--local-lr", type=float, default=0.1)
    ap.add_argument("--pretrain-steps", type=int, default=0, help="0: the untrained round-1 model")
    ap.add_argument("--slices", type=int, default=1, help="attack this many different target slices")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("attack_out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    model = build_model(args.model)
    pre_x, pre_m = PhantomDataset("site_b", 64, args.size, args.seed + 1).tensors()
    pretrain(model, pre_x, pre_m, args.pretrain_steps)
    print(f"global model: {args.model}, {args.pretrain_steps} pretraining steps ({time.perf_counter() - start:.1f} s)")
    pool_x, pool_m = PhantomDataset("site_a", 256, args.size, args.seed).tensors()
    organ = [i for i in range(len(pool_x)) if int(pool_m[i].sum()) >= 64]
    need = max(args.batch_sizes)
    results = []
    for s in range(args.slices):
        idx = organ[s * need : (s + 1) * need]
        print(f"--- target slices {idx}")
        res = run_attack_experiment(
            model,
            pool_x[idx],
            pool_m[idx],
            out_dir=args.out / f"slice{s}",
            batch_sizes=args.batch_sizes,
            sigmas=args.sigmas,
            max_grad_norm=args.max_grad_norm,
            steps=args.steps,
            lr=args.lr,
            tv_weight=args.tv_weight,
            restarts=args.restarts,
            known_mask=not args.unknown_mask,
            local_steps=args.local_steps,
            local_lr=args.local_lr,
            attack={"objective": args.objective, "optimizer": args.optimizer, "noise_std": args.noise_std},
            mode=args.mode,
            references=args.references,
            top_k=args.top_k,
            seed=args.seed,
        )
        results.append(res)
    # Summary over the slices: mean of each run's batch-mean metrics.
    rows = {}
    for res in results:
        for r in res["runs"]:
            key = (r["batch_size"], r["sigma"])
            row = rows.setdefault(key, {"body_ssim": [], "psnr": [], "best_trivial": [], "margin": [], "s": []})
            row["body_ssim"].append(r["mean"]["body_ssim"])
            row["psnr"].append(r["mean"]["psnr"])
            row["best_trivial"].append(r["best_trivial"]["body_ssim"])
            row["margin"].append(r["margin_body_ssim"])
            row["s"].append(r["attack_seconds"])
            row["mode"], row["epsilon"] = r["mode"], r["epsilon"]
    avg = lambda v: sum(v) / len(v)  # noqa: E731
    print()
    print(f"mean over {args.slices} target slice(s):")
    print("| B | update | epsilon (1 step) | mode | body SSIM | best trivial | margin | PSNR dB | attack s |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for (b, sigma), row in rows.items():
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.1f}"
        name = "non-private" if sigma is None else f"DP sigma={sigma:g}"
        line = {k: avg(v) for k, v in row.items() if isinstance(v, list)}
        summary.append({"batch_size": b, "sigma": sigma, "mode": row["mode"], "epsilon": row["epsilon"], **line})
        print(
            f"| {b} | {name} | {eps} | {row['mode']} | {line['body_ssim']:.3f} | {line['best_trivial']:.3f} "
            f"| {line['margin']:+.3f} | {line['psnr']:.1f} | {line['s']:.1f} |"
        )
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s; PNGs and JSON in {args.out}")
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "summary": summary}
    out["seconds"] = total
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(out, indent=1, default=lambda o: None if o is math.nan else o))
    return out


if __name__ == "__main__":
    main()
