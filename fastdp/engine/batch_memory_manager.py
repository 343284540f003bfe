"""Splits large logical (privacy) batches into bounded physical batches.

Within `with BatchMemoryManager(...) as loader:` each logical batch of the DP data loader is
yielded as physical batches of at most `max_physical_batch_size` samples; optimizer.step() on
all but the last only accumulates the clipped per-sample gradients (no noise, no update, no
accountant step), so the privacy step stays one logical step. An empty logical batch is
yielded as one empty physical batch (a noise-only step). Each physical batch is one forward,
one backward and one optimizer.step(), as the DPOptimizer requires; leaving the loop in the
middle of a logical batch discards the clipped sums of its physical batches so far (that
logical batch never becomes a step).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from fastdp.engine.optimizer import DPOptimizer


def _split(batch, lo: int, hi: int):
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, dict):
        return {k: _split(v, lo, hi) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_split(v, lo, hi) for v in batch)
    return batch


def _batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return _batch_len(batch[0])
    raise TypeError(f"cannot find the batch dimension of a {type(batch).__name__}")


class BatchMemoryManager:
    """Context manager yielding physical batches of at most max_physical_batch_size samples.

    Args:
        data_loader: the (DP) data loader of logical batches.
        max_physical_batch_size: memory bound on the samples in one forward/backward.
        optimizer: the DPOptimizer (its step is skipped on all but the last physical batch).
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: DPOptimizer) -> None:
        if max_physical_batch_size < 1:
            raise ValueError("max_physical_batch_size must be >= 1")
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> _PhysicalBatches:
        return _PhysicalBatches(self)

    def __exit__(self, *exc) -> None:
        self.optimizer.signal_skip_step(False)
        self.optimizer.discard_accumulated()


class _PhysicalBatches:
    def __init__(self, manager: BatchMemoryManager) -> None:
        self.m = manager

    def __len__(self) -> int:
        return len(self.m.data_loader)

    def __iter__(self) -> Iterator:
        k = self.m.max_physical_batch_size
        opt = self.m.optimizer
        for batch in self.m.data_loader:
            n = _batch_len(batch)
            bounds = [(lo, min(n, lo + k)) for lo in range(0, n, k)] or [(0, 0)]
            for j, (lo, hi) in enumerate(bounds):
                opt.signal_skip_step(j < len(bounds) - 1)
                try:
                    yield _split(batch, lo, hi) if len(bounds) > 1 else batch
                except GeneratorExit:
                    # The loop was left in the middle of this logical batch: it never becomes a step.
                    opt.signal_skip_step(False)
                    opt.discard_accumulated()
                    raise
