"""Load, validate, reorient (canonical RAS+, docs/DESIGN.md "Conventions") and save NIfTI volumes; build
output folders atomically, with a pool of worker processes.
"""
from __future__ import annotations

import contextlib
import gzip
import multiprocessing
import os
import shutil
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from util.cli import warn
from util.errors import UserError
from util.io import check_output_folder, dicom_fix, holds_dcm_files, looks_dicom, write_bytes_atomic

CANONICAL_AXCODES = ("R", "A", "S")
AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class NiftiVolume:
    """A volume in canonical RAS+ orientation plus what is needed to go back to the file's geometry."""
    array: np.ndarray                       # X x Y x Z canonical (dtype as stored, or as the loader asked)
    affine: np.ndarray                      # 4 x 4 canonical voxel -> world (mm)
    original_affine: np.ndarray             # 4 x 4 as stored
    original_shape: tuple[int, int, int]    # as stored
    original_axcodes: str                   # storage orientation, e.g. "LPS"
    path: Path
    codes: tuple[int, int] = (1, 1)        # the file's (qform, sform) codes, kept by outputs in its geometry

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along the canonical axes, shape (3,)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def _named_right(path: Path) -> bool:
    """False for a gzip file named .nii, or an uncompressed NIfTI named .nii.gz (nibabel goes by the name)."""
    with open(path, "rb") as file:
        head = file.read(348)
    if path.name.endswith(".nii"):
        return head[:2] != b"\x1f\x8b"
    return not (path.name.endswith(".nii.gz") and (head[344:347] == b"n+1" or head[4:7] == b"n+2"))


def _load_misnamed(path: Path) -> nib.Nifti1Image:
    data = path.read_bytes()
    zipped = data[:2] == b"\x1f\x8b"
    data = gzip.decompress(data) if zipped else data
    image = (nib.Nifti2Image if data[4:7] == b"n+2" else nib.Nifti1Image).from_bytes(data)
    kind = "gzip-compressed but named .nii" if zipped else "not gzip-compressed but named .nii.gz"
    warn(f"{path}: {kind}: read by its content; tools that go by the name will fail on it: rename it")
    return image


def _dicom_hint(folder: Path) -> str:
    """': give the file' text for a folder or DICOM where a NIfTI file is expected (DICOM: a converter)."""
    return f": {dicom_fix(folder)}" if holds_dcm_files(folder) else ": give the path of a .nii.gz file"


def read_nifti(path: Path, dtype=None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(data X x Y x Z as stored, as `dtype`; affine; (qform, sform) codes) of a 3D NIfTI (or X x Y x Z x 1),
    every defect of the file a one-line UserError."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a NIfTI file{_dicom_hint(path)}")
    if not path.is_file():
        raise UserError(f"{path}: file not found: check the path or regenerate the data set")
    try:
        image = nib.load(str(path)) if _named_right(path) else _load_misnamed(path)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise UserError(f"{path}: not a NIfTI file ({type(image).__name__}): convert it to .nii.gz")
        data = np.asanyarray(image.dataobj, dtype=dtype)  # forces decompression: truncation shows up here
    except UserError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError,
            nib.filebasedimages.ImageFileError) as error:
        if looks_dicom(path):
            raise UserError(f"{path}: a DICOM file, not NIfTI{_dicom_hint(path.parent)}") from None
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:90]
        raise UserError(f"{path}: cannot read NIfTI ({reason}): the file is corrupt or truncated; "
                        "copy or export it again") from None
    codes = (int(image.header["qform_code"]), int(image.header["sform_code"]))
    affine = np.asarray(image.affine, dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: image has {data.ndim} dimensions {tuple(data.shape)}, expected a 3D "
                        "volume X x Y x Z: export one 3D volume per file")
    if min(data.shape) < 1:
        raise UserError(f"{path}: empty volume of shape {tuple(data.shape)}: export it again")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():   # poisons scaling and Dice
        raise UserError(f"{path}: {int((~np.isfinite(data)).sum())} NaN/inf voxels: fix or re-export the "
                        "volume (e.g. replace them with the background value)")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UserError(f"{path}: affine is not invertible or not finite: fix the NIfTI header (sform/qform)")
    return data, affine, codes


def load_nifti(path: str | Path) -> NiftiVolume:
    """A 3D NIfTI, validated (`read_nifti`) and reoriented to canonical RAS+."""
    path = Path(path)
    data, affine, codes = read_nifti(path)
    original_axcodes = "".join(nib.aff2axcodes(affine))
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    array = np.asfortranarray(canonical.dataobj)   # NIfTI voxel order: cheap z slabs, cheap flat views
    return NiftiVolume(array=array, affine=np.asarray(canonical.affine, dtype=np.float64),
                       original_affine=affine, original_shape=tuple(int(s) for s in data.shape),
                       original_axcodes=original_axcodes, path=path, codes=codes)


def check_same_grid(mask: NiftiVolume, volume: NiftiVolume) -> None:
    """A mask must lie on its volume's voxel grid in world space (any storage orientation)."""
    if tuple(mask.array.shape) == tuple(volume.array.shape) and np.allclose(
            mask.affine, volume.affine, atol=AFFINE_TOLERANCE_MM):
        return                                              # same world grid (any storage orientation)
    if tuple(mask.original_shape) != tuple(volume.original_shape):
        raise UserError(f"{mask.path}: mask shape {tuple(mask.original_shape)} differs from volume "
                        f"{volume.path.name} shape {tuple(volume.original_shape)}: resample the mask onto "
                        "the volume grid")
    if not np.allclose(mask.original_affine, volume.original_affine, atol=AFFINE_TOLERANCE_MM):
        raise UserError(f"{mask.path}: mask affine differs from volume {volume.path.name} affine: resample "
                        "the mask onto the volume grid (or fix its header)")


def to_original(array_canonical: np.ndarray, original_axcodes: str | tuple[str, ...]) -> np.ndarray:
    """A canonical RAS+ array X x Y x Z in the storage orientation `original_axcodes` (undoes load_nifti)."""
    codes = tuple(original_axcodes)
    assert len(codes) == 3, codes           # the prepared-folder reader checks stored axis codes
    transform = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), axcodes2ornt(codes))
    return np.ascontiguousarray(apply_orientation(np.asarray(array_canonical), transform))


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | Path, codes=(1, 1)) -> None:
    """Save `array` (X x Y x Z) with `affine` and (qform, sform) `codes` atomically and deterministically."""
    path = Path(path)
    assert path.name.endswith(".nii.gz"), path
    array = np.asarray(array)
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_xyzt_units("mm", "sec")
    affine = np.asarray(affine, dtype=np.float64)
    header.set_qform(affine, code=int(codes[0]))
    header.set_sform(affine, code=int(codes[1]))
    header["vox_offset"] = 352
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    raw = header.binaryblock + b"\x00" * 4 + array.tobytes(order="F")
    write_bytes_atomic(gzip.compress(raw, compresslevel=1, mtime=0), path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:     # exists but belongs to someone else
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Leftovers of a killed `atomic_folder` run on `out`: remove `<out>.partial-<pid>`; put back
    `<out>.old-<pid>` when `out` is missing (killed between the two renames), else remove it."""
    if not out.parent.is_dir():
        return
    for kind in ("partial", "old"):
        prefix = f"{out.name}.{kind}-"
        for path in [p for p in out.parent.iterdir() if p.name.startswith(prefix)]:
            pid = path.name[len(prefix):]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.replace(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Build a folder in `<out>.partial-<pid>` and rename it to `out` only when the block succeeds; a
    killed run's leftovers are cleaned by the next run on the same `out`."""
    out = Path(out)
    _clean_stale(out)
    check_output_folder(out, inputs, "--out", overwrite)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(partial, out)
        # no .old-<pid> left
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(partial, out)


def _star(item: tuple):
    function, arguments = item
    return function(*arguments)


def parallel_map(function, tasks: list[tuple], workers: int, progress: dict | None = None) -> list:
    """[function(*task) for task in tasks] in order, in `workers` forked processes (`progress`: tqdm's)."""
    from tqdm import tqdm  # progress bar of the command line only
    items, results, processes = [(function, task) for task in tasks], [], min(workers, len(tasks))
    pool = multiprocessing.get_context("fork").Pool(processes) if processes > 1 else None
    with tqdm(total=len(tasks), **(progress or {"disable": True})) as bar, pool or contextlib.nullcontext():
        for result in pool.imap(_star, items, chunksize=1) if pool else map(_star, items):
            results.append(result)
            bar.update(1)
    return results
