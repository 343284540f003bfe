"""PReLU: per-sample gradients of its slopes ([B, 1] or [B, C]) are small, so always stored."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.rules.base import Call, trainable
from fastdp.engine.rules.registry import register_rule
from fastdp.engine.tape import Stored


class _PReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, call: Call):
        ctx.call = call
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        n = w.numel()
        wb = w.view((1, -1) + (1,) * (x.dim() - 2)) if (n > 1 and x.dim() >= 2) else w.reshape(())
        gx = torch.where(x > 0, g, g * wb) if ctx.needs_input_grad[0] else None
        B = x.shape[0]
        if trainable(w):
            scale = ctx.call.tape.loss_scale(B)
            prod = g * x.clamp(max=0)
            if n == 1:
                gw = prod.flatten(1).sum(1, keepdim=True) if prod.dim() > 1 else prod.unsqueeze(1)
            else:
                gw = prod.flatten(2).sum(2) if prod.dim() > 2 else prod
            ctx.call.tape.record(ctx.call.batch, Stored([w], [gw * scale]))
        return gx, None, None


@register_rule(nn.PReLU)
def prelu_forward(module: nn.PReLU, call: Call, x: torch.Tensor) -> torch.Tensor:
    """module(x) through _PReLUFn. x: [B, C, ...] (or [B] with one slope) -> same."""
    return _PReLUFn.apply(x, module.weight, call)
