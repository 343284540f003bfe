"""What every per-layer rule uses: the `Call` it is given, the store-or-defer threshold and
small tensor helpers (trainable, squared norms, clip coefficients)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastdp.engine.tape import Batch, Tape

if TYPE_CHECKING:  # only for the annotation: the tuner is the conv rule's business
    from fastdp.engine.rules.conv_tuner import ConvTuner

aten = torch.ops.aten

# Keep per-sample gradients when they are at most this many times the elements of the layer's
# input + output gradient (which autograd holds anyway); otherwise recompute the clipped sum.
# Read at backward time as `base.STORE_RATIO`, so that tests can force either path.
STORE_RATIO = 4.0


@dataclass
class Call:
    """One recorded call of a layer, handed to its rule's forward.

    module: the layer; name: its qualified name in the model (for error messages);
    tape: the private model's Tape (`tape.loss_scale(B)`, `tape.record(batch, ...)`);
    batch: the forward pass this call belongs to (record into it in the backward);
    conv_tuner: the private model's per-sample conv method chooser (used by the conv rule).
    """

    module: nn.Module
    name: str
    tape: Tape
    batch: Batch
    conv_tuner: ConvTuner


def trainable(p: torch.Tensor | None) -> bool:
    """Whether `p` is a tensor that wants a gradient (None: an absent bias)."""
    return p is not None and p.requires_grad


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype norms of `t` accumulate in: float64 for float64, float32 for anything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def acc_sq(t: torch.Tensor) -> torch.Tensor:
    """[B] squared norms of t [B, ...] accumulated in at least fp32."""
    flat = t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)
    return flat.to(acc_dtype(t)).pow(2).sum(1)


def detach(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach()


def coef(c: torch.Tensor, scale: float, like: torch.Tensor, ndim: int) -> torch.Tensor:
    """Clip factors c [B] times the loss scale, in like's dtype, shaped [B, 1, ...] (ndim dims)
    to multiply an output gradient sample by sample."""
    return (c * scale).to(like.dtype).view(-1, *([1] * (ndim - 1)))
