"""Poisson sampling: each sample joins each batch independently with probability q.

Batches have variable size (possibly 0); the DP analysis (amplification by sampling) assumes
exactly this. An empty batch is yielded as tensors with 0 rows, so the training loop still
takes a (noise-only) step.

The analysis also assumes that each step uses exactly one Poisson batch. DPDataLoader counts
the batches it hands out (in its iterator, in the main process: with num_workers > 0 the batch
sampler runs ahead to prefetch) and the DPOptimizer made for it checks at every real step that
at most one was drawn since the previous one. A batch drawn and then abandoned by closing its
iterator before any step (a `break` at the top of the loop) is not counted.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping

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


def _empty_from_collated(sample, collated):
    """The 0-sample batch of `collated` = collate([sample]): what the collate makes of 0 samples.

    Tensors keep their trailing shape and dtype (the collate already turned numpy arrays and
    numbers into tensors, with its own dtypes); a list the collate made of non-tensor items
    (strings, paths) is empty; dicts, tuples and lists of the sample's structure recurse.
    """
    if isinstance(collated, torch.Tensor):
        return collated[:0]
    if isinstance(collated, Mapping) and isinstance(sample, Mapping):
        return {k: _empty_from_collated(sample[k], v) for k, v in collated.items()}
    if isinstance(collated, (tuple, list)):
        if isinstance(sample, (tuple, list)) and len(sample) == len(collated):
            parts = [_empty_from_collated(s, c) for s, c in zip(sample, collated, strict=True)]
            return type(collated)(*parts) if hasattr(collated, "_fields") else type(collated)(parts)  # namedtuple
        return type(collated)()
    return collated


class _EmptyAwareCollate:
    def __init__(self, collate_fn, dataset: Dataset) -> None:
        self.collate_fn = collate_fn or default_collate
        self.dataset = dataset
        self._one = None  # (sample, collate([sample])): the template of an empty batch

    def __call__(self, batch):
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self._one is None:
            sample = self.dataset[0]
            self._one = (sample, self.collate_fn([sample]))
        # A new structure each time: a loop that assigns into a dict batch must not change the next.
        return _empty_from_collated(*self._one)


class _CountingIterator:
    """Iterator over a DPDataLoader's batches that tells the loader about each batch it hands out."""

    def __init__(self, loader: DPDataLoader, inner) -> None:
        self._loader = loader
        self._inner = inner
        self._last_round: int | None = None  # loader's step round when this iterator last yielded
        self._open = True

    def __iter__(self) -> _CountingIterator:
        return self

    def __len__(self) -> int:
        return len(self._inner)

    def __next__(self):
        if not self._open:
            raise StopIteration
        try:
            batch = next(self._inner)
        except StopIteration:
            self._open = False  # exhausted: its last batch was used by the loop body
            raise
        self._last_round = self._loader._note_draw()
        return batch

    def close(self) -> None:
        """Abandons the iterator; a batch it handed out after the last step is not counted."""
        if self._open:
            self._open = False
            if self._last_round is not None:
                self._loader._note_abandoned(self._last_round)

    def __del__(self) -> None:
        self.close()


class DPDataLoader(DataLoader):
    """A DataLoader with Poisson sampling, made from an ordinary one (its dataset, workers, collate).

    sample_rate defaults to 1 / len(data_loader) (so the expected batch size is the original's).
    `batches_since_step` counts the batches handed out since the last real optimizer step
    (see the module docstring).
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
        self.batches_since_step = 0
        self.draws = 0  # batches handed out in total
        self._round = 0  # real steps (and discarded steps) so far
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, generator, secure_mode)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=_EmptyAwareCollate(collate_fn, dataset), **kwargs)

    def __iter__(self) -> _CountingIterator:
        return _CountingIterator(self, super().__iter__())

    def _note_draw(self) -> int:
        self.batches_since_step += 1
        self.draws += 1
        return self._round

    def _note_abandoned(self, round_: int) -> None:
        if round_ == self._round and self.batches_since_step > 0:
            self.batches_since_step -= 1

    def end_step(self) -> None:
        """Called by the DPOptimizer after a real step, or a refused one whose batch is discarded."""
        self.batches_since_step = 0
        self._round += 1

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
