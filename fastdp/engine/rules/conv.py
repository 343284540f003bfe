"""Conv{1,2,3}d and ConvTranspose{1,2,3}d: per-sample weight gradients by the private model's
ConvTuner; stored when small, else norms now and the clipped sum as one c-scaled weight-gradient
convolution (the per-sample gradients are not kept)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.rules import base
from fastdp.engine.rules.base import Call, acc_sq, aten, coef, trainable
from fastdp.engine.rules.conv_tuner import ConvSpec, conv_backward
from fastdp.engine.rules.registry import register_rule
from fastdp.engine.tape import Deferred, Stored


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: ConvSpec, call: Call):
        ctx.spec, ctx.call = spec, call
        ctx.save_for_backward(x, weight, bias)
        s = spec
        return aten.convolution(
            x, weight, bias, s.stride, s.padding, s.dilation, s.transposed, s.output_padding, s.groups
        )

    @staticmethod
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        s: ConvSpec = ctx.spec
        gx = conv_backward(g, x, w, s, [True, False, False])[0] if ctx.needs_input_grad[0] else None
        _record_conv(ctx.call, s, x, g, w, b)
        return gx, None, None, None, None


def _record_conv(call: Call, s: ConvSpec, x, g, w, b) -> None:
    B = x.shape[0]
    scale = call.tape.loss_scale(B)
    tuner = call.conv_tuner
    w_on, b_on = trainable(w), trainable(b)
    params = ([w] if w_on else []) + ([b] if b_on else [])
    sum_dims = list(range(2, g.dim()))
    store = B * w.numel() <= base.STORE_RATIO * (x.numel() + g.numel()) or not w_on
    if store:
        grads = []
        if w_on:
            grads.append(tuner.per_sample_weight(g, x, w, s, 0, B))
        if b_on:
            grads.append(g.sum(dim=sum_dims) if sum_dims else g.clone())
        call.tape.record(call.batch, Stored(params, grads, scale))  # the DP step applies the scale
        return
    # Large weight, low resolution: per-sample norms without keeping per-sample gradients (formed
    # chunk by chunk, or the ghost norm where that is faster), clipped sum as one weight-gradient
    # conv on c-scaled output gradients.
    chunk = max(1, int(base.STORE_RATIO * (x.numel() + g.numel()) // max(1, w.numel())))
    sq = tuner.per_sample_sq_norms(g, x, w, s, 0, B, chunk=chunk) * (scale * scale)
    if b_on:
        sq += acc_sq(g.sum(dim=sum_dims) * scale)

    def clipped_sum(c: torch.Tensor) -> list[torch.Tensor]:
        gc = g * coef(c, scale, g, g.dim())
        bias_sizes = [w.shape[1] * s.groups if s.transposed else w.shape[0]]
        _, gw, gb = conv_backward(gc, x, w, s, [False, True, b_on], bias_sizes)
        return [gw] + ([gb] if b_on else [])

    def materialize() -> list[torch.Tensor]:
        out = [tuner.per_sample_weight(g, x, w, s, 0, B).mul_(scale)]
        if b_on:
            out.append(g.sum(dim=sum_dims) * scale)
        return out

    call.tape.record(call.batch, Deferred(params, sq, clipped_sum, materialize))


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_forward(module: nn.modules.conv._ConvNd, call: Call, x: torch.Tensor, output_size=None) -> torch.Tensor:
    """module(x) through _ConvFn (same result as module.forward). x: [B, C_in, *S] -> [B, C_out, *T].

    Padding modes other than zeros (and string padding) pad x first, so the convolution that is
    differentiated per sample is always zero-padded."""
    nd = len(module.kernel_size)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    if transposed:
        if module.padding_mode != "zeros":
            raise ValueError(f"fastdp: {call.name}: ConvTranspose only supports padding_mode='zeros'")
        out_pad = module._output_padding(
            x,
            output_size,
            list(module.stride),
            list(module.padding),
            list(module.kernel_size),
            nd,
            list(module.dilation),
        )
        padding = list(module.padding)
    else:
        out_pad = [0] * nd
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            if module.padding == "valid":
                pad_amounts = None
            else:
                pad_amounts = module._reversed_padding_repeated_twice
            if pad_amounts is not None and any(pad_amounts):
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x = F.pad(x, pad_amounts, mode=mode)
            padding = [0] * nd
        else:
            padding = list(module.padding)
    spec = ConvSpec(list(module.stride), padding, list(module.dilation), transposed, list(out_pad), module.groups)
    return _ConvFn.apply(x, module.weight, module.bias, spec, call)
