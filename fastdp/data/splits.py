"""Ways to split one data set into sites (hospitals): index lists, one per site.

Every function returns ``list[np.ndarray]`` of int64 indices, disjoint, covering all
``n`` samples (except where stated), deterministic in ``seed``. Wrap them with
:func:`subsets` to get one ``torch.utils.data.Subset`` per site.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset, Subset


def _check(n: int, n_sites: int) -> None:
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if n < n_sites:
        raise ValueError(f"cannot split {n} samples into {n_sites} non-empty sites")


def split_iid(n: int, n_sites: int, seed: int = 0) -> list[np.ndarray]:
    """Random equal-sized sites (sizes differ by at most one), as the paper split MSD."""
    _check(n, n_sites)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, n_sites)]


def split_by_group(groups: Sequence[int] | np.ndarray, n_sites: int, seed: int = 0) -> list[np.ndarray]:
    """Whole groups (patients) per site: no patient's slices are in two sites.

    Groups are shuffled, then each goes to the site with the fewest samples so far, which
    balances site sizes. ``groups``: [n] group id per sample.
    """
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    if len(uniq) < n_sites:
        raise ValueError(f"{len(uniq)} groups (patients) cannot fill {n_sites} sites")
    rng = np.random.default_rng(seed)
    order = rng.permutation(uniq)
    members = {gid: np.flatnonzero(groups == gid) for gid in order}
    sites: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    sizes = np.zeros(n_sites, dtype=np.int64)
    for gid in order:
        k = int(np.argmin(sizes))
        sites[k].append(members[gid])
        sizes[k] += len(members[gid])
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in sites]


def split_dirichlet(
    strata: Sequence[int] | np.ndarray, n_sites: int, alpha: float = 0.5, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed sites: each stratum's samples are shared by Dirichlet(alpha) proportions.

    ``strata``: [n] a category per sample (e.g. liver present or not, lesion or not, patient
    group). Small ``alpha`` gives strongly skewed sites; large ``alpha`` approaches IID.
    Redraws (up to 100 times) until every site has at least ``min_size`` samples.
    """
    strata = np.asarray(strata)
    _check(len(strata), n_sites)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        sites: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        for value in np.unique(strata):
            idx = rng.permutation(np.flatnonzero(strata == value))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_sites, alpha))) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                sites[k].append(part)
        out = [np.sort(np.concatenate(parts)).astype(np.int64) for parts in sites]
        if min(len(o) for o in out) >= min_size:
            return out
    raise ValueError(f"could not draw {n_sites} sites of >= {min_size} samples with alpha={alpha}; raise alpha")


def split_quantity(n: int, n_sites: int, alpha: float = 1.0, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Quantity-skewed sites: random samples, site sizes drawn from Dirichlet(alpha)."""
    _check(n, n_sites)
    if n < n_sites * min_size:
        raise ValueError(f"cannot give {n_sites} sites >= {min_size} samples each out of {n}")
    rng = np.random.default_rng(seed)
    extra = n - n_sites * min_size
    sizes = min_size + np.floor(rng.dirichlet(np.full(n_sites, alpha)) * extra).astype(int)
    sizes[: n - sizes.sum()] += 1  # hand out the rounding remainder
    perm = rng.permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.split(perm, np.cumsum(sizes)[:-1])]


def subsets(dataset: Dataset, splits: Sequence[np.ndarray]) -> list[Subset]:
    """One ``torch.utils.data.Subset`` of ``dataset`` per site."""
    return [Subset(dataset, part.tolist()) for part in splits]
