"""MSD loader on a tiny Decathlon folder built with nibabel: preprocessing, cache, errors."""

import json

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from fastdp.data.msd import MSDFileError, MSDSliceDataset, load_msd_volume, read_msd_index  # noqa: E402


def _write_case(root, name, shape=(40, 32, 12), organ_slices=(4, 5, 6), seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.uniform(-1000, 1000, size=shape).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    for k in organ_slices:
        label[10:20, 8:16, k] = 1
        label[12:14, 10:12, k] = 2  # tumour: merged into the foreground
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
    return hu, label


@pytest.fixture
def msd_root(tmp_path):
    root = tmp_path / "Task03_Liver"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    vols = [_write_case(root, "liver_0", seed=0), _write_case(root, "liver_1", organ_slices=(8,), seed=1)]
    training = [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in range(2)]
    (root / "dataset.json").write_text(json.dumps({"name": "Liver", "training": training}))
    return root, vols


def test_reads_layout_and_preprocesses(msd_root):
    root, vols = msd_root
    ds = MSDSliceDataset(root, size=16)
    assert len(ds) == 24  # all axial slices of both cases
    assert ds.patient_ids.tolist() == [0] * 12 + [1] * 12
    x, y = ds[5]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y.shape == (16, 16) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(torch.unique(y).tolist()) == {0, 1}  # liver (1) and tumour (2) merged
    assert ds.has_organ.tolist() == [k in (4, 5, 6) for k in range(12)] + [k == 8 for k in range(12)]


def test_native_window_exact(msd_root):
    root, vols = msd_root
    hu, label = vols[0]
    # Square in-plane volume so the native size needs no resize.
    from fastdp.data.msd import preprocess_case

    imgs, masks, keep = preprocess_case(hu[:32].astype(np.float32), label[:32], size=32)
    ref = (np.clip(hu[:32][::-1, ::-1, :].transpose(2, 1, 0).astype(np.float32), -150, 200) + 150) / 350
    np.testing.assert_allclose(imgs.astype(np.float32), ref, atol=1e-3)
    assert masks.max() == 1 and keep.tolist() == list(range(12))


def test_near_organ_slices(msd_root):
    root, _ = msd_root
    ds = MSDSliceDataset(root, size=16, organ_margin=1)
    assert ds.slice_numbers.tolist() == [3, 4, 5, 6, 7, 7, 8, 9]
    assert ds.patient_ids.tolist() == [0] * 5 + [1] * 3


def test_cached_dataset_reads_no_nifti(msd_root, tmp_path, monkeypatch):
    root, _ = msd_root
    cache = tmp_path / "cache"
    a = MSDSliceDataset(root, size=16, cache_dir=cache)
    import fastdp.data.msd as msd

    def boom(*args, **kwargs):
        raise AssertionError("NIfTI was read although the cache was complete")

    monkeypatch.setattr(msd, "load_msd_volume", boom)
    b = MSDSliceDataset(root, size=16, cache_dir=cache)
    assert len(a) == len(b)
    for i in (0, 5, 17):
        torch.testing.assert_close(a[i][0], b[i][0])
        assert torch.equal(a[i][1], b[i][1])


def test_missing_files_are_named(msd_root):
    root, _ = msd_root
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="liver_1.nii.gz"):
        read_msd_index(root)
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        MSDSliceDataset(root / "nope")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_msd_volume(root / "missing.nii.gz")


def test_corrupt_files_are_named(msd_root):
    root, _ = msd_root
    bad = root / "imagesTr" / "liver_1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated gzip
    with pytest.raises(MSDFileError, match="liver_1.nii.gz"):
        MSDSliceDataset(root, size=16)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(MSDFileError, match="dataset.json"):
        read_msd_index(root)


def test_shape_mismatch_is_named(msd_root):
    root, _ = msd_root
    nib.save(nib.Nifti1Image(np.zeros((40, 32, 11), np.uint8), np.eye(4)), root / "labelsTr" / "liver_0.nii.gz")
    with pytest.raises(MSDFileError, match="liver_0"):
        MSDSliceDataset(root, size=16)


def test_monai_dict_pipeline_matches_the_loader(msd_root):
    from fastdp.data.msd import ct_volume_transforms

    root, vols = msd_root
    hu, label = vols[0]
    out = ct_volume_transforms()(
        {"image": str(root / "imagesTr/liver_0.nii.gz"), "label": str(root / "labelsTr/liver_0.nii.gz")}
    )
    assert tuple(out["image"].shape) == (1, *hu.shape)  # the fixture's affine is RAS already
    np.testing.assert_allclose(out["image"][0].numpy(), np.clip((hu.astype(np.float64) + 150) / 350, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(out["label"][0].numpy(), label)


def test_window_must_be_increasing(msd_root):
    root, _ = msd_root
    with pytest.raises(ValueError, match="high > low"):
        MSDSliceDataset(root, size=16, window=(200, -150))
