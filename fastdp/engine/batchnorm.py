"""fix_batchnorm: replace BatchNorm layers (not DP-compatible) by GroupNorm."""

from __future__ import annotations

import math

from torch import nn


def _groups_for(channels: int, max_groups: int) -> int:
    return math.gcd(channels, max_groups) or 1


def fix_batchnorm(model: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replaces every BatchNorm{1,2,3}d / SyncBatchNorm in `model` (in place) by GroupNorm.

    GroupNorm(gcd(C, max_groups), C, eps, affine) as Opacus's ModuleValidator.fix does; a
    BatchNorm that is the model itself is returned replaced. Returns the model.
    """
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _replacement(model, max_groups)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _replacement(child, max_groups))
        else:
            fix_batchnorm(child, max_groups)
    return model


def _replacement(bn: nn.modules.batchnorm._BatchNorm, max_groups: int) -> nn.GroupNorm:
    gn = nn.GroupNorm(_groups_for(bn.num_features, max_groups), bn.num_features, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        gn.to(device=bn.weight.device, dtype=bn.weight.dtype)
    return gn
