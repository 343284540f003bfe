"""Procedural 2D axial abdominal CT phantom with liver masks.

The default data source of fastdp: no download, any size from 64 to 512, seeded and
deterministic, and fast enough to generate on the fly (batched, vectorised torch).

A slice is drawn in three steps:

1. **Anatomy** (per patient, independent of the scanner): a tissue label map painted from
   ellipses in a "standard patient" frame (mm, origin at the body centre, x to the image
   right = patient's left, y posterior), scaled by the patient's size and deformed by smooth
   random fields: body outline with subcutaneous fat, abdominal wall muscle, visceral fat and
   bowel, spine (vertebral body, canal, posterior elements), paraspinal muscles, ribs, aorta,
   IVC, liver (right and left lobe, sometimes with hypodense lesions, carved by the
   gallbladder and IVC), spleen, kidneys, stomach with a gas cap, bowel gas, and the table.
   Which organs appear and how large depends on the cranio-caudal slice level; below the
   liver the slice has no liver.
2. **Radiodensity**: each tissue gets a per-patient Hounsfield value in a realistic range
   (liver 51-69 HU, fat -110..-90, muscle 35-55, bone 400-1000, air -1000) plus a smooth
   texture.
3. **Scanner** (per site, see :class:`~fastdp.data.sites.ScannerProfile`): calibration
   gain and offset, Gaussian blur of the reconstruction kernel, correlated noise (its std
   falls with coarser pixels, as when a real scan is resized), then the
   paper's window: clip to [-150, 200] HU and scale to [0, 1].

Determinism: every random number of slice ``i`` comes from a generator seeded with
``(seed, site name, i)``, so a slice does not depend on which other slices are rendered
with it, in which order, or in which chunk. The anatomy of slice ``i`` does not depend on
the output size either (only its noise does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
import torch.nn.functional as F

from fastdp.data.sites import ScannerProfile, get_site

#: The paper's CT window (HU): values are clipped to it and scaled to [0, 1].
HU_WINDOW: tuple[float, float] = (-150.0, 200.0)
MIN_SIZE, MAX_SIZE = 64, 512


class Tissue(IntEnum):
    """Tissue classes of the phantom's label map (before the liver mask is derived)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    VISCERA = 3  # mesenteric fat and bowel wall, a textured mix of -110..+30 HU
    BONE = 4  # cancellous bone
    CORTEX = 5  # cortical bone
    LIVER = 6
    LESION = 7  # liver lesion: part of the liver mask, as MSD's merged labels
    SPLEEN = 8
    KIDNEY = 9
    VESSEL = 10
    GAS = 11
    FLUID = 12  # CSF, bile, stomach contents
    TABLE = 13


N_TISSUES = len(Tissue)

# Texture amplitude (HU per unit of the smooth texture field), per tissue.
_TEXTURE_HU = torch.zeros(N_TISSUES)
_TEXTURE_HU[Tissue.VISCERA] = 70.0
_TEXTURE_HU[Tissue.FAT] = 4.0
_TEXTURE_HU[Tissue.MUSCLE] = 3.0
_TEXTURE_HU[Tissue.LIVER] = 2.0
_TEXTURE_HU[Tissue.LESION] = 3.0
_TEXTURE_HU[Tissue.SPLEEN] = 2.0
_TEXTURE_HU[Tissue.KIDNEY] = 3.0
_TEXTURE_HU[Tissue.BONE] = 30.0

# Number of random numbers drawn per slice (a fixed layout keeps the stream stable).
_N_UNIFORM = 40
_N_NORMAL = 16
_COARSE = 6  # grid of the smooth shape-perturbation fields
_FINE = 14  # grid of the texture / bowel-gas fields
_CACHE_PIXELS = 1 << 20
_RIB_ANGLES_DEG = (-35.0, -8.0, 22.0, 55.0, 125.0, 158.0, 188.0, 215.0)


@dataclass
class PhantomSlices:
    """A batch of rendered slices.

    Attributes:
        image: [N, 1, H, W] float32 in [0, 1] (windowed to [-150, 200] HU and scaled).
        mask: [N, H, W] int64, 1 = liver (including lesions), 0 = background.
        hu: [N, H, W] float32 true radiodensity in HU before the scanner (no blur, no
            noise, no calibration), or None unless requested.
        observed_hu: [N, H, W] float32 HU as the site's scanner reports them (calibrated,
            blurred, noisy), before windowing, or None unless requested.
        tissue: [N, H, W] uint8 :class:`Tissue` labels, or None unless requested.
        level: [N] float32 cranio-caudal slice level in [0, 1] (0 = liver dome).
    """

    image: torch.Tensor
    mask: torch.Tensor
    level: torch.Tensor
    hu: torch.Tensor | None = None
    observed_hu: torch.Tensor | None = None
    tissue: torch.Tensor | None = None


def window_hu(hu: torch.Tensor, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """Clip HU to ``window`` and scale linearly to [0, 1] (the paper's preprocessing)."""
    lo, hi = window
    return ((hu.clamp(lo, hi) - lo) / (hi - lo)).to(torch.float32)


def _slice_random(profile: ScannerProfile, index: int, seed: int, size: int, noise: bool):
    """All random numbers of one slice, from a generator keyed by (seed, site, index)."""
    key = np.array([int(seed) & 0xFFFFFFFFFFFFFFFF, (profile.key << 32) | int(index)], dtype=np.uint64)
    rng = np.random.Generator(np.random.Philox(key=key))
    u = rng.random(_N_UNIFORM)
    g = rng.standard_normal(_N_NORMAL)
    coarse = rng.standard_normal((3, _COARSE, _COARSE))
    fine = rng.standard_normal((2, _FINE, _FINE))
    white = None
    if noise:
        # torch's vectorised normal sampler is about 3x faster than numpy's for an image.
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
        white = torch.randn(size, size, generator=gen)
    return u, g, coarse, fine, white


def _gauss_kernel1d(sigma_px: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma_px))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma_px) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [..., H, W] with replicate padding.

    Shifted multiply-adds rather than conv2d: with one channel and small kernels this is
    several times faster on CPU.
    """
    r = (k.numel() - 1) // 2
    w = [float(v) for v in k]
    h_, w_ = x.shape[-2:]
    xp = F.pad(x, (r, r, 0, 0), mode="replicate")
    out = xp[..., :, 0:w_] * w[0]
    for i in range(1, len(w)):
        out.add_(xp[..., :, i : i + w_], alpha=w[i])
    xp = F.pad(out, (0, 0, r, r), mode="replicate")
    out = xp[..., 0:h_, :] * w[0]
    for i in range(1, len(w)):
        out.add_(xp[..., i : i + h_, :], alpha=w[i])
    return out


def _smooth_basis(coords_mm: torch.Tensor, half_extent_mm: float, n_centres: int) -> torch.Tensor:
    """Gaussian bumps on a regular grid of centres, rows normalised to unit norm: [len, n]."""
    centres = torch.linspace(-half_extent_mm, half_extent_mm, n_centres)
    width = 2.0 * half_extent_mm / (n_centres - 1)
    phi = torch.exp(-0.5 * ((coords_mm.view(-1, 1) - centres.view(1, -1)) / (0.8 * width)) ** 2)
    return phi / phi.norm(dim=1, keepdim=True)


def _smooth_fields(weights: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Smooth random fields with unit variance per pixel: [N, C, g, g] weights -> [N, C, S, S]."""
    return basis @ weights @ basis.T


def _col(v: np.ndarray | float, n: int) -> torch.Tensor:
    """A per-slice parameter as an [N, 1, 1] float32 tensor."""
    return torch.as_tensor(np.broadcast_to(np.asarray(v, dtype=np.float32), (n,)).copy()).view(n, 1, 1)


# Paint order: a structure painted later has a higher code and wins (the label map keeps
# the maximum code, which is much faster on CPU than masked writes). Codes map to tissues.
_PAINT_ORDER: tuple[Tissue, ...] = (
    Tissue.AIR,  # 0
    Tissue.FAT,  # 1 body
    Tissue.MUSCLE,  # 2 abdominal wall
    Tissue.VISCERA,  # 3 cavity
    Tissue.MUSCLE,  # 4 back muscles, psoas
    Tissue.CORTEX,  # 5 vertebral body shell, lamina, spinous process, ribs
    Tissue.BONE,  # 6 vertebral body
    Tissue.FLUID,  # 7 spinal canal
    Tissue.KIDNEY,  # 8
    Tissue.SPLEEN,  # 9
    Tissue.FLUID,  # 10 stomach
    Tissue.GAS,  # 11 stomach gas
    Tissue.LIVER,  # 12
    Tissue.LESION,  # 13 (only painted on code 12)
    Tissue.FLUID,  # 14 gallbladder
    Tissue.VESSEL,  # 15 IVC, aorta
    Tissue.GAS,  # 16 bowel gas
    Tissue.TABLE,  # 17 (only outside the body)
)
_CODE_TO_TISSUE = torch.tensor([int(t) for t in _PAINT_ORDER], dtype=torch.uint8)
_C_FAT, _C_WALL, _C_CAVITY, _C_MUSCLE, _C_CORTEX, _C_BONE, _C_CANAL = 1, 2, 3, 4, 5, 6, 7
_C_KIDNEY, _C_SPLEEN, _C_STOMACH, _C_STOMACH_GAS = 8, 9, 10, 11
_C_LIVER, _C_LESION, _C_GALLBLADDER, _C_VESSEL, _C_GAS, _C_TABLE = 12, 13, 14, 15, 16, 17
assert _C_LESION == _C_LIVER + 1  # the liver mask is the code range [_C_LIVER, _C_LESION]


class _Painter:
    """Paints ellipses (in each slice's standard-patient frame) onto a code map, cropped.

    Every ellipse is evaluated only inside the union over the batch of its bounding boxes,
    so small structures cost little; that and max-painting keep the phantom fast.
    """

    def __init__(self, x, y, code, scale, centre_x, centre_y, spacing, fov):
        self.x, self.y, self.code = x, y, code  # [N,1,W], [N,H,1] std mm; [N,H,W] uint8
        self.n, self.size = code.shape[0], code.shape[-1]
        self.scale, self.cx, self.cy = scale, centre_x, centre_y  # [N] numpy: patient frame
        self.spacing, self.fov = spacing, fov

    def _pixel_range(self, centre_std, offset_mm, radius_std, on):
        lo = (offset_mm + self.scale * (centre_std - radius_std))[on]
        hi = (offset_mm + self.scale * (centre_std + radius_std))[on]
        to_px = lambda mm: (mm + 0.5 * self.fov) / self.spacing - 0.5  # noqa: E731
        a = int(np.clip(np.floor(to_px(lo.min())), 0, self.size))
        b = int(np.clip(np.ceil(to_px(hi.max())) + 1, 0, self.size))
        return a, b

    def ellipse(self, code, cx, cy, a, b, theta=None, on=True, pert=None, within=None):
        """Paint ``code`` where the ellipse (std-mm centre, semi-axes, angle rad) is inside.

        ``on``: bool per slice (absent slices draw nothing); ``pert``: (field [N,H,W], amount)
        added to the threshold 1 (bumps the outline); ``within``: bool [N,H,W] restriction.
        Returns (mask of the crop, (row slice, col slice)) or None if nothing was drawn.
        """
        n = self.n
        cx, cy, a, b = (np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for v in (cx, cy, a, b))
        a, b = np.maximum(a, 0.5), np.maximum(b, 0.5)
        on = np.broadcast_to(np.asarray(on, dtype=bool), (n,))
        if not on.any():
            return None
        amount = 0.0 if pert is None else pert[1]
        radius = np.maximum(a, b) * np.sqrt(1.0 + 3.0 * amount)  # fields are clamped to +-3
        r0, r1 = self._pixel_range(cy, self.cy, radius, on)
        c0, c1 = self._pixel_range(cx, self.cx, radius, on)
        if r1 <= r0 or c1 <= c0:
            return None
        rows, cols = slice(r0, r1), slice(c0, c1)
        dx = self.x[:, :, cols] - _col(cx, n)
        dy = self.y[:, rows, :] - _col(cy, n)
        if theta is None:
            q = (dx / _col(a, n)).square() + (dy / _col(b, n)).square()
        else:
            th = np.broadcast_to(np.asarray(theta, dtype=np.float64), (n,))
            c, s = np.cos(th), np.sin(th)
            ia2, ib2 = 1.0 / a**2, 1.0 / b**2
            qa = dx.square() * _col(c * c * ia2 + s * s * ib2, n)
            qc = dy.square() * _col(s * s * ia2 + c * c * ib2, n)
            q = torch.addcmul(qa + qc, dx * _col(2.0 * c * s * (ia2 - ib2), n), dy)
        thr = _col(np.where(on, 1.0, -1.0), n)
        if pert is not None:
            thr = thr + amount * pert[0][:, rows, cols]
        mask = q < thr
        if within is not None:
            mask &= within[:, rows, cols]
        self.paint(mask, code, rows, cols)
        return mask, (rows, cols)

    def paint(self, mask, code, rows=slice(None), cols=slice(None)):
        view = self.code[:, rows, cols]
        torch.maximum(view, mask.view(torch.uint8) * code, out=view)


def _bump(z: np.ndarray, lo: float, hi: float, power: float = 0.5) -> np.ndarray:
    """A size profile that is 0 outside [lo, hi] and peaks at 1 in the middle."""
    t = np.clip((z - lo) / (hi - lo), 0.0, 1.0)
    return np.sin(np.pi * t) ** power


@contextmanager
def _one_thread():
    """Run torch ops on one intra-op thread (restored after).

    The phantom's ops are many small, memory-bound tensors: extra threads only add
    synchronisation, and on a busy machine OpenMP barriers make 2 threads ~10x slower than 1.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def render_slices(
    site: str | ScannerProfile,
    indices: Sequence[int] | np.ndarray,
    size: int = 128,
    seed: int = 0,
    *,
    return_hu: bool = False,
) -> PhantomSlices:
    """Render phantom slices ``indices`` of ``site`` at ``size`` x ``size`` pixels.

    Args:
        site: a built-in site name or a :class:`ScannerProfile`.
        indices: slice (patient) indices; any non-negative integers.
        size: output height and width in pixels, 64..512.
        seed: global seed; (seed, site name, index) determines the slice.
        return_hu: also return true HU, observed HU and the tissue label map.

    Returns:
        :class:`PhantomSlices` with image [N, 1, size, size] in [0, 1] and mask [N, size, size].

    Rendering runs on one torch thread (restored afterwards): faster for these small ops.
    """
    profile = get_site(site)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    # Sub-batches of about 2**20 pixels keep the working arrays in cache (3x faster at 256).
    step = max(1, _CACHE_PIXELS // (int(size) * int(size)))
    with _one_thread(), torch.no_grad():
        if len(idx) <= step:
            return _render(profile, idx, size, seed, return_hu)
        parts = [_render(profile, idx[i : i + step], size, seed, return_hu) for i in range(0, len(idx), step)]
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(q, name) for q in parts])  # noqa: E731
    return PhantomSlices(**{f.name: cat(f.name) for f in dataclasses.fields(PhantomSlices)})


def _render(profile: ScannerProfile, indices, size: int, seed: int, return_hu: bool) -> PhantomSlices:
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    size = int(size)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << 32):
        raise ValueError("phantom slice indices must be in [0, 2**32)")
    n = int(idx.size)
    if n == 0:
        empty = torch.zeros(0, size, size)
        return PhantomSlices(
            image=empty.unsqueeze(1),
            mask=empty.long(),
            level=torch.zeros(0),
            hu=empty if return_hu else None,
            observed_hu=empty if return_hu else None,
            tissue=empty.to(torch.uint8) if return_hu else None,
        )

    with_noise = profile.noise_std_hu > 0
    draws = [_slice_random(profile, int(i), seed, size, with_noise) for i in idx]
    u = np.stack([d[0] for d in draws])  # [N, 40] uniform
    g = np.stack([d[1] for d in draws])  # [N, 16] standard normal

    # ---- patient and slice level -------------------------------------------------------
    lo, hi = profile.slice_range
    z = lo + (hi - lo) * u[:, 0]
    s = np.clip(profile.patient_scale_mean + profile.patient_scale_std * g[:, 0], 0.7, 1.35)
    body_a = 165.0 * (1.0 + 0.05 * np.clip(g[:, 1], -2.5, 2.5))
    body_b = 118.0 * (1.0 + 0.06 * np.clip(g[:, 2], -2.5, 2.5))
    body_x = 10.0 * np.clip(g[:, 3], -2.5, 2.5)  # body centre in the scanner frame, mm
    body_y = 12.0 + 6.0 * np.clip(g[:, 4], -2.5, 2.5)
    fat = np.clip(profile.fat_mm_mean * (1.0 + 0.3 * g[:, 5]), 4.0, 45.0)
    wall = np.clip(11.0 + 2.0 * g[:, 6], 6.0, 16.0)
    mean_axis = 0.5 * (body_a + body_b)
    r_wall = 1.0 - fat / mean_axis  # relative radius of the inner fat boundary
    r_cav = r_wall - wall / mean_axis  # relative radius of the abdominal cavity

    # Pixel centres in the scanner frame (mm), then in each slice's standard-patient frame.
    spacing = profile.fov_mm / size
    c = (torch.arange(size, dtype=torch.float32) + 0.5) * spacing - 0.5 * profile.fov_mm
    sc = _col(s, n)
    x = (c.view(1, 1, size) - _col(body_x, n)) / sc  # [N, 1, W]
    y = (c.view(1, size, 1) - _col(body_y, n)) / sc  # [N, H, 1]

    # Smooth random fields, defined in the patient frame so the anatomy does not depend on
    # the output size or the scanner's field of view. Clamped to +-3 (bounding boxes rely on it).
    coarse = torch.from_numpy(np.stack([d[2] for d in draws]).astype(np.float32))  # [N, 3, 6, 6]
    fine = torch.from_numpy(np.stack([d[3] for d in draws]).astype(np.float32))  # [N, 2, 12, 12]
    bx_c, by_c = (
        _smooth_basis(x.view(n, size), 200.0, _COARSE),
        _smooth_basis(y.view(n, size), 200.0, _COARSE),
    )
    bx_f, by_f = _smooth_basis(x.view(n, size), 200.0, _FINE), _smooth_basis(y.view(n, size), 200.0, _FINE)
    shape_field = (by_c.view(n, 1, size, -1) @ coarse @ bx_c.view(n, 1, size, -1).transpose(-1, -2)).clamp_(-3, 3)
    fine_field = (by_f.view(n, 1, size, -1) @ fine @ bx_f.view(n, 1, size, -1).transpose(-1, -2)).clamp_(-3, 3)
    body_pert, liver_pert, organ_pert = shape_field.unbind(1)
    texture, gas_field = fine_field.unbind(1)

    code = torch.zeros(n, size, size, dtype=torch.uint8)
    p = _Painter(x, y, code, s, body_x, body_y, spacing, profile.fov_mm)

    # ---- body, fat, wall, cavity ---------------------------------------------------------
    ya = y / _col(body_b, n)
    # The back is flattened by the table: an extra quartic term for y > 0.
    rb = (x / _col(body_a, n)).square() + (ya.square() + 0.35 * ya.clamp(min=0.0) ** 4)
    rb = torch.addcmul(rb, body_pert, torch.tensor(0.05))
    body = rb < 1.0
    cavity = rb < _col(r_cav**2, n)
    p.paint(body, _C_FAT)
    p.paint(rb < _col(r_wall**2, n), _C_WALL)
    p.paint(cavity, _C_CAVITY)

    # ---- back muscles, psoas, spine --------------------------------------------------------
    for side in (-1.0, 1.0):
        p.ellipse(_C_MUSCLE, side * 32.0, 84.0, 22.0, 19.0)
        psoas_r = 8.0 + 14.0 * np.clip((z - 0.5) / 0.5, 0.0, 1.0)
        p.ellipse(_C_MUSCLE, side * 36.0, 40.0, psoas_r, psoas_r * 1.1, on=z > 0.55)
    p.ellipse(_C_CORTEX, 0.0, 45.0, 18.0, 17.0)
    p.ellipse(_C_BONE, 0.0, 45.0, 15.5, 14.5)
    p.ellipse(_C_CORTEX, 0.0, 82.0, 17.0, 5.0)
    p.ellipse(_C_CORTEX, 0.0, 94.0, 4.5, 10.0)
    p.ellipse(_C_CANAL, 0.0, 70.0, 8.0, 8.0)

    # ---- ribs: small ovals in the muscle wall, fewer below the liver ------------------------
    r_mid = 0.5 * (r_wall + r_cav) + 0.01
    p_rib = np.clip(1.05 - 0.9 * z, 0.15, 1.0)
    jitter = (u[:, 24] - 0.5) * 0.15
    for k, ang in enumerate(_RIB_ANGLES_DEG):
        th = np.deg2rad(ang) + jitter
        p.ellipse(
            _C_CORTEX,
            body_a * r_mid * np.cos(th),
            body_b * r_mid * np.sin(th),
            6.5,
            5.0,
            on=u[:, 16 + k] < p_rib,
        )

    # ---- kidneys, spleen, stomach -----------------------------------------------------------
    fk = _bump(z, 0.4, 1.0) * (0.85 + 0.3 * u[:, 31])
    ky = 52.0 + 6.0 * (2.0 * u[:, 35] - 1.0)
    for side in (-1.0, 1.0):
        p.ellipse(
            _C_KIDNEY,
            side * 62.0,
            ky,
            24.0 * fk,
            36.0 * fk,
            -side * 0.4,
            fk > 0.15,
            (organ_pert, 0.15),
            cavity,
        )
    fsp = _bump(z, 0.0, 0.6) * (0.85 + 0.3 * u[:, 30])
    p.ellipse(
        _C_SPLEEN, 92.0 + 8.0 * (u[:, 34] - 0.5), 35.0 + 10.0 * (u[:, 34] - 0.5), 32.0 * fsp, 55.0 * fsp, 0.6,
        fsp > 0.15, (organ_pert, 0.15), cavity,
    )  # fmt: skip
    fst = _bump(z, 0.0, 0.45) * (0.7 + 0.6 * u[:, 32])
    st_cy, st_b = -30.0, np.maximum(32.0 * fst, 1.0)
    drawn = p.ellipse(_C_STOMACH, 55.0, st_cy, 42.0 * fst, st_b, 0.3, fst > 0.2, (organ_pert, 0.1), cavity)
    if drawn is not None:
        stomach, (rows, cols) = drawn
        p.paint(stomach & (y[:, rows, :] < _col(st_cy - 0.35 * st_b, n)), _C_STOMACH_GAS, rows, cols)

    # ---- liver --------------------------------------------------------------------------
    liver_scale = np.clip(1.0 + 0.1 * g[:, 7], 0.75, 1.3)
    z_end = np.clip(0.68 + 0.05 * g[:, 8], 0.55, 0.8)
    f_right = _bump(z, -0.15, z_end, power=0.6) * liver_scale
    f_left = np.clip(1.0 - z / (0.6 * z_end), 0.0, 1.0) ** 0.5 * liver_scale
    lx = -66.0 + 6.0 * np.clip(g[:, 9], -2.5, 2.5)
    ly = -2.0 + 6.0 * np.clip(g[:, 10], -2.5, 2.5)
    a1, b1 = 74.0 * f_right, 90.0 * f_right
    liver_on = (z < z_end) & (f_right > 0.12)
    lpert = (liver_pert, 0.25)
    p.ellipse(_C_LIVER, lx, ly, a1, b1, 0.35 + 0.15 * g[:, 11], liver_on, lpert, cavity)
    p.ellipse(
        _C_LIVER, lx + 62.0 * liver_scale, ly - 46.0 * liver_scale, 62.0 * f_left, 26.0 * f_left,
        -0.35 + 0.2 * (u[:, 1] - 0.5), liver_on & (f_left > 0.2), lpert, cavity,
    )  # fmt: skip
    # Lesions lie inside the liver; the gallbladder and IVC carve it (painted later, higher code).
    n_lesions = (u[:, 2] < profile.lesion_prob) * (1 + (u[:, 3] > 0.6) + (u[:, 3] > 0.9))
    liver_now = code == _C_LIVER
    for k in range(3):
        ox, oy, r = u[:, 4 + 3 * k], u[:, 5 + 3 * k], 4.0 + 16.0 * u[:, 6 + 3 * k]
        cx, cy = lx + 0.5 * a1 * (2 * ox - 1), ly + 0.5 * b1 * (2 * oy - 1)
        p.ellipse(_C_LESION, cx, cy, r, r, None, liver_on & (n_lesions > k), (organ_pert, 0.2), liver_now)
    gb_on = (u[:, 14] < 0.5) & (z > 0.4 * z_end) & (z < 0.9 * z_end)
    p.ellipse(
        _C_GALLBLADDER,
        lx + 30.0,
        ly - 35.0,
        11.0 + 6.0 * u[:, 15],
        16.0 + 8.0 * u[:, 15],
        None,
        gb_on,
        None,
        cavity,
    )
    p.ellipse(_C_VESSEL, -20.0, 22.0, 13.0, 9.0)
    p.ellipse(_C_VESSEL, 14.0, 26.0, 10.0 + 3.0 * u[:, 26], 10.0 + 3.0 * u[:, 26])

    # ---- bowel gas, outside the body, table -------------------------------------------------
    gas = (gas_field > _col(1.6 + 0.6 * u[:, 25], n)) & (code == _C_CAVITY) & (y < 40.0)
    p.paint(gas, _C_GAS)
    code.mul_(body)
    table_top = body_y + s * body_b * 0.98 + profile.table_gap_mm
    yy = c.view(1, size, 1)
    table = (yy > _col(table_top, n)) & (yy < _col(table_top + 9.0, n)) & (c.abs() < 0.42 * profile.fov_mm)
    p.paint(table & ~body, _C_TABLE)

    # ---- radiodensity ---------------------------------------------------------------------
    t_hu = np.empty((n, N_TISSUES), dtype=np.float32)  # HU per tissue per slice
    t_hu[:, Tissue.AIR] = -1000.0
    t_hu[:, Tissue.FAT] = -110.0 + 20.0 * u[:, 27]
    t_hu[:, Tissue.MUSCLE] = np.clip(45.0 + 4.0 * g[:, 15], 35.0, 55.0)
    t_hu[:, Tissue.VISCERA] = -45.0 + 20.0 * u[:, 33]
    t_hu[:, Tissue.BONE] = 400.0 + 150.0 * u[:, 28]
    t_hu[:, Tissue.CORTEX] = 700.0 + 300.0 * u[:, 29]
    t_hu[:, Tissue.LIVER] = np.clip(60.0 + 4.0 * g[:, 12], 53.0, 67.0)
    t_hu[:, Tissue.LESION] = 15.0 + 25.0 * u[:, 13]
    t_hu[:, Tissue.SPLEEN] = np.clip(47.0 + 3.0 * g[:, 13], 40.0, 54.0)
    t_hu[:, Tissue.KIDNEY] = np.clip(32.0 + 3.0 * g[:, 14], 25.0, 40.0)
    t_hu[:, Tissue.VESSEL] = 35.0 + 10.0 * u[:, 36]
    t_hu[:, Tissue.GAS] = -990.0
    t_hu[:, Tissue.FLUID] = 2.0 + 13.0 * u[:, 37]
    t_hu[:, Tissue.TABLE] = profile.table_hu
    order = _CODE_TO_TISSUE.long()
    code_hu = torch.from_numpy(t_hu)[:, order]  # [N, n_codes]
    code_tex = _TEXTURE_HU[order].expand(n, -1).contiguous()
    flat = code.view(n, -1).long()
    hu = torch.gather(code_hu, 1, flat).view(n, size, size)
    hu = torch.addcmul(hu, torch.gather(code_tex, 1, flat).view(n, size, size), texture.clamp(-1.6, 1.6))

    # ---- scanner ---------------------------------------------------------------------------
    obs = hu * profile.intensity_scale + profile.intensity_offset_hu
    blur_px = profile.blur_mm / spacing
    if blur_px > 0.25:
        obs = _blur(obs, _gauss_kernel1d(blur_px))
    if with_noise:
        white = torch.stack([d[4] for d in draws])
        corr_px = profile.noise_corr_mm / spacing
        if corr_px > 0.25:
            k = _gauss_kernel1d(corr_px)
            # A separable kernel k (x) k scales the std of white noise by sum(k^2).
            white = _blur(white, k).div_(float(k.square().sum()))
        obs = torch.add(obs, white, alpha=profile.noise_std_at(size))
    image = window_hu(obs).unsqueeze(1)
    mask = ((code - _C_LIVER) <= (_C_LESION - _C_LIVER)).long()  # uint8 wrap-around: one compare
    return PhantomSlices(
        image=image,
        mask=mask,
        level=torch.from_numpy(z.astype(np.float32)),
        hu=hu if return_hu else None,
        observed_hu=obs if return_hu else None,
        tissue=_CODE_TO_TISSUE[code.long()] if return_hu else None,
    )
