"""Gradient inversion on a fastdp site's update: non-private vs DP, scored fairly against trivial guesses.

The global model is a U-Net at round 1 (untrained): ``unet_small`` (GroupNorm), the paper-like
``bn_unet_small`` (BatchNorm after bias-free convolutions, attacked in eval mode) or its GroupNorm
conversion ``bn_unet_small_gn``. A site holds B phantom CT slices and sends its update
(fastdp.federated.Site.local_update) without DP and with DP-SGD at several noise multipliers; the
server attacks each update with the same settings. Each reconstruction is scored after the best
affine intensity fit (aligned body SSIM, PSNR), by NCC, and by identification among 20 other
patients' slices with similar liver masks, next to the same scores of guesses that need no gradient.

    python examples/gradient_inversion.py                                   # B = 1, 4 slices, ~2 min
    python examples/gradient_inversion.py --slices 8 --sigmas 0.5 1.0       # the docs/attacks.md table
    python examples/gradient_inversion.py --model bn_unet_small --slices 8
    python examples/gradient_inversion.py --local-optimizer adam --local-steps 10 --local-lr 0.003 --steps 40

Writes attack_B{B}.png and attack_results.json into --out and prints a summary table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastdp.attacks import run_attack_experiment


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="unet_small", help="unet_small, bn_unet_small, bn_unet_small_gn, ...")
    ap.add_argument("--size", type=int, default=64, help="slice side in pixels")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--slices", type=int, default=4, help="images attacked per batch size (B divides it)")
    ap.add_argument("--sigmas", type=float, nargs="*", default=[1.0], help="DP noise multipliers (C = 1)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--mode", choices=["retrieval", "pixels"], default="pixels")
    ap.add_argument("--references", type=int, default=256, help="attacker's public reference slices (retrieval)")
    ap.add_argument("--top-k", type=int, default=3, help="retrieved slices averaged")
    ap.add_argument("--steps", type=int, default=200, help="attack optimisation steps")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--tv-weight", type=float, default=0.1)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--layer-weights", default="inverse_norm", help="'inverse_norm' or 'none' (one plain cosine)")
    ap.add_argument("--noise-std", type=float, default=0.0, help="pixel noise added to candidates (0: off)")
    ap.add_argument("--unknown-mask", action="store_true", help="optimise the mask jointly")
    ap.add_argument("--local-optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--local-steps", type=int, default=1, help="site's local steps (unrolled by the attack)")
    ap.add_argument("--local-lr", type=float, default=0.1)
    ap.add_argument("--pool-size", type=int, default=20, help="identification distractors (0: off)")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="0: the untrained round-1 model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("attack_out"))
    args = ap.parse_args(argv)
    start = time.perf_counter()
    results = []
    for b in args.batch_sizes:
        if args.slices % b:
            raise SystemExit(f"--slices {args.slices} is not a multiple of batch size {b}")
        res = run_attack_experiment(
            args.model,
            out_dir=args.out / f"B{b}",
            batch_sizes=(b,),
            batches=args.slices // b,
            sigmas=args.sigmas,
            max_grad_norm=args.max_grad_norm,
            steps=args.steps,
            lr=args.lr,
            tv_weight=args.tv_weight,
            restarts=args.restarts,
            known_mask=not args.unknown_mask,
            local_steps=args.local_steps,
            local_lr=args.local_lr,
            local_optimizer=args.local_optimizer,
            size=args.size,
            pretrain_steps=args.pretrain_steps,
            attack={
                "layer_weights": None if args.layer_weights == "none" else args.layer_weights,
                "noise_std": args.noise_std,
            },
            pool_size=args.pool_size,
            mode=args.mode,
            references=args.references,
            top_k=args.top_k,
            seed=args.seed,
            threads=args.threads,
        )
        results.extend(res["runs"])
    print(f"\n{args.model}, {args.slices} slices per batch size, {args.steps} steps:")
    cols = "B | update | aligned body SSIM | best aligned trivial | margin | NCC | top-1 (NCC) | top-1 (update) | s/img"
    print(f"| {cols} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        name = "non-private" if r["sigma"] is None else f"DP sigma={r['sigma']:g}"
        ident, gid = r.get("identification") or {}, r.get("gradient_identification") or {}
        bt = r["best_trivial_aligned"]
        print(
            f"| {r['batch_size']} | {name} | {r['mean']['aligned_body_ssim']:.3f} | {bt['name']} "
            f"{bt['aligned_body_ssim']:.3f} | {r['margin_aligned_body_ssim']:+.3f} | {r['mean']['ncc']:.2f} | "
            f"{ident.get('top1', float('nan')):.2f} | {gid.get('top1', float('nan')):.2f} | "
            f"{r['seconds_per_image']:.1f} |"
        )
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s; PNGs and JSON in {args.out}")
    return {"runs": results, "seconds": total}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
