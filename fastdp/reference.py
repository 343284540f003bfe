"""Pure-PyTorch reference of every compiled op: the oracle in tests, the fallback without a build.

Written for clarity, not speed: per-parameter norms, an explicit clip-factor weighted sum and
a Philox4x32-10 generator in int64 tensor arithmetic that reproduces the compiled noise stream
(up to float rounding of the Box-Muller transform, which uses torch's own log/sin/cos here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a and uint32 values b stored in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi = b * a_hi  # < 2^48: no int64 overflow
    p_lo = b * a_lo
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    lo = mid & _MASK32
    hi = ((p_hi >> 16) + (mid >> 32)) & _MASK32
    return hi, lo


def philox4x32_10(blocks: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """Philox4x32-10 of counters {block_lo, block_hi, offset_lo, offset_hi}, key {seed_lo, seed_hi}.

    Args:
        blocks: int64 tensor [N] of block indices (>= 0).
    Returns:
        int64 tensor [N, 4] of uint32 outputs.
    """
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    c0 = blocks & _MASK32
    c1 = (blocks >> 32) & _MASK32
    c2 = torch.full_like(blocks, offset & _MASK32)
    c3 = torch.full_like(blocks, (offset >> 32) & _MASK32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=1)


def gaussian_noise(
    numel: int, seed: int, offset: int, first: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal draws z[first .. first+numel) of the (seed, offset) stream, float32 [numel]."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    idx = torch.arange(first, first + numel, dtype=torch.int64, device=device)
    blocks = idx >> 2
    lane = idx & 3
    r = philox4x32_10(blocks, seed, offset)  # [N, 4]
    pair = lane >> 1
    u1_bits = torch.gather(r, 1, (2 * pair).unsqueeze(1)).squeeze(1)
    u2_bits = torch.gather(r, 1, (2 * pair + 1).unsqueeze(1)).squeeze(1)
    u1 = ((u1_bits >> 8) + 1).double() / 16777216.0
    u2 = (u2_bits >> 8).double() / 16777216.0
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2
    z = torch.where((lane & 1) == 0, radius * torch.cos(angle), radius * torch.sin(angle))
    return z.float()


def _acc_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def per_sample_sq_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B] sum over tensors of each sample's squared L2 norm; grads[k] is [B, ...]."""
    if len(grads) == 0:
        raise ValueError("per_sample_sq_norms: needs at least one tensor")
    acc = _acc_dtype(grads)
    total = torch.zeros(grads[0].shape[0], dtype=acc, device=grads[0].device)
    for g in grads:
        total += g.to(acc).reshape(g.shape[0], g[0].numel() if g.shape[0] else 0).pow(2).sum(dim=1)
    return total


def clip_factors(sq_norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """[B] c_i = min(1, max_norm / (||g_i|| + 1e-6)), as Opacus's flat clipping."""
    return (max_norm / (sq_norms.double().sqrt() + 1e-6)).clamp(max=1.0)


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
    """out[k] = (sum_i c_i grads[k][i] + noise_std * z) * scale in place; returns c [B]."""
    acc = torch.float64 if (_acc_dtype(grads) == torch.float64 or sq_norms.dtype == torch.float64) else torch.float32
    coef = clip_factors(sq_norms, max_norm).to(acc)
    first = 0
    for g, o in zip(grads, out, strict=True):
        summed = torch.einsum("i,i...->...", coef, g.to(acc))
        if noise_std > 0:
            z = gaussian_noise(o.numel(), seed, offset, first, o.device).to(acc).reshape(o.shape)
            summed = summed + noise_std * z
        o.copy_(summed * scale)
        first += o.numel()
    return coef


def add_noise_scale_(grads: Sequence[torch.Tensor], noise_std: float, scale: float, seed: int, offset: int) -> None:
    """grads[k] = (grads[k] + noise_std * z) * scale in place."""
    first = 0
    for g in grads:
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        val = g.to(acc)
        if noise_std > 0:
            val = val + noise_std * gaussian_noise(g.numel(), seed, offset, first, g.device).to(acc).reshape(g.shape)
        g.copy_(val * scale)
        first += g.numel()
