"""The data of an experiment: each site's training and validation slices and a held-out test set.

Phantom: every site is a scanner profile; training, validation and test slices are disjoint
ranges of its phantom patients (training from slice 0, validation from 10**6, test from 2*10**6).
MSD: the task's patients are split at random, whole patients per site, with one extra group of
patients held out as the test set (the paper split Task03_Liver at random).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from fastdp.data import PhantomDataset, get_site, random_site_profile, split_by_group
from fastdp.data.msd import MSDSliceDataset
from fastdp.experiment.config import DataConfig

__all__ = ["ExperimentData", "build_data"]

# First slice index of each split in a phantom site: far enough apart never to overlap.
_VAL_START, _TEST_START = 10**6, 2 * 10**6


@dataclass
class ExperimentData:
    """Datasets of ``(image [1, S, S] float32 in [0, 1], mask [S, S] int64)`` items.

    Attributes:
        train: per site (in config order), its training slices.
        val: per site, its validation slices (None when val_slices_per_site = 0).
        test: the held-out test set (None when test_slices = 0).
        test_parts: the test set split by where its patients come from, {name: Dataset}: each
            site's own held-out patients when the phantom test set is pooled over the sites, the
            test site alone with ``test_site``; None where the split is unknown (MSD: the test
            patients are a group of their own). Used to report each site's test Dice (fairness).
    """

    train: dict[str, Dataset]
    val: dict[str, Dataset | None]
    test: Dataset | None
    test_parts: dict[str, Dataset] | None = None

    def pooled(self) -> tuple[Dataset, Dataset | None]:
        """All sites' training slices as one dataset, and all validation slices (centralised training)."""
        vals = [v for v in self.val.values() if v is not None]
        return ConcatDataset(list(self.train.values())), (ConcatDataset(vals) if vals else None)


def _phantom_profile(name: str, seed: int):

    match = re.fullmatch(r"site_(\d+)", name)
    return random_site_profile(int(match.group(1)), seed) if match else get_site(name)


def _phantom(cfg: DataConfig, seed: int) -> ExperimentData:

    size = cfg.image_size
    profiles = {s: _phantom_profile(s, seed) for s in cfg.sites}
    train = {s: PhantomDataset(p, cfg.slices_per_site, size, seed) for s, p in profiles.items()}
    val = {
        s: PhantomDataset(p, cfg.val_slices_per_site, size, seed, start=_VAL_START) if cfg.val_slices_per_site else None
        for s, p in profiles.items()
    }
    test, test_parts = None, None
    if cfg.test_slices and cfg.test_site is not None:
        test = PhantomDataset(_phantom_profile(cfg.test_site, seed), cfg.test_slices, size, seed, start=_TEST_START)
        test_parts = {cfg.test_site: test}
    elif cfg.test_slices:
        # Pooled over sites, counts differing by at most one.
        counts = [len(part) for part in np.array_split(np.arange(cfg.test_slices), len(profiles))]
        parts = {
            s: PhantomDataset(p, n, size, seed, start=_TEST_START)
            for (s, p), n in zip(profiles.items(), counts, strict=True)
        }
        test_parts = {s: d for s, d in parts.items() if len(d)}
        test = ConcatDataset(list(test_parts.values()))
    return ExperimentData(train, val, test, test_parts)


def _msd(cfg: DataConfig, seed: int) -> ExperimentData:

    full = MSDSliceDataset(cfg.msd_path, cfg.image_size, organ_margin=cfg.msd_organ_margin, cache_dir=cfg.msd_cache_dir)
    n_groups = len(cfg.sites) + (1 if cfg.test_slices else 0)
    groups = split_by_group(full.patient_ids, n_groups, seed)
    rng = np.random.default_rng(seed)
    train, val = {}, {}
    for site, idx in zip(cfg.sites, groups, strict=False):
        idx = rng.permutation(idx)
        n_val = min(cfg.val_slices_per_site, len(idx) // 5)  # never more than a fifth of a site's slices
        val[site] = Subset(full, np.sort(idx[:n_val]).tolist()) if n_val else None
        rest = idx[n_val:]
        if cfg.slices_per_site:
            rest = rest[: cfg.slices_per_site]
        train[site] = Subset(full, np.sort(rest).tolist())
    test = None
    if cfg.test_slices:
        test_idx = rng.permutation(groups[-1])[: cfg.test_slices]
        test = Subset(full, np.sort(test_idx).tolist())
    return ExperimentData(train, val, test)


def build_data(cfg: DataConfig, seed: int = 0) -> ExperimentData:
    """Builds every site's datasets (phantom slices are rendered lazily, on first access)."""
    return _phantom(cfg, seed) if cfg.source == "phantom" else _msd(cfg, seed)
