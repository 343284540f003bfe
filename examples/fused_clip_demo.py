"""Per-sample clipping + noise of a real model's per-sample gradients with fastdp's fused op.

Computes the per-sample gradients of a small segmentation CNN with torch.func, then forms the
DP-SGD gradient (clip each sample to norm C, sum, add N(0, sigma^2 C^2), divide by the batch
size) twice: with fastdp's compiled ops and with the per-parameter PyTorch path Opacus uses.
Checks that both agree with the noise off and prints the time of each.

    python examples/fused_clip_demo.py [--batch 32] [--size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fastdp
from fastdp import ops


def small_segmentation_cnn(channels: int = 16) -> nn.Module:
    """A 4-conv GroupNorm network with a 2-class per-pixel head: [B, 1, H, W] -> [B, 2, H, W]."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.GroupNorm(4, channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.GroupNorm(4, 2 * channels),
        nn.ReLU(),
        nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * channels, 2, 1),
    )


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: [B, *param.shape]} gradients of each sample's mean pixel cross-entropy."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def reference_dp_gradient(grads: list[torch.Tensor], max_norm: float, noise_std: float, batch: int):
    """The per-parameter PyTorch path (what Opacus does): norms, einsum, torch.normal, scale."""
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=1) for g in grads], dim=1).norm(2, dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    out = []
    for g in grads:
        summed = torch.einsum("i,i...", coef, g)
        out.append((summed + torch.normal(0.0, noise_std, summed.shape)) / batch)
    return out


def fastdp_dp_gradient(grads, outs, max_norm: float, noise_std: float, batch: int, noise: fastdp.NoiseSource):
    """fastdp: one norm pass and one fused clip + sum + noise + scale pass over all parameters."""
    sq = ops.per_sample_sq_norms(grads)
    seed, offset = noise.next()
    ops.clip_accumulate_noise(grads, sq, outs, max_norm, noise_std, 1.0 / batch, seed, offset)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"fastdp {fastdp.__version__}; compiled core: {fastdp.compiled_available()}; torch {torch.__version__}")

    model = small_segmentation_cnn(args.channels)
    x = torch.rand(args.batch, 1, args.size, args.size)
    y = (x[:, 0] > 0.5).long()
    per_sample = per_sample_gradients(model, x, y)
    grads = [per_sample[name] for name, _ in model.named_parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters in {len(grads)} tensors; batch {args.batch}")

    max_norm, sigma = 1.0, 1.0
    outs = [torch.empty(g.shape[1:]) for g in grads]
    noise = fastdp.NoiseSource(seed=0)
    # Noise off: both paths must give the same clipped mean gradient.
    ref = reference_dp_gradient(grads, max_norm, 0.0, args.batch)
    got = fastdp_dp_gradient(grads, outs, max_norm, 0.0, args.batch, noise)
    worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(got, ref, strict=True))
    print(f"noise off: max relative difference fastdp vs reference = {worst:.2e}")
    assert worst < 1e-4, "fastdp and the reference disagree"

    times = {"reference": [], "fastdp": []}
    for _ in range(args.repeats):  # interleaved, medians: this machine is shared and noisy
        start = time.perf_counter()
        reference_dp_gradient(grads, max_norm, sigma * max_norm, args.batch)
        times["reference"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fastdp_dp_gradient(grads, outs, max_norm, sigma * max_norm, args.batch, noise)
        times["fastdp"].append(time.perf_counter() - start)
    ref_ms = statistics.median(times["reference"]) * 1e3
    fast_ms = statistics.median(times["fastdp"]) * 1e3
    print(f"clip + sum + noise (sigma={sigma}, C={max_norm}): reference {ref_ms:.2f} ms, fastdp {fast_ms:.2f} ms")
    print(f"speed-up: {ref_ms / fast_ms:.2f}x (median of {args.repeats} interleaved runs)")


if __name__ == "__main__":
    main()
