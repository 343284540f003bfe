"""Per-layer rules: how each supported layer gives per-sample norms and clipped gradient sums.

Every supported layer runs its forward through a custom autograd Function that takes the
layer's parameters as inputs (so the graph reaches it even when the input needs no gradient)
but returns no gradient for them: autograd never computes the unclipped weight gradient.
Its backward computes grad_input as usual and records, for the layer's trainable parameters,
either the per-sample gradients (`Stored`, when they are small) or what is needed to get the
per-sample norms and, after clipping, the clipped sum (`Deferred`).

Per-sample gradients are of the per-sample losses: with loss_reduction="mean" autograd's
grad_output of sample i is (1/B) dL_i/dout_i, so results are multiplied by B (the batch size
of this forward), as Opacus does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.errors import UnsupportedModuleError
from fastdp.engine.tape import Batch, Deferred, Stored, Tape

aten = torch.ops.aten

# Keep per-sample gradients when they are at most this many times the elements of the layer's
# input + output gradient (which autograd holds anyway); otherwise recompute the clipped sum.
STORE_RATIO = 4.0


@dataclass
class Call:
    """One recorded call of a layer: who it is and which batch it belongs to."""

    module: nn.Module
    name: str
    tape: Tape
    batch: Batch


def _trainable(p: torch.Tensor | None) -> bool:
    return p is not None and p.requires_grad


def _acc_sq(t: torch.Tensor) -> torch.Tensor:
    """[B] squared norms of t [B, ...] accumulated in at least fp32."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    flat = t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)
    return flat.to(acc).pow(2).sum(1)


def _detach(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach()


def _coef(c: torch.Tensor, scale: float, like: torch.Tensor, ndim: int) -> torch.Tensor:
    return (c * scale).to(like.dtype).view(-1, *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------- conv


@dataclass
class ConvSpec:
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    transposed: bool
    output_padding: list[int]
    groups: int


def _conv_weight_grad(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, s: ConvSpec) -> torch.Tensor:
    return aten.convolution_backward(
        g,
        x,
        w,
        None,
        s.stride,
        s.padding,
        s.dilation,
        s.transposed,
        s.output_padding,
        s.groups,
        [False, True, False],
    )[1]


def _ps_loop(g, x, w, s: ConvSpec) -> torch.Tensor:
    """A loop of batch-1 weight-gradient convolutions (no im2col buffer)."""
    out = torch.empty((x.shape[0], *w.shape), dtype=w.dtype, device=w.device)
    for i in range(x.shape[0]):
        out[i] = _conv_weight_grad(g[i : i + 1], x[i : i + 1], w, s)
    return out


def _ps_grouped(g, x, w, s: ConvSpec) -> torch.Tensor:
    """One grouped weight-gradient convolution with the batch folded into the groups."""
    n = x.shape[0]
    xg = x.reshape(1, n * x.shape[1], *x.shape[2:])
    gg = g.reshape(1, n * g.shape[1], *g.shape[2:])
    wg = w.repeat(n, *([1] * (w.dim() - 1)))
    folded = ConvSpec(s.stride, s.padding, s.dilation, s.transposed, s.output_padding, s.groups * n)
    return _conv_weight_grad(gg, xg, wg, folded).view(n, *w.shape)


def _ps_unfold(g, x, w, s: ConvSpec) -> torch.Tensor:
    """im2col + batched matmul (2-d, not transposed; cheap when C_in * k * k is small)."""
    n, G = x.shape[0], s.groups
    cols = F.unfold(x, w.shape[2:], s.dilation, s.padding, s.stride)  # [n, C_in*k*k, T]
    cols = cols.view(n, G, -1, cols.shape[-1])
    gg = g.reshape(n, G, w.shape[0] // G, -1)
    return torch.einsum("bgot,bgit->bgoi", gg, cols).reshape(n, *w.shape)


_PS_METHODS = {"loop": _ps_loop, "grouped": _ps_grouped, "unfold": _ps_unfold}
# None: time the candidates on the first TUNE_CALLS calls of each layer shape (min per method)
# and keep the fastest; or force one of _PS_METHODS (tests, experiments). The environment
# variable FASTDP_CONV_METHOD sets it for a whole process: timed choices can differ between
# processes, and the methods agree only to float rounding (federated runs compared across
# processes need one fixed method).
CONV_METHOD: str | None = os.environ.get("FASTDP_CONV_METHOD") or None
if CONV_METHOD is not None and CONV_METHOD not in _PS_METHODS:
    raise ValueError(f"FASTDP_CONV_METHOD={CONV_METHOD!r}: expected one of {sorted(_PS_METHODS)}")
TUNE_CALLS = 2
_conv_choice: dict[tuple, str] = {}
_conv_trials: dict[tuple, dict[str, float]] = {}


def _ps_candidates(x, w, s: ConvSpec) -> list[str]:
    cands = ["loop", "grouped"]
    if not s.transposed and x.dim() == 4 and x.is_floating_point():
        kk = w.shape[1] * w.shape[2] * w.shape[3]  # C_in/groups * k * k
        one_by_one = w.shape[2] * w.shape[3] == 1  # im2col is the input itself
        if one_by_one or kk <= 2 * w.shape[0] // s.groups:  # im2col at most twice the output gradient
            cands.append("unfold")
    return cands


def _batch_bucket(batch: int) -> int:
    """Batch sizes share a tuning result up to the next power of two: Poisson sampling gives a
    different batch size nearly every step, and timing every candidate for each new size made
    a 64x64 U-Net's DP step 1.5x non-private instead of 1.1x (measured on the 2-core CPU)."""
    return 1 << max(0, int(batch) - 1).bit_length()


def _timed(name, g, x, w, s):
    sync = x.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    out = _PS_METHODS[name](g, x, w, s)
    if sync:
        torch.cuda.synchronize(x.device)
    return out, time.perf_counter() - t0


def _per_sample_conv_weight(g, x, w, s: ConvSpec, lo: int, hi: int) -> torch.Tensor:
    """[hi-lo, *w.shape] per-sample weight gradients of samples lo..hi-1.

    The fastest method depends on the layer and machine (measured on a 2-core CPU: a batch-1
    loop at high resolution, the batch folded into groups elsewhere), so each layer shape is
    timed on its first calls and the fastest method kept.
    """
    g, x = g[lo:hi], x[lo:hi]
    if CONV_METHOD is not None:
        return _PS_METHODS[CONV_METHOD](g, x, w, s)
    if x.shape[0] <= 1:
        return _ps_loop(g, x, w, s)
    key = (
        _batch_bucket(x.shape[0]),
        tuple(x.shape[1:]),
        tuple(w.shape),
        tuple(s.stride),
        tuple(s.padding),
        tuple(s.dilation),
        s.transposed,
        s.groups,
        x.dtype,
        x.device.type,
    )
    choice = _conv_choice.get(key)
    if choice is not None:
        return _PS_METHODS[choice](g, x, w, s)
    trials = _conv_trials.setdefault(key, {"_calls": 0})
    result = None
    for name in _ps_candidates(x, w, s):
        out, dt = _timed(name, g, x, w, s)
        trials[name] = min(trials.get(name, float("inf")), dt)
        result = out if result is None else result
    trials["_calls"] += 1
    if trials["_calls"] >= TUNE_CALLS:
        _conv_choice[key] = min((k for k in trials if k != "_calls"), key=trials.__getitem__)
        del _conv_trials[key]
    return result


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec: ConvSpec, call: Call):
        ctx.spec, ctx.call = spec, call
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias)
        return aten.convolution(
            x,
            weight,
            bias,
            spec.stride,
            spec.padding,
            spec.dilation,
            spec.transposed,
            spec.output_padding,
            spec.groups,
        )

    @staticmethod
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        s: ConvSpec = ctx.spec
        gx = None
        if ctx.needs_input_grad[0]:
            gx = aten.convolution_backward(
                g,
                x,
                w,
                None,
                s.stride,
                s.padding,
                s.dilation,
                s.transposed,
                s.output_padding,
                s.groups,
                [True, False, False],
            )[0]
        _record_conv(ctx.call, s, x, g, w, b)
        return gx, None, None, None, None


def _record_conv(call: Call, s: ConvSpec, x, g, w, b) -> None:
    B = x.shape[0]
    scale = call.tape.loss_scale(B)
    w_on, b_on = _trainable(w), _trainable(b)
    params = ([w] if w_on else []) + ([b] if b_on else [])
    sum_dims = list(range(2, g.dim()))
    store = B * w.numel() <= STORE_RATIO * (x.numel() + g.numel()) or not w_on
    if store:
        grads = []
        if w_on:
            grads.append(_per_sample_conv_weight(g, x, w, s, 0, B).mul_(scale))
        if b_on:
            grads.append(g.sum(dim=sum_dims).mul_(scale) if sum_dims else g * scale)
        call.tape.record(call.batch, Stored(params, grads))
        return
    # Large weight, low resolution: per-sample norms without keeping per-sample gradients,
    # clipped sum as one weight-gradient conv on c-scaled output gradients.
    sq = torch.zeros(B, dtype=torch.float64 if w.dtype == torch.float64 else torch.float32, device=w.device)
    chunk = max(1, int(STORE_RATIO * (x.numel() + g.numel()) // max(1, w.numel())))
    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        sq[lo:hi] += _acc_sq(_per_sample_conv_weight(g, x, w, s, lo, hi))
    sq *= scale * scale
    if b_on:
        sq += _acc_sq(g.sum(dim=sum_dims) * scale)

    def clipped_sum(c: torch.Tensor) -> list[torch.Tensor]:
        gc = g * _coef(c, scale, g, g.dim())
        _, gw, gb = aten.convolution_backward(
            gc,
            x,
            w,
            [w.shape[1] * s.groups if s.transposed else w.shape[0]],
            s.stride,
            s.padding,
            s.dilation,
            s.transposed,
            s.output_padding,
            s.groups,
            [False, True, b_on],
        )
        return [gw] + ([gb] if b_on else [])

    def materialize() -> list[torch.Tensor]:
        out = [_per_sample_conv_weight(g, x, w, s, 0, B).mul_(scale)]
        if b_on:
            out.append(g.sum(dim=sum_dims) * scale)
        return out

    call.tape.record(call.batch, Deferred(params, sq, clipped_sum, materialize))


def conv_forward(module: nn.modules.conv._ConvNd, call: Call, x: torch.Tensor, output_size=None):
    """Forward of Conv{1,2,3}d / ConvTranspose{1,2,3}d through _ConvFn (same result as module.forward)."""
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


# --------------------------------------------------------------------------------------- linear


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
    w_on, b_on = _trainable(w), _trainable(b)
    params = ([w] if w_on else []) + ([b] if b_on else [])
    p_out, d_in = w.shape
    A = x.flatten(1, -2) if x.dim() > 2 else x.unsqueeze(1)  # [B, T, d]
    G = g.flatten(1, -2) if g.dim() > 2 else g.unsqueeze(1)  # [B, T, p]
    T = A.shape[1]
    ghost = 2 * T * T < p_out * d_in
    big = B * w.numel() > STORE_RATIO * (x.numel() + g.numel())
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
            sq = _acc_sq(A) * _acc_sq(G)
        else:
            sq = (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))
            sq = sq.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    else:
        sq = torch.cat([_acc_sq(torch.einsum("btp,btd->bpd", G[i : i + 1], A[i : i + 1])) for i in range(B)])
    sq = sq * (scale * scale)
    if b_on:
        sq = sq + _acc_sq(G.sum(1) * scale)

    def clipped_sum(c: torch.Tensor) -> list[torch.Tensor]:
        Gc = G * _coef(c, scale, G, 3)
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


def linear_forward(module: nn.Linear, call: Call, x: torch.Tensor):
    return _LinearFn.apply(x, module.weight, module.bias, call)


# ---------------------------------------------------------------------- group / instance norm


class _GroupNormFn(torch.autograd.Function):
    """GroupNorm with the batch folded into the channels (N=1, C=B*C, G=B*G): the standard
    backward's weight/bias gradients are then the per-sample ones, at the ordinary cost."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, call: Call):
        B, C = x.shape[0], x.shape[1]
        hw = x[0, 0].numel() if B > 0 else 0
        xf = x.contiguous().view(1, B * C, hw)
        wr = weight.repeat(B) if weight is not None else None
        br = bias.repeat(B) if bias is not None else None
        out, mean, rstd = aten.native_group_norm(xf, wr, br, 1, B * C, hw, B * groups, eps)
        ctx.call, ctx.groups, ctx.shape = call, groups, x.shape
        ctx.save_for_backward(xf, wr, mean, rstd, weight, bias)
        ctx.mark_non_differentiable(mean, rstd)
        # Reshaped by the caller: a view made inside a Function could not be modified in place.
        return out, mean, rstd

    @staticmethod
    def backward(ctx, g, _gm=None, _gr=None):
        xf, wr, mean, rstd, w, b = ctx.saved_tensors
        B, C = ctx.shape[0], ctx.shape[1]
        hw = xf.shape[2]
        w_on, b_on = _trainable(w), _trainable(b)
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
            grads.append(gw.view(B, C).mul_(scale))
        if b_on:
            params.append(b)
            grads.append(gb.view(B, C).mul_(scale))
        call.tape.record(call.batch, Stored(params, grads))
        return (gx.view(ctx.shape) if gx is not None else None), None, None, None, None, None


def group_norm_forward(module: nn.GroupNorm, call: Call, x: torch.Tensor):
    if x.shape[0] == 0:
        out = F.group_norm(x, module.num_groups, _detach(module.weight), _detach(module.bias), module.eps)
        return _EmptyFn.apply(out, call, module.weight, module.bias)
    return _GroupNormFn.apply(x, module.weight, module.bias, module.num_groups, module.eps, call)[0].view(x.shape)


def instance_norm_forward(module: nn.modules.instancenorm._InstanceNorm, call: Call, x: torch.Tensor):
    feature_dim = x.dim() - module._get_no_batch_dim()
    if feature_dim != 1 or x.dim() != module._get_no_batch_dim() + 1:
        raise ValueError(f"fastdp: {call.name}: InstanceNorm needs a batched input [B, C, ...], got {tuple(x.shape)}")
    use_running = module.track_running_stats and not module.training
    if use_running:
        xhat = F.instance_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
        return _ChannelAffineFn.apply(xhat, module.weight, module.bias, call)
    if x.shape[0] == 0:
        out = F.instance_norm(x, None, None, _detach(module.weight), _detach(module.bias), True, 0.0, module.eps)
        return _EmptyFn.apply(out, call, module.weight, module.bias)
    C = x.shape[1]
    out, mean, rstd = _GroupNormFn.apply(x, module.weight, module.bias, C, module.eps, call)
    out, mean, rstd = out.view(x.shape), mean.view(x.shape[0], C), rstd.view(x.shape[0], C)
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
        if _trainable(w):
            params.append(w)
            grads.append((g * xhat).sum(dims) * scale if dims else g * xhat * scale)
        if _trainable(b):
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
        ps = [p for p in ctx.params if _trainable(p)]
        ctx.call.tape.record(ctx.call.batch, Stored(ps, [p.new_zeros((0, *p.shape)) for p in ps]))
        return (g, None) + (None,) * len(ctx.params)


# ------------------------------------------------------------------------------------ layernorm


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
        if _trainable(w):
            xhat = (x - mean) * rstd
            params.append(w)
            grads.append((g * xhat).sum(mid) * scale if mid else g * xhat * scale)
        if _trainable(b):
            params.append(b)
            grads.append(g.sum(mid) * scale if mid else g * scale)
        ctx.call.tape.record(ctx.call.batch, Stored(params, grads))
        return gx, None, None, None, None, None


def layer_norm_forward(module: nn.LayerNorm, call: Call, x: torch.Tensor):
    ns = list(module.normalized_shape)
    if x.dim() <= len(ns):
        raise ValueError(
            f"fastdp: {call.name}: LayerNorm over all dims of input {tuple(x.shape)} would normalise "
            "across the batch dimension"
        )
    return _LayerNormFn.apply(x, module.weight, module.bias, ns, module.eps, call)


# ---------------------------------------------------------------------------------------- prelu


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
        if _trainable(w):
            scale = ctx.call.tape.loss_scale(B)
            prod = g * x.clamp(max=0)
            if n == 1:
                gw = prod.flatten(1).sum(1, keepdim=True) if prod.dim() > 1 else prod.unsqueeze(1)
            else:
                gw = prod.flatten(2).sum(2) if prod.dim() > 2 else prod
            ctx.call.tape.record(ctx.call.batch, Stored([w], [gw * scale]))
        return gx, None, None


def prelu_forward(module: nn.PReLU, call: Call, x: torch.Tensor):
    return _PReLUFn.apply(x, module.weight, call)


# ------------------------------------------------------------------------------------ embedding


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
        sq = sq.to(torch.float64 if w.dtype == torch.float64 else torch.float32) * (scale * scale)

        def clipped_sum(c: torch.Tensor) -> list[torch.Tensor]:
            Gc = G * _coef(c, scale, G, 3)
            return [torch.zeros_like(w).index_add_(0, ids.reshape(-1), Gc.reshape(-1, D))]

        def materialize() -> list[torch.Tensor]:
            out = torch.zeros((B, V, D), dtype=w.dtype, device=w.device)
            out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, D), G * scale)
            return [out]

        ctx.call.tape.record(ctx.call.batch, Deferred([w], sq, clipped_sum, materialize))
        return None, None, None, None


def embedding_forward(module: nn.Embedding, call: Call, idx: torch.Tensor):
    if module.scale_grad_by_freq:
        raise ValueError(f"fastdp: {call.name}: Embedding(scale_grad_by_freq=True) mixes samples; not supported")
    if idx.dim() < 1:
        raise ValueError(f"fastdp: {call.name}: Embedding needs batched indices [B, ...]")
    return _EmbeddingFn.apply(idx, module.weight, module, call)


# -------------------------------------------------------------------------------------- generic


def _output_tolerance(out: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol) for per-sample vs batched outputs of the same computation, which differ by
    rounding only (other kernels, other summation order): relative to max|out|."""
    if out.dtype in (torch.float16, torch.bfloat16):
        return (1e-2 if out.dtype == torch.float16 else 4e-2), 1e-3
    if out.dtype == torch.float32 and out.device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
        if tf32 or torch.get_float32_matmul_precision() != "highest":
            return 1e-2, 1e-5  # TF32 / bf16-pass matmuls: ~10 mantissa bits
    return 1e-4, 1e-6


class _GenericFn(torch.autograd.Function):
    """Any other module with its own parameters: per-sample gradients by torch.func (vmap of a
    batch-of-one vjp). Recomputes the module's forward in backward, per sample.

    That recomputation is only the batched forward if the module treats samples independently
    and draws no random numbers, so the backward checks both: randomness makes vmap fail
    (randomness="error"), and the recomputed per-sample outputs must equal the batched output
    (kept from the forward, a copy of the layer's output) to rounding. Otherwise the module is
    refused (UnsupportedModuleError, raised from loss.backward(); the tape is cleared)."""

    @staticmethod
    def forward(ctx, x, call: Call, names, run, *params):
        ctx.call, ctx.names, ctx.run = call, names, run
        ctx.save_for_backward(x, *params)
        out = run(dict(zip(names, params, strict=True)), x)
        ctx.out = out.detach().clone()  # a copy: later in-place ops on `out` must not change it
        return out

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        names, run = ctx.names, ctx.run
        call: Call = ctx.call
        pdict = {n: p.detach() for n, p in zip(names, params, strict=True)}
        batched = ctx.out

        def one(xi, gi):
            def f(pd, xx):
                return run(pd, xx.unsqueeze(0)).squeeze(0)

            out_i, vjp_fn = torch.func.vjp(f, pdict, xi)
            return out_i, vjp_fn(gi)

        kind = type(call.module).__name__
        try:
            with torch.enable_grad():
                per_sample_out, (gp, gx) = torch.func.vmap(one, randomness="error")(x.detach(), g)
        except Exception as e:
            if not isinstance(e, RuntimeError) or isinstance(e, torch.cuda.OutOfMemoryError):
                call.tape.abort(f"the backward of module '{call.name}' ({kind}) raised {type(e).__name__}: {e}.")
                raise
            if "random operation" in str(e) or "randomness error mode" in str(e):
                msg = (
                    f"fastdp: module '{call.name}' ({kind}) draws random numbers in its forward (dropout, "
                    "torch.rand, ...); the generic per-sample path recomputes the forward per sample and cannot "
                    "reproduce the batched forward's random draws, so its per-sample gradients would not be those "
                    "of the loss that was computed. Move the randomness out of the module with parameters (e.g. "
                    "an nn.Dropout submodule of the parent, applied to its output) or freeze its parameters "
                    "(requires_grad_(False))."
                )
            else:
                msg = (
                    f"fastdp: module '{call.name}' ({kind}) goes through the generic torch.func per-sample path "
                    f"(vmap of a batch-of-one vjp), which failed for it: {e} Make its forward work on a batch "
                    "of one sample under torch.func.vmap, or freeze its parameters (requires_grad_(False))."
                )
            call.tape.abort(msg)
            raise UnsupportedModuleError(msg) from e
        _check_same_outputs(call, kind, per_sample_out, batched)
        B = x.shape[0]
        scale = call.tape.loss_scale(B)
        call.tape.record(call.batch, Stored(list(params), [gp[n] * scale for n in names]))
        gx = gx if ctx.needs_input_grad[0] else None
        return (gx, None, None, None) + (None,) * len(params)


def _check_same_outputs(call: Call, kind: str, per_sample: torch.Tensor, batched: torch.Tensor) -> None:
    """Refuses a module whose per-sample recomputation is not its batched forward (it mixes samples)."""
    if per_sample.shape != batched.shape:
        bad = f"its per-sample outputs have shape {tuple(per_sample.shape)}, its batched output {tuple(batched.shape)}"
    elif batched.numel() == 0:
        return
    else:
        acc = torch.float64 if batched.dtype == torch.float64 else torch.float32
        ps, bt = per_sample.to(acc), batched.to(acc)
        finite = torch.isfinite(bt)
        # A NaN/inf sample (NaN loss) is the optimizer's to refuse; here only where it appears matters.
        same_nonfinite = torch.equal(finite, torch.isfinite(ps))
        ps, bt = ps[finite], bt[finite]
        diff = float((ps - bt).abs().max()) if bt.numel() else 0.0
        rtol, atol = _output_tolerance(batched)
        bound = rtol * (float(bt.abs().max()) if bt.numel() else 0.0) + atol
        if same_nonfinite and diff <= bound:
            return
        bad = f"its per-sample outputs differ from its batched outputs (max abs difference {diff:.3g} > {bound:.3g})"
        if not same_nonfinite:
            bad = "its per-sample outputs are NaN/inf where its batched outputs are not, or the reverse"
    msg = (
        f"fastdp: module '{call.name}' ({kind}) goes through the generic torch.func per-sample path, but {bad}: "
        "it mixes the samples of a batch (like BatchNorm: a mean or other statistic over dim 0), so "
        "per-sample gradients (and DP) are not defined for it, nor for the layers before it. Make its "
        "forward treat each sample independently (freezing its parameters does not help: it would still "
        "mix the samples' gradients)."
    )
    call.tape.abort(msg)
    raise UnsupportedModuleError(msg)


def generic_forward(module: nn.Module, call: Call, orig_forward, *args, **kwargs):
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
        raise ValueError(
            f"fastdp: module '{call.name}' ({type(module).__name__}) has its own trainable parameters and "
            "goes through the generic torch.func per-sample path, which needs forward(x) with one "
            "batch-first tensor argument. Wrap it so, or freeze its parameters."
        )
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    params = [getattr(module, n) for n in names]
    x = args[0]
    if not x.is_floating_point():
        raise ValueError(f"fastdp: module '{call.name}': generic per-sample path needs a float input")

    def run(pdict, xx):
        with _bypass(module):
            return torch.func.functional_call(module, pdict, (xx,), strict=False)

    return _GenericFn.apply(x, call, names, run, *params)


class _bypass:
    """Within: the module's patched forward calls the original (used by the generic path)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self):
        self.module._fastdp_bypass = True

    def __exit__(self, *exc):
        self.module._fastdp_bypass = False


# ----------------------------------------------------------------------------------- dispatcher

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def rule_for(module: nn.Module):
    """The forward rule for a module with trainable parameters, or None for the generic path.

    Fast rules apply to the torch classes and to subclasses that keep the class's forward.
    """
    for base, fn in (
        (_CONV, conv_forward),
        ((nn.Linear,), linear_forward),
        ((nn.GroupNorm,), group_norm_forward),
        (_INSTANCE, instance_norm_forward),
        ((nn.LayerNorm,), layer_norm_forward),
        ((nn.PReLU,), prelu_forward),
        ((nn.Embedding,), embedding_forward),
    ):
        for cls in base:
            if isinstance(module, cls) and type(module).forward is cls.forward:
                return fn
    return None


def supported_names() -> list[str]:
    return [c.__name__ for c in (*_CONV, nn.Linear, nn.GroupNorm, *_INSTANCE, nn.LayerNorm, nn.PReLU, nn.Embedding)]
