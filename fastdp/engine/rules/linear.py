"""Linear: per-sample norms by the ghost Gram form <A A^T, G G^T> when 2T^2 < p*d (T tokens per
sample), else from per-sample gradients; stored when small, else the clipped sum as one matmul
of c-scaled output gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.rules import base
from fastdp.engine.rules.base import Call, acc_dtype, acc_sq, coef, trainable
from fastdp.engine.rules.registry import register_rule
from fastdp.engine.tape import Deferred, Stored


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, call: Call):
        ctx.call = call
        ctx.save_for_backward(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        gx = g.matmul(w) if ctx.needs_input_grad[0] else None
        _record_linear(ctx.call, x, g, w, b)
        return gx, None, None, None


def _record_linear(call: Call, x, g, w, b) -> None:
    B = x.shape[0]
    scale = call.tape.loss_scale(B)
    w_on, b_on = trainable(w), trainable(b)
    params = ([w] if w_on else []) + ([b] if b_on else [])
    p_out, d_in = w.shape
    A = x.flatten(1, -2) if x.dim() > 2 else x.unsqueeze(1)  # [B, T, d]
    G = g.flatten(1, -2) if g.dim() > 2 else g.unsqueeze(1)  # [B, T, p]
    T = A.shape[1]
    ghost = 2 * T * T < p_out * d_in
    big = B * w.numel() > base.STORE_RATIO * (x.numel() + g.numel())
    if not w_on or not (ghost or big):
        grads = []
        if w_on:
            grads.append(torch.einsum("btp,btd->bpd", G, A).mul_(scale))
        if b_on:
            grads.append(G.sum(1) * scale)
        call.tape.record(call.batch, Stored(params, grads))
        return
    if ghost:
        # ||sum_t G_t A_t^T||^2 = <A A^T, G G^T> (Goodfellow 2015; Li et al. 2021)
        if T == 1:
            sq = acc_sq(A) * acc_sq(G)
        else:
            sq = (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))
            sq = sq.to(acc_dtype(w))
    else:
        sq = torch.cat([acc_sq(torch.einsum("btp,btd->bpd", G[i : i + 1], A[i : i + 1])) for i in range(B)])
    sq = sq * (scale * scale)
    if b_on:
        sq = sq + acc_sq(G.sum(1) * scale)

    def clipped_sum(c: torch.Tensor) -> list[torch.Tensor]:
        Gc = G * coef(c, scale, G, 3)
        out = [Gc.reshape(-1, p_out).t().matmul(A.reshape(-1, d_in))]
        if b_on:
            out.append(Gc.sum((0, 1)))
        return out

    def materialize() -> list[torch.Tensor]:
        out = [torch.einsum("btp,btd->bpd", G, A) * scale]
        if b_on:
            out.append(G.sum(1) * scale)
        return out

    call.tape.record(call.batch, Deferred(params, sq, clipped_sum, materialize))


@register_rule(nn.Linear)
def linear_forward(module: nn.Linear, call: Call, x: torch.Tensor) -> torch.Tensor:
    """module(x) through _LinearFn. x: [B, ..., d_in] -> [B, ..., d_out]."""
    return _LinearFn.apply(x, module.weight, module.bias, call)
