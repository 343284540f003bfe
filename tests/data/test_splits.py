"""Site splits: disjoint, complete, deterministic; by patient keeps patients whole."""

import numpy as np
import pytest
import torch

from fastdp.data import split_by_group, split_dirichlet, split_iid, split_quantity, subsets


def _check_partition(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n and allidx.min() == 0 and allidx.max() == n - 1


def test_iid():
    parts = split_iid(103, 4, seed=1)
    _check_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_iid(103, 4, seed=1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, split_iid(103, 4, seed=2), strict=True))
    with pytest.raises(ValueError):
        split_iid(2, 3)


def test_by_group_keeps_patients_whole():
    groups = np.repeat(np.arange(12), np.arange(1, 13))  # patients with 1..12 slices
    parts = split_by_group(groups, 3, seed=0)
    _check_partition(parts, len(groups))
    site_of = {}
    for k, p in enumerate(parts):
        for g in np.unique(groups[p]):
            assert site_of.setdefault(g, k) == k
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 12
    with pytest.raises(ValueError):
        split_by_group([0, 0, 1], 3)


def test_dirichlet_skew():
    strata = np.repeat([0, 1], 500)
    skewed = split_dirichlet(strata, 4, alpha=0.1, seed=0)
    flat = split_dirichlet(strata, 4, alpha=1000.0, seed=0)
    _check_partition(skewed, 1000)
    _check_partition(flat, 1000)
    frac = lambda parts: np.array([strata[p].mean() for p in parts])  # noqa: E731
    assert frac(skewed).std() > frac(flat).std()
    assert np.allclose(frac(flat), 0.5, atol=0.1)


def test_quantity_skew():
    parts = split_quantity(200, 5, alpha=0.3, seed=0, min_size=5)
    _check_partition(parts, 200)
    assert min(len(p) for p in parts) >= 5
    assert np.std([len(p) for p in parts]) > 5


def test_subsets():
    ds = torch.utils.data.TensorDataset(torch.arange(10))
    subs = subsets(ds, split_iid(10, 2))
    assert sum(len(s) for s in subs) == 10
