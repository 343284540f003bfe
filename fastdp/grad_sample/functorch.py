"""Opacus's `opacus.grad_sample.functorch.make_functional`, on torch.func.functional_call.

For computing per-sample gradients yourself (grad_sample_mode="no_op"), as Opacus's cifar10
example does:

    fmodel, _ = make_functional(model)
    def loss_of_one(params, x, y):
        return criterion(fmodel(params, x.unsqueeze(0)), y.unsqueeze(0))
    grads = torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, 0, 0))(params, xs, ys)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastdp.engine.grad_sample import PrivateModule

__all__ = ["make_functional"]


def make_functional(
    mod: nn.Module, disable_autograd_tracking: bool = False
) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """(fmodel, params): fmodel(params, *args, **kwargs) runs `mod` with `params` in place of its
    parameters (in mod.parameters() order); params are mod's current parameters (detached with
    disable_autograd_tracking=True). Buffers are the module's own.

    A private model runs as its plain model (mod._module): a functional call records nothing for
    fastdp's own per-sample gradients."""
    target, prefix = (mod._module, "_module.") if isinstance(mod, PrivateModule) else (mod, "")
    names = [n.removeprefix(prefix) for n, _ in mod.named_parameters()]
    params = tuple(p.detach() if disable_autograd_tracking else p for _, p in mod.named_parameters())

    def fmodel(new_params, *args, **kwargs):
        if len(new_params) != len(names):
            raise ValueError(f"make_functional: got {len(new_params)} parameters, the module has {len(names)}")
        return torch.func.functional_call(target, dict(zip(names, new_params, strict=True)), args, kwargs)

    return fmodel, params
