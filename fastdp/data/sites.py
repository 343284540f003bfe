"""Per-site scanner and population profiles for the CT phantom.

A site (hospital) differs from another in its scanner and its patients. Everything the phantom
generator lets vary between sites lives in one frozen dataclass, :class:`ScannerProfile`, so a
site is a value that can be printed, compared and stored next to results.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

#: Pixel spacing (mm) at which ScannerProfile.noise_std_hu is specified.
NOISE_REF_SPACING_MM = 0.8


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and patient population look.

    Attributes:
        name: site name; it also keys the random stream, so two profiles with the same name
            and seed produce the same patients (anatomy) seen through their own scanner.
        noise_std_hu: standard deviation of the image noise in HU at the reference pixel
            spacing ``NOISE_REF_SPACING_MM`` (a 512 x 512 reconstruction). Coarser output
            pixels average noise, so the std falls as ref / spacing, as when a real scan is
            resized (see :meth:`noise_std_at`).
        noise_corr_mm: Gaussian correlation length (sigma, mm) of the noise; soft kernels
            give blotchier noise.
        intensity_scale: calibration gain, ``HU_observed = scale * HU + offset``.
        intensity_offset_hu: calibration offset in HU.
        blur_mm: sigma (mm) of the Gaussian point-spread function of the reconstruction kernel.
        fov_mm: reconstructed field of view (mm, square); pixel spacing is ``fov_mm / size``.
        patient_scale_mean: mean patient size relative to a standard adult (1.0).
        patient_scale_std: spread of patient size.
        fat_mm_mean: mean subcutaneous fat thickness (mm) of the population.
        slice_range: range of cranio-caudal slice levels sampled, 0 = liver dome,
            1 = well below the liver; the liver is absent beyond about 0.7.
        lesion_prob: probability that a slice through the liver shows at least one lesion.
        table_hu: radiodensity of the patient table (carbon fibre is low, older tables high).
        table_gap_mm: gap between the patient's back and the table.
    """

    name: str
    noise_std_hu: float = 12.0
    noise_corr_mm: float = 0.8
    intensity_scale: float = 1.0
    intensity_offset_hu: float = 0.0
    blur_mm: float = 0.9
    fov_mm: float = 400.0
    patient_scale_mean: float = 1.0
    patient_scale_std: float = 0.07
    fat_mm_mean: float = 16.0
    slice_range: tuple[float, float] = (0.0, 0.95)
    lesion_prob: float = 0.25
    table_hu: float = -200.0
    table_gap_mm: float = 8.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ScannerProfile.name must be a non-empty string")
        if self.noise_std_hu < 0 or self.blur_mm < 0 or self.noise_corr_mm < 0:
            raise ValueError(f"site {self.name!r}: noise_std_hu, noise_corr_mm and blur_mm must be >= 0")
        if self.fov_mm <= 0 or self.intensity_scale <= 0 or self.patient_scale_mean <= 0:
            raise ValueError(f"site {self.name!r}: fov_mm, intensity_scale and patient_scale_mean must be > 0")
        lo, hi = self.slice_range
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"site {self.name!r}: slice_range must satisfy 0 <= lo < hi <= 1, got {self.slice_range}")
        if not 0.0 <= self.lesion_prob <= 1.0:
            raise ValueError(f"site {self.name!r}: lesion_prob must be in [0, 1]")

    @property
    def key(self) -> int:
        """A stable 32-bit integer derived from the name (feeds the random stream)."""
        return zlib.crc32(self.name.encode("utf-8"))

    def pixel_spacing(self, size: int) -> float:
        """Pixel spacing (mm) of a ``size`` x ``size`` image of this site."""
        return self.fov_mm / size

    def noise_std_at(self, size: int) -> float:
        """Noise std (HU) of one pixel of a ``size`` x ``size`` image of this site."""
        return self.noise_std_hu * min(1.0, NOISE_REF_SPACING_MM / self.pixel_spacing(size))

    def replace(self, **changes: object) -> ScannerProfile:
        """A copy with some fields changed (e.g. ``site.replace(noise_std_hu=0)``)."""
        return dataclasses.replace(self, **changes)


#: Built-in sites: three genuinely different scanners and populations.
SITES: dict[str, ScannerProfile] = {
    # A modern scanner: low noise, standard kernel, tight FOV, carbon-fibre table.
    "site_a": ScannerProfile(
        name="site_a",
        noise_std_hu=8.0,
        noise_corr_mm=0.7,
        blur_mm=0.7,
        fov_mm=380.0,
        patient_scale_mean=0.97,
        fat_mm_mean=14.0,
        slice_range=(0.0, 0.9),
        lesion_prob=0.3,
        table_hu=-250.0,
    ),
    # An older scanner: noisy, soft kernel, miscalibrated (+18 HU, gain 0.94), large FOV,
    # heavier patients, dense table; scans extend further below the liver.
    "site_b": ScannerProfile(
        name="site_b",
        noise_std_hu=22.0,
        noise_corr_mm=1.6,
        intensity_scale=0.94,
        intensity_offset_hu=18.0,
        blur_mm=1.6,
        fov_mm=460.0,
        patient_scale_mean=1.08,
        patient_scale_std=0.09,
        fat_mm_mean=24.0,
        slice_range=(0.05, 1.0),
        lesion_prob=0.2,
        table_hu=120.0,
        table_gap_mm=4.0,
    ),
    # A low-dose protocol with a sharp kernel: high, fine-grained noise, gain 1.06, -12 HU
    # offset, small patients, scans centred on the liver.
    "site_c": ScannerProfile(
        name="site_c",
        noise_std_hu=32.0,
        noise_corr_mm=0.5,
        intensity_scale=1.06,
        intensity_offset_hu=-12.0,
        blur_mm=0.5,
        fov_mm=350.0,
        patient_scale_mean=0.9,
        patient_scale_std=0.06,
        fat_mm_mean=10.0,
        slice_range=(0.0, 0.8),
        lesion_prob=0.4,
        table_hu=-60.0,
        table_gap_mm=12.0,
    ),
}


def get_site(site: str | ScannerProfile) -> ScannerProfile:
    """Resolve a site name (``"site_a"``, ``"site_b"``, ``"site_c"``) or pass a profile through."""
    if isinstance(site, ScannerProfile):
        return site
    try:
        return SITES[site]
    except KeyError:
        raise KeyError(f"unknown site {site!r}; built-in sites are {sorted(SITES)}") from None


def random_site_profile(index: int, seed: int = 0) -> ScannerProfile:
    """A random but plausible site profile, named ``site_<index>`` (deterministic in index, seed).

    Used when more sites are needed than the built-in ones. Ranges cover the built-in sites.
    """
    rng = np.random.default_rng([seed, 0x5173, index])
    u = rng.random(12)
    lo = 0.1 * u[9]
    return ScannerProfile(
        name=f"site_{index}",
        noise_std_hu=float(6.0 + 30.0 * u[0]),
        noise_corr_mm=float(0.5 + 1.2 * u[1]),
        intensity_scale=float(0.92 + 0.16 * u[2]),
        intensity_offset_hu=float(-20.0 + 40.0 * u[3]),
        blur_mm=float(0.5 + 1.2 * u[4]),
        fov_mm=float(340.0 + 130.0 * u[5]),
        patient_scale_mean=float(0.88 + 0.22 * u[6]),
        fat_mm_mean=float(8.0 + 20.0 * u[7]),
        slice_range=(float(lo), float(0.8 + 0.2 * u[8])),
        lesion_prob=float(0.1 + 0.35 * u[10]),
        table_hu=float(-300.0 + 450.0 * u[11]),
    )


def site_profiles(n_sites: int, seed: int = 0) -> list[ScannerProfile]:
    """``n_sites`` distinct profiles: the built-in ones first, then random ones."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    builtin = list(SITES.values())
    return builtin[:n_sites] + [random_site_profile(i, seed) for i in range(len(builtin), n_sites)]
