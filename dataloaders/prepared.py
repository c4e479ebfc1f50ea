"""The one reader of a prepared folder (docs/DESIGN.md, "Prepared data folder").

meta.json, index.json, the training arrays (with their 2.5D neighbours), the evaluation volumes, the file
names of case ids and the default support volume; every error is one line naming the file and the prepare
command. `check_folder` reads the whole folder and reports its first defect (scripts/check_dataset.py).
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dataloaders.organs import INDEX_TO_NAME
from dataloaders.transforms import validate_intensity
from util.errors import UserError
from util.io import check_input_folder

# the support volume of the official evaluation (docs/method.md, "The SENet volumetric protocol")
OFFICIAL_SUPPORT = "10000132"
NEIGHBOURS = "neighbours"    # PREP/train/<pid>_neighbours.npy: N x 2 x S x S, each row's (z - 1, z + 1)
TRAIN_FILE_KINDS = ("image", "label", NEIGHBOURS)
VOLUME_KEYS = ("image", "label", "affine", "original_affine", "original_shape", "original_axcodes", "spacing")
AS_STORED = "as stored"      # original_axcodes of a volume kept as read, not reoriented (SSL-ALPNet layout)
RERUN = "re-run scripts/prepare_visceral.py"


def case_id(name: str) -> str:
    """A source case name as prepared file names use it: other characters than [A-Za-z0-9._-] become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def is_case_id(pid: str) -> bool:
    """True when `pid` can name prepared files: non-empty, unchanged by `case_id`, not hidden ('.x')."""
    return isinstance(pid, str) and bool(pid) and case_id(pid) == pid and not pid.startswith(".")


def train_file_name(pid: str, kind: str) -> str:
    """File name of a training volume's 'image', 'label' or 'neighbours' array in PREP/train."""
    return f"{pid}_{kind}.npy"


def train_file_case(name: str) -> str | None:
    """The case id of a PREP/train file name by its LAST suffix ('image_1_image.npy': 'image_1'), or None."""
    for kind in TRAIN_FILE_KINDS:
        suffix = f"_{kind}.npy"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def prepare_hint(prep_dir: str | Path) -> str:
    """The command that makes `prep_dir` a prepared folder (for error messages)."""
    return (f"run `python scripts/prepare_visceral.py --visceral-dir <VISCERAL dir> --out {prep_dir}` "
            "(or `make demo` for the phantom)")


def _read_json(prep_dir: str | Path, name: str, what: str) -> dict:
    """PREP/<name>, a JSON object; one-line errors for a missing folder, a missing file or bad JSON."""
    folder = Path(prep_dir)
    if not folder.is_dir():
        raise UserError(f"{what} '{prep_dir}' does not exist: {prepare_hint(prep_dir)}, or point to "
                        "the prepared folder")
    path = folder / name
    if not path.is_file():
        raise UserError(f"{what} '{prep_dir}' is not a prepared folder (no {name}): {prepare_hint(prep_dir)}")
    try:
        content = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{what} '{prep_dir}': {name} is unreadable ({error}): "
                        f"{prepare_hint(prep_dir)}") from None
    if not isinstance(content, dict):
        raise UserError(f"{what} '{prep_dir}': {name} is unreadable (not a JSON object): "
                        f"{prepare_hint(prep_dir)}")
    return content


def read_meta(prep_dir: str | Path, what: str = "prepared data") -> dict:
    """PREP/meta.json. `what` names the folder in messages (e.g. 'path.data_dir')."""
    return _read_json(prep_dir, "meta.json", what)


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


def load_volume(prep_dir: str | Path, split: str, pid: str, arrays: bool = True) -> dict[str, Any]:
    """One prepared volume: image X x Y x Z (HU), label X x Y x Z (uint8), geometry fields, 'pid'; with
    arrays=False only the names of its entries (each None)."""
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
    return {**volume, "pid": pid}


def check_volumes(prep_dir: str | Path, split: str, pids: list[str]) -> None:
    """Every volume of `pids` opens and holds an image and a label (reads each archive's directory only)."""
    for pid in pids:
        load_volume(prep_dir, split, pid, arrays=False)


def default_support(pids: list[str]) -> str:
    """The official support volume when present, else the first patient id in sorted order."""
    return OFFICIAL_SUPPORT if OFFICIAL_SUPPORT in pids else sorted(pids)[0]


def _open_npy(prep_dir: str | Path, pid: str, kind: str, fix: str) -> np.ndarray:
    """Memory map of PREP/train/<pid>_<kind>.npy; one line for a missing or unreadable file."""
    path = Path(prep_dir) / "train" / train_file_name(pid, kind)
    if not path.is_file():
        raise UserError(f"{path}: missing training file: {fix}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"{path}: unreadable ({type(error).__name__}: {error}; the file is truncated or "
                        f"corrupt): {fix}") from None


def open_training_images(prep_dir: str | Path, pid: str) -> np.ndarray:
    """Memory map of PREP/train/<pid>_image.npy, N x S x S float32 (images-only folders: no labels)."""
    return _open_npy(prep_dir, pid, "image", prepare_hint(prep_dir))


def open_training_volume(prep_dir: str | Path, pid: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory maps of PREP/train/<pid>_{image,label}.npy: images N x S x S float32, labels N x S x S uint8."""
    return open_training_images(prep_dir, pid), _open_npy(prep_dir, pid, "label", prepare_hint(prep_dir))


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


def check_training_neighbours(prep_dir: str | Path, pids: list[str], what: str = "prepared data") -> None:
    """Every training volume of `pids` has its stored neighbours (2.5D input, model.input_slices = 3)."""
    missing = [pid for pid in pids if not Path(prep_dir, "train", train_file_name(pid, NEIGHBOURS)).is_file()]
    if missing:
        raise UserError(f"{what} '{prep_dir}' has no neighbour slices (train/{missing[0]}_{NEIGHBOURS}.npy "
                        "missing), which model.input_slices=3 needs: "
                        f"{reprepare_hint(prep_dir)}, or set model.input_slices=1")


def open_training_neighbours(prep_dir: str | Path, pid: str) -> np.ndarray:
    """Memory map of PREP/train/<pid>_neighbours.npy: N x 2 x S x S float32, row r's (z - 1, z + 1)."""
    neighbours = _open_npy(prep_dir, pid, NEIGHBOURS, reprepare_hint(prep_dir))
    images = open_training_images(prep_dir, pid)
    if neighbours.shape != (images.shape[0], 2, *images.shape[1:]):
        raise UserError(f"prepared data '{prep_dir}': {neighbours.filename} has shape {neighbours.shape}, "
                        f"expected {(images.shape[0], 2, *images.shape[1:])} (N x 2 x S x S for "
                        f"{images.shape[0]} rows): {reprepare_hint(prep_dir)}")
    return neighbours


def training_slices(images: np.ndarray, neighbours: np.ndarray | None, row: int) -> np.ndarray:
    """Training row `row` as model input, float32: the slice S x S of `images` (N x S x S), or with stored
    `neighbours` (N x 2 x S x S) the stack 3 x S x S (z - 1, z, z + 1)."""
    if neighbours is None:
        return np.array(images[row], dtype=np.float32)                               # S x S
    return np.stack([neighbours[row, 0], images[row], neighbours[row, 1]]).astype(np.float32)   # 3 x S x S


# ------------------------------------------------------------------------------ the folder check
def _json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing: {RERUN} for this folder")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error}): {RERUN}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: not a JSON object: {RERUN}")
    return content


def _check_meta(path: Path, meta: dict, labeled: bool) -> dict:
    """meta.json's keys; returns its splits."""
    missing = [k for k in ("format_version", "prep_size", "intensity", "splits", "seed") if k not in meta]
    if missing:
        raise UserError(f"{path}: keys {', '.join(missing)} missing: {RERUN}")
    if meta["format_version"] != 1:
        raise UserError(f"{path}: format_version {meta['format_version']} is not 1: {RERUN} with this "
                        "version of the code")
    try:
        validate_intensity(meta["intensity"])
    except UserError as error:
        raise UserError(f"{path}: {error}: {RERUN}") from None
    if not isinstance(meta["prep_size"], int) or meta["prep_size"] < 16:
        raise UserError(f"{path}: prep_size {meta['prep_size']!r} is not an integer >= 16: {RERUN}")
    splits = meta["splits"]
    if not isinstance(splits, dict) or set(splits) != {"train", "val", "gold"}:
        raise UserError(f"{path}: splits must have exactly train, val and gold: {RERUN}")
    seen: dict[str, str] = {}
    for split, pids in splits.items():
        if not isinstance(pids, list):
            raise UserError(f"{path}: splits.{split} is not a list of case ids: {RERUN}")
        for pid in pids:
            if not is_case_id(pid):
                raise UserError(f"{path}: case id {pid!r} in splits.{split} cannot name prepared files "
                                f"(letters, digits, '.', '_', '-'): {RERUN}")
            if pid in seen:
                raise UserError(f"{path}: patient {pid} is in both {seen[pid]} and {split}: {RERUN}")
            seen[pid] = split
    if not splits["train"]:
        raise UserError(f"{path}: the train split is empty: prepare a data set with training volumes")
    if not splits["gold"] and labeled:
        raise UserError(f"{path}: the gold split is empty: prepare a data set with silver and gold volumes")
    return splits


def _check_array(prep: Path, pid: str, kind: str, dtype, shape: tuple, unit: bool, what: str = ""):
    """PREP/train/<pid>_<kind>.npy of `dtype` and `shape` (None: any length). `what` names image values:
    finite, with `unit` in [0, 1] (minmax, window; not zscore); else labels, at most 20."""
    array, path = _open_npy(prep, pid, kind, RERUN), prep / "train" / train_file_name(pid, kind)
    if array.dtype != dtype or len(array.shape) != len(shape) or any(
            e is not None and e != n for e, n in zip(shape, array.shape)):
        expected = " x ".join("N" if e is None else str(e) for e in shape) + (
            " (the z - 1 and z + 1 slices of each image row)" if len(shape) == 4 else "")
        raise UserError(f"{path}: {array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} {expected}: "
                        f"{RERUN}")
    array = np.asarray(array)
    if what and not np.isfinite(array).all():
        raise UserError(f"{path}: {what} values not finite: {RERUN}")
    if what and unit and (array.min(initial=0) < 0 or array.max(initial=0) > 1):
        raise UserError(f"{path}: {what} values outside [0, 1] (intensity scaled to [0, 1] in meta.json): "
                        f"{RERUN}")
    if not what and array.size and int(array.max()) > 20:
        raise UserError(f"{path}: label value {int(array.max())} > 20: {RERUN}")
    return array


def _check_volume(path: Path) -> set[int]:
    """One val/gold npz; returns the label values present."""
    if not path.is_file():
        raise UserError(f"{path}: missing evaluation volume: {RERUN}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in VOLUME_KEYS if key not in data.files]
            v = {} if missing else {key: data[key] for key in VOLUME_KEYS}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: unreadable ({type(error).__name__}): {RERUN}") from None
    if missing:
        raise UserError(f"{path}: keys {', '.join(missing)} missing: {RERUN}")
    image, label, shape, axcodes = v["image"], v["label"], v["original_shape"], str(v["original_axcodes"])
    if image.dtype not in (np.int16, np.float32) or image.ndim != 3 or label.dtype != np.uint8 \
            or label.shape != image.shape:
        raise UserError(f"{path}: image {image.dtype} {image.shape} / label {label.dtype} {label.shape}: "
                        "expected int16 and uint8 volumes of one shape (a float32 image where int16 was "
                        f"inexact): {RERUN}")
    if image.dtype == np.float32 and not np.isfinite(image).all():
        raise UserError(f"{path}: image values not finite: {RERUN}")
    if axcodes == AS_STORED:     # kept as read (possibly cropped): each stored size >= the volume's
        shape_ok = len(shape) == 3 and all(int(o) >= s for o, s in zip(shape, image.shape))
    else:
        shape_ok = sorted(shape.tolist()) == sorted(image.shape) and len(axcodes) == 3
    if v["affine"].shape != (4, 4) or v["original_affine"].shape != (4, 4) or v["spacing"].shape != (3,) \
            or not shape_ok:
        raise UserError(f"{path}: geometry keys (affine, original_affine, original_shape, original_axcodes, "
                        f"spacing) are inconsistent: {RERUN}")
    values = set(np.unique(label).tolist())
    if max(values) > 20:
        raise UserError(f"{path}: label value {max(values)} > 20: {RERUN}")
    return values - {0}


def check_folder(prep_dir: str | Path) -> dict:
    """{"rows": per-class table rows, "splits": sizes, "prep_size", "labeled"} of a prepared folder after
    reading every file; a one-line UserError on the first defect found."""
    prep = Path(prep_dir)
    if not prep.exists():
        raise UserError(f"{prep}: folder not found: run scripts/prepare_visceral.py --out {prep}")
    check_input_folder(prep, "", "give a folder written by scripts/prepare_visceral.py --out")
    alpnet = any(prep.glob("image_*.nii*"))
    if not (prep / "meta.json").exists() and (alpnet or any(prep.glob("*/Volumes"))):
        layout = " --layout alpnet" if alpnet else ""
        raise UserError(f"{prep}: a data folder, not a prepared one: prepare it first: python "
                        f"scripts/prepare_visceral.py --visceral-dir {prep} --out NEW_FOLDER{layout}")
    meta = _json(prep / "meta.json")
    source = meta.get("source")
    labeled = not (isinstance(source, dict) and source.get("layout") == "images-only")
    splits = _check_meta(prep / "meta.json", meta, labeled)
    size = int(meta["prep_size"])
    index = _json(prep / "index.json")
    if not isinstance(index.get("slices"), dict):
        raise UserError(f"{prep / 'index.json'}: no 'slices' object: {RERUN}")
    unit = meta["intensity"].get("mode") != "zscore"        # SSL-ALPNet's z-score: any finite value
    labels = {}
    for pid in splits["train"]:
        image = _check_array(prep, pid, "image", np.float32, (None, size, size), unit, "image")
        labels[pid] = np.zeros(image.shape, np.uint8) if not labeled else _check_array(
            prep, pid, "label", np.uint8, (image.shape[0], size, size), unit)
        if (prep / "train" / train_file_name(pid, NEIGHBOURS)).is_file():       # 2.5D input, optional
            _check_array(prep, pid, NEIGHBOURS, np.float32, (len(image), 2, size, size), unit, "neighbour")
    volumes = {split: {pid: _check_volume(prep / "volumes" / split / f"{pid}.npz") for pid in splits[split]}
               for split in ("val", "gold")}
    rows = []
    for key, entries in index["slices"].items():
        if not key.isdigit() or not 1 <= int(key) <= 20:
            raise UserError(f"{prep / 'index.json'}: class '{key}' is not a label index 1-20: {RERUN}")
        klass = int(key)
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in labels):
                raise UserError(f"{prep / 'index.json'}: entry {entry} of class {klass} does not name a "
                                f"training volume as [pid, row, z]: {RERUN}")
            pid, row, z = entry
            if not (isinstance(row, int) and 0 <= row < len(labels[pid]) and isinstance(z, int) and z >= 0):
                raise UserError(f"{prep / 'index.json'}: entry {entry}: row out of range for "
                                f"{pid} ({labels[pid].shape[0]} slices): {RERUN}")
            if not (labels[pid][row] == klass).any():
                raise UserError(f"{prep / 'train' / train_file_name(pid, 'label')}: row {row} has no voxel "
                                f"of class {klass} listed in index.json: {RERUN}")
        rows.append({"index": klass, "name": INDEX_TO_NAME[klass], "slices": len(entries),
                     "volumes": len({entry[0] for entry in entries}),
                     **{split: sum(klass in v for v in found.values()) for split, found in volumes.items()}})
    for path in sorted((prep / "train").glob("*.npy")):
        pid = train_file_case(path.name)
        if pid not in labels:
            what = (f"files of {pid} which is not in splits.train" if pid
                    else "a file that is not <id>_image.npy / <id>_label.npy / <id>_neighbours.npy")
            raise UserError(f"{prep / 'train'}: {path.name}: {what}: re-run the preparation into an empty "
                            "folder")
    if not labeled and index["slices"]:
        raise UserError(f"{prep / 'index.json'}: an images-only folder lists training slices: {RERUN}")
    return {"rows": sorted(rows, key=lambda r: r["index"]), "prep_size": size, "labeled": labeled,
            "splits": {split: len(pids) for split, pids in splits.items()}}
