"""DICOM series reader: NIfTI -> DICOM series -> volume round trips, pydicom's own files, bad folders."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.spatial.transform import Rotation

from dataloaders.dicom import LPS_TO_RAS, is_dicom_path, read_dicom_series
from util.errors import UserError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SHAPE = (12, 10, 7)                                   # X != Y != Z: a transposed axis shows


def affine_of(rotation=(0.0, 0.0, 0.0), spacing=(0.7, 0.8, 2.5), origin=(-40.0, 25.0, 110.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", rotation, degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def ds_text(values) -> list[str]:
    return [f"{v:.10g}" for v in values]               # DS values hold at most 16 characters


def write_series(folder: Path, volume: np.ndarray, affine: np.ndarray, slope: float = 1.0,
                 intercept: float = 0.0, series_uid: str | None = None, description: str = "axial",
                 order=None, prefix: str = "IM") -> list[Path]:
    """Write a volume X x Y x Z (RAS affine) as a CT series, slice k to the file sorted at order[k], stored
    values (volume - intercept) / slope as int16."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :2], axis=0)                 # along X (a row), along Y (a column)
    directions = lps[:3, :2] / spacing
    series_uid = series_uid or generate_uid()
    order = range(volume.shape[2]) if order is None else order
    paths = []
    for k, position in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "CT", series_uid, description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = ds_text(lps[:3, 3] + k * lps[:3, 2])
        ds.ImageOrientationPatient = ds_text(directions.T.ravel())
        ds.PixelSpacing = ds_text([spacing[1], spacing[0]])           # between rows, between columns
        ds.SliceThickness = ds_text([np.linalg.norm(lps[:3, 2])])[0]
        ds.RescaleSlope, ds.RescaleIntercept = ds_text([slope])[0], ds_text([intercept])[0]
        stored = np.round((volume[:, :, k].T - intercept) / slope).astype(np.int16)   # rows (Y) x columns (X)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = stored.tobytes()
        paths.append(folder / f"{prefix}{position:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for tag, value in tags.items():
        if value is None:
            delattr(ds, tag)
        else:
            setattr(ds, tag, value)
    ds.save_as(path, enforce_file_format=True)


def ct_volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 3000, SHAPE).astype(np.int16)


@pytest.mark.parametrize("rotation, shuffled", [((0, 0, 0), False), ((0, 0, 0), True),
                                                ((20, -35, 50), False), ((20, -35, 50), True)])
def test_round_trip_same_voxels_and_geometry(tmp_path, rotation, shuffled):
    volume, affine = ct_volume(), affine_of(rotation)
    order = np.random.default_rng(1).permutation(SHAPE[2]) if shuffled else None
    write_series(tmp_path / "series", volume, affine, intercept=-1024.0, order=order)
    read, read_affine = read_dicom_series(tmp_path / "series")
    assert read.dtype == np.int16 and np.array_equal(read, volume)
    np.testing.assert_allclose(read_affine, affine, atol=1e-4)
    image = nib.Nifti1Image(read, read_affine)
    assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(affine)


def test_round_trip_left_handed_affine_reads_slices_along_the_normal(tmp_path):
    affine = affine_of() @ np.diag([-1.0, 1.0, 1.0, 1.0])       # LAS storage: slice axis against the normal
    volume = ct_volume()
    write_series(tmp_path, volume, affine)
    read, read_affine = read_dicom_series(tmp_path)
    flip_z = np.eye(4)
    flip_z[2, 2], flip_z[2, 3] = -1.0, SHAPE[2] - 1
    assert np.array_equal(read, volume[:, :, ::-1])             # the same image in world space
    np.testing.assert_allclose(read_affine, affine @ flip_z, atol=1e-4)


def test_non_integral_rescale_gives_float32(tmp_path):
    volume = ct_volume().astype(np.float64) * 0.5
    write_series(tmp_path, volume, affine_of((5, 0, 0)), slope=0.5, intercept=-1024.0)
    read, _ = read_dicom_series(tmp_path)
    assert read.dtype == np.float32 and np.array_equal(read, volume.astype(np.float32))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_test_file_reads_as_one_slice(tmp_path, name):
    source = PYDICOM_FILES / name
    if not source.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom install ({PYDICOM_FILES})")
    ds = pydicom.dcmread(get_testdata_file(name))
    shutil.copy(source, tmp_path / name)
    for path in (tmp_path, tmp_path / name):
        volume, affine = read_dicom_series(path)
        assert volume.shape == (ds.Columns, ds.Rows, 1)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        np.testing.assert_allclose(spacing, [*map(float, ds.PixelSpacing[::-1]), float(ds.SliceThickness)])
        np.testing.assert_allclose(affine[:3, 3], np.array([-1, -1, 1]) * np.array(ds.ImagePositionPatient,
                                                                                  dtype=float))
        expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        assert np.array_equal(volume[:, :, 0], expected.T)
    assert is_dicom_path(tmp_path) and is_dicom_path(tmp_path / name)


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_geometry_agrees_with_nibabels_dicom_wrapper(tmp_path):
    """An independent reading of one oblique slice: nibabel's array is rows x columns, ours its transpose."""
    from nibabel.nicom.dicomwrappers import wrapper_from_data
    paths = write_series(tmp_path, ct_volume(), affine_of((20, -35, 50)))
    volume, affine = read_dicom_series(tmp_path)
    wrapper = wrapper_from_data(pydicom.dcmread(paths[0]))
    assert np.array_equal(wrapper.get_data().T, volume[:, :, 0])
    np.testing.assert_allclose((LPS_TO_RAS @ wrapper.affine)[:, [1, 0, 3]], affine[:, [0, 1, 3]], atol=1e-4)


def test_is_dicom_path(tmp_path):
    write_series(tmp_path / "series", ct_volume(), affine_of())
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("no DICOM here")
    nib.save(nib.Nifti1Image(ct_volume(), affine_of()), str(tmp_path / "scan.nii.gz"))
    assert is_dicom_path(tmp_path / "series") and is_dicom_path(tmp_path / "series" / "IM0000.dcm")
    assert not is_dicom_path(tmp_path / "plain") and not is_dicom_path(tmp_path / "scan.nii.gz")


def expect_error(path: Path, match: str, **options) -> str:
    with pytest.raises(UserError, match=match) as error:
        read_dicom_series(path, **options)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_several_series_are_listed_and_one_is_chosen(tmp_path):
    write_series(tmp_path, ct_volume(0), affine_of(), series_uid="1.2.3.1", description="axial")
    write_series(tmp_path, ct_volume(1)[:, :, :4], affine_of(), series_uid="1.2.3.2", description="thin",
                 prefix="B")
    message = expect_error(tmp_path, "holds 2 DICOM series.*--series UID")
    assert "1.2.3.1 'axial' 7 slices" in message and "1.2.3.2 'thin' 4 slices" in message
    volume, _ = read_dicom_series(tmp_path, series_uid="1.2.3.2")
    assert np.array_equal(volume, ct_volume(1)[:, :, :4])
    expect_error(tmp_path, "no DICOM series 9.9.*--series", series_uid="9.9")


def test_spacing_within_tolerance_is_read(tmp_path):
    affine = affine_of()
    paths = write_series(tmp_path, ct_volume(), affine)
    shift_slice_4(paths, affine, 0.01)
    assert read_dicom_series(tmp_path)[0].shape == SHAPE


def test_folders_without_a_dicom_image_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "no DICOM file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("no DICOM here")
    nib.save(nib.Nifti1Image(ct_volume(), affine_of()), str(tmp_path / "other" / "scan.nii.gz"))
    expect_error(tmp_path / "other", "no DICOM file")
    expect_error(tmp_path / "absent", "folder not found")
    report = tmp_path / "report"
    report.mkdir()
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid(), "SR"
    ds.save_as(report / "report.dcm", enforce_file_format=True)
    expect_error(report, "no image")
    write_series(report, ct_volume(), affine_of())                 # beside an image series it is skipped
    assert np.array_equal(read_dicom_series(report)[0], ct_volume())


def shift_slice_4(paths, affine, mm):
    edit(paths[4], ImagePositionPatient=ds_text((LPS_TO_RAS @ affine)[:3, 3] + [0, 0, 4 * 2.5 + mm]))


DAMAGED = {  # name: (damage(paths, affine), the error's pattern); the missing slice in a tilted series
    "missing slice": (lambda p, a: p[3].unlink(),
                      "missing or unevenly spaced.*step 5 mm after slice 3 of 6, spacing 2.5 mm"),
    "uneven spacing": (lambda p, a: shift_slice_4(p, a, 0.5), "missing or unevenly spaced"),
    "duplicate positions": (lambda p, a: edit(p[2], ImagePositionPatient=pydicom.dcmread(p[1])
                                              .ImagePositionPatient), "share one position"),
    "mixed sizes": (lambda p, a: edit(p[2], PixelSpacing=["0.9", "0.7"]),
                    "mixes slice sizes or pixel spacings"),
    "a coronal slice": (lambda p, a: edit(p[2], ImageOrientationPatient=ds_text([1, 0, 0, 0, 0, -1])),
                        "mixes slice orientations"),
    "no position": (lambda p, a: edit(p[0], ImagePositionPatient=None),
                    "ImagePositionPatient holds 0 values, not 3: no usable patient"),
    "not DICOM": (lambda p, a: p[2].write_text("not DICOM at all"), "IM0002.dcm: not a DICOM object"),
    "cut inside the header": (lambda p, a: p[2].write_bytes(p[2].read_bytes()[:450]),
                              "IM0002.dcm: image header without SeriesInstanceUID, Rows or Columns"),
    "cut inside the pixel data": (lambda p, a: p[2].write_bytes(p[2].read_bytes()[:-60]),
                                  "IM0002.dcm: cannot decode the pixel data.*truncated"),
}


@pytest.mark.filterwarnings("ignore:Expected implicit VR")
@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_series_is_one_line_naming_the_folder(tmp_path, case):
    damage, pattern = DAMAGED[case]
    affine = affine_of((0, 10, 0) if case == "missing slice" else (0, 0, 0))
    damage(write_series(tmp_path, ct_volume(), affine), affine)
    expect_error(tmp_path, pattern)
