"""Independent oracle: DP-SGD gradient from a microbatch-of-one loop (each sample's full gradient)."""

from __future__ import annotations

import torch
from torch import nn


def microbatch_reference(
    model: nn.Module, per_sample_loss, inputs, targets, max_grad_norm: float, expected_batch_size: float
):
    """{name: (sum_i c_i g_i) / E[B]} with g_i the gradient of sample i's loss, c_i = min(1, C/(||g_i||+1e-6)).

    per_sample_loss(output [1, ...], target [1, ...]) -> scalar loss of that one sample.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    B = inputs.shape[0]
    for i in range(B):
        grads = torch.autograd.grad(
            per_sample_loss(model(inputs[i : i + 1]), targets[i : i + 1]),
            list(params.values()),
            allow_unused=True,
        )
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values(), strict=True)]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        c = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for n, g in zip(params, grads, strict=True):
            total[n] += c * g
    return {n: t / expected_batch_size for n, t in total.items()}
