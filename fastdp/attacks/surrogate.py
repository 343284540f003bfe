"""A smooth surrogate of a network for gradient inversion: kinks replaced by soft versions.

Why: a PReLU / ReLU / max-pool network's parameter gradient g(x) is *discontinuous* in the input x
(a unit's slope jumps from 1 to its negative slope when its pre-activation crosses 0, a max-pool's
winner changes), so the inversion objective ``1 - cos(g(x), g_shared)`` is a staircase that
autograd does not see. Measured on unet_small (docs/attacks.md): started from the truth plus noise
of std 0.05, L-BFGS on the real network stalls at NCC 0.96 within 20 evaluations; on the same
weights with softened kinks it returns to the truth (NCC 0.9997). An attacker therefore simulates
the candidate's gradient through :func:`smooth_surrogate` with a sharpness ``beta`` that grows
over the search (a homotopy towards the real network); the shared gradient still comes from the
real network.

The surrogate has the same parameter names and shapes as the original (PReLU keeps its ``weight``),
so ``torch.func.functional_call`` with the original's parameters works on it unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SoftMaxPool2d", "SoftPReLU", "smooth_surrogate", "kinked_modules"]


def _soft_relu(x: torch.Tensor, beta: float) -> torch.Tensor:
    """softplus(beta x) / beta: ReLU with its kink rounded over a width of about 1 / beta."""
    return F.softplus(x, beta=beta)


class SoftPReLU(nn.Module):
    """``a x + (1 - a) softplus(beta x) / beta``: PReLU / LeakyReLU / ReLU (a = 0) without the kink.

    ``weight`` is PReLU's slope parameter (shape [1] or [C]); a fixed ``slope`` (LeakyReLU, ReLU) is
    used when ``weight`` is None. Tends to the kinked function as beta -> inf.
    """

    def __init__(self, beta: float, weight: torch.Tensor | None = None, slope: float = 0.0):
        super().__init__()
        if weight is not None:
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        else:
            self.weight = None
        self.slope = slope
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            a = self.slope
        elif self.weight.numel() > 1:
            a = self.weight.view(1, -1, *([1] * (x.dim() - 2)))
        else:
            a = self.weight
        return a * x + (1 - a) * _soft_relu(x, self.beta)


class SoftMaxPool2d(nn.Module):
    """Max-pool over non-overlapping k x k windows as a softmax-weighted mean with temperature 1 / beta.

    [B, C, H, W] -> [B, C, H // k, W // k]; H and W must be multiples of k (as in a U-Net).
    """

    def __init__(self, kernel_size: int, beta: float):
        super().__init__()
        self.k = int(kernel_size)
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.k
        if h % k or w % k:
            raise ValueError(f"SoftMaxPool2d: input {h}x{w} is not a multiple of the window {k}")
        win = x.view(b, c, h // k, k, w // k, k).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // k, w // k, k * k)
        return (torch.softmax(win * self.beta, -1) * win).sum(-1)


def _pool_size(mod: nn.MaxPool2d) -> int:
    k, s = mod.kernel_size, mod.stride
    k = k if isinstance(k, int) else (k[0] if k[0] == k[1] else -1)
    s = s if isinstance(s, int) else (s[0] if s[0] == s[1] else -1)
    pad = mod.padding if isinstance(mod.padding, int) else max(mod.padding)
    dil = mod.dilation if isinstance(mod.dilation, int) else max(mod.dilation)
    if k < 1 or s != k or pad or dil != 1 or mod.ceil_mode or mod.return_indices:
        raise ValueError(
            f"smooth_surrogate: only square non-overlapping MaxPool2d (stride = kernel, no padding) is "
            f"supported, got {mod}"
        )
    return k


#: Module types with a kink that :func:`smooth_surrogate` replaces.
_KINKED = (nn.PReLU, nn.ReLU, nn.LeakyReLU, nn.MaxPool2d)


def kinked_modules(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` that :func:`smooth_surrogate` would soften."""
    return [n for n, m in model.named_modules() if isinstance(m, _KINKED)]


def smooth_surrogate(model: nn.Module, beta: float) -> nn.Module:
    """A deep copy of ``model`` with PReLU, ReLU, LeakyReLU and MaxPool2d softened at sharpness ``beta``.

    Args:
        model: the attacked network (not modified). Kinks inside ``forward`` code (``F.relu``,
            ``torch.max``) cannot be seen and stay as they are.
        beta: sharpness (> 0): activations use softplus(beta x) / beta, pools a softmax with
            temperature 1 / beta. Inputs of these layers are GroupNorm / BatchNorm outputs of order
            1, so beta 3-30 goes from strongly smoothed to nearly the real network.
    Returns: the surrogate module (same parameter names and shapes, same device and dtype).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.PReLU):
                setattr(parent, name, SoftPReLU(beta, weight=child.weight))
            elif isinstance(child, nn.LeakyReLU):
                setattr(parent, name, SoftPReLU(beta, slope=child.negative_slope))
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, SoftPReLU(beta, slope=0.0))
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, SoftMaxPool2d(_pool_size(child), beta))
    return out
