"""What the backward pass leaves for the DP step: per-layer gradient contributions per batch.

Each wrapped layer's backward records one contribution for its trainable parameters:

- `Stored`: per-sample gradients [B, *shape] (small layers; clipped and summed by the fused op);
- `Deferred`: what is needed to give the layer's per-sample squared norms [B] and, once the clip
  factors c [B] are known, the clipped sum sum_i c_i g_i in one weight-gradient computation
  (large layers; the per-sample gradients are never kept).

Contributions are grouped by the forward pass (a "batch") they belong to. DP-SGD clips each
sample once per step, so the optimizer refuses a step with more than one recorded batch (two
forward/backward passes before one step: gradient accumulation) rather than clipping each.
A backward that fails part-way (a layer refused in its backward) leaves no half-recorded batch:
the tape is cleared and marks the failure, so that a step() taken anyway is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Stored:
    """Per-sample gradients of `params` (each [B, *p.shape]), already loss-scaled."""

    params: list[torch.nn.Parameter]
    grads: list[torch.Tensor]


@dataclass
class Deferred:
    """A layer whose clipped sum is formed after the clip factors are known.

    sq_norms: [B] this layer's contribution to the per-sample squared norms.
    clipped_sum: c [B] -> list of summed gradients, one per param (shapes of params).
    materialize: () -> list of per-sample gradients [B, *p.shape] (used when a parameter is
        shared by several contributions, so norms cannot be added per layer).
    """

    params: list[torch.nn.Parameter]
    sq_norms: torch.Tensor
    clipped_sum: Callable[[torch.Tensor], list[torch.Tensor]]
    materialize: Callable[[], list[torch.Tensor]]


@dataclass
class Batch:
    """Contributions recorded for one forward pass."""

    batch_size: int
    first_module: str
    contributions: list = field(default_factory=list)


class Tape:
    """Shared state of one private model: the loss reduction and the batches awaiting a step.

    `failure` holds the message of a backward that failed since the last clear (None if none).
    """

    def __init__(self, loss_reduction: str = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.batches: list[Batch] = []
        self.current: Batch | None = None
        self.awaiting_backward = False
        self.enabled = True
        self.failure: str | None = None

    def loss_scale(self, batch_size: int) -> float:
        """Factor turning autograd's grad_output into per-sample-loss gradients."""
        return float(batch_size) if self.loss_reduction == "mean" else 1.0

    def begin_forward(self) -> None:
        self.current = None

    def note_forward(self, module_name: str, batch_size: int) -> Batch:
        """Called by every wrapped layer in a recorded forward; checks batch sizes agree."""
        if self.current is None:
            self.current = Batch(batch_size, module_name)
            self.batches.append(self.current)
            self.awaiting_backward = True
        elif batch_size != self.current.batch_size:
            raise ValueError(
                f"fastdp: module '{module_name}' got an input with batch size {batch_size}, but "
                f"'{self.current.first_module}' got {self.current.batch_size} in the same forward. "
                "Inputs must be batch-first (dim 0 = samples) in every layer with trainable parameters."
            )
        return self.current

    def record(self, batch: Batch, contribution) -> None:
        self.awaiting_backward = False
        batch.contributions.append(contribution)

    def abort(self, message: str) -> None:
        """A backward failed part-way: drop everything recorded (some layers may already have
        recorded their part of the batch) and remember why, so that a step() is refused."""
        self.clear()
        self.failure = message

    def clear(self) -> None:
        self.batches = []
        self.current = None
        self.awaiting_backward = False
        self.failure = None
