"""Typed entry points to fastdp's compiled ops (torch.ops.fastdp.*).

Each function runs the compiled kernel for its device when the core is built and falls back to
the pure-PyTorch reference (fastdp.reference) otherwise. All ops take lists of tensors: every
parameter of a model in one call.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from fastdp import _core
from fastdp import reference as _ref

_warned_devices: set[str] = set()


def _use_compiled(device: torch.device) -> bool:
    if _core.has_kernel(device):
        return True
    key = device.type
    if key not in _warned_devices and _core.compiled_available():
        _warned_devices.add(key)
        warnings.warn(
            f"fastdp's compiled core has no kernels for {key} tensors (built without CUDA?); "
            "using the pure-PyTorch reference ops.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _device_of(tensors: Sequence[torch.Tensor], fallback: torch.Tensor | None = None) -> torch.device:
    if len(tensors) > 0:
        return tensors[0].device
    if fallback is not None:
        return fallback.device
    return torch.device("cpu")


def per_sample_sq_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample squared L2 norms over a list of per-sample gradients.

    Args:
        grads: tensors [B, ...] (any float dtype, one device), e.g. one per parameter.
    Returns:
        [B] sum over k of ||grads[k][i]||^2, float32 (float64 if any input is float64).
    """
    grads = list(grads)
    if len(grads) == 0:
        raise ValueError("per_sample_sq_norms: needs at least one tensor (got an empty list)")
    if _use_compiled(_device_of(grads)):
        return torch.ops.fastdp.per_sample_sq_norms(grads)
    return _ref.per_sample_sq_norms(grads)


def clip_accumulate_noise(
    grads: Sequence[torch.Tensor],
    sq_norms: torch.Tensor,
    out: Sequence[torch.Tensor],
    max_norm: float,
    noise_std: float,
    scale: float,
    seed: int,
    offset: int,
) -> torch.Tensor:
    """Fused per-sample clipping, summation and Gaussian noise, written into `out`.

    c_i = min(1, max_norm / (sqrt(sq_norms[i]) + 1e-6));
    out[k] = (sum_i c_i * grads[k][i] + noise_std * z_k) * scale,
    z ~ N(0, 1) drawn from Philox(seed, offset) at each element's index in the concatenation of
    `out` (so CPU and GPU draw the same noise).

    Args:
        grads: per-sample gradients, grads[k] is [B, *shape_k]. B may be 0 (noise only).
        sq_norms: [B] squared per-sample norms over ALL parameters (not only these tensors).
        out: preallocated contiguous tensors, out[k] of shape shape_k (e.g. p.grad).
        max_norm: clipping bound C (> 0).
        noise_std: standard deviation of the added noise (sigma * C), >= 0.
        scale: final multiplier (1 / expected batch size for DP-SGD).
        seed, offset: noise stream; see fastdp.noise.NoiseSource.
    Returns:
        [B] clip factors c (float32, or float64 for float64 inputs).
    """
    grads, out = list(grads), list(out)
    if _use_compiled(sq_norms.device):
        return torch.ops.fastdp.clip_accumulate_noise(
            grads, sq_norms, out, float(max_norm), float(noise_std), float(scale), int(seed), int(offset)
        )
    return _ref.clip_accumulate_noise(grads, sq_norms, out, max_norm, noise_std, scale, seed, offset)


def add_noise_scale_(grads: Sequence[torch.Tensor], noise_std: float, scale: float, seed: int, offset: int) -> None:
    """In place: grads[k] = (grads[k] + noise_std * z_k) * scale, z ~ N(0, 1) from Philox(seed, offset).

    For gradients whose clipped sum was formed elsewhere (e.g. a weight-gradient computation on
    clip-scaled output gradients).
    """
    grads = list(grads)
    if _use_compiled(_device_of(grads)):
        torch.ops.fastdp.add_noise_scale_(grads, float(noise_std), float(scale), int(seed), int(offset))
        return
    _ref.add_noise_scale_(grads, noise_std, scale, seed, offset)


if _core.compiled_available():

    @torch.library.register_fake("fastdp::per_sample_sq_norms")
    def _per_sample_sq_norms_fake(grads):
        torch._check(len(grads) > 0, lambda: "per_sample_sq_norms: needs at least one tensor")
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        return grads[0].new_empty((grads[0].shape[0],), dtype=dtype)

    @torch.library.register_fake("fastdp::clip_accumulate_noise")
    def _clip_accumulate_noise_fake(grads, sq_norms, out, max_norm, noise_std, scale, seed, offset):
        dtype = (
            torch.float64
            if sq_norms.dtype == torch.float64 or any(g.dtype == torch.float64 for g in grads)
            else torch.float32
        )
        return sq_norms.new_empty(sq_norms.shape, dtype=dtype)

    @torch.library.register_fake("fastdp::add_noise_scale_")
    def _add_noise_scale_fake(grads, noise_std, scale, seed, offset):
        return None
