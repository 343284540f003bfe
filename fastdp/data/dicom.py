"""DICOM CT series: a directory of single-frame slices -> one volume in HU, slices in position order.

Hospitals store CT as DICOM: one file per axial slice, stored integers that each slice's
RescaleSlope and RescaleIntercept map to Hounsfield units. :func:`read_dicom_series` reads
one series (one directory) with pydicom:

- slices are ordered by their position along the slice normal (ImagePositionPatient projected
  on the cross product of the two ImageOrientationPatient directions), never by InstanceNumber
  or file name, which scanners, PACS exports and anonymisers do not keep consistent;
- every slice goes through its own modality LUT (``pydicom.pixels.apply_modality_lut``:
  RescaleSlope / RescaleIntercept) to HU;
- the volume is indexed ``[column, row, slice]`` and its affine maps that index to RAS
  millimetres, the convention of NIfTI files and MONAI's readers, so MONAI's ``Orientation``
  and fastdp's slicing treat both formats alike.

:class:`DicomSeriesReader` is the same as a MONAI ``ImageReader``:
``LoadImage(reader=DicomSeriesReader())("case_0/")`` or ``LoadImaged`` in a MONAI pipeline.
MONAI's own ``PydicomReader`` orders a series by InstanceNumber (and drops slices without one),
hence a reader of our own.

Not covered: DICOM-SEG and RTSTRUCT labels (keep labels as NIfTI on the image's grid, or as a
DICOM series of label values), enhanced multi-frame DICOM (convert it to NIfTI, e.g. with
dcm2niix), several series in one directory (give each its own directory).

Needs pydicom >= 3 (``pip install pydicom``, in the ``data`` extra), imported on first use.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from monai.data import ImageReader

__all__ = ["DicomSeries", "DicomSeriesError", "DicomSeriesReader", "read_dicom_series"]

# LPS (DICOM's patient coordinates) -> RAS (NIfTI's): x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomSeriesError(OSError):
    """A directory that cannot be read as one DICOM series; the message names the directory or file."""


def _pydicom():
    try:
        import pydicom
        import pydicom.misc
        import pydicom.pixels
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading DICOM needs pydicom >= 3: pip install pydicom (or fastdp[data])") from exc
    return pydicom


@dataclass(frozen=True)
class DicomSeries:
    """One series read by :func:`read_dicom_series`.

    Attributes:
        volume: [I, J, K] values after the modality LUT (HU for CT): I columns, J rows of each
            slice, K slices in order of position along the slice normal.
        affine: [4, 4] float64, voxel index (i, j, k, 1) -> RAS millimetres.
        files: the slice files, in the order of ``volume``'s last axis.
        series_uid: the SeriesInstanceUID ("" when the files have none).
    """

    volume: np.ndarray
    affine: np.ndarray
    files: list[Path] = field(default_factory=list)
    series_uid: str = ""


def _floats(ds, name: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(name)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (n,) or not np.isfinite(out).all():
        raise DicomSeriesError(
            f"DICOM file {path} has no valid {name} ({n} numbers), which is needed to order and place the "
            f"slices; got {value!r}"
        )
    return out


def _image_files(directory: Path, pydicom) -> list[tuple[Path, object]]:
    """(path, dataset) of every DICOM image file in ``directory`` (not recursive)."""
    out = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            if not pydicom.misc.is_dicom(path):
                continue  # a README, a checksum list: not part of the series
            ds = pydicom.dcmread(path)
        except Exception as exc:  # pydicom raises many types for a damaged file
            raise DicomSeriesError(f"could not read DICOM file {path}: {exc!r}") from exc
        if "PixelData" in ds:  # DICOMDIR, reports, presentation states carry no slice
            out.append((path, ds))
    return out


def read_dicom_series(directory: str | os.PathLike, *, modality: str | None = "CT", dtype=np.float32) -> DicomSeries:
    """Reads the one DICOM series in ``directory`` as a volume ordered by slice position.

    Args:
        directory: a folder holding the series' files (one single-frame image per file; other
            files are skipped).
        modality: the Modality every slice must have ("CT": the values are HU, and windowing
            them means something); None accepts any (e.g. a label series).
        dtype: dtype of the returned volume.

    Returns:
        A :class:`DicomSeries`: volume [columns, rows, slices] after RescaleSlope/Intercept,
        its RAS affine, the files in slice order and the series UID.

    Raises:
        FileNotFoundError: ``directory`` is not a directory.
        DicomSeriesError: no image files, several series, another modality, multi-frame files,
            slices of different size, spacing or orientation, missing position tags, two slices
            at one position, or unreadable pixel data; the message names the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"DICOM series directory not found: {directory}")
    pydicom = _pydicom()
    slices = _image_files(directory, pydicom)
    if not slices:
        raise DicomSeriesError(f"no DICOM image files in {directory} (expected one file per slice of one series)")
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if len(uids) > 1:
        raise DicomSeriesError(
            f"{directory} holds {len(uids)} series ({', '.join(uids[:3])}{', ...' if len(uids) > 3 else ''}): "
            "put each series in its own directory"
        )
    first_path, first = slices[0]
    iop = _floats(first, "ImageOrientationPatient", 6, first_path)
    spacing = _floats(first, "PixelSpacing", 2, first_path)  # [between rows, between columns] in mm
    shape = (int(first.get("Rows", 0)), int(first.get("Columns", 0)))
    positions = []
    for path, ds in slices:
        if modality is not None and str(ds.get("Modality", "")) != modality:
            raise DicomSeriesError(
                f"DICOM file {path} has Modality {str(ds.get('Modality', ''))!r}, not {modality!r}: HU windowing "
                f"needs a {modality} series (pass modality=None to read any series)"
            )
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomSeriesError(
                f"DICOM file {path} is multi-frame (enhanced DICOM), which is not supported: convert the series "
                "to NIfTI (e.g. with dcm2niix) and list the .nii.gz instead"
            )
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != shape:
            raise DicomSeriesError(f"DICOM file {path} is {ds.get('Rows')}x{ds.get('Columns')}, the series {shape}")
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), iop, atol=1e-4):
            raise DicomSeriesError(f"DICOM file {path} is oriented differently from {first_path} (a localiser?)")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), spacing, rtol=1e-4):
            raise DicomSeriesError(f"DICOM file {path} has another PixelSpacing than {first_path}")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
    row_dir, col_dir = iop[:3], iop[3:]  # directions of increasing column index and of increasing row index
    normal = np.cross(row_dir, col_dir)
    depth = np.asarray(positions) @ normal
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    if len(gaps) and gaps.min() < 1e-3:
        k = int(np.argmin(gaps))
        a, b = slices[order[k]][0], slices[order[k + 1]][0]
        raise DicomSeriesError(
            f"DICOM files {a} and {b} lie at the same position: {directory} holds several acquisitions (echoes, "
            "phases, a repeated scan); keep one of them per directory"
        )
    if len(gaps) > 1 and gaps.max() - gaps.min() > 0.01 * gaps.mean():
        warnings.warn(
            f"{directory}: slice spacing varies from {gaps.min():.3g} to {gaps.max():.3g} mm (missing slices?); "
            "the volume's affine assumes even spacing",
            stacklevel=2,
        )
    volume = np.empty((shape[1], shape[0], len(slices)), dtype=dtype)
    for k, i in enumerate(order):
        path, ds = slices[i]
        try:
            values = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)  # RescaleSlope * stored + RescaleIntercept
        except Exception as exc:  # compressed without a decoder, truncated pixel data, ...
            raise DicomSeriesError(f"could not decode the pixels of DICOM file {path}: {exc!r}") from exc
        volume[:, :, k] = np.asarray(values).T  # [rows, columns] -> [columns, rows]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # one column further: along the row direction, by the column spacing
    lps[:3, 1] = col_dir * spacing[0]
    p0 = positions[order[0]]
    if len(order) > 1:
        lps[:3, 2] = (positions[order[-1]] - p0) / (len(order) - 1)
    else:
        lps[:3, 2] = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    lps[:3, 3] = p0
    return DicomSeries(volume, _LPS_TO_RAS @ lps, [slices[i][0] for i in order], uids[0])


class DicomSeriesReader(ImageReader):
    """MONAI ``ImageReader`` for a DICOM series directory (:func:`read_dicom_series`).

    ``LoadImage(reader=DicomSeriesReader(), ensure_channel_first=True)(directory)`` gives a
    MetaTensor [1, I, J, K] in HU with its RAS affine; ``Orientation(axcodes="RAS")`` then
    lays it out as the NIfTI loader does.

    ``read`` only checks that it was given one directory; the series is read and checked in
    ``get_data``. MONAI's LoadImage tries its other readers when ``read`` fails, and its own
    PydicomReader would then read a series this reader refuses (two series, a duplicate
    position) in InstanceNumber order; an error in ``get_data`` reaches the caller instead.

    Args:
        modality: the Modality the series must have (None: any; "CT" for images to be windowed).
    """

    def __init__(self, modality: str | None = "CT") -> None:
        super().__init__()
        self.modality = modality

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True for one directory (a series has no file suffix)."""
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and Path(names[0]).is_dir()

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> Path:
        """The one series directory in ``data`` (a path or a list of one path)."""
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(names) != 1 or not Path(names[0]).is_dir():
            raise DicomSeriesError(f"DicomSeriesReader reads one series directory, got {[str(n) for n in names]}")
        return Path(names[0])

    def get_data(self, img: Path) -> tuple[np.ndarray, dict]:
        """(volume [I, J, K] in HU, MONAI metadata: affine, original_affine, spatial_shape, space, channel dim)."""
        series = read_dicom_series(img, modality=self.modality)
        meta = {
            "affine": series.affine.copy(),
            "original_affine": series.affine.copy(),
            "spatial_shape": np.asarray(series.volume.shape),
            "space": "RAS",
            "original_channel_dim": float("nan"),  # no channel axis: EnsureChannelFirst adds one
            "series_uid": series.series_uid,
        }
        return series.volume, meta
