"""Non-private vs differentially private training of a CT liver-segmentation U-Net with fastdp.

Two phantom CT sites (scanners) train a GroupNorm U-Net; a third, unseen scanner tests it.
The same model, data, optimizer, Poisson-sampled batches and number of steps are trained twice:
with plain PyTorch and with fastdp's DP-SGD (per-sample clipping, Gaussian noise, Poisson sampling, RDP accounting)
calibrated to a target epsilon. Prints Dice on the held-out site, epsilon and time per step.

    python examples/dp_ct_segmentation.py [--steps 300] [--epsilon 8] [--size 64]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.data import PhantomDataset
from fastdp.engine import DPDataLoader
from fastdp.models import count_parameters, dice_ce_criterion, dice_global, unet_small


@torch.no_grad()
def held_out_dice(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    """Liver Dice over all pixels of the test slices (images [N, 1, H, W], masks [N, H, W])."""
    model.eval()
    preds = torch.cat([model(images[i : i + 64]).argmax(1) for i in range(0, len(images), 64)])
    model.train()
    return dice_global(preds, masks)


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train(model, loader, optimizer, criterion, steps: int, lr: float, label: str) -> tuple[int, float]:
    """Runs `steps` optimizer steps over `loader` (re-iterated as needed); returns (steps, seconds)."""
    done, start = 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            if done >= steps:
                break
            cosine_lr(optimizer, lr, done, steps)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            done += 1
            if done % 50 == 0 or done == steps:
                elapsed = time.perf_counter() - start
                print(f"  [{label}] step {done:4d}/{steps}  loss {loss.item():.4f}  {elapsed:6.1f} s", flush=True)
    return done, time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="slice side in pixels")
    ap.add_argument("--train-per-site", type=int, default=1500)
    ap.add_argument("--test", type=int, default=300, help="held-out site_c slices")
    ap.add_argument("--batch", type=int, default=32, help="(expected) batch size")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"fastdp {fastdp.__version__} (compiled core: {fastdp.compiled_available()}), torch {torch.__version__}")

    sites = [PhantomDataset(s, args.train_per_site, args.size, args.seed) for s in ("site_a", "site_b")]
    images = torch.cat([d.tensors()[0] for d in sites])
    masks = torch.cat([d.tensors()[1] for d in sites])
    test_x, test_y = PhantomDataset("site_c", args.test, args.size, args.seed, start=10**6).tensors()
    train_set = TensorDataset(images, masks)
    print(f"data: {len(train_set)} slices from site_a + site_b, {len(test_x)} held-out slices from site_c")

    results = {}
    for mode in ("non-private", "fastdp DP-SGD"):
        torch.manual_seed(args.seed)
        model = unet_small()
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        loader = DataLoader(train_set, batch_size=args.batch, shuffle=True)
        criterion = dice_ce_criterion()
        epsilon = float("nan")
        engine = None
        if mode == "non-private":
            # The same Poisson-sampled batches as DP-SGD (variable sizes, expected args.batch), so the
            # step times compare the DP mechanism, not fixed vs variable batch shapes (new shapes
            # cost oneDNN and the per-layer tuning time of their own).
            loader = DPDataLoader(train_set, sample_rate=args.batch / len(train_set))
        else:
            engine = fastdp.PrivacyEngine(accountant="rdp")
            epochs = args.steps * args.batch / len(train_set)
            model, optimizer, loader = engine.make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=args.epsilon,
                target_delta=args.delta,
                epochs=epochs,
                max_grad_norm=args.max_grad_norm,
            )
            print(f"[{mode}] noise multiplier {optimizer.noise_multiplier:.3f} for epsilon {args.epsilon}")
        print(f"[{mode}] unet_small, {count_parameters(model) / 1e6:.3f}M parameters, {args.steps} steps")
        steps, seconds = train(model, loader, optimizer, criterion, args.steps, args.lr, mode)
        if engine is not None:
            epsilon = engine.get_epsilon(args.delta)
        dice = held_out_dice(model, test_x, test_y)
        results[mode] = {"dice": dice, "epsilon": epsilon, "ms_per_step": 1e3 * seconds / steps, "seconds": seconds}

    print()
    print(f"| training | held-out Dice (site_c) | epsilon (delta={args.delta:g}) | ms / step | total s |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        eps = "inf (no privacy)" if math.isnan(r["epsilon"]) else f"{r['epsilon']:.2f}"
        print(f"| {mode} | {r['dice']:.3f} | {eps} | {r['ms_per_step']:.0f} | {r['seconds']:.0f} |")
    ratio = results["fastdp DP-SGD"]["ms_per_step"] / results["non-private"]["ms_per_step"]
    print(f"\nDP step time / non-private step time: {ratio:.2f}x")
    return results


if __name__ == "__main__":
    main()
