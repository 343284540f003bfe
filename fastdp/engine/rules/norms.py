"""GroupNorm, InstanceNorm{1,2,3}d and LayerNorm: per-sample gradients of the affine weight and
bias are small ([B, C] or [B, *normalized_shape]), so they are always stored."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.rules.base import Call, aten, detach, trainable
from fastdp.engine.rules.registry import register_rule
from fastdp.engine.tape import Stored


class _GroupNormFn(torch.autograd.Function):
    """GroupNorm with the batch folded into the channels (N=1, C=B*C, G=B*G): the standard
    backward's weight/bias gradients are then the per-sample ones, at the ordinary cost.

    Returns the output [1, B*C, hw] (reshaped by the caller: a view made inside a Function could
    not be modified in place). stats: None, or a list that receives (mean, rstd) [1, B*G] for
    InstanceNorm's running statistics (not outputs: two non-differentiable outputs cost the
    Function ~40 us per call, fwd + bwd, on the 2-core CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, call: Call, stats: list | None = None):
        B, C = x.shape[0], x.shape[1]
        hw = x.numel() // (B * C) if B > 0 else 0
        xf = x.contiguous().view(1, B * C, hw)
        # the folded weight [B*C]: a copy (the kernel reads a contiguous one); expand + contiguous is
        # a little cheaper than repeat
        wr = weight.expand(B, C).contiguous().view(B * C) if weight is not None else None
        br = bias.expand(B, C).contiguous().view(B * C) if bias is not None else None
        out, mean, rstd = aten.native_group_norm(xf, wr, br, 1, B * C, hw, B * groups, eps)
        ctx.call, ctx.groups, ctx.shape = call, groups, x.shape
        ctx.save_for_backward(xf, wr, mean, rstd, weight, bias)
        if stats is not None:
            stats.extend((mean, rstd))
        return out

    @staticmethod
    def backward(ctx, g):
        xf, wr, mean, rstd, w, b = ctx.saved_tensors
        B, C = ctx.shape[0], ctx.shape[1]
        hw = xf.shape[2]
        w_on, b_on = trainable(w), trainable(b)
        gx, gw, gb = aten.native_group_norm_backward(
            g.contiguous().view(1, B * C, hw),
            xf,
            mean,
            rstd,
            wr,
            1,
            B * C,
            hw,
            B * ctx.groups,
            [ctx.needs_input_grad[0], w_on, b_on],
        )
        call: Call = ctx.call
        scale = call.tape.loss_scale(B)
        params, grads = [], []
        if w_on:
            params.append(w)
            grads.append(gw.view(B, C))
        if b_on:
            params.append(b)
            grads.append(gb.view(B, C))
        call.tape.record(call.batch, Stored(params, grads, scale))  # the DP step applies the scale
        return (gx.view(ctx.shape) if gx is not None else None), None, None, None, None, None, None


@register_rule(nn.GroupNorm)
def group_norm_forward(module: nn.GroupNorm, call: Call, x: torch.Tensor) -> torch.Tensor:
    """module(x) through _GroupNormFn (the batch folded into the groups). x: [B, C, ...] -> same."""
    if x.shape[0] == 0:
        out = F.group_norm(x, module.num_groups, detach(module.weight), detach(module.bias), module.eps)
        return _EmptyFn.apply(out, call, module.weight, module.bias)
    return _GroupNormFn.apply(x, module.weight, module.bias, module.num_groups, module.eps, call).view(x.shape)


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_forward(module: nn.modules.instancenorm._InstanceNorm, call: Call, x: torch.Tensor) -> torch.Tensor:
    """module(x): a GroupNorm with one channel per group (training, or no running statistics),
    else a per-channel affine map of the normalised input. x: [B, C, ...] -> same; updates the
    running statistics as torch does."""
    feature_dim = x.dim() - module._get_no_batch_dim()
    if feature_dim != 1 or x.dim() != module._get_no_batch_dim() + 1:
        raise ValueError(f"fastdp: {call.name}: InstanceNorm needs a batched input [B, C, ...], got {tuple(x.shape)}")
    use_running = module.track_running_stats and not module.training
    if use_running:
        xhat = F.instance_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
        return _ChannelAffineFn.apply(xhat, module.weight, module.bias, call)
    if x.shape[0] == 0:
        out = F.instance_norm(x, None, None, detach(module.weight), detach(module.bias), True, 0.0, module.eps)
        return _EmptyFn.apply(out, call, module.weight, module.bias)
    C = x.shape[1]
    stats: list[torch.Tensor] = []
    out = _GroupNormFn.apply(x, module.weight, module.bias, C, module.eps, call, stats)
    out, mean, rstd = out.view(x.shape), stats[0].view(x.shape[0], C), stats[1].view(x.shape[0], C)
    if module.track_running_stats and module.training:
        with torch.no_grad():
            n = x[0, 0].numel()
            mom = module.momentum if module.momentum is not None else 0.0
            var = (rstd.double().pow(-2) - module.eps).clamp(min=0) * (n / max(n - 1, 1))
            module.running_mean.mul_(1 - mom).add_(mom * mean.mean(0).to(module.running_mean.dtype))
            module.running_var.mul_(1 - mom).add_(mom * var.mean(0).to(module.running_var.dtype))
    return out


class _ChannelAffineFn(torch.autograd.Function):
    """out = xhat * w[c] + b[c] on [B, C, ...] (InstanceNorm with running statistics, eval mode)."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, call: Call):
        ctx.call = call
        ctx.save_for_backward(xhat, weight, bias)
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        out = xhat
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        return out

    @staticmethod
    def backward(ctx, g):
        xhat, w, b = ctx.saved_tensors
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        gx = g * w.view(shape) if w is not None else g
        B = xhat.shape[0]
        scale = ctx.call.tape.loss_scale(B)
        dims = list(range(2, g.dim()))
        params, grads = [], []
        if trainable(w):
            params.append(w)
            grads.append((g * xhat).sum(dims) * scale if dims else g * xhat * scale)
        if trainable(b):
            params.append(b)
            grads.append(g.sum(dims) * scale if dims else g * scale)
        ctx.call.tape.record(ctx.call.batch, Stored(params, grads))
        return gx, None, None, None


class _EmptyFn(torch.autograd.Function):
    """Pass-through for a batch of 0 samples: records empty per-sample gradients."""

    @staticmethod
    def forward(ctx, out, call: Call, *params):
        ctx.call = call
        ctx.params = params
        return out.clone()  # 0 samples: free

    @staticmethod
    def backward(ctx, g):
        ps = [p for p in ctx.params if trainable(p)]
        ctx.call.tape.record(ctx.call.batch, Stored(ps, [p.new_zeros((0, *p.shape)) for p in ps]))
        return (g, None) + (None,) * len(ctx.params)


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps: float, call: Call):
        out, mean, rstd = aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.call, ctx.ns = call, normalized_shape
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, b, mean, rstd = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = aten.native_layer_norm_backward(g, x, ctx.ns, mean, rstd, w, b, [True, False, False])[0]
        B = x.shape[0]
        scale = ctx.call.tape.loss_scale(B)
        mid = list(range(1, x.dim() - len(ctx.ns)))  # dims between batch and normalized ones
        params, grads = [], []
        if trainable(w):
            xhat = (x - mean) * rstd
            params.append(w)
            grads.append((g * xhat).sum(mid) * scale if mid else g * xhat * scale)
        if trainable(b):
            params.append(b)
            grads.append(g.sum(mid) * scale if mid else g * scale)
        ctx.call.tape.record(ctx.call.batch, Stored(params, grads))
        return gx, None, None, None, None, None


@register_rule(nn.LayerNorm)
def layer_norm_forward(module: nn.LayerNorm, call: Call, x: torch.Tensor) -> torch.Tensor:
    """module(x) through _LayerNormFn. x: [B, ..., *normalized_shape] -> same."""
    ns = list(module.normalized_shape)
    if x.dim() <= len(ns):
        raise ValueError(
            f"fastdp: {call.name}: LayerNorm over all dims of input {tuple(x.shape)} would normalise "
            "across the batch dimension"
        )
    return _LayerNormFn.apply(x, module.weight, module.bias, ns, module.eps, call)
