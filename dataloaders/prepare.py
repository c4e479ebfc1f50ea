"""Any source layout -> the prepared folder of docs/DESIGN.md ("Prepared data folder"), built atomically:
`prepare_dataset` (VISCERAL, multi-label, images-only; the official slice rule `Selection`) and
`prepare_alpnet` (one fold, setting and label set of an SSL-ALPNet folder).
"""
from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from dataloaders import layouts, transforms
from dataloaders.label_map import outlier_warning, read_label_map
from dataloaders.layouts import LabeledVolume
from dataloaders.nifti import atomic_folder, parallel_map
from dataloaders.organs import INDEX_TO_NAME
from dataloaders.prepared import NEIGHBOURS, is_case_id, train_file_name
from util.cli import warn
from util.errors import UserError
from util.io import check_input_folder, check_output_folder, write_bytes_atomic

FORMAT_VERSION = 1
MIN_WINDOW_COVER = 0.05                   # a volume must fill at least 5% of [0, 1] under an HU window


@dataclass(frozen=True)
class Selection:
    """The slice selection rule (official defaults)."""
    min_voxels: int = 150
    max_per_volume: int = 5
    many: int = 20
    keep_all: bool = False
    skip_last: bool = False   # True: the official notebook, axial slices 0 .. Z-2 only (never the last)

    def check(self) -> None:
        if self.min_voxels < 0 or not 1 <= self.max_per_volume <= self.many:
            raise UserError(f"slice selection --min-voxels {self.min_voxels} / --max-per-volume "
                            f"{self.max_per_volume} / --many {self.many} is out of range: use "
                            "min-voxels >= 0 and 1 <= max-per-volume <= many (official: 150 / 5 / 20)")


@dataclass
class SourceCase:
    """One volume of the source data set and how to load it (`unlabeled`: layout 'images-only')."""
    pid: str
    load: Callable[[], LabeledVolume]
    unlabeled: bool = False


def list_sources(source_dir: str | Path, layout: str = "visceral", label_map: str | Path | None = None,
                 allow_missing: bool = False) -> tuple[list[SourceCase], list[SourceCase]]:
    """(silver cases, gold cases) of a data set in the 'visceral', 'multilabel' or 'images-only' layout."""
    root = check_input_folder(source_dir, "", "give the data folder (or make a phantom with "
                              "scripts/make_phantom.py --out NEW_FOLDER)")
    if layout == "visceral":
        silver, gold = (layouts.find_cases(root / name) for name in ("SilverCorpus", "GoldCorpus"))
        return ([SourceCase(c.pid, partial(layouts.load_case, c)) for c in silver],
                [SourceCase(c.pid, partial(layouts.load_case, c)) for c in gold])
    if layout == "multilabel":
        if label_map is None:
            raise UserError("--layout multilabel needs --label-map map.json (label name -> value)")
        names = read_label_map(label_map)
        silver, gold = ([SourceCase(pid, partial(layouts.load_multilabel_case, image, label, names, pid,
                                                 allow_missing))
                         for pid, image, label in layouts.find_multilabel_cases(root, split)]
                        for split in ("silver", "gold"))
        return silver, gold
    assert layout == "images-only", layout   # every volume trains (self-supervised); no validation or test
    return [SourceCase(pid, partial(layouts.load_unlabeled, path, pid), unlabeled=True)
            for pid, path in layouts.find_image_volumes(root)], []


def select_slices(label: np.ndarray, index: int, rng: np.random.Generator, rule: Selection) -> np.ndarray:
    """Sorted z of the training slices of class `index` in one label volume X x Y x Z."""
    counts = (label == index).sum(axis=(0, 1))                                             # Z
    if rule.skip_last:                                  # the official notebook's range(Z - 1)
        counts = counts[:-1]
    qualifying = np.flatnonzero(counts > rule.min_voxels)
    if rule.keep_all or qualifying.size <= rule.many:
        return qualifying
    return np.sort(rng.choice(qualifying, size=rule.max_per_volume, replace=False))


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed equivalent with fixed zip timestamps (same content -> same bytes), atomic."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for key, value in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue(), compresslevel=1)
    write_bytes_atomic(buffer.getvalue(), path)


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes_atomic(buffer.getvalue(), path)


def volume_arrays(volume: LabeledVolume) -> dict[str, np.ndarray]:
    """The keys of a prepared evaluation volume (DESIGN.md); the image as `exact_image` left it."""
    image = volume.image
    return {"image": image.array, "label": volume.label.astype(np.uint8),
            "affine": image.affine, "original_affine": image.original_affine,
            "original_shape": np.asarray(image.original_shape, dtype=np.int64),
            "original_axcodes": np.asarray(image.original_axcodes), "spacing": image.spacing}


def training_images(image: np.ndarray, rows: np.ndarray, intensity: dict,
                    size: int) -> tuple[np.ndarray, np.ndarray]:
    """Training slices `rows` (z) of a volume X x Y x Z and their (z - 1, z + 1) neighbours, scaled, resized
    and clipped to [0, 1]; a per-volume z-score without statistics takes the training rows'."""
    rows = np.asarray(rows, dtype=int)
    if not rows.size:
        return np.zeros((0, size, size), np.float32), np.zeros((0, 2, size, size), np.float32)
    around = transforms.neighbour_indices(rows, image.shape[2])                         # N x 3
    needed, position = np.unique(around, return_inverse=True)                           # M, N*3
    position = position.reshape(around.shape)                                           # N x 3
    scaling = intensity
    if intensity.get("mode") == "zscore" and "mean" not in intensity:
        rows_xy = np.asarray(np.moveaxis(image[:, :, rows], 2, 0), np.float32)        # N x X x Y
        scaling = transforms.volume_intensity(rows_xy, intensity, "training slices")
    slices = transforms.scale_intensity(np.moveaxis(image[:, :, needed], 2, 0), scaling)  # M x X x Y
    slices = np.asarray(transforms.resize_image(slices, size), dtype=np.float32).clip(0, 1)  # M x S x S
    return slices[position[:, 1]], slices[position[:, [0, 2]]]      # N x S x S, N x 2 x S x S


def process_case(case: SourceCase, split: str, out: Path, size: int, intensity: dict, rule: Selection,
                 seed: int) -> dict:
    """Load one case and write its prepared files; returns its summary (and slices for training)."""
    volume = case.load()
    if intensity["mode"] != "window":     # warned: a few extreme voxels that stretch the scaled range
        problem = outlier_warning(volume.image.array, volume.image.path, "volume", intensity["mode"],
                                  "--window LO HI")
        if problem:
            warn(problem)
    else:                                 # refused: a window that maps the volume into < 5% of [0, 1]
        (low, high), values = intensity["window"], volume.image.array
        vmin, vmax = float(values.min()), float(values.max())
        if (min(vmax, high) - max(vmin, low)) / (high - low) < MIN_WINDOW_COVER:
            raise UserError(f"{volume.image.path}: voxel values span [{vmin:g}, {vmax:g}], which the HU "
                            f"window [{low:g}, {high:g}] maps into less than {MIN_WINDOW_COVER:.0%} of "
                            "[0, 1] (not Hounsfield units?): leave --window out (per-slice min-max scaling) "
                            "or convert the volume to HU")
    present = [int(v) for v in np.unique(volume.label) if v > 0]
    summary = {"pid": case.pid, "split": split, "shape": list(volume.label.shape), "structures": present,
               "image_dtype": "int16" if volume.image.array.dtype == np.int16 else "float32",
               "overlap_voxels": volume.overlap_voxels, "orientation": volume.image.original_axcodes}
    if split != "train":
        save_npz_deterministic(out / "volumes" / split / f"{case.pid}.npz", volume_arrays(volume))
        return summary
    rng = np.random.default_rng([seed, zlib.crc32(case.pid.encode())])   # (seed, pid) only, not the order
    chosen = {index: select_slices(volume.label, index, rng, rule) for index in present}
    chosen = {index: zs for index, zs in chosen.items() if zs.size}
    rows = np.unique(np.concatenate([np.zeros(0, int)] + list(chosen.values()))).astype(int)   # z of each row
    if case.unlabeled:  # images-only: every axial slice, row = z; no label file
        rows = np.arange(volume.image.array.shape[2])
    images, neighbours = training_images(volume.image.array, rows, intensity, size)  # N(x 2) x S x S
    labels = np.zeros((0, size, size), np.uint8)                                              # N x S x S
    if rows.size:
        labels = transforms.resize_label(np.moveaxis(volume.label[:, :, rows], 2, 0), size)
        labels = np.asarray(labels, dtype=np.uint8)
    save_npy(out / "train" / train_file_name(case.pid, "image"), images)
    save_npy(out / "train" / train_file_name(case.pid, NEIGHBOURS), neighbours)
    if case.unlabeled:
        return summary
    save_npy(out / "train" / train_file_name(case.pid, "label"), labels)
    row_of = {int(z): row for row, z in enumerate(rows)}
    # a class that vanishes when its slice is shrunk to prep_size is not listed for that slice
    summary["slices"] = {str(index): [[case.pid, row_of[int(z)], int(z)] for z in zs
                                      if (labels[row_of[int(z)]] == index).any()]
                         for index, zs in chosen.items()}
    summary["slices"] = {key: entries for key, entries in summary["slices"].items() if entries}
    return summary


def split_silver(pids: list[str], n_val: int | None, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) patient ids: a seeded choice of n_val validation volumes (default 20%, at least 1)."""
    if n_val is None:
        n_val = max(1, round(0.2 * len(pids)))
    if not 0 <= n_val < len(pids):
        raise UserError(f"--n-val {n_val} leaves no training volume among {len(pids)} silver volumes: use "
                        f"0 <= n-val <= {len(pids) - 1}")
    order = np.random.default_rng([seed, 7]).permutation(len(pids))
    val = sorted(pids[i] for i in order[:n_val])
    return [p for p in pids if p not in val], val


def check_out_location(out: str | Path, source_dir: str | Path, label_map: str | Path | None,
                       overwrite: bool) -> None:
    """`out` is not, holds not and lies not in the source; `--overwrite` replaces only a prepared folder."""
    out, source = Path(out), Path(source_dir)
    if source.is_dir() and Path(os.path.realpath(source)) in Path(os.path.realpath(out)).parents:
        raise UserError(f"--out {out} lies inside the input folder {source}: prepared files would mix with "
                        f"the source data (a later run reads them as cases): give an --out outside {source}")
    check_output_folder(out, [source_dir, label_map], "--out", overwrite)
    if out.is_dir() and not (out / "meta.json").is_file() and any(out.iterdir()):
        raise UserError(f"--out {out}: --overwrite replaces only a prepared folder (with meta.json) or an "
                        "empty one, and this folder holds other files: give a new folder, or remove it "
                        "yourself")


def prepare_dataset(source_dir: str | Path, out: str | Path, layout: str = "visceral",
                    label_map: str | Path | None = None, size: int = 256, intensity: dict | None = None,
                    n_val: int | None = None, seed: int = 1234, rule: Selection = Selection(),
                    workers: int = 2, overwrite: bool = False, allow_missing: bool = False) -> dict:
    """Write PREP (DESIGN.md "Prepared data folder") atomically; returns meta.json's content."""
    intensity = transforms.validate_intensity(intensity or transforms.DEFAULT_INTENSITY)
    if not 16 <= size <= 2048:
        raise UserError(f"--size {size}: use 16 .. 2048 (256 for the phantom, 512 for VISCERAL)")
    rule.check()
    check_out_location(out, source_dir, label_map, overwrite)
    silver, gold = list_sources(source_dir, layout, label_map, allow_missing)
    seen: dict[str, str] = {}               # every case id names prepared files, and one case only
    for split, cases in (("silver (training)", silver), ("gold (test)", gold)):
        for case in cases:
            if not is_case_id(case.pid):
                raise UserError(f"{source_dir}: case id {case.pid!r} cannot name prepared files: rename the "
                                "case with letters, digits, '.', '_' or '-' only")
            if case.pid in seen:
                raise UserError(f"{source_dir}: case id {case.pid} names two volumes ({seen[case.pid]} and "
                                f"{split}): give every case its own id")
            seen[case.pid] = split
    if layout == "images-only":
        if n_val:
            raise UserError(f"--n-val {n_val}: the images-only layout has no labels to validate on: leave "
                            "--n-val out")
        n_val = 0
    train, val = split_silver([c.pid for c in silver], n_val, seed)
    split_of = {**{p: "train" for p in train}, **{p: "val" for p in val}}
    with atomic_folder(out, overwrite, inputs=[source_dir, label_map]) as partial_dir:
        for sub in ("train", "volumes/val", "volumes/gold"):
            (partial_dir / sub).mkdir(parents=True)
        tasks = [(c, split_of[c.pid], partial_dir, size, intensity, rule, seed) for c in silver]
        tasks += [(c, "gold", partial_dir, size, intensity, rule, seed) for c in gold]
        summaries = parallel_map(process_case, tasks, workers)
        index: dict[str, list] = {}
        for summary in summaries:
            for label, entries in summary.pop("slices", {}).items():
                index.setdefault(label, []).extend(entries)
        index = {label: index[label] for label in sorted(index, key=int)}
        meta = {"format_version": FORMAT_VERSION,
                "source": {"dir": str(Path(source_dir).resolve()), "layout": layout,
                           "label_map": str(Path(label_map).resolve()) if label_map else None},
                "prep_size": size, "intensity": intensity,
                "selection": asdict(rule),
                "seed": seed, "splits": {"train": train, "val": val, "gold": [c.pid for c in gold]},
                "classes": {label: INDEX_TO_NAME[int(label)] for label in index},
                "volumes": {s["pid"]: {k: v for k, v in s.items() if k != "pid"} for s in summaries}}
        write_bytes_atomic(json.dumps({"slices": index}).encode(), partial_dir / "index.json")
        write_bytes_atomic(json.dumps(meta, indent=1).encode(), partial_dir / "meta.json")
    return meta


# ------------------------------------------------------------------------------ SSL-ALPNet folders
# Training slices normalised as SSL-ALPNet's loader and cropped to 256 x 256 (not in [0, 1]); the fold's
# test, support (and validation) scans as stored, cropped, and normalised at evaluation.


def normalised_volume(image: np.ndarray, intensity: dict, name: str = "evaluation volume") -> np.ndarray:
    """A volume (Y x X x Z) normalised by meta.json's `intensity` (SSL-ALPNet's, no eps), float32."""
    resolved = transforms.volume_intensity(image, intensity, name)
    return ((np.asarray(image, np.float64) - resolved["mean"]) / resolved["std"]).astype(np.float32)


def prepare_alpnet(data_dir: str | Path, out: str | Path, fold: int, setting: int = 2, label_set: int = 0,
                   rule: str = "or", overwrite: bool = False, validation: bool = False,
                   superpixel_dir: str | Path | None = None) -> dict:
    """Write the prepared folder of one (fold, setting, label set); returns its meta.json content.
    validation: the fold's validation scan is stored with the gold volumes, not trained on."""
    data_dir = Path(data_dir)
    if setting not in (1, 2):
        raise UserError(f"setting {setting!r} does not exist: use 1 (test organs in training slices) or 2 "
                        "(every slice holding a test organ dropped)")
    if rule not in ("or", "and"):
        raise UserError(f"exclusion rule '{rule}' is unknown: use 'or' (SSL-ALPNet) or 'and' (Q-Net lineage)")
    dataset = layouts.detect_dataset(data_dir)
    classmap = layouts.read_classmap(data_dir)
    ids = layouts.scan_ids(data_dir)
    test, support, training = layouts.fold_scans(ids, fold, dataset)
    held_out = [layouts.validation_scan(ids, fold, dataset)] if validation else []
    training = [sid for sid in training if sid not in held_out]
    # Setting 1 trains one model for both label sets: every evaluated organ is a test organ of it
    test_values = dataset.test_values(label_set) if setting == 2 else list(dataset.evaluated)
    excluded = test_values if setting == 2 else []
    # superpixels: for self-supervised training, all training scans or none (supervised rows, mask copy)
    sp_dir = Path(superpixel_dir or data_dir)
    missing = layouts.missing_superpixels(sp_dir, training)
    if 0 < len(missing) < len(training):
        raise UserError(f"{layouts.superpixel_path(sp_dir, missing[0])}: missing (training scans "
                        f"without superpixels: {missing}): {layouts.make_superpixels_command(data_dir)}")
    with_superpixels = not missing
    scans = {sid: layouts.load_scan(data_dir, sid, dataset, superpixels=with_superpixels and sid in training,
                                   classmap=classmap, superpixel_dir=sp_dir)
             for sid in ids if sid in training or sid in test or sid == support or sid in held_out}
    for value in test_values:                          # the support must show every test organ
        if not layouts.organ_slices(scans[support].label, value).size:
            raise UserError(f"{data_dir / f'label_{support}.nii.gz'}: the support scan of fold {fold} "
                            f"holds no {dataset.class_names[value]}: use the data set's complete labels")
    sizes = {tuple(layouts.crop(scan.image).shape[:2]) for scan in scans.values()}
    if len(sizes) != 1 or len(set(next(iter(sizes)))) != 1:
        raise UserError(f"{data_dir}: scans have in-plane sizes {sorted(sizes)} after the [:256, :256] crop, "
                        "one square size is needed: use the data set as SSL-ALPNet's preprocessing wrote it")
    ct_stats = layouts.ct_statistics([scans[s].image for s in training]) if dataset.modality == "CT" else None
    # meta.json's `intensity`: MR z-score per volume; CT with the training scans' mean and std
    intensity = {"mode": "zscore"} if ct_stats is None else {"mode": "zscore", "mean": ct_stats[0],
                                                             "std": ct_stats[1]}
    kept_counts, index = {}, {}
    with atomic_folder(out, overwrite, inputs=[data_dir]) as partial:
        for sub in ("train", "volumes/gold") + (("superpixels",) if with_superpixels else ()):
            (partial / sub).mkdir(parents=True)
        for sid in training:
            scan = scans[sid]
            keep = layouts.kept_slices(scan.label, excluded, rule)                           # Z
            rows = np.flatnonzero(keep)
            image = layouts.crop(normalised_volume(scan.image, intensity, f"{data_dir}/image_{sid}.nii.gz"))
            label = layouts.crop(layouts.to_vocabulary(scan.label, dataset))                   # 256 x 256 x Z
            save_npy(partial / "train" / f"{sid}_image.npy", np.moveaxis(image[:, :, rows], 2, 0).copy())
            # 2.5D input: each kept row's (z - 1, z + 1), a dropped slice replaced by the centre itself
            save_npy(partial / "train" / train_file_name(str(sid), NEIGHBOURS),
                     np.ascontiguousarray(transforms.neighbour_stack(image, rows, 3, keep)[:, [0, 2]]))
            save_npy(partial / "train" / f"{sid}_label.npy", np.moveaxis(label[:, :, rows], 2, 0).copy())
            if with_superpixels:
                sp = layouts.crop(scan.superpixels)[:, :, rows]
                save_npy(partial / "superpixels" / f"{sid}.npy",
                         np.moveaxis(sp, 2, 0).astype(np.uint16).copy())
            kept_counts[str(sid)] = {"slices": int(keep.size), "kept": int(rows.size)}
            for organ_index in np.setdiff1d(label[:, :, rows], [0]):
                present = np.flatnonzero((label[:, :, rows] == organ_index).any(axis=(0, 1)))
                index.setdefault(str(int(organ_index)), []).extend(
                    [str(sid), int(row), int(rows[row])] for row in present)
        for sid in test + [support] + held_out:
            scan = scans[sid]
            save_npz_deterministic(partial / "volumes" / "gold" / f"{sid}.npz", {
                "image": layouts.crop(scan.image).astype(np.float32),
                "label": layouts.crop(layouts.to_vocabulary(scan.label, dataset)),
                "affine": scan.affine, "original_affine": scan.affine,
                "original_shape": np.asarray(scan.image.shape, dtype=np.int64),
                "original_axcodes": np.asarray("as stored"), "spacing": np.abs(np.diag(scan.affine)[:3])})
        if with_superpixels:
            superpixel_meta = {"format_version": 1, "params": {"method": "ssl-alpnet superpix-MIDDLE"},
                               "volumes": {str(s): {} for s in training}}
            write_bytes_atomic(json.dumps(superpixel_meta).encode(), partial / "superpixels" / "meta.json")
        index = {key: index[key] for key in sorted(index, key=int)}
        meta = {"format_version": FORMAT_VERSION,
                "source": {"dir": str(data_dir.resolve()), "layout": "alpnet", "dataset": dataset.name},
                "prep_size": next(iter(sizes))[0], "intensity": intensity,
                "selection": {"rule": "every slice" if setting == 1 else f"setting 2 ({rule} rule)"},
                "seed": 0, "splits": {"train": [str(s) for s in training], "val": [],
                                      "gold": [str(s) for s in test + [support] + held_out]},
                "classes": {key: INDEX_TO_NAME[int(key)] for key in index},
                "alpnet": {"gold_image": "as stored", "fold": fold, "setting": setting,
                           "label_set": label_set if setting == 2 else None, "rule": rule,
                           "test": [str(s) for s in test], "support": str(support),
                           "validation": [str(s) for s in held_out],
                           "test_organs": [dataset.vocabulary[v] for v in test_values],
                           "excluded": [dataset.vocabulary[v] for v in excluded],
                           "superpixels": with_superpixels,
                           "kept": kept_counts}}
        write_bytes_atomic(json.dumps({"slices": index}).encode(), partial / "index.json")
        write_bytes_atomic(json.dumps(meta, indent=1).encode(), partial / "meta.json")
    return meta
