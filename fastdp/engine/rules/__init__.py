"""Per-layer rules: how each layer gives per-sample gradient norms and clipped gradient sums.

One file per layer family (conv, linear, embedding, norms, activations), each registering its
forward rules with `register_rule`; `generic` is the torch.func fallback for any other layer.
Importing this package imports every family, so the registry is complete.

How a rule works. A private model replaces the forward of every module with trainable
parameters by its rule, `forward(module, call, *args, **kwargs)`. The rule runs the layer
through a custom torch.autograd.Function that takes the layer's parameters as inputs (so the
backward runs even when the input needs no gradient) but returns None as their gradient:
autograd never forms the unclipped weight gradient. Its backward returns grad_input as usual
and records, once per call, the per-sample information of the module's trainable parameters:

- `Stored(params, grads, scale=1.0)`: per-sample gradients scale * grads[k], grads[k] of shape
  [B, *params[k].shape] (when they are small; a scale left to the DP step costs no pass);
- `Deferred(params, sq_norms, clipped_sum, materialize)`: sq_norms [B], the layer's part of
  the per-sample squared norms; clipped_sum(c [B]) -> [sum_i c_i g_i per param]; and
  materialize() -> the per-sample gradients, used only when a parameter is shared by calls.

`call` (a `Call`) gives: call.module, call.name (for error messages), call.tape and
call.batch. Gradients are of the per-sample losses: multiply by call.tape.loss_scale(B) (B for
loss_reduction="mean", whose grad_output is 1/B of a sample's), or pass it as Stored's scale,
then call.tape.record(call.batch, Stored(...)). Record only the parameters that require grad.

The contract: a rule covers the module's registered (leaf) parameters named in `params`
(default ("weight", "bias")). A module whose trainable parameters are anything else (weight
norm, spectral norm, a parametrization, an extra parameter) is refused when it is made private.

A rule for your own layer is one small file, e.g. out[b, c, ...] = x[b, c, ...] * weight[c]:

    import torch
    import fastdp
    from fastdp.engine.rules import Call, Stored

    class _ChannelScaleFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, call: Call):
            ctx.call = call
            ctx.save_for_backward(x, weight)
            return x * weight.view(1, -1, *[1] * (x.dim() - 2))

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            call = ctx.call
            if w.requires_grad:
                per_sample = (g * x).flatten(2).sum(2) * call.tape.loss_scale(x.shape[0])  # [B, C]
                call.tape.record(call.batch, Stored([w], [per_sample]))
            return g * w.view(1, -1, *[1] * (x.dim() - 2)), None, None

    @fastdp.register_rule(ChannelScale, params=("weight",))
    def channel_scale_forward(module: ChannelScale, call: Call, x: torch.Tensor) -> torch.Tensor:
        return _ChannelScaleFn.apply(x, module.weight, call)

Register before making the model private (rules are looked up then). unregister_rule removes
a rule. tests/engine/test_register_rule.py checks this example against a microbatch-of-one loop.
"""

# isort: off
# The families register on import, in this order (supported_names lists them so).
from fastdp.engine.rules import conv, linear, norms, activations, embedding  # noqa: F401

# isort: on
from fastdp.engine.rules.base import Call
from fastdp.engine.rules.conv_tuner import ConvTuner, default_conv_method
from fastdp.engine.rules.generic import GENERIC_RULE
from fastdp.engine.rules.registry import Rule, register_rule, rule_for, supported_names, unregister_rule
from fastdp.engine.tape import Deferred, Stored

__all__ = [
    "GENERIC_RULE",
    "Call",
    "ConvTuner",
    "Deferred",
    "Rule",
    "Stored",
    "default_conv_method",
    "register_rule",
    "rule_for",
    "supported_names",
    "unregister_rule",
]
