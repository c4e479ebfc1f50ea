"""The prepared-folder checker (`check_prepared`, DESIGN.md "Prepared data folder") and the mask-copy
honesty check (`mask_copy_dice`, docs/method.md "Mask copy"): a data set on which copying the support's
mask scores high does not test few-shot segmentation. Each defect is one line naming the file and the fix.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from dataloaders.organs import INDEX_TO_NAME, NAME_TO_INDEX, TABLE_COLUMNS, TEST_ORGANS
from dataloaders.prepare import NEIGHBOURS, is_case_id, train_file_case, train_file_name
from dataloaders.prepared import default_support, load_volume
from dataloaders.transforms import validate_intensity
from evaluation.protocols import dice, get_preset, mask_copy, preset_range
from util.errors import UserError
from util.io import check_input_folder

VOLUME_KEYS = ("image", "label", "affine", "original_affine", "original_shape", "original_axcodes", "spacing")
AS_STORED = "as stored"        # original_axcodes of a volume kept as read, not reoriented (SSL-ALPNet layout)
DEFAULT_PRESET = "inclusive"
RERUN = "re-run scripts/prepare_visceral.py"


def mask_copy_dice(labels: dict[str, np.ndarray], support: str | None = None, preset: str = DEFAULT_PRESET,
                   organs: list[str] | None = None) -> dict[str, dict]:
    """{organ: {"mean", "median", "n", "per_query": {pid: dice}}} of copying the support's mask to each
    other volume (labels: {pid: X x Y x Z uint8}), 3D over the query's organ range; no range: not scored."""
    rule = get_preset(preset)
    support = support or default_support(list(labels))
    if support not in labels:
        raise UserError(f"support volume {support} not among {', '.join(sorted(labels))}: pick one of them")
    results = {}
    for organ in organs or TEST_ORGANS:
        index = NAME_TO_INDEX[organ]
        support_mask = labels[support] == index
        support_range = preset_range(support_mask, rule)
        per_query = {}
        for pid, label in sorted(labels.items()):
            query_mask = label == index
            query_range = None if pid == support or support_range is None else \
                preset_range(query_mask, rule, role="query")
            if query_range is None:
                continue
            prediction = mask_copy(support_mask, support_range, query_mask.shape, query_range, rule.n_chunks,
                                   rule.rule)
            z = slice(query_range[0], query_range[1] + 1)
            per_query[pid] = dice(prediction[..., z], query_mask[..., z], rule.dice_smooth, rule.dice_eps)
        values = list(per_query.values())
        results[organ] = {"mean": float(np.mean(values)) if values else float("nan"),
                          "median": float(np.median(values)) if values else float("nan"),
                          "n": len(values), "per_query": per_query}
    return results


def format_mask_copy(results: dict[str, dict], support: str, preset: str) -> str:
    """A `mask_copy_dice` result per organ side, then the README table's organs (kidney, psoas: the mean
    of their scored sides) and their mean."""
    lines = [f"mask-copy Dice (no model; support {support}, preset {preset}, mean over query volumes):"]
    for organ, result in results.items():
        lines.append(f"  {organ:<14} {result['mean']:.3f}  (median {result['median']:.3f}, n={result['n']})")
    columns = {}
    for column, sides in TABLE_COLUMNS.items():
        values = [results[side]["mean"] for side in sides
                  if side in results and np.isfinite(results[side]["mean"])]
        if values:
            columns[column] = float(np.mean(values))
    if columns:
        lines.append("  organs as in the README table (kidney, psoas: mean of right and left): "
                     + ", ".join(f"{column} {value:.3f}" for column, value in columns.items()))
        mean = np.mean(list(columns.values()))
        lines.append(f"  {'mean':<14} {mean:.3f}  (mean of the {len(columns)} organs {', '.join(columns)}, "
                     "each side pair counted once)")
    return "\n".join(lines)


def prepared_mask_copy(prep_dir: str | Path, preset: str = DEFAULT_PRESET) -> str:
    """`format_mask_copy` of the gold volumes of a prepared folder (test organs, default support)."""
    get_preset(preset)                                       # an unknown preset before any volume is read
    gold = Path(prep_dir) / "volumes" / "gold"
    labels = {path.stem: load_volume(prep_dir, "gold", path.stem)["label"]
              for path in sorted(gold.glob("*.npz"))}
    if len(labels) < 2:
        raise UserError(f"{gold}: fewer than 2 gold volumes: the mask-copy check needs a support and a query")
    support = default_support(list(labels))
    return format_mask_copy(mask_copy_dice(labels, support, preset), support, preset)


# ------------------------------------------------------------------------------ the folder checker
def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing: {RERUN} for this folder")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error}): {RERUN}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: not a JSON object: {RERUN}")
    return content


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"{path}: unreadable ({error}): {RERUN}") from None


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
        raise UserError(f"{path}: prep_size {meta['prep_size']!r} is not an integer >= 16: re-run the "
                        "preparation")
    splits = meta["splits"]
    if not isinstance(splits, dict) or set(splits) != {"train", "val", "gold"}:
        raise UserError(f"{path}: splits must have exactly train, val and gold: re-run the preparation")
    seen: dict[str, str] = {}
    for split, pids in splits.items():
        if not isinstance(pids, list):
            raise UserError(f"{path}: splits.{split} is not a list of case ids: re-run the preparation")
        for pid in pids:
            if not is_case_id(pid):
                raise UserError(f"{path}: case id {pid!r} in splits.{split} cannot name prepared files "
                                f"(letters, digits, '.', '_', '-'): {RERUN}")
            if pid in seen:
                raise UserError(f"{path}: patient {pid} is in both {seen[pid]} and {split}: re-run the "
                                "preparation")
            seen[pid] = split
    if not splits["train"]:
        raise UserError(f"{path}: the train split is empty: prepare a data set with training volumes")
    if not splits["gold"] and labeled:
        raise UserError(f"{path}: the gold split is empty: prepare a data set with silver and gold volumes")
    return splits


def _check_train(prep: Path, pid: str, size: int, labeled: bool, unit: bool) -> np.ndarray:
    """train/<pid>_{image,label,neighbours}.npy; returns the labels N x S x S (0 when not `labeled`).
    unit: the images lie in [0, 1] (minmax, window), else (zscore) only finite."""
    image_path, label_path = (prep / "train" / train_file_name(pid, kind) for kind in ("image", "label"))
    arrays = []
    for path, dtype in ((image_path, np.float32), (label_path, np.uint8))[: 2 if labeled else 1]:
        if not path.is_file():
            raise UserError(f"{path}: missing training file: {RERUN}")
        array = _load_npy(path)
        if array.dtype != dtype or array.ndim != 3 or array.shape[1:] != (size, size):
            raise UserError(f"{path}: {array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} "
                            f"N x {size} x {size}: {RERUN}")
        arrays.append(array)
    image, label = arrays if labeled else (arrays[0], np.zeros(arrays[0].shape, np.uint8))
    if image.shape[0] != label.shape[0]:
        raise UserError(f"{label_path}: {label.shape[0]} label slices for {image.shape[0]} image slices: "
                        "re-run the preparation")
    _check_values(image_path, np.asarray(image), unit, "image")
    if label.size and int(label.max()) > 20:
        raise UserError(f"{label_path}: label value {int(label.max())} > 20: re-run the preparation")
    path = prep / "train" / train_file_name(pid, NEIGHBOURS)         # 2.5D input, optional
    if path.is_file():
        neighbours, expected = _load_npy(path), (image.shape[0], 2, *image.shape[1:])
        if neighbours.dtype != np.float32 or neighbours.shape != expected:
            raise UserError(f"{path}: {neighbours.dtype} {tuple(neighbours.shape)}, expected float32 "
                            f"{expected} (the z - 1 and z + 1 slices of each image row): {RERUN}")
        _check_values(path, np.asarray(neighbours), unit, "neighbour")
    return np.asarray(label)


def _check_values(path: Path, values: np.ndarray, unit: bool, what: str) -> None:
    if not np.isfinite(values).all():
        raise UserError(f"{path}: {what} values not finite: re-run the preparation")
    if unit and (values.min(initial=0) < 0 or values.max(initial=0) > 1):
        raise UserError(f"{path}: {what} values outside [0, 1] (intensity scaled to [0, 1] in meta.json): "
                        "re-run the preparation")


def _check_volume(path: Path) -> set[int]:
    """One val/gold npz; returns the label values present."""
    if not path.is_file():
        raise UserError(f"{path}: missing evaluation volume: {RERUN}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in VOLUME_KEYS if key not in data.files]
            if missing:
                raise UserError(f"{path}: keys {', '.join(missing)} missing: re-run the preparation")
            image, label, affine, original_affine, axcodes, spacing, original_shape = (
                data[key] for key in ("image", "label", "affine", "original_affine", "original_axcodes",
                                      "spacing", "original_shape"))
            axcodes = str(axcodes)
    except UserError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: unreadable ({type(error).__name__}): re-run the preparation") from None
    if image.dtype not in (np.int16, np.float32) or image.ndim != 3 or label.dtype != np.uint8 \
            or label.shape != image.shape:
        raise UserError(f"{path}: image {image.dtype} {image.shape} / label {label.dtype} {label.shape}: "
                        "expected int16 and uint8 volumes of one shape (a float32 image where int16 was "
                        "inexact): re-run the preparation")
    if image.dtype == np.float32 and not np.isfinite(image).all():
        raise UserError(f"{path}: image values not finite: re-run the preparation")
    if axcodes == AS_STORED:     # kept as read (possibly cropped): each stored size >= the volume's
        shape_ok = len(original_shape) == 3 and all(int(o) >= s for o, s in zip(original_shape, image.shape))
    else:
        shape_ok = sorted(original_shape.tolist()) == sorted(image.shape) and len(axcodes) == 3
    if affine.shape != (4, 4) or original_affine.shape != (4, 4) or spacing.shape != (3,) or not shape_ok:
        raise UserError(f"{path}: geometry keys (affine, original_affine, original_shape, original_axcodes, "
                        "spacing) are inconsistent: re-run the preparation")
    values = set(np.unique(label).tolist())
    if max(values) > 20:
        raise UserError(f"{path}: label value {max(values)} > 20: re-run the preparation")
    return values - {0}


def check_prepared(prep_dir: str | Path) -> dict:
    """{"rows": per-class table rows, "splits": sizes, ...} of a prepared folder; a one-line UserError on
    the first defect found."""
    prep = Path(prep_dir)
    if not prep.exists():
        raise UserError(f"{prep}: folder not found: run scripts/prepare_visceral.py --out {prep}")
    check_input_folder(prep, "", "give a folder written by scripts/prepare_visceral.py --out")
    alpnet = any(prep.glob("image_*.nii*"))
    if not (prep / "meta.json").exists() and (alpnet or any(prep.glob("*/Volumes"))):
        layout = " --layout alpnet" if alpnet else ""
        raise UserError(f"{prep}: a data folder, not a prepared one: prepare it first: python "
                        f"scripts/prepare_visceral.py --visceral-dir {prep} --out NEW_FOLDER{layout}")
    meta = _load_json(prep / "meta.json")
    source = meta.get("source")
    labeled = not (isinstance(source, dict) and source.get("layout") == "images-only")
    splits = _check_meta(prep / "meta.json", meta, labeled)
    size = int(meta["prep_size"])
    index = _load_json(prep / "index.json")
    if not isinstance(index.get("slices"), dict):
        raise UserError(f"{prep / 'index.json'}: no 'slices' object: re-run the preparation")
    unit = meta["intensity"].get("mode") != "zscore"        # SSL-ALPNet's z-score: any finite value
    labels = {pid: _check_train(prep, pid, size, labeled, unit) for pid in splits["train"]}
    volumes = {split: {pid: _check_volume(prep / "volumes" / split / f"{pid}.npz") for pid in splits[split]}
               for split in ("val", "gold")}
    rows = []
    for key, entries in index["slices"].items():
        if not key.isdigit() or not 1 <= int(key) <= 20:
            raise UserError(f"{prep / 'index.json'}: class '{key}' is not a label index 1-20: re-run the "
                            "preparation")
        klass = int(key)
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in labels):
                raise UserError(f"{prep / 'index.json'}: entry {entry} of class {klass} does not name a "
                                "training volume as [pid, row, z]: re-run the preparation")
            pid, row, z = entry
            if not (isinstance(row, int) and 0 <= row < labels[pid].shape[0]
                    and isinstance(z, int) and z >= 0):
                raise UserError(f"{prep / 'index.json'}: entry {entry}: row out of range for "
                                f"{pid} ({labels[pid].shape[0]} slices): re-run the preparation")
            if not (labels[pid][row] == klass).any():
                label_file = prep / "train" / train_file_name(pid, "label")
                raise UserError(f"{label_file}: row {row} has no voxel of class {klass} listed in "
                                "index.json: re-run the preparation")
        rows.append({"index": klass, "name": INDEX_TO_NAME[klass], "slices": len(entries),
                     "volumes": len({entry[0] for entry in entries}),
                     "val": sum(klass in v for v in volumes["val"].values()),
                     "gold": sum(klass in v for v in volumes["gold"].values())})
    for path in sorted((prep / "train").glob("*.npy")):
        pid = train_file_case(path.name)           # the writer's own file-name rule (dataloaders/prepare.py)
        if pid not in labels:
            what = (f"files of {pid} which is not in splits.train" if pid
                    else "a file that is not <id>_image.npy / <id>_label.npy / <id>_neighbours.npy")
            raise UserError(f"{prep / 'train'}: {path.name}: {what}: re-run the preparation into an empty "
                            "folder")
    if not labeled and index["slices"]:
        raise UserError(f"{prep / 'index.json'}: an images-only folder lists training slices: re-run the "
                        "preparation")
    return {"rows": sorted(rows, key=lambda r: r["index"]), "prep_size": size, "labeled": labeled,
            "splits": {split: len(pids) for split, pids in splits.items()}}


def format_table(report: dict) -> str:
    """Per-class table of a `check_prepared` report."""
    lines = [f"{'index':>5}  {'class':<24} {'slices':>6} {'volumes':>7} {'val vol':>7} {'gold vol':>8}"]
    lines += [f"{row['index']:>5}  {row['name']:<24} {row['slices']:>6} {row['volumes']:>7} "
              f"{row['val']:>7} {row['gold']:>8}" for row in report["rows"]]
    if not report["labeled"]:
        lines.append("images only (no labels): for self-supervised training (scripts/make_superpixels.py)")
    sizes = report["splits"]
    lines.append(f"train {sizes['train']} volumes, val {sizes['val']}, gold {sizes['gold']}; "
                 f"prep size {report['prep_size']}")
    return "\n".join(lines)
