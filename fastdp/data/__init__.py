"""CT data: a multi-site phantom (the built-in default), the MSD NIfTI loader and site splits.

``fastdp.data.msd`` needs nibabel (``pip install nibabel``); it is imported lazily.
"""

from fastdp.data.datasets import PhantomDataset, make_phantom_sites
from fastdp.data.phantom import HU_WINDOW, PhantomSlices, Tissue, render_slices, window_hu
from fastdp.data.sites import SITES, ScannerProfile, get_site, random_site_profile, site_profiles
from fastdp.data.splits import split_by_group, split_dirichlet, split_iid, split_quantity, subsets

__all__ = [
    "HU_WINDOW",
    "SITES",
    "PhantomDataset",
    "PhantomSlices",
    "ScannerProfile",
    "Tissue",
    "get_site",
    "make_phantom_sites",
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


def __getattr__(name: str):
    # MSD loader names resolve lazily so importing fastdp.data does not need nibabel.
    if name in {"MSDSliceDataset", "MSDFileError", "load_msd_volume", "read_msd_index"}:
        from fastdp.data import msd

        return getattr(msd, name)
    raise AttributeError(f"module 'fastdp.data' has no attribute {name!r}")
