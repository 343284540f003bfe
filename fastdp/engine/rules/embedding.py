"""Embedding: per-sample norms from token coincidences (no [V, D] per-sample tensor); the clipped
sum as one index_add of c-scaled output gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.rules.base import Call, acc_dtype, coef
from fastdp.engine.rules.registry import register_rule
from fastdp.engine.tape import Deferred


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, module: nn.Embedding, call: Call):
        ctx.call = call
        ctx.padding_idx = module.padding_idx
        ctx.save_for_backward(idx, weight)
        return F.embedding(idx, weight, module.padding_idx, module.max_norm, module.norm_type, False, False)

    @staticmethod
    def backward(ctx, g):
        idx, w = ctx.saved_tensors
        B = idx.shape[0]
        V, D = w.shape
        scale = ctx.call.tape.loss_scale(B)
        ids = idx.flatten(1) if idx.dim() > 1 else idx.unsqueeze(1)  # [B, T]
        G = g.reshape(*ids.shape, D)
        if ctx.padding_idx is not None:
            G = G * (ids != ctx.padding_idx).unsqueeze(-1).to(G.dtype)
        # ||g_i||^2 = sum_{t,t'} [I_t == I_t'] <G_t, G_t'>: no [V, D] per-sample tensor.
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(G.dtype)
        sq = (torch.bmm(G, G.transpose(1, 2)) * same).sum((1, 2))
        sq = sq.to(acc_dtype(w)) * (scale * scale)

        def clipped_sum(c: torch.Tensor) -> list[torch.Tensor]:
            Gc = G * coef(c, scale, G, 3)
            return [torch.zeros_like(w).index_add_(0, ids.reshape(-1), Gc.reshape(-1, D))]

        def materialize() -> list[torch.Tensor]:
            out = torch.zeros((B, V, D), dtype=w.dtype, device=w.device)
            out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, D), G * scale)
            return [out]

        ctx.call.tape.record(ctx.call.batch, Deferred([w], sq, clipped_sum, materialize))
        return None, None, None, None


@register_rule(nn.Embedding)
def embedding_forward(module: nn.Embedding, call: Call, idx: torch.Tensor) -> torch.Tensor:
    """module(idx) through _EmbeddingFn. idx: [B, ...] integer ids -> [B, ..., D]."""
    if module.scale_grad_by_freq:
        raise ValueError(f"fastdp: {call.name}: Embedding(scale_grad_by_freq=True) mixes samples; not supported")
    if idx.dim() < 1:
        raise ValueError(f"fastdp: {call.name}: Embedding needs batched indices [B, ...]")
    return _EmbeddingFn.apply(idx, module.weight, module, call)
