"""fix_batchnorm: replace BatchNorm layers (not DP-compatible) by GroupNorm (or InstanceNorm)."""

from __future__ import annotations

import math

from torch import nn

_INSTANCE_NORM = {
    nn.BatchNorm1d: nn.InstanceNorm1d,
    nn.BatchNorm2d: nn.InstanceNorm2d,
    nn.BatchNorm3d: nn.InstanceNorm3d,
}


def _groups_for(channels: int, max_groups: int) -> int:
    return math.gcd(channels, max_groups) or 1


def fix_batchnorm(
    model: nn.Module,
    max_groups: int = 32,
    *,
    num_groups: int | None = None,
    replace_bn_with_in: bool = False,
) -> nn.Module:
    """Replaces every BatchNorm{1,2,3}d / SyncBatchNorm in `model` (in place) by GroupNorm.

    GroupNorm(gcd(C, max_groups), C, eps, affine) as Opacus's ModuleValidator.fix does (Opacus's
    keywords: num_groups= a fixed group count, which must divide every C; replace_bn_with_in=True
    gives InstanceNorm{1,2,3}d(C, eps, affine) instead). A BatchNorm that is the model itself is
    returned replaced. Returns the model. Unlike Opacus, BatchNorms without trainable parameters
    are replaced too: they still mix the samples of a batch.
    """
    if num_groups is not None and replace_bn_with_in:
        raise ValueError(
            "num_groups and replace_bn_with_in=True are mutually exclusive: choose GroupNorm or InstanceNorm"
        )
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _replacement(model, max_groups, num_groups, replace_bn_with_in)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _replacement(child, max_groups, num_groups, replace_bn_with_in))
        else:
            fix_batchnorm(child, max_groups, num_groups=num_groups, replace_bn_with_in=replace_bn_with_in)
    return model


def _replacement(
    bn: nn.modules.batchnorm._BatchNorm, max_groups: int, num_groups: int | None, instance: bool
) -> nn.Module:
    C = bn.num_features
    if instance:
        cls = next((i for b, i in _INSTANCE_NORM.items() if isinstance(bn, b)), None)
        if cls is None:
            raise ValueError(
                f"{type(bn).__name__} has no InstanceNorm of its dimension: use GroupNorm (replace_bn_with_in=False)"
            )
        new: nn.Module = cls(C, eps=bn.eps, affine=bn.affine)
    else:
        groups = _groups_for(C, max_groups) if num_groups is None else num_groups
        if C % groups:
            raise ValueError(f"num_groups={groups} does not divide the {C} channels of a {type(bn).__name__}")
        new = nn.GroupNorm(groups, C, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        new.to(device=bn.weight.device, dtype=bn.weight.dtype)
    return new
