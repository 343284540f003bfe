"""DICOM CT series: a series written here with pydicom (16x16 slices, known HU, slope/intercept,
files and InstanceNumbers out of position order) read to HU, ordered by ImagePositionPatient,
and windowed by the MSD loader like a NIfTI volume."""

import json

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from fastdp.data.dicom import DicomSeriesError, DicomSeriesReader, read_dicom_series  # noqa: E402
from fastdp.data.msd import MSDFileError, MSDSliceDataset, ct_volume_transforms, load_msd_volume  # noqa: E402

N_SLICES, SIZE = 4, 16
SLOPE, INTERCEPT = 2.0, -1024.0
SPACING = (0.7, 0.8)  # PixelSpacing: between rows, between columns (different, to catch a swapped axis)
ORIGIN = (-100.0, -120.0)  # ImagePositionPatient x, y (LPS)
Z0, DZ = -50.0, 2.5


def hu_slice(k: int) -> np.ndarray:
    """Known HU of slice k (k = 0 is the lowest, most inferior): [rows, columns], even values.

    A ramp along the columns from below the window (-300) to above it, an offset per slice,
    and one bright marker at row 2, column 5 that shows the in-plane orientation.
    """
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    hu = -300 + 40 * cols + 100 * k + 0 * rows
    hu[2, 5] = 1000
    return hu.astype(np.int64)


def write_slice(path, hu, *, z, series_uid, instance, modality="CT", position=True):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    if position:
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(SPACING)
    ds.SliceThickness = DZ
    ds.RescaleSlope = SLOPE
    ds.RescaleIntercept = INTERCEPT
    ds.RescaleType = "HU"
    stored = ((hu - INTERCEPT) / SLOPE).astype(np.uint16)  # HU = SLOPE * stored + INTERCEPT
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=16)
    ds.save_as(path, enforce_file_format=True)


def write_series(directory, series_uid="1.2.3.4.5", n=N_SLICES, z=None, **kw):
    """Files named and numbered against the position order: neither may be what orders the slices."""
    directory.mkdir(parents=True, exist_ok=True)
    z = [Z0 + DZ * k for k in range(n)] if z is None else z
    order = (2, 0, 3, 1) if n == N_SLICES else range(n)
    for k in order:
        name = f"IM{(7 * k + 3) % 10:04d}.dcm"
        write_slice(directory / name, hu_slice(k), z=z[k], series_uid=series_uid, instance=n - k, **kw)
    (directory / "README.txt").write_text("not a DICOM file: skipped")
    return directory


def expected_affine() -> np.ndarray:
    """RAS affine of the [column, row, slice] volume: LPS x and y change sign."""
    return np.array(
        [
            [-SPACING[1], 0, 0, -ORIGIN[0]],
            [0, -SPACING[0], 0, -ORIGIN[1]],
            [0, 0, DZ, Z0],
            [0, 0, 0, 1],
        ]
    )


def organ_mask(k: int) -> np.ndarray:
    """[rows, columns] label of slice k: liver (1) with a tumour (2) in slices 1 and 2."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    if k in (1, 2):
        m[3:9, 4:11] = 1
        m[5, 6] = 2
    return m


@pytest.fixture
def dicom_task(tmp_path):
    """An MSD-like task: imagesTr/case_0/ is a DICOM series, labelsTr/case_0.nii.gz its NIfTI label."""
    root = tmp_path / "Task03_Liver"
    write_series(root / "imagesTr" / "case_0")
    (root / "labelsTr").mkdir()
    label = np.stack([organ_mask(k).T for k in range(N_SLICES)], axis=-1)  # [columns, rows, slices]
    nib.save(nib.Nifti1Image(label, expected_affine()), root / "labelsTr" / "case_0.nii.gz")
    training = [{"image": "./imagesTr/case_0", "label": "./labelsTr/case_0.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps({"name": "Liver", "training": training}))
    return root


def window(hu):
    return np.clip((np.asarray(hu, np.float64) + 150) / 350, 0, 1)


def test_series_is_read_in_position_order_with_hu(tmp_path):
    series = read_dicom_series(write_series(tmp_path / "s"))
    assert series.volume.shape == (SIZE, SIZE, N_SLICES) and series.volume.dtype == np.float32
    for k in range(N_SLICES):  # slope and intercept applied, slice k where its position puts it
        np.testing.assert_array_equal(series.volume[:, :, k], hu_slice(k).T)
    np.testing.assert_allclose(series.affine, expected_affine(), atol=1e-9)
    assert [int(pydicom.dcmread(f).InstanceNumber) for f in series.files] == [4, 3, 2, 1]


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI 1.6, registering its default readers
def test_monai_load_image_reads_a_series_directory(tmp_path):
    from monai.transforms import LoadImage

    directory = write_series(tmp_path / "s")
    img = LoadImage(reader=DicomSeriesReader(), image_only=True, ensure_channel_first=True)(directory)
    assert tuple(img.shape) == (1, SIZE, SIZE, N_SLICES)
    np.testing.assert_array_equal(img[0, :, :, 1].numpy(), hu_slice(1).T)
    np.testing.assert_allclose(img.affine.numpy(), expected_affine(), atol=1e-9)


def test_msd_loader_windows_dicom_slices_in_order(dicom_task):
    ds = MSDSliceDataset(dicom_task, size=SIZE)
    assert len(ds) == N_SLICES and ds.slice_numbers.tolist() == list(range(N_SLICES))
    for k in range(N_SLICES):
        x, y = ds[k]
        assert x.shape == (1, SIZE, SIZE) and y.shape == (SIZE, SIZE)
        # radiological display of a standard axial series is the stored pixel grid itself
        np.testing.assert_allclose(x[0].numpy(), window(hu_slice(k)), atol=1e-3)
        np.testing.assert_array_equal(y.numpy(), organ_mask(k) > 0)
    assert float(ds[0][0][0, 2, 5]) == 1.0  # the marker (1000 HU) is clipped to the window top
    assert float(ds[0][0][0, 0, 0]) == 0.0 and float(ds[3][0][0, 0, 15]) == 1.0
    assert ds.has_organ.tolist() == [False, True, True, False]


def test_resized_dicom_slices_stay_in_the_window(dicom_task):
    ds = MSDSliceDataset(dicom_task, size=8, organ_margin=0)
    assert ds.slice_numbers.tolist() == [1, 2]
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(torch.unique(y).tolist()) == {0, 1}


def test_monai_dict_pipeline_matches_the_loader(dicom_task):
    case = {"image": str(dicom_task / "imagesTr" / "case_0"), "label": str(dicom_task / "labelsTr" / "case_0.nii.gz")}
    out = ct_volume_transforms()(case)
    hu = load_msd_volume(case["image"], modality="CT")
    assert tuple(out["image"].shape) == (1, *hu.shape)
    np.testing.assert_allclose(out["image"][0].numpy(), window(hu), atol=1e-6)
    np.testing.assert_array_equal(out["label"][0].numpy(), load_msd_volume(case["label"]))


def test_cache_notices_a_changed_slice(dicom_task, tmp_path):
    cache = tmp_path / "cache"
    before = MSDSliceDataset(dicom_task, size=SIZE, cache_dir=cache)[0][0]
    series = dicom_task / "imagesTr" / "case_0"
    lowest = read_dicom_series(series).files[0]
    write_slice(lowest, hu_slice(0) + 200, z=Z0, series_uid="1.2.3.4.5", instance=4)
    after = MSDSliceDataset(dicom_task, size=SIZE, cache_dir=cache)[0][0]
    np.testing.assert_allclose(after[0].numpy(), window(hu_slice(0) + 200), atol=1e-3)
    assert not torch.equal(before, after)


def test_label_on_another_grid_is_refused(dicom_task):
    flipped = np.diag([SPACING[1], -SPACING[0], DZ, 1.0])  # a label written without the LPS -> RAS flip of x
    label = nib.load(dicom_task / "labelsTr" / "case_0.nii.gz").get_fdata().astype(np.uint8)
    nib.save(nib.Nifti1Image(label, flipped), dicom_task / "labelsTr" / "case_0.nii.gz")
    with pytest.raises(MSDFileError, match="voxel grid"):
        MSDSliceDataset(dicom_task, size=SIZE)


def test_bad_series_are_named(tmp_path):
    two = write_series(tmp_path / "two", series_uid="1.2.3.4.5")
    write_slice(two / "other.dcm", hu_slice(0), z=Z0 + 100, series_uid="1.2.3.4.6", instance=1)
    with pytest.raises(DicomSeriesError, match="2 series"):
        read_dicom_series(two)
    mr = write_series(tmp_path / "mr", modality="MR")
    with pytest.raises(DicomSeriesError, match="Modality 'MR'"):
        read_dicom_series(mr)
    assert read_dicom_series(mr, modality=None).volume.shape == (SIZE, SIZE, N_SLICES)
    same = write_series(tmp_path / "same", n=2, z=[Z0, Z0])
    with pytest.raises(DicomSeriesError, match="same position"):
        read_dicom_series(same)
    nopos = write_series(tmp_path / "nopos", n=2, position=False)
    with pytest.raises(DicomSeriesError, match="ImagePositionPatient"):
        read_dicom_series(nopos)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DicomSeriesError, match="no DICOM image files"):
        read_dicom_series(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_dicom_series(tmp_path / "missing")


def test_uneven_spacing_warns(tmp_path):
    uneven = write_series(tmp_path / "uneven", n=3, z=[Z0, Z0 + DZ, Z0 + 4 * DZ])
    with pytest.warns(UserWarning, match="spacing varies"):
        series = read_dicom_series(uneven)
    assert [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in series.files] == [Z0, Z0 + DZ, Z0 + 4 * DZ]


def test_msd_loader_names_a_bad_series(dicom_task):
    series = dicom_task / "imagesTr" / "case_0"
    write_slice(series / "scout.dcm", hu_slice(0), z=Z0 + 1, series_uid="9.9.9", instance=99)
    with pytest.raises(MSDFileError, match="case_0"):
        MSDSliceDataset(dicom_task, size=SIZE)


def test_monai_pipeline_does_not_fall_back_to_another_reader(tmp_path):
    # MONAI's LoadImage tries its other readers when the chosen one fails to read; its PydicomReader
    # would read this directory (two series mixed) in InstanceNumber order without a word.
    two = write_series(tmp_path / "two", series_uid="1.2.3.4.5")
    write_slice(two / "other.dcm", hu_slice(0), z=Z0 + 100, series_uid="1.2.3.4.6", instance=1)
    with pytest.raises(Exception) as info:
        ct_volume_transforms(keys=("image", None))({"image": str(two)})
    cause = info.value
    while cause.__cause__ is not None:  # MONAI's Compose wraps the error in its own RuntimeError
        cause = cause.__cause__
    assert isinstance(cause, DicomSeriesError) and "2 series" in str(cause)
