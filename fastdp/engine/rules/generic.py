"""The generic path: any other module with its own parameters, per-sample gradients by torch.func
(vmap of a batch-of-one vjp), refused when its forward draws random numbers or mixes samples.

It is not in the registry: the private model falls back to GENERIC_RULE for a module no
registered rule covers (when allow_generic and the module has no trainable submodules).
"""

from __future__ import annotations

import torch
from torch import nn

from fastdp.engine.errors import UnsupportedModuleError
from fastdp.engine.rules.base import Call
from fastdp.engine.rules.registry import Rule
from fastdp.engine.tape import Stored


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


def generic_forward(module: nn.Module, call: Call, *args, **kwargs) -> torch.Tensor:
    """module(x) through _GenericFn. x: [B, ...] float (the one positional argument) -> [B, ...]."""
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


# Every trainable parameter the module owns (not a fixed weight/bias pair): not checked by name.
GENERIC_RULE = Rule(nn.Module, generic_forward, params=())
