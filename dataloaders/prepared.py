"""The one reader of a prepared folder (docs/DESIGN.md, "Prepared data folder").

meta.json, index.json, the evaluation volumes, the intensity the folder was scaled with and the
default support volume. Every error is one line that names the folder and the prepare command.
Only the data set checker (evaluation/dataset_check.py) opens these files itself, to report every
defect of a folder instead of the first one.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from util.errors import UserError

# the support volume of the official evaluation (docs/method.md, "The SENet volumetric protocol")
OFFICIAL_SUPPORT = "10000132"


def prepare_hint(prep_dir: str | Path) -> str:
    """The command that makes `prep_dir` a prepared folder (for error messages)."""
    return (f"run `python scripts/prepare_visceral.py --visceral-dir <VISCERAL dir> --out {prep_dir}` "
            "(or `make demo` for the phantom)")


def _read_json(prep_dir: str | Path, name: str, what: str) -> Any:
    """PREP/<name> parsed; one-line errors for a missing folder, a missing file or bad JSON."""
    folder = Path(prep_dir)
    if not folder.is_dir():
        raise UserError(f"{what} '{prep_dir}' does not exist: {prepare_hint(prep_dir)}, or point to "
                        "the prepared folder")
    path = folder / name
    if not path.is_file():
        raise UserError(f"{what} '{prep_dir}' is not a prepared folder (no {name}): {prepare_hint(prep_dir)}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{what} '{prep_dir}': {name} is unreadable ({error}): "
                        f"{prepare_hint(prep_dir)}") from None


def read_meta(prep_dir: str | Path, what: str = "prepared data") -> dict:
    """PREP/meta.json. `what` names the folder in messages (e.g. 'path.data_dir')."""
    meta = _read_json(prep_dir, "meta.json", what)
    if not isinstance(meta, dict):
        raise UserError(f"{what} '{prep_dir}': meta.json is unreadable (not a JSON object): "
                        f"{prepare_hint(prep_dir)}")
    return meta


def read_slice_index(prep_dir: str | Path,
                     what: str = "prepared data") -> dict[int, list[tuple[str, int, int]]]:
    """PREP/index.json as {label index: [(pid, row, z), ...]} (the training slices)."""
    raw = _read_json(prep_dir, "index.json", what)
    try:
        return {int(label): [(str(pid), int(row), int(z)) for pid, row, z in entries]
                for label, entries in raw["slices"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{what} '{prep_dir}': index.json is unreadable ({type(error).__name__}: {error}): "
                        f"{prepare_hint(prep_dir)}") from None


def prepared_intensity(prep_dir: str | Path) -> dict | None:
    """meta.json's `intensity` of `prep_dir`; None when the folder or its meta.json is unreadable.

    For records (checkpoints note the scaling they were trained on), where a missing folder is no error.
    """
    try:
        return read_meta(prep_dir).get("intensity")
    except UserError:
        return None


def list_volumes(prep_dir: str | Path, split: str) -> list[str]:
    """Sorted patient ids of PREP/volumes/<split>/*.npz; a clear error when there are none."""
    folder = Path(prep_dir) / "volumes" / split
    pids = sorted(path.stem for path in folder.glob("*.npz")) if folder.is_dir() else []
    if not pids:
        raise UserError(f"no prepared {split} volumes in {folder}: {prepare_hint(prep_dir)}")
    return pids


def load_volume(prep_dir: str | Path, split: str, pid: str) -> dict[str, Any]:
    """One prepared volume: image X x Y x Z (HU), label X x Y x Z (uint8), geometry fields, 'pid'."""
    path = Path(prep_dir) / "volumes" / split / f"{pid}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            volume = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"prepared volume {path} cannot be read ({type(error).__name__}: {error}): "
                        f"{prepare_hint(prep_dir)}") from None
    for key in ("image", "label"):
        if key not in volume:
            raise UserError(f"prepared volume {path} has no '{key}': {prepare_hint(prep_dir)}")
    volume["pid"] = pid
    return volume


def default_support(pids: list[str]) -> str:
    """The official support volume when present, else the first patient id in sorted order."""
    return OFFICIAL_SUPPORT if OFFICIAL_SUPPORT in pids else sorted(pids)[0]


def open_training_volume(prep_dir: str | Path, pid: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory maps of PREP/train/<pid>_{image,label}.npy: images N x S x S float32, labels N x S x S uint8."""
    base = Path(prep_dir) / "train" / pid
    for kind in ("image", "label"):
        if not Path(f"{base}_{kind}.npy").is_file():
            raise UserError(f"prepared data '{prep_dir}': index.json names {base}_{kind}.npy which is "
                            f"missing: {prepare_hint(prep_dir)}")
    try:
        return (np.load(f"{base}_image.npy", mmap_mode="r", allow_pickle=False),
                np.load(f"{base}_label.npy", mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"prepared data '{prep_dir}': {base}_image.npy / _label.npy unreadable "
                        f"({type(error).__name__}: {error}): the file is truncated or corrupt; "
                        f"{prepare_hint(prep_dir)}") from None


def open_training_images(prep_dir: str | Path, pid: str) -> np.ndarray:
    """Memory map of PREP/train/<pid>_image.npy alone (N x S x S float32; an images-only folder has no
    labels)."""
    path = Path(prep_dir) / "train" / f"{pid}_image.npy"
    if not path.is_file():
        raise UserError(f"prepared data '{prep_dir}': {path} is missing: {prepare_hint(prep_dir)}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"prepared data '{prep_dir}': {path} unreadable ({type(error).__name__}: {error}): "
                        f"the file is truncated or corrupt; {prepare_hint(prep_dir)}") from None
