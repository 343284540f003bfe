"""Centralised, non-private baseline: the default U-Net on phantom CT, tested on an unseen site.

Trains ``unet_small`` on slices pooled from two sites (site_a, site_b) and evaluates on a
third scanner it never saw (site_c: lower dose, sharper kernel, other calibration and
patients). This is the upper bound the federated and DP runs are compared against.

    python examples/centralised_training.py                # about 4-5 min on 2 CPU cores
    python examples/centralised_training.py --size 128 --minutes 10 --figure out/centralised.png

Prints phantom generation speed, training progress, and the held-out Dice: global (all
pixels of the test set pooled), and the mean per-slice Dice over slices that contain liver.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fastdp.data import PhantomDataset, render_slices
from fastdp.models import count_parameters, dice_ce_criterion, dice_global, dice_per_sample, unet_small


def phantom_speed(size: int, n: int = 1024, chunk: int = 128) -> float:
    """Phantom slices per second at ``size`` (rendered in chunks, as the datasets do)."""
    render_slices("site_a", range(chunk), size)  # warm-up
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        render_slices("site_b", range(start, start + chunk), size)
    return n / (time.perf_counter() - t0)


def augment_intensity(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample random gain, offset and noise on windowed slices [B, 1, H, W] in [0, 1].

    Other scanners differ in calibration and noise; jittering them in training is what lets
    the model work on a site it never saw.
    """
    b = x.shape[0]
    gain = 0.9 + 0.2 * torch.rand(b, 1, 1, 1, generator=g)
    offset = 0.06 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    sigma = 0.03 * torch.rand(b, 1, 1, 1, generator=g)
    return (x * gain + offset + sigma * torch.randn(x.shape, generator=g)).clamp_(0.0, 1.0)


@torch.no_grad()
def evaluate(model, images, masks, batch: int = 64):
    model.eval()
    preds = torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    model.train()
    has_liver = masks.flatten(1).any(1)
    per_slice = dice_per_sample(preds, masks)
    return dice_global(preds, masks), float(per_slice[has_liver].mean()), preds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="slice size in pixels (64, 96, 128, ...)")
    ap.add_argument("--train-per-site", type=int, default=2000)
    ap.add_argument("--test", type=int, default=400, help="held-out site_c slices")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=4.0, help="training time budget (wall clock)")
    # One thread by default: on a shared 2-core machine two OpenMP threads measured 7x slower
    # (8 vs 55 samples/s) whenever another process held a core; use --threads 2 on an idle one.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", default=None, help="write a PNG of test slices, truth and prediction")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    print(f"phantom: {phantom_speed(args.size):.0f} slices/s at {args.size}x{args.size}")

    # Train: two scanners pooled. Test: a third scanner, other patients (disjoint indices).
    train_sets = [PhantomDataset(s, args.train_per_site, args.size, args.seed) for s in ("site_a", "site_b")]
    images = torch.cat([d.tensors()[0] for d in train_sets])
    masks = torch.cat([d.tensors()[1] for d in train_sets])
    test_x, test_y = PhantomDataset("site_c", args.test, args.size, args.seed, start=10**6).tensors()
    print(f"data: {len(images)} training slices (site_a + site_b), {len(test_x)} test slices (site_c), "
          f"{time.perf_counter() - t_start:.1f} s")  # fmt: skip

    model = unet_small()
    print(f"model: unet_small, {count_parameters(model) / 1e6:.3f}M parameters")
    criterion = dice_ce_criterion()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    budget = 60.0 * args.minutes
    g = torch.Generator().manual_seed(args.seed)
    t_train, step, seen = time.perf_counter(), 0, 0
    while time.perf_counter() - t_train < budget:
        for idx in torch.randperm(len(images), generator=g).split(args.batch):
            elapsed = time.perf_counter() - t_train
            if elapsed >= budget:
                break
            # Cosine decay over the time budget (the number of steps is not known in advance).
            lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * elapsed / budget))
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = images[idx], masks[idx]
            x = augment_intensity(x, g)
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + len(idx)
            if step % 100 == 0:
                rate = seen / elapsed
                print(f"step {step:5d}  {elapsed:6.1f} s  loss {loss.item():.4f}  {rate:.1f} samples/s")
    train_s = time.perf_counter() - t_train
    dice_all, dice_liver, preds = evaluate(model, test_x, test_y)
    total_s = time.perf_counter() - t_start
    print(f"trained {step} steps ({seen} samples, {seen / len(images):.1f} epochs) in {train_s:.0f} s")
    print(f"held-out site_c: global Dice {dice_all:.4f}, mean Dice of liver slices {dice_liver:.4f}")
    print(f"total wall time {total_s:.0f} s")
    if args.figure:
        from fastdp.viz import save_segmentation_grid

        keep = test_y.flatten(1).any(1).nonzero().flatten()[:6]
        d = dice_per_sample(preds[keep], test_y[keep])
        path = save_segmentation_grid(
            args.figure, test_x[keep], test_y[keep], preds[keep], titles=[f"Dice {v:.3f}" for v in d]
        )
        print(f"figure: {path}")
    return {"dice_global": dice_all, "dice_liver_slices": dice_liver, "train_s": train_s, "total_s": total_s}


if __name__ == "__main__":
    main()
