"""The one reader of a prepared folder (docs/DESIGN.md, "Prepared data folder").

meta.json, index.json, the training slices (and their stored neighbours for 2.5D input), the evaluation
volumes, the intensity the folder was scaled with and the default support volume. Every error is one
line that names the folder and the prepare command.
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
    """meta.json's `intensity` of `prep_dir`; None when unreadable (for records, where that is no error)."""
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


def _read_volume(prep_dir: str | Path, split: str, pid: str, arrays: bool) -> dict[str, Any]:
    """PREP/volumes/<split>/<pid>.npz: its arrays (arrays=True), else only its list of entries (the
    archive's directory: no array is read); one-line errors for an unreadable file or a missing entry."""
    path = Path(prep_dir) / "volumes" / split / f"{pid}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            volume = {key: data[key] if arrays else None for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"prepared volume {path} cannot be read ({type(error).__name__}: {error}): "
                        f"{prepare_hint(prep_dir)}") from None
    for key in ("image", "label"):
        if key not in volume:
            raise UserError(f"prepared volume {path} has no '{key}': {prepare_hint(prep_dir)}")
    return volume


def load_volume(prep_dir: str | Path, split: str, pid: str) -> dict[str, Any]:
    """One prepared volume: image X x Y x Z (HU), label X x Y x Z (uint8), geometry fields, 'pid'."""
    volume = _read_volume(prep_dir, split, pid, arrays=True)
    volume["pid"] = pid
    return volume


def check_volumes(prep_dir: str | Path, split: str, pids: list[str]) -> None:
    """Every volume of `pids` opens and holds an image and a label (load_volume's one-line errors), found
    before a long evaluation starts instead of at the volume's turn; reads each archive's directory only."""
    for pid in pids:
        _read_volume(prep_dir, split, pid, arrays=False)


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
    """Memory map of PREP/train/<pid>_image.npy alone, N x S x S float32 (images-only folders: no labels)."""
    path = Path(prep_dir) / "train" / f"{pid}_image.npy"
    if not path.is_file():
        raise UserError(f"prepared data '{prep_dir}': {path} is missing: {prepare_hint(prep_dir)}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"prepared data '{prep_dir}': {path} unreadable ({type(error).__name__}: {error}): "
                        f"the file is truncated or corrupt; {prepare_hint(prep_dir)}") from None


NEIGHBOURS = "neighbours"    # PREP/train/<pid>_neighbours.npy: N x 2 x S x S, each row's (z - 1, z + 1)


def reprepare_hint(prep_dir: str | Path) -> str:
    """The command that writes `prep_dir` again with the same source and options (from its meta.json)."""
    try:
        meta = read_meta(prep_dir)
    except UserError:
        return prepare_hint(prep_dir)
    source = meta.get("source") or {}
    layout, folder = source.get("layout", "visceral"), source.get("dir", "<source dir>")
    options = f"--layout {layout}" if layout != "visceral" else ""
    if layout == "alpnet":
        alpnet = meta.get("alpnet") or {}
        options += f" --fold {alpnet.get('fold')} --setting {alpnet.get('setting')}"
        if alpnet.get("setting") == 2:
            options += f" --label-set {alpnet.get('label_set')} --rule {alpnet.get('rule')}"
    elif layout == "images-only":
        return (f"re-run `python scripts/make_superpixels.py --images {folder} --out {prep_dir} --overwrite` "
                "(with the options that made it)")
    return (f"re-run the prepare command, `python scripts/prepare_visceral.py --visceral-dir {folder} "
            f"{options + ' ' if options else ''}--out {prep_dir} --overwrite` (with the options that made "
            "it)")


def _neighbours_path(prep_dir: str | Path, pid: str) -> Path:
    return Path(prep_dir) / "train" / f"{pid}_{NEIGHBOURS}.npy"


def check_training_neighbours(prep_dir: str | Path, pids: list[str], what: str = "prepared data") -> None:
    """Every training volume of `pids` has its stored neighbours (2.5D input, model.input_slices = 3);
    a folder written before they were stored gets one line naming the command that writes it again."""
    missing = [pid for pid in pids if not _neighbours_path(prep_dir, pid).is_file()]
    if missing:
        raise UserError(f"{what} '{prep_dir}' has no neighbour slices (train/{missing[0]}_{NEIGHBOURS}.npy "
                        "missing; the folder predates them), which model.input_slices=3 needs: "
                        f"{reprepare_hint(prep_dir)}, or set model.input_slices=1")


def open_training_neighbours(prep_dir: str | Path, pid: str) -> np.ndarray:
    """Memory map of PREP/train/<pid>_neighbours.npy: N x 2 x S x S float32, row r's (z - 1, z + 1) after
    `transforms.neighbour_indices`' rule."""
    check_training_neighbours(prep_dir, [pid])
    path = _neighbours_path(prep_dir, pid)
    try:
        neighbours = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"prepared data '{prep_dir}': {path} unreadable ({type(error).__name__}: {error}): "
                        f"the file is truncated or corrupt; {reprepare_hint(prep_dir)}") from None
    images = open_training_images(prep_dir, pid)
    if neighbours.shape != (images.shape[0], 2, *images.shape[1:]):
        raise UserError(f"prepared data '{prep_dir}': {path} has shape {neighbours.shape}, expected "
                        f"{(images.shape[0], 2, *images.shape[1:])} (N x 2 x S x S for {images.shape[0]} "
                        f"rows): {reprepare_hint(prep_dir)}")
    return neighbours


def training_slices(images: np.ndarray, neighbours: np.ndarray | None, row: int) -> np.ndarray:
    """Training row `row` as model input, float32: the slice S x S of `images` (N x S x S), or with stored
    `neighbours` (N x 2 x S x S) the stack 3 x S x S (z - 1, z, z + 1)."""
    if neighbours is None:
        return np.array(images[row], dtype=np.float32)                               # S x S
    return np.stack([neighbours[row, 0], images[row], neighbours[row, 1]]).astype(np.float32)   # 3 x S x S
