"""Phantom generator: determinism, value ranges, tissue HU, per-site scanner differences."""

import numpy as np
import pytest
import torch

from fastdp.data import SITES, PhantomDataset, ScannerProfile, Tissue, make_phantom_sites, render_slices


def test_shapes_dtypes_and_range():
    out = render_slices("site_a", range(6), 64, seed=1)
    assert out.image.shape == (6, 1, 64, 64) and out.image.dtype == torch.float32
    assert out.mask.shape == (6, 64, 64) and out.mask.dtype == torch.int64
    assert out.image.min() >= 0.0 and out.image.max() <= 1.0
    assert set(out.mask.unique().tolist()) <= {0, 1}
    assert out.hu is None and out.tissue is None


@pytest.mark.parametrize("size", [64, 96, 256, 512])
def test_sizes(size):
    out = render_slices("site_c", [3], size)
    assert out.image.shape == (1, 1, size, size)


def test_size_limits():
    with pytest.raises(ValueError, match="size"):
        render_slices("site_a", [0], 32)
    with pytest.raises(ValueError, match="size"):
        render_slices("site_a", [0], 513)


def test_deterministic_regardless_of_order_and_batch():
    a = render_slices("site_b", [5, 6, 7, 8], 64, seed=3)
    b = render_slices("site_b", [8, 7], 64, seed=3)
    c = render_slices("site_b", [6], 64, seed=3)
    torch.testing.assert_close(a.image[3], b.image[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.image[2], b.image[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.image[1], c.image[0], rtol=0, atol=1e-6)
    assert torch.equal(a.mask[1], c.mask[0])
    d = render_slices("site_b", [5], 64, seed=4)
    assert not torch.equal(a.image[0], d.image[0])


def test_dataset_items_match_rendering_and_access_order():
    ds = PhantomDataset("site_a", n=20, size=64, seed=2, start=100, chunk=8)
    x13, y13 = ds[13]
    x2, _ = ds[2]
    ref = render_slices("site_a", [113, 102], 64, seed=2)
    assert x13.shape == (1, 64, 64) and y13.shape == (64, 64) and y13.dtype == torch.int64
    torch.testing.assert_close(x13, ref.image[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(x2, ref.image[1], rtol=0, atol=1e-6)
    assert torch.equal(y13, ref.mask[0])
    uncached = PhantomDataset("site_a", n=20, size=64, seed=2, start=100, cache=False)
    torch.testing.assert_close(uncached[13][0], x13, rtol=0, atol=1e-6)
    imgs, masks = ds.tensors()
    assert imgs.shape == (20, 1, 64, 64) and masks.shape == (20, 64, 64)
    with pytest.raises(IndexError):
        ds[20]


def test_dataset_works_with_dataloader():
    ds = PhantomDataset("site_c", n=10, size=64)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)))
    assert x.shape == (4, 1, 64, 64) and y.shape == (4, 64, 64)


def test_tissue_hu_ranges_before_windowing():
    out = render_slices("site_a", range(48), 128, seed=0, return_hu=True)
    hu, tissue = out.hu, out.tissue

    def median(t):
        sel = hu[tissue == int(t)]
        assert sel.numel() > 0, f"no {t.name} pixels"
        return sel.median().item()

    assert 50 <= median(Tissue.LIVER) <= 70
    assert -115 <= median(Tissue.FAT) <= -85
    assert 30 <= median(Tissue.MUSCLE) <= 60
    assert 40 <= median(Tissue.SPLEEN) <= 55
    assert median(Tissue.BONE) >= 400 and median(Tissue.CORTEX) >= 600
    assert hu[tissue == int(Tissue.AIR)].eq(-1000).all()
    assert median(Tissue.GAS) < -900
    # The liver mask is exactly liver + lesion tissue.
    assert torch.equal(out.mask.bool(), (tissue == int(Tissue.LIVER)) | (tissue == int(Tissue.LESION)))


def test_anatomy_varies_and_liver_sometimes_absent():
    out = render_slices("site_b", range(64), 64, seed=0)
    area = out.mask.flatten(1).sum(1).float()
    assert (area == 0).any(), "some slices should be below the liver"
    present = area[area > 0]
    assert present.std() / present.mean() > 0.2, "liver size should vary"
    assert out.level.min() >= 0 and out.level.max() <= 1


def _background_noise_std(site):
    """Noise std (HU) measured in the air outside the body, where the true HU is constant."""
    out = render_slices(site, range(8), 128, seed=0, return_hu=True)
    air = out.tissue == int(Tissue.AIR)
    # Stay away from edges of the body (blur) by eroding the air mask with a 5x5 min filter.
    eroded = -torch.nn.functional.max_pool2d(-air.float().unsqueeze(1), 5, 1, 2).squeeze(1) > 0.5
    return out.observed_hu[eroded].std().item()


def test_sites_have_distinct_scanners():
    stds = {name: _background_noise_std(name) for name in SITES}
    for name, std in stds.items():
        expected = SITES[name].noise_std_at(128)
        assert abs(std - expected) < 0.25 * expected, (name, std, expected)
    assert SITES["site_c"].noise_std_at(512) == SITES["site_c"].noise_std_hu  # 0.68 mm pixels: full noise
    assert stds["site_a"] < stds["site_b"] < stds["site_c"]
    # Calibration: a noiseless, unblurred profile reproduces scale * HU + offset exactly.
    clean = SITES["site_b"].replace(noise_std_hu=0.0, blur_mm=0.0)
    out = render_slices(clean, range(4), 64, return_hu=True)
    torch.testing.assert_close(out.observed_hu, out.hu * clean.intensity_scale + clean.intensity_offset_hu)
    # Same patient (index), different scanners: same anatomy seen differently.
    a = render_slices("site_a", [0], 64)
    b = render_slices(SITES["site_a"].replace(noise_std_hu=30.0, intensity_offset_hu=20.0), [0], 64)
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.image, b.image)


def test_profiles_validate_and_extra_sites():
    with pytest.raises(ValueError):
        ScannerProfile(name="x", noise_std_hu=-1)
    with pytest.raises(ValueError):
        ScannerProfile(name="x", slice_range=(0.5, 0.2))
    with pytest.raises(KeyError, match="site_a"):
        render_slices("no_such_site", [0], 64)
    sites = make_phantom_sites(5, [3, 4, 5, 6, 7], size=64, seed=1)
    assert [len(s) for s in sites] == [3, 4, 5, 6, 7]
    assert len({s.site for s in sites}) == 5
    assert len({s.profile for s in sites}) == 5
    assert np.isfinite(sites[4][0][0].numpy()).all()


def test_empty_request():
    out = render_slices("site_a", [], 64)
    assert out.image.shape == (0, 1, 64, 64) and out.mask.shape == (0, 64, 64)


def test_works_with_dp_poisson_loader():
    from fastdp.engine import DPDataLoader

    ds = PhantomDataset("site_a", n=40, size=64)
    loader = DPDataLoader(ds, sample_rate=0.03, steps=40, generator=torch.Generator().manual_seed(0))
    sizes = []
    for x, y in loader:
        assert x.shape[1:] == (1, 64, 64) and y.shape[1:] == (64, 64) and y.dtype == torch.int64
        sizes.append(len(x))
    assert 0 in sizes and max(sizes) > 0  # Poisson batches vary in size, empty ones keep their shape
