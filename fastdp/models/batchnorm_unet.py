"""A paper-like BatchNorm U-Net (bias-free convolutions + BatchNorm) and its GroupNorm conversion.

Ziller et al. attacked BatchNorm U-Nets through inversefed, which calls ``model.eval()``: an
eval-mode BatchNorm is a fixed per-channel affine map ``(x - running_mean) / sqrt(running_var +
eps) * weight + bias``, so that network is not blind to the input's intensity scale, while a
GroupNorm U-Net (the DP-compatible one) normalises any scale away. These helpers let the attack
experiment separate the two effects (BN -> GN swap vs DP noise) on the same architecture:

* :func:`bn_unet_small` — :class:`fastdp.models.UNet` (3 levels, 16 base channels) with every
  GroupNorm replaced by ``BatchNorm2d``;
* :func:`calibrate_batchnorm` — sets the running statistics from public images (what a trained
  model's BN layers hold), weights untouched;
* :func:`freeze_batchnorm` — replaces every BatchNorm by :class:`FrozenBatchNorm2d`, the eval-mode
  map as a module of its own: the same function in train and eval mode, per-sample (so a DP engine
  can clip it with its generic per-sample rule) and with trainable weight and bias;
* :func:`to_groupnorm` — the GroupNorm conversion of the same weights (affine parameters copied).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastdp.models.unet import UNet, _groups


class FrozenBatchNorm2d(nn.Module):
    """Eval-mode BatchNorm as a fixed per-channel affine map with trainable weight and bias.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` over [B, C, H, W];
    the running statistics are buffers and never update.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        c = bn.num_features
        self.eps = float(bn.eps)
        self.weight = nn.Parameter(bn.weight.detach().clone() if bn.affine else torch.ones(c))
        self.bias = nn.Parameter(bn.bias.detach().clone() if bn.affine else torch.zeros(c))
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def _replace(module: nn.Module, kind: type, make) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, make(child))
        else:
            _replace(child, kind, make)
    return module


def bn_unet_small(in_channels: int = 1, out_channels: int = 2, **kwargs) -> UNet:
    """``unet_small``'s architecture with BatchNorm2d after every (bias-free) 3x3 convolution.

    Not DP-trainable as is (BatchNorm mixes samples): attack it after :func:`freeze_batchnorm`
    (the paper's eval-mode setting) or convert it with :func:`to_groupnorm`.
    Shapes: [B, in_channels, H, W] -> logits [B, out_channels, H, W], H and W divisible by 8.
    """
    kwargs = {"base_channels": 16, "depth": 3, **kwargs}
    net = UNet(in_channels, out_channels, **kwargs)
    return _replace(net, nn.GroupNorm, lambda gn: nn.BatchNorm2d(gn.num_channels))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> nn.Module:
    """Sets every BatchNorm's running mean and variance to its statistics on ``images`` [N, C, H, W].

    A cumulative average over batches (momentum None); parameters are not changed. Returns the
    model in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, images.shape[0], batch_size):
        model(images[i : i + batch_size].float())
    return model.eval()


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d replaced by its eval-mode :class:`FrozenBatchNorm2d`."""
    return _replace(copy.deepcopy(model), nn.BatchNorm2d, FrozenBatchNorm2d)


def to_groupnorm(model: nn.Module, max_groups: int = 8) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d / FrozenBatchNorm2d replaced by GroupNorm.

    Groups as in :class:`fastdp.models.UNet` (at most ``max_groups``); the affine weight and
    bias are copied, the running statistics dropped (GroupNorm normalises each sample itself).
    """

    def make(bn):
        c = bn.weight.shape[0]
        gn = nn.GroupNorm(_groups(c, max_groups), c)
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        return gn

    out = _replace(copy.deepcopy(model), nn.BatchNorm2d, make)
    return _replace(out, FrozenBatchNorm2d, make)
