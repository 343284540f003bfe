"""torch Datasets over the phantom: one site's slices, generated lazily in chunks and cached."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from fastdp.data.phantom import render_slices
from fastdp.data.sites import ScannerProfile, get_site, site_profiles


class PhantomDataset(Dataset):
    """``n`` phantom slices of one site: items are ``(image, mask)``.

    ``image`` is [1, size, size] float32 in [0, 1] (CT windowed to [-150, 200] HU);
    ``mask`` is [size, size] int64 with 1 = liver (tumour merged), 0 = background, the layout
    ``torch.nn.functional.cross_entropy`` and :func:`fastdp.models.per_sample_loss` take.

    Item ``i`` is phantom slice ``start + i`` of the site, so two datasets of the same site
    with disjoint ``[start, start + n)`` hold different patients (e.g. train and test).
    Slices are rendered on first access, ``chunk`` at a time, and kept (``cache=True``:
    about 20 KB per 128x128 slice), so later epochs cost nothing. Works with any sampler,
    including the DP engine's Poisson sampling: items are independent of access order.

    Args:
        site: built-in site name (``"site_a"``, ``"site_b"``, ``"site_c"``) or a ScannerProfile.
        n: number of slices.
        size: height and width in pixels (64..512).
        seed: global seed.
        start: index of the first slice.
        cache: keep rendered slices in memory.
        chunk: slices rendered per call (vectorised rendering is faster in batches).
    """

    def __init__(
        self,
        site: str | ScannerProfile = "site_a",
        n: int = 1000,
        size: int = 128,
        seed: int = 0,
        *,
        start: int = 0,
        cache: bool = True,
        chunk: int = 64,
    ):
        if n < 0 or start < 0 or chunk < 1:
            raise ValueError(f"need n >= 0, start >= 0 and chunk >= 1 (got n={n}, start={start}, chunk={chunk})")
        self.profile = get_site(site)
        self.n, self.size, self.seed, self.start = int(n), int(size), int(seed), int(start)
        self.cache, self.chunk = cache, int(chunk)
        self._images: torch.Tensor | None = None
        self._masks: torch.Tensor | None = None
        self._done = np.zeros(0, dtype=bool)
        if cache:
            self._images = torch.empty(self.n, 1, self.size, self.size)
            self._masks = torch.empty(self.n, self.size, self.size, dtype=torch.uint8)
            self._done = np.zeros((self.n + self.chunk - 1) // self.chunk, dtype=bool)

    @property
    def site(self) -> str:
        """The site's name."""
        return self.profile.name

    def __len__(self) -> int:
        return self.n

    def _render(self, lo: int, hi: int):
        out = render_slices(self.profile, np.arange(self.start + lo, self.start + hi), self.size, self.seed)
        return out.image, out.mask

    def _ensure(self, c: int) -> None:
        if not self._done[c]:
            lo, hi = c * self.chunk, min(self.n, (c + 1) * self.chunk)
            img, msk = self._render(lo, hi)
            self._images[lo:hi] = img
            self._masks[lo:hi] = msk.to(torch.uint8)
            self._done[c] = True

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a PhantomDataset of {self.n} slices")
        if not self.cache:
            img, msk = self._render(i, i + 1)
            return img[0], msk[0]
        self._ensure(i // self.chunk)
        # A copy: in-place augmentation of an item must not change the cache.
        return self._images[i].clone(), self._masks[i].long()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All slices at once: images [n, 1, size, size] float32, masks [n, size, size] int64."""
        if not self.cache:
            return self._render(0, self.n)
        for c in range(len(self._done)):
            self._ensure(c)
        return self._images, self._masks.long()

    def __repr__(self) -> str:
        args = f"site={self.site!r}, n={self.n}, size={self.size}, seed={self.seed}, start={self.start}"
        return f"PhantomDataset({args})"


def make_phantom_sites(
    n_sites: int = 3, n_per_site: int = 500, size: int = 128, seed: int = 0, *, start: int = 0
) -> list[PhantomDataset]:
    """One :class:`PhantomDataset` per site: the built-in sites first, then random profiles.

    Args:
        n_sites: number of sites (hospitals).
        n_per_site: slices per site (an int, or a list with one count per site).
        size: slice height and width in pixels.
        seed: global seed (also seeds the random site profiles beyond the built-in three).
        start: first slice index in every site (use disjoint ranges for train and test).
    """
    counts = [n_per_site] * n_sites if isinstance(n_per_site, int) else list(n_per_site)
    if len(counts) != n_sites:
        raise ValueError(f"n_per_site has {len(counts)} entries for {n_sites} sites")
    return [
        PhantomDataset(p, n=c, size=size, seed=seed, start=start)
        for p, c in zip(site_profiles(n_sites, seed), counts, strict=True)
    ]
