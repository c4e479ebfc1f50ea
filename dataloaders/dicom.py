"""Read a DICOM series folder as voxels X x Y x Z (X along a row, Y down the columns, Z along the slice
normal; rescale applied) and a 4 x 4 RAS affine, so that `nib.Nifti1Image(volume, affine)` has its geometry.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from util.errors import UserError
from util.io import looks_dicom

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])   # DICOM patient space is LPS, NIfTI's is RAS
SPACING_TOLERANCE = 0.01                        # a slice step may differ from the spacing by 1 %
ORIENTATION_TOLERANCE = 1e-4                    # direction cosines of one stack agree to this
READ_ERRORS = (InvalidDicomError, struct.error, OSError, EOFError, ValueError, KeyError, TypeError,
               AttributeError)


def is_dicom_path(path: str | Path) -> bool:
    """True for a DICOM file, or a folder holding at least one DICOM file (not searched recursively)."""
    path = Path(path)
    return any(looks_dicom(p) for p in path.iterdir()) if path.is_dir() else looks_dicom(path)


def _read(path: Path, pixels: bool) -> pydicom.Dataset:
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    except READ_ERRORS as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:90]
        raise UserError(f"{path}: cannot read DICOM ({reason}): the file is corrupt or truncated; "
                        "copy or export it again") from None
    if not (dataset.get("SOPClassUID") or dataset.file_meta.get("MediaStorageSOPClassUID")):
        raise UserError(f"{path}: not a DICOM object (no SOP class): the file is corrupt, truncated or not "
                        "DICOM; copy or export it again, or move it out of the folder")
    return dataset


def _number(dataset: pydicom.Dataset, tag: str, default: float) -> float:
    value = dataset.get(tag)
    return default if value in (None, "") else float(value)


def _floats(path: Path, header: pydicom.Dataset, tag: str, count: int) -> np.ndarray:
    value = header.get(tag)
    values = [] if value in (None, "") else list(value) if isinstance(value, MultiValue) else [value]
    if len(values) != count:
        raise UserError(f"{path}: {tag} holds {len(values)} values, not {count}: no usable patient "
                        "geometry (a secondary capture or a corrupt file); export the original series")
    return np.array(values, dtype=float)


def read_dicom_series(path: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Volume (int16, or float32 where the rescale is not integral) X x Y x Z and its 4 x 4 RAS affine of
    a series folder (not recursive) or of the series of one of its files; non-image objects skipped."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: folder not found: check the path of the DICOM series")
    if path.is_file() and not looks_dicom(path):
        raise UserError(f"{path}: not a DICOM file: give a DICOM series folder or one of its .dcm files")
    folder = path.parent if path.is_file() else path
    if path.is_file():
        series_uid = series_uid or str(_read(path, pixels=False).get("SeriesInstanceUID", ""))
    files = sorted(p for p in folder.iterdir() if looks_dicom(p))
    if not files:
        raise UserError(f"{folder}: no DICOM file (.dcm or DICM header) in this folder: give the folder "
                        "that holds the series' slice files")
    series: dict[str, list] = {}
    for p in files:
        header = _read(p, pixels=False)
        sop_class = header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID", "")
        if "Rows" not in header and "Image Storage" not in UID(str(sop_class)).name:
            continue                                                    # a structure set, report, DICOMDIR
        if any(tag not in header for tag in ("SeriesInstanceUID", "Rows", "Columns")):
            raise UserError(f"{p}: image header without SeriesInstanceUID, Rows or Columns: the file is "
                            "corrupt or truncated; copy or export it again")
        series.setdefault(str(header.SeriesInstanceUID), []).append((p, header))
    if not series:
        raise UserError(f"{folder}: its DICOM files hold no image (non-image objects only): give the "
                        "folder of a CT or MR image series")
    listing = "; ".join(f"{uid} '{s[0][1].get('SeriesDescription', '')}' {len(s)} slices"
                        for uid, s in series.items())
    if series_uid is None and len(series) > 1:
        raise UserError(f"{folder}: holds {len(series)} DICOM series ({listing}): "
                        "choose one with --series UID")
    if series_uid is not None and series_uid not in series:
        raise UserError(f"{folder}: has no DICOM series {series_uid} (it holds {listing}): "
                        "pass one of these UIDs to --series")
    return _stack(folder, series[series_uid if series_uid is not None else next(iter(series))])


def _stack(folder: Path, slices: list[tuple[Path, pydicom.Dataset]]) -> tuple[np.ndarray, np.ndarray]:
    """Check that the slices form one evenly spaced stack; sort them along the normal; read the voxels."""
    for path, h in slices:
        if int(h.get("NumberOfFrames") or 1) > 1 or int(h.get("SamplesPerPixel") or 1) > 1:
            raise UserError(f"{path}: multi-frame or colour DICOM is not read: export the series as "
                            "one greyscale file per slice (CT or MR Image Storage)")
    sizes = {(int(h.Rows), int(h.Columns), *_floats(p, h, "PixelSpacing", 2)) for p, h in slices}
    if len(sizes) > 1:
        raise UserError(f"{folder}: the series mixes slice sizes or pixel spacings {sorted(sizes)}: export "
                        "one stack of equal slices, or choose another series")
    orientations = np.array([_floats(p, h, "ImageOrientationPatient", 6) for p, h in slices])  # n x 6
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise UserError(f"{folder}: the series mixes slice orientations (a localiser?): export one stack "
                        "of parallel slices, or choose another series")
    row_direction, column_direction = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_direction, column_direction)
    positions = np.array([_floats(p, h, "ImagePositionPatient", 3) for p, h in slices])     # n x 3
    order = np.argsort(positions @ normal, kind="stable")
    positions, slices = positions[order], [slices[k] for k in order]
    steps = np.diff(positions @ normal)                                                     # n - 1
    if len(steps) and steps.min() < 1e-3:
        raise UserError(f"{folder}: several slices share one position along the normal (echoes, phases "
                        "or repeats in one series): export one volume per series")
    spacing = steps.min() if len(steps) else 0.0
    if np.any(uneven := np.abs(steps - spacing) > SPACING_TOLERANCE * spacing):
        k = int(np.argmax(uneven))
        raise UserError(f"{folder}: slices missing or unevenly spaced along the normal (step {steps[k]:.4g} "
                        f"mm after slice {k + 1} of {len(slices)}, spacing {spacing:.4g} mm): export the "
                        "complete series, or resample it to even spacing")
    first = slices[0][1]
    slice_step = ((positions[-1] - positions[0]) / len(steps) if len(steps) else
                  normal * _number(first, "SpacingBetweenSlices", _number(first, "SliceThickness", 1.0)))
    _, _, row_spacing, column_spacing = sizes.pop()
    lps = np.eye(4)
    lps[:3, :3] = np.stack([row_direction * column_spacing, column_direction * row_spacing, slice_step], 1)
    lps[:3, 3] = positions[0]
    return _voxels(slices), LPS_TO_RAS @ lps


def _voxels(slices: list[tuple[Path, pydicom.Dataset]]) -> np.ndarray:
    """Stored values times RescaleSlope plus RescaleIntercept, X x Y x Z; int16 where exact, else float32."""
    rescale = [(_number(h, "RescaleSlope", 1.0), _number(h, "RescaleIntercept", 0.0)) for _, h in slices]
    integral = all(slope == 1 and intercept.is_integer() for slope, intercept in rescale)
    shape = (int(slices[0][1].Columns), int(slices[0][1].Rows), len(slices))               # X x Y x Z
    volume = np.empty(shape, np.int32 if integral else np.float32)
    for k, ((path, _), (slope, intercept)) in enumerate(zip(slices, rescale)):
        try:
            stored = _read(path, pixels=True).pixel_array.T                               # X x Y
        except (RuntimeError, NotImplementedError, ValueError, AttributeError) as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:90]
            raise UserError(f"{path}: cannot decode the pixel data ({reason}): the file is truncated, or "
                            "its transfer syntax needs a decoder (pylibjpeg, GDCM); export it again "
                            "uncompressed") from None
        volume[:, :, k] = stored.astype(np.int32) + int(intercept) if integral else stored * slope + intercept
    if integral:
        return volume.astype(np.int16 if volume.min() >= -32768 and volume.max() <= 32767 else np.float32)
    return volume
