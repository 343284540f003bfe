"""Medical Segmentation Decathlon (MSD) loader: CT volumes (NIfTI or DICOM) to preprocessed 2D axial slices.

Layout (e.g. ``Task03_Liver``)::

    root/dataset.json            {"training": [{"image": "./imagesTr/liver_0.nii.gz",
                                                "label": "./labelsTr/liver_0.nii.gz"}, ...]}
    root/imagesTr/*.nii.gz       CT volumes in HU
    root/labelsTr/*.nii.gz       0 background, 1 liver, 2 tumour

An ``image`` entry may also name a directory holding one DICOM CT series (``"./imagesTr/liver_0"``,
read by :mod:`fastdp.data.dicom`: slices ordered by ImagePositionPatient, RescaleSlope/Intercept
applied); its label stays a NIfTI file on the series' voxel grid (or is a DICOM series of label
values). DICOM-SEG and RTSTRUCT labels are not read.

Preprocessing follows Ziller et al. and is MONAI's transforms: ``LoadImage`` (``NibabelReader``
or :class:`~fastdp.data.dicom.DicomSeriesReader`) -> ``EnsureChannelFirst`` ->
``Orientation("RAS")`` -> ``ScaleIntensityRange(a_min=-150, a_max=200, b_min=0, b_max=1,
clip=True)`` -> 2D axial slices (optionally only those within a few slices of the organ) ->
``Resize`` to ``size`` x ``size`` (bilinear with anti-aliasing; labels nearest). Liver and
tumour are merged into one foreground label. Slices are shown radiologically (patient's right
on the image left, anterior at the top), like the phantom. Preprocessed slices are cached (in
memory, or as memory-mapped ``.npy`` files in ``cache_dir``), so epochs after the first never
read a volume again. :func:`ct_volume_transforms` is the same volume pipeline as MONAI dict
transforms, for MONAI datasets.

Needs nibabel (``pip install nibabel``), and pydicom for DICOM series.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastdp.atomic import atomic_write
from fastdp.data.batches import plain_tensor
from fastdp.data.phantom import HU_WINDOW

# 2: MONAI's Resize (Gaussian anti-aliasing) replaced torch's antialiased interpolate.
_CACHE_VERSION = 2
# Slices resized per call: bounds the memory of a 512x512 volume's float copies.
_RESIZE_CHUNK = 64


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
    """One training case of an MSD task: its name and image/label paths (a file, or a DICOM directory)."""

    name: str
    image: Path
    label: Path


def _case_name(entry: str) -> str:
    return Path(entry).name.removesuffix(".gz").removesuffix(".nii")


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
        cases = [MSDCase(_case_name(e["image"]), root / e["image"], root / e["label"]) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MSDFileError(f"could not read the training list of {index}: {exc!r}") from exc
    for case in cases:
        for path in (case.image, case.label):
            if not (path.is_file() or path.is_dir()):
                raise FileNotFoundError(f"MSD file listed in {index} is missing: {path}")
    return cases


# RAS axis labels, given explicitly: MONAI 1.6 warns that Orientation's default labels will change.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@contextlib.contextmanager
def _quiet_reader_registration():
    """Silences what MONAI 1.6 says each time a LoadImage registers its default readers with pydicom
    installed and no GPU decoder (a warning and a log line about nvImageCodec): nothing to act on."""
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            yield
    finally:
        plugin_log.setLevel(level)


@functools.cache
def _loaders():
    """MONAI's LoadImage (channel first), Orientation("RAS"), a NIfTI reader and the DICOM reader class, built once."""
    from monai.data import NibabelReader
    from monai.transforms import LoadImage, Orientation

    from fastdp.data.dicom import DicomSeriesReader

    with _quiet_reader_registration():
        load = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
    return load, Orientation(axcodes="RAS", labels=_RAS_LABELS), NibabelReader(), DicomSeriesReader


def load_msd_volume(
    path: str | os.PathLike, dtype=np.float32, *, modality: str | None = None, return_affine: bool = False
):
    """A volume as a RAS-oriented array [I, J, K] (voxel values as stored in NIfTI, HU for DICOM CT).

    MONAI ``LoadImage`` (NIfTI file: ``NibabelReader``; directory: one DICOM series,
    :class:`~fastdp.data.dicom.DicomSeriesReader`) -> ``EnsureChannelFirst`` -> ``Orientation("RAS")``.

    Args:
        path: a NIfTI file, or a directory holding one DICOM series.
        dtype: dtype of the returned array.
        modality: for a DICOM series, the Modality it must have ("CT" for images; None: any).
        return_affine: also return the [4, 4] RAS affine of the returned array.

    Returns:
        the [I, J, K] array, or (array, affine) with ``return_affine``.

    Raises:
        FileNotFoundError: the path does not exist.
        MSDFileError: the file or series cannot be read, or is not 3D; names the file.
    """
    path = Path(path)
    if not (path.is_file() or path.is_dir()):
        raise FileNotFoundError(f"volume not found: {path} (a NIfTI file or a DICOM series directory)")
    load, to_ras, nifti_reader, dicom_reader = _loaders()
    if path.is_dir():
        reader, what = dicom_reader(modality), "DICOM series"
    else:
        _nibabel()  # a clear ImportError when nibabel is missing
        reader, what = nifti_reader, "NIfTI file"
    try:
        # A runtime reader: LoadImage tries no other reader, so errors are the reader's own.
        vol = to_ras(load(str(path), reader=reader))
    except Exception as exc:  # nibabel and pydicom raise many types (ImageFileError, EOFError, zlib.error, ...)
        if isinstance(exc, OSError) and str(path) in str(exc):
            raise MSDFileError(str(exc)) from exc  # the DICOM reader's own message names the file
        raise MSDFileError(f"could not read {what} {path}: {exc!r}") from exc
    affine = getattr(vol, "affine", None)
    if affine is None:
        raise RuntimeError(
            "MONAI metadata tracking is off (monai.data.set_track_meta(False)): the MSD loader needs the "
            "volumes' affines to orient them; turn it back on with monai.data.set_track_meta(True)"
        )
    if vol.ndim != 4 or vol.shape[0] != 1:
        raise MSDFileError(f"expected a 3D volume in {path}, got shape {tuple(vol.shape[1:])}")
    data = plain_tensor(vol)[0].numpy().astype(dtype, copy=False)
    return (data, np.asarray(affine, dtype=np.float64)) if return_affine else data


def ct_volume_transforms(window: tuple[float, float] = HU_WINDOW, keys: tuple[str, str | None] = ("image", "label")):
    """MONAI dict transforms of one case: the MSD loader's volume pipeline for MONAI datasets.

    ``LoadImaged`` (NIfTI file or DICOM series directory) -> ``EnsureChannelFirstd`` ->
    ``Orientationd("RAS")`` -> ``ScaleIntensityRanged(a_min=window[0], a_max=window[1], b_min=0,
    b_max=1, clip=True)`` on the image. Items ``{keys[0]: path, keys[1]: path}`` become
    ``{keys[0]: [1, I, J, K] float32 in [0, 1], keys[1]: [1, I, J, K]}`` MetaTensors.

    Args:
        window: HU window mapped to [0, 1].
        keys: the image key and the label key (None for an image-only pipeline).
    """
    from monai.data import NibabelReader
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged

    from fastdp.data.dicom import DicomSeriesReader

    lo, hi = _check_window(window)
    image_key, label_key = keys
    # NibabelReader is tried first (MONAI tries the last listed first), so NIfTI raises nothing on the way.
    with _quiet_reader_registration():
        steps = [LoadImaged(image_key, reader=[DicomSeriesReader("CT"), NibabelReader()], image_only=True)]
        all_keys = [image_key]
        if label_key is not None:
            steps.append(LoadImaged(label_key, reader=[DicomSeriesReader(None), NibabelReader()], image_only=True))
            all_keys.append(label_key)
    steps += [
        EnsureChannelFirstd(all_keys),
        Orientationd(all_keys, axcodes="RAS", labels=_RAS_LABELS),
        ScaleIntensityRanged(image_key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    return Compose(steps)


def _check_window(window) -> tuple[float, float]:
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ValueError(f"the HU window must be (low, high) with high > low, got {window}")
    return lo, hi


def _axial_slices(vol: np.ndarray) -> np.ndarray:
    """RAS [I, J, K] -> [K, J, I] radiological slices (anterior at the top, right on the left)."""
    return np.ascontiguousarray(vol[::-1, ::-1, :].transpose(2, 1, 0))


def _resize(slices: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[k, H, W] -> [k, size, size] with MONAI's Resize (the k slices are its channels)."""
    from monai.transforms import Resize

    resize = Resize((size, size), mode=mode, anti_aliasing=mode == "bilinear")
    chunks = [plain_tensor(resize(c)) for c in torch.split(slices.float(), _RESIZE_CHUNK)]
    return torch.cat(chunks)


def preprocess_case(
    image_hu: np.ndarray,
    label: np.ndarray,
    size: int,
    window: tuple[float, float] = HU_WINDOW,
    organ_margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case to slices: MONAI ScaleIntensityRange (window -> [0, 1], clipped), slice selection, Resize.

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
    from monai.transforms import ScaleIntensityRange

    lo, hi = _check_window(window)
    scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    img = torch.from_numpy(_axial_slices(np.asarray(image_hu, dtype=np.float32)))
    lab = torch.from_numpy(_axial_slices((np.asarray(label) > 0).astype(np.uint8)))
    keep = np.arange(img.shape[0])
    if organ_margin is not None:
        has = lab.flatten(1).any(1).numpy()
        near = np.zeros_like(has)
        for k in np.flatnonzero(has):
            near[max(0, k - organ_margin) : k + organ_margin + 1] = True
        keep = np.flatnonzero(near)
    img, lab = img[keep], lab[keep]
    img = plain_tensor(scale(img))
    if img.shape[0] and tuple(img.shape[-2:]) != (size, size):
        img = _resize(img, size, "bilinear")
        lab = _resize(lab, size, "nearest-exact").round()
    return img.clamp_(0, 1).half().numpy(), lab.to(torch.uint8).numpy(), keep.astype(np.int64)


def _same_grid(a: np.ndarray, b: np.ndarray) -> bool:
    """Affines that place every voxel within a quarter voxel of each other (flips and shifts differ)."""
    spacing = np.linalg.norm(a[:3, :3], axis=0).min()
    return bool(np.abs(a - b).max() <= 0.25 * spacing)


def _stamp(path: Path) -> str:
    """What the cache key knows of an image or label: a file's, or every file of a DICOM directory's, size and mtime."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    parts = []
    for p in files:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


class MSDSliceDataset(Dataset):
    """2D axial slices of an MSD task, preprocessed as in the paper; items ``(image, mask)``.

    ``image``: [1, size, size] float32 in [0, 1]; ``mask``: [size, size] int64 (1 = organ
    incl. tumour). Stored as float16/uint8 after the first read. Images may be NIfTI files or
    DICOM CT series directories (see the module docstring).

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
        stamp = [_stamp(p) for p in (case.image, case.label)]
        key = f"v{_CACHE_VERSION}|{self.size}|{self.window}|{self.organ_margin}|{'|'.join(stamp)}"
        h = hashlib.sha1(key.encode()).hexdigest()[:16]
        return tuple(self.cache_dir / f"{case.name}.{h}.{part}.npy" for part in ("img", "lbl", "idx"))

    def _load_case(self, case: MSDCase):
        paths = self._cache_paths(case) if self.cache_dir is not None else None
        if paths is not None and all(p.is_file() for p in paths):
            return tuple(np.load(p, mmap_mode="r") for p in paths)
        image, image_affine = load_msd_volume(case.image, modality="CT", return_affine=True)
        label, label_affine = load_msd_volume(case.label, dtype=np.float32, return_affine=True)
        if image.shape != label.shape:
            raise MSDFileError(f"image {case.image} has shape {image.shape} but label {case.label} has {label.shape}")
        # A DICOM image's label comes from another tool: check it covers the same voxels (a flipped
        # or shifted label would train on wrong masks without any error).
        if case.image.is_dir() and not _same_grid(image_affine, label_affine):
            raise MSDFileError(
                f"label {case.label} is not on the voxel grid of the DICOM series {case.image} (RAS affines "
                f"{label_affine.round(3).tolist()} vs {image_affine.round(3).tolist()}): resample the label onto "
                "the series, or write it with the series' geometry"
            )
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
