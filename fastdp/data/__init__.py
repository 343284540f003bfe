"""CT data: a multi-site phantom (the built-in default), the MSD loader (NIfTI or DICOM CT) and site splits.

``fastdp.data.msd`` needs nibabel (``pip install nibabel``) and ``fastdp.data.dicom`` pydicom
(``pip install pydicom``); both are imported lazily. Batches may be ``(image, label)`` tuples or
MONAI-style dicts: :func:`image_and_label` reads either.
"""

from fastdp.data.batches import DEFAULT_BATCH_KEYS, image_and_label, plain_tensor
from fastdp.data.datasets import PhantomDataset, make_phantom_sites
from fastdp.data.phantom import HU_WINDOW, PhantomSlices, Tissue, render_slices, window_hu
from fastdp.data.sites import SITES, ScannerProfile, get_site, random_site_profile, site_profiles
from fastdp.data.splits import split_by_group, split_dirichlet, split_iid, split_quantity, subsets

__all__ = [
    "DEFAULT_BATCH_KEYS",
    "HU_WINDOW",
    "SITES",
    "PhantomDataset",
    "PhantomSlices",
    "ScannerProfile",
    "Tissue",
    "get_site",
    "image_and_label",
    "make_phantom_sites",
    "plain_tensor",
    "random_site_profile",
    "render_slices",
    "site_profiles",
    "split_by_group",
    "split_dirichlet",
    "split_iid",
    "split_quantity",
    "subsets",
    "window_hu",
]

# Names of the lazily imported modules (they import MONAI's transforms, nibabel or pydicom).
_LAZY = {
    "MSDSliceDataset": "msd",
    "MSDFileError": "msd",
    "ct_volume_transforms": "msd",
    "load_msd_volume": "msd",
    "read_msd_index": "msd",
    "DicomSeries": "dicom",
    "DicomSeriesError": "dicom",
    "DicomSeriesReader": "dicom",
    "read_dicom_series": "dicom",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fastdp.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fastdp.data' has no attribute {name!r}")
