"""Loads the compiled core (fastdp._C) once and says whether each device has kernels."""

from __future__ import annotations

import functools
import warnings

import torch

_LOAD_ERROR: str | None = None
try:
    from fastdp import _C  # noqa: F401  (registers torch.ops.fastdp.*)
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _LOAD_ERROR = str(exc)
    warnings.warn(
        "fastdp's compiled core is not built (" + _LOAD_ERROR + "); using the pure-PyTorch reference "
        "ops, which are correct but slower. Build with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def compiled_available() -> bool:
    """True when fastdp._C loaded and registered its ops."""
    return _LOAD_ERROR is None


def compiled_error() -> str | None:
    """Why the compiled core did not load, or None."""
    return _LOAD_ERROR


def has_kernel(device: torch.device | str) -> bool:
    """True when the compiled core has kernels for tensors on `device`."""
    if _LOAD_ERROR is not None:
        return False
    return _has_kernel_for_type(torch.device(device).type)


@functools.cache
def _has_kernel_for_type(device_type: str) -> bool:
    # Cached: asked on every op call, and the registrations never change after import.
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastdp::per_sample_sq_norms", key)
