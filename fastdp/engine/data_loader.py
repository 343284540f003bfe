"""Poisson sampling: each sample joins each batch independently with probability q.

Batches have variable size (possibly 0); the DP analysis (amplification by sampling) assumes
exactly this. An empty batch is yielded as tensors with 0 rows, so the training loop still
takes a (noise-only) step.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields `steps` batches of indices; index j is in a batch with probability sample_rate.

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1].
        steps: batches per epoch (default round(1/q), so an epoch sees N samples on average).
        generator: torch.Generator; ignored in secure mode.
        secure_mode: draw each epoch's generator seed from the OS CSPRNG.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else max(1, int(round(1 / sample_rate)))
        self.generator = generator
        self.secure_mode = secure_mode

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        gen = self.generator
        if self.secure_mode or gen is None:
            gen = torch.Generator()
            gen.manual_seed(secrets.randbits(63) if self.secure_mode else int(torch.randint(0, 2**62, (1,)).item()))
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=gen) < self.sample_rate
            yield torch.nonzero(mask, as_tuple=False).flatten().tolist()


def _empty_like_batch(sample):
    """A batch of 0 samples shaped like one sample (tensors [0, *shape], recursively)."""
    if isinstance(sample, torch.Tensor):
        return sample.new_zeros((0, *sample.shape))
    if isinstance(sample, (int, float, bool)):
        dtype = torch.int64 if isinstance(sample, (int, bool)) and not isinstance(sample, float) else torch.float32
        return torch.zeros((0,), dtype=dtype)
    if isinstance(sample, dict):
        return {k: _empty_like_batch(v) for k, v in sample.items()}
    if isinstance(sample, (tuple, list)):
        return type(sample)(_empty_like_batch(v) for v in sample)
    return sample.__class__() if hasattr(sample, "__len__") else None


class _EmptyAwareCollate:
    def __init__(self, collate_fn, dataset: Dataset) -> None:
        self.collate_fn = collate_fn or default_collate
        self.dataset = dataset
        self._empty = None

    def __call__(self, batch):
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self._empty is None:
            self._empty = _empty_like_batch(self.dataset[0])
        return self._empty


class DPDataLoader(DataLoader):
    """A DataLoader with Poisson sampling, made from an ordinary one (its dataset, workers, collate).

    sample_rate defaults to 1 / len(data_loader) (so the expected batch size is the original's).
    """

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        steps: int | None = None,
        collate_fn=None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        **kwargs,
    ) -> None:
        self.sample_rate = sample_rate
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, generator, secure_mode)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=_EmptyAwareCollate(collate_fn, dataset), **kwargs)

    @classmethod
    def from_data_loader(
        cls, data_loader: DataLoader, generator: torch.Generator | None = None, secure_mode: bool = False
    ) -> DPDataLoader:
        """Poisson-sampling version of `data_loader` with sample rate 1/len(data_loader)."""
        if isinstance(data_loader, DPDataLoader):
            return data_loader
        sample_rate = 1.0 / len(data_loader)
        return cls(
            data_loader.dataset,
            sample_rate=sample_rate,
            steps=len(data_loader),
            collate_fn=data_loader.collate_fn,
            generator=generator if generator is not None else data_loader.generator,
            secure_mode=secure_mode,
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            multiprocessing_context=data_loader.multiprocessing_context,
            persistent_workers=data_loader.persistent_workers if data_loader.num_workers > 0 else False,
        )
