"""What the backward pass leaves for the DP step: per-layer gradient contributions per batch.

Each wrapped layer's backward records one contribution for its trainable parameters:

- `Stored`: per-sample gradients [B, *shape] (small layers; clipped and summed by the fused op);
- `Deferred`: what is needed to give the layer's per-sample squared norms [B] and, once the clip
  factors c [B] are known, the clipped sum sum_i c_i g_i in one weight-gradient computation
  (large layers; the per-sample gradients are never kept).

Contributions are grouped by the forward pass (a "batch") they belong to. DP-SGD clips each
sample once per step, so the optimizer refuses a step with more than one recorded batch (two
forward/backward passes before one step: gradient accumulation) rather than clipping each.

Several calls of the model before one backward (a GAN discriminator on real, then on fake
samples, both losses summed into one backward) are one batch: row i of every call is privacy
unit i, its gradients from all calls summed before it is clipped once (Opacus's semantics, where
grad samples of the calls add up). Every call must have the same batch size B; the inputs of
row i in each call must come from data sample i only, or from no private data at all (the
generator's fakes); the optimizer's check that at most one Poisson batch was drawn per step
still applies.
A backward that fails part-way (a layer refused in its backward) leaves no half-recorded batch:
the tape is cleared and marks the failure, so that a step() taken anyway is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Stored:
    """Per-sample gradients of `params`: scale * grads[k], each grads[k] [B, *p.shape].

    scale: the loss scale still to apply (1.0: grads are already the per-sample-loss gradients).
    The hot rules record autograd's grads unscaled with scale = tape.loss_scale(B): the DP step
    folds it into the squared norms (times scale^2) and the fused clip's final multiplier, which
    saves one pass over every stored per-sample gradient.
    """

    params: list[torch.nn.Parameter]
    grads: list[torch.Tensor]
    scale: float = 1.0

    def scaled(self) -> list[torch.Tensor]:
        """The per-sample gradients themselves (scale applied; the recorded tensors when 1.0)."""
        return self.grads if self.scale == 1.0 else [g * self.scale for g in self.grads]


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
    calls: int = 1  # calls of the private model recorded into this batch (one backward for all)


class Tape:
    """Shared state of one private model: the loss reduction and the batches awaiting a step.

    `failure` holds the message of a backward that failed since the last clear (None if none).
    `in_unit` > 0 while the generic path runs a module's own forward (patched modules run as is).
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
        self.in_unit = 0
        self.call_noted = False  # a layer of the current call of the model was noted

    def loss_scale(self, batch_size: int) -> float:
        """Factor turning autograd's grad_output into per-sample-loss gradients."""
        return float(batch_size) if self.loss_reduction == "mean" else 1.0

    def begin_forward(self) -> bool:
        """A training call of the private model starts. Returns True when it continues the batch of
        an earlier call whose backward has not run yet (see the module docstring), else starts a new
        batch at its first recorded layer."""
        self.call_noted = False
        if self.awaiting_backward and self.current is not None:
            self.current.calls += 1
            return True
        self.current = None
        return False

    def note_forward(self, module_name: str, batch_size: int) -> Batch:
        """Called by every wrapped layer in a recorded forward; checks batch sizes agree."""
        first_of_call, self.call_noted = not self.call_noted, True
        if self.current is None:
            self.current = Batch(batch_size, module_name)
            self.batches.append(self.current)
            self.awaiting_backward = True
        elif batch_size != self.current.batch_size and first_of_call:
            raise ValueError(
                f"fastdp: module '{module_name}' got an input with batch size {batch_size}, but an earlier call "
                f"of the private model since the last backward had batch size {self.current.batch_size}. Calls "
                "before one backward are one batch, row i of each call privacy unit i (its gradients summed, "
                "then clipped once), so every call needs the same batch size: e.g. a GAN discriminator's fake "
                "batch of the real batch's size (torch.randn(real.shape[0], ...)). Otherwise concatenate the "
                "inputs into one call (torch.cat) and split its output. Call optimizer.zero_grad() to discard a "
                "call whose loss you do not backpropagate, and evaluate under torch.no_grad() / model.eval()."
            )
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
        # Empty the contributions, not only the list: a Deferred's closures hold the layer's input,
        # whose autograd graph holds the rules' ctx.call -> Batch -> contributions, a cycle through
        # C++ autograd nodes that Python's gc cannot collect (it leaked every step's graph and
        # activations: +0.9 GB per federated DP round of the demo).
        for batch in self.batches:
            batch.contributions.clear()
        if self.current is not None:
            self.current.contributions.clear()
        self.batches = []
        self.current = None
        self.awaiting_backward = False
        self.failure = None
