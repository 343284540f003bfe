"""Medical Segmentation Decathlon (MSD) loader: NIfTI volumes to preprocessed 2D axial slices.

Layout (e.g. ``Task03_Liver``)::

    root/dataset.json            {"training": [{"image": "./imagesTr/liver_0.nii.gz",
                                                "label": "./labelsTr/liver_0.nii.gz"}, ...]}
    root/imagesTr/*.nii.gz       CT volumes in HU
    root/labelsTr/*.nii.gz       0 background, 1 liver, 2 tumour

Preprocessing follows Ziller et al.: clip HU to [-150, 200], scale to [0, 1], merge liver and
tumour into one foreground label, take 2D axial slices (optionally only those within a few
slices of the organ), resize to ``size`` x ``size``. Volumes are reoriented to RAS and
slices shown radiologically (patient's right on the image left, anterior at the top), like
the phantom. Preprocessed slices are cached (in memory, or as memory-mapped ``.npy`` files
in ``cache_dir``), so epochs after the first never read NIfTI again.

Needs nibabel (``pip install nibabel``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fastdp.atomic import atomic_write
from fastdp.data.phantom import HU_WINDOW

_CACHE_VERSION = 1


class MSDFileError(OSError):
    """A file of the MSD folder is missing, unreadable or inconsistent; the message names it."""


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastdp.data.msd needs nibabel to read NIfTI files: pip install nibabel") from exc
    return nibabel


@dataclass(frozen=True)
class MSDCase:
    """One training case of an MSD task: its name and image/label paths."""

    name: str
    image: Path
    label: Path


def read_msd_index(root: str | os.PathLike) -> list[MSDCase]:
    """The training cases listed in ``root/dataset.json``, paths resolved and checked.

    Raises:
        FileNotFoundError: ``root``, ``dataset.json`` or a listed image/label is missing.
        MSDFileError: ``dataset.json`` is not valid JSON or has no ``training`` list.
    """
    root = Path(root)
    index = root / "dataset.json"
    if not index.is_file():
        raise FileNotFoundError(f"MSD index not found: {index} (expected the Decathlon layout)")
    try:
        meta = json.loads(index.read_text())
        entries = meta["training"]
        cases = []
        for e in entries:
            image, label = root / e["image"], root / e["label"]
            cases.append(MSDCase(Path(e["image"]).name.removesuffix(".gz").removesuffix(".nii"), image, label))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MSDFileError(f"could not read the training list of {index}: {exc!r}") from exc
    for case in cases:
        for path in (case.image, case.label):
            if not path.is_file():
                raise FileNotFoundError(f"MSD file listed in {index} is missing: {path}")
    return cases


def load_msd_volume(path: str | os.PathLike, dtype=np.float32) -> np.ndarray:
    """A NIfTI volume as a RAS-oriented array [I, J, K] (voxel values as stored, e.g. HU).

    Raises:
        FileNotFoundError: the file does not exist.
        MSDFileError: nibabel cannot read it (corrupt, truncated, not NIfTI); names the file.
    """
    nib = _nibabel()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise MSDFileError(f"could not read NIfTI file {path}: {exc!r}") from exc
    if data.ndim != 3:
        raise MSDFileError(f"expected a 3D volume in {path}, got shape {data.shape}")
    return data


def _axial_slices(vol: np.ndarray) -> np.ndarray:
    """RAS [I, J, K] -> [K, J, I] radiological slices (anterior at the top, right on the left)."""
    return np.ascontiguousarray(vol[::-1, ::-1, :].transpose(2, 1, 0))


def preprocess_case(
    image_hu: np.ndarray,
    label: np.ndarray,
    size: int,
    window: tuple[float, float] = HU_WINDOW,
    organ_margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case to slices.

    Args:
        image_hu: [I, J, K] RAS volume in HU.
        label: [I, J, K] label volume; every label > 0 is foreground (liver + tumour merged).
        size: output slice height and width.
        window: HU clip range, scaled to [0, 1].
        organ_margin: keep only slices within this many slices of one containing foreground
            (None keeps all; a case without foreground then keeps none).

    Returns:
        images [k, size, size] float16 in [0, 1], masks [k, size, size] uint8 in {0, 1},
        slice numbers [k] int64 (axial index in the RAS volume).
    """
    lo, hi = window
    img = torch.from_numpy(_axial_slices(image_hu).astype(np.float32))
    lab = torch.from_numpy(_axial_slices((label > 0).astype(np.uint8)))
    keep = np.arange(img.shape[0])
    if organ_margin is not None:
        has = lab.flatten(1).any(1).numpy()
        near = np.zeros_like(has)
        for k in np.flatnonzero(has):
            near[max(0, k - organ_margin) : k + organ_margin + 1] = True
        keep = np.flatnonzero(near)
    img, lab = img[keep], lab[keep]
    img = ((img.clamp(lo, hi) - lo) / (hi - lo)).unsqueeze(1)
    if img.shape[0] and tuple(img.shape[-2:]) != (size, size):
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        lab = F.interpolate(lab.unsqueeze(1).float(), size=(size, size), mode="nearest-exact").squeeze(1)
    return img.squeeze(1).clamp_(0, 1).half().numpy(), lab.to(torch.uint8).numpy(), keep.astype(np.int64)


class MSDSliceDataset(Dataset):
    """2D axial slices of an MSD task, preprocessed as in the paper; items ``(image, mask)``.

    ``image``: [1, size, size] float32 in [0, 1]; ``mask``: [size, size] int64 (1 = organ
    incl. tumour). Stored as float16/uint8 after the first read.

    Attributes:
        patient_ids: [N] int64 case number of every slice (for :func:`split_by_group`).
        has_organ: [N] bool, slice contains foreground (for :func:`split_dirichlet`).
        slice_numbers: [N] int64 axial index of every slice in its volume.
        cases: the :class:`MSDCase` list used.

    Args:
        root: the task folder (holding ``dataset.json``).
        size: slice height and width after resizing (the paper used 256).
        organ_margin: keep only slices within this many slices of the organ (None: all).
        cases: use only these case indices (after ``dataset.json`` order) or names.
        cache_dir: where to write the preprocessed cache (``.npy`` files, memory-mapped on
            later runs); None keeps it in memory for this object's lifetime only.
        window: HU window.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 256,
        *,
        organ_margin: int | None = None,
        cases: list[int] | list[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        window: tuple[float, float] = HU_WINDOW,
    ):
        all_cases = read_msd_index(root)
        if cases is not None:
            by_name = {c.name: c for c in all_cases}
            try:
                all_cases = [by_name[c] if isinstance(c, str) else all_cases[c] for c in cases]
            except (KeyError, IndexError) as exc:
                raise ValueError(f"unknown case {exc} in {root}") from exc
        self.cases = all_cases
        self.size, self.window, self.organ_margin = int(size), window, organ_margin
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        images, masks, pids, numbers = [], [], [], []
        for pid, case in enumerate(self.cases):
            img, msk, num = self._load_case(case)
            images.append(img)
            masks.append(msk)
            pids.append(np.full(len(num), pid, dtype=np.int64))
            numbers.append(num)
        self._images, self._masks = images, masks
        self.patient_ids = np.concatenate(pids) if pids else np.zeros(0, np.int64)
        self.slice_numbers = np.concatenate(numbers) if numbers else np.zeros(0, np.int64)
        self._offsets = np.concatenate([[0], np.cumsum([len(n) for n in numbers])]).astype(np.int64)
        self.has_organ = np.concatenate([m.reshape(len(m), -1).any(1) for m in masks]) if masks else np.zeros(0, bool)

    def _cache_paths(self, case: MSDCase) -> tuple[Path, Path, Path]:
        stamp = []
        for p in (case.image, case.label):
            st = p.stat()
            stamp.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        key = f"v{_CACHE_VERSION}|{self.size}|{self.window}|{self.organ_margin}|{'|'.join(stamp)}"
        h = hashlib.sha1(key.encode()).hexdigest()[:16]
        return tuple(self.cache_dir / f"{case.name}.{h}.{part}.npy" for part in ("img", "lbl", "idx"))

    def _load_case(self, case: MSDCase):
        paths = self._cache_paths(case) if self.cache_dir is not None else None
        if paths is not None and all(p.is_file() for p in paths):
            return tuple(np.load(p, mmap_mode="r") for p in paths)
        image = load_msd_volume(case.image)
        label = load_msd_volume(case.label, dtype=np.float32)
        if image.shape != label.shape:
            raise MSDFileError(f"image {case.image} has shape {image.shape} but label {case.label} has {label.shape}")
        out = preprocess_case(image, label, self.size, self.window, self.organ_margin)
        if paths is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for arr, p in zip(out, paths, strict=True):
                atomic_write(p, lambda f, arr=arr: np.save(f, arr))  # a crash never leaves a half-written cache
            return tuple(np.load(p, mmap_mode="r") for p in paths)
        return out

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} slices")
        case = int(np.searchsorted(self._offsets, i, side="right") - 1)
        k = i - int(self._offsets[case])
        image = torch.from_numpy(np.asarray(self._images[case][k], dtype=np.float32)).unsqueeze(0)
        mask = torch.from_numpy(np.asarray(self._masks[case][k], dtype=np.int64))
        return image, mask
