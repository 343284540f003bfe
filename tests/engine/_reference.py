"""Independent oracle: DP-SGD gradient from a microbatch-of-one loop (each sample's full gradient)."""

from __future__ import annotations

import torch
from torch import nn


def per_sample_grads(model: nn.Module, per_sample_loss, inputs, targets) -> tuple[dict, torch.Tensor]:
    """({name: [B, *shape]} gradients of each sample's own loss, [B] their global L2 norms).

    per_sample_loss(output of one sample [1, ...], target [1, ...]) -> scalar loss of that sample.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(inputs.shape[0]):
        loss = per_sample_loss(model(inputs[i : i + 1]), targets[i : i + 1])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            out[n].append(torch.zeros_like(p) if g is None else g.detach())
    stacked = {n: torch.stack(v) for n, v in out.items()}
    norms = torch.sqrt(sum(g.double().flatten(1).pow(2).sum(1) for g in stacked.values()))
    return stacked, norms


def clipped_mean(grads: dict, norms: torch.Tensor, max_grad_norm: float, expected_batch_size: float) -> dict:
    """{name: (sum_i c_i g_i) / E[B]}, c_i = min(1, C / (||g_i|| + 1e-6))."""
    c = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...->...", c.to(g.dtype), g) / expected_batch_size for n, g in grads.items()}
