"""An SSL-ALPNet-layout folder (dataloaders/alpnet_layout.py) -> a prepared folder of one fold and setting.

The prepared folder (docs/DESIGN.md "Prepared data folder") holds, for fold k of SSL-ALPNet's split:
  train/<id>_image.npy     the training scans' axial slices, normalised as SSL-ALPNet's loader (MR z-score
                           per volume; CT by the training scans' global mean and std), cropped to 256 x 256,
                           float32 (N x 256 x 256; not in [0, 1])
  train/<id>_label.npy     their labels in this project's organ vocabulary (uint8)
  train/<id>_neighbours.npy  N x 2 x 256 x 256 float32: each row's slices z - 1 and z + 1 for 2.5D input
                           (dataloaders/neighbours.py: edge replicate; a slice Setting 2 dropped is
                           replaced by the centre slice, so no excluded image enters training)
  superpixels/<id>.npy     SSL-ALPNet's own superpix-MIDDLE superpixels of the same rows (uint16)
  index.json               per organ, the training slices holding >= 1 voxel of it (supervised episodes)
  volumes/gold/<id>.npz    the fold's test scans and its support scan: image as stored (cropped, float32),
                           label, geometry; meta.json's `intensity` says how to normalise it
                           (`normalised_volume`: MR per-volume z-score, CT the training statistics)
Setting 2 keeps only the training slices without any test organ (`kept_slices`, rule 'or' as
SSL-ALPNet; 'and' = the Q-Net lineage); Setting 1 keeps every slice. The rows of the training arrays
are the kept slices (their z are in index.json and meta.json). Built atomically
(dataloaders.nifti.atomic_folder).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataloaders import alpnet_layout as layout
from dataloaders.intensity import volume_intensity
from dataloaders.neighbours import neighbour_stack
from dataloaders.nifti import atomic_folder
from dataloaders.organs import INDEX_TO_NAME, NAME_TO_INDEX
from dataloaders.prepare import FORMAT_VERSION, NEIGHBOURS, save_npy, save_npz_deterministic, train_file_name
from util.atomic import write_bytes_atomic
from util.errors import UserError

SETTINGS = (1, 2)
RULES = ("or", "and")


def intensity_record(dataset: layout.AlpnetDataset, ct_stats: tuple[float, float] | None) -> dict:
    """meta.json's `intensity` (dataloaders/intensity.py): MR z-score per volume; CT with the training scans'
    mean and std. The training slices are stored already normalised; evaluation volumes as stored."""
    if dataset.modality == "MR":
        return {"mode": "zscore"}
    return {"mode": "zscore", "mean": ct_stats[0], "std": ct_stats[1]}


def normalised_volume(image: np.ndarray, intensity: dict) -> np.ndarray:
    """An evaluation volume (Y x X x Z as stored) normalised by meta.json's `intensity`, float32."""
    resolved = volume_intensity(image, intensity, "evaluation volume")
    return ((np.asarray(image, np.float64) - resolved["mean"]) / resolved["std"]).astype(np.float32)


def prepare_alpnet(data_dir: str | Path, out: str | Path, fold: int, setting: int = 2, label_set: int = 0,
                   rule: str = "or", overwrite: bool = False, with_superpixels: bool = True,
                   validation: bool = False) -> dict:
    """Write the prepared folder of one (fold, setting, label set); returns its meta.json content.

    validation: hold the fold's validation scan (layout.validation_scan) out of training and store it
    with the evaluation volumes (meta alpnet.validation), for choosing options without the test scans."""
    data_dir = Path(data_dir)
    if setting not in SETTINGS:
        raise UserError(f"setting {setting!r} does not exist: use 1 (test organs in training slices) or 2 "
                        "(every slice holding a test organ dropped)")
    if rule not in RULES:
        raise UserError(f"exclusion rule '{rule}' is unknown: use 'or' (SSL-ALPNet) or 'and' (Q-Net lineage)")
    dataset = layout.detect_dataset(data_dir)
    classmap = layout.read_classmap(data_dir)
    ids = layout.scan_ids(data_dir)
    test, support, training = layout.fold_scans(ids, fold, dataset)
    held_out = [layout.validation_scan(ids, fold, dataset)] if validation else []
    training = [sid for sid in training if sid not in held_out]
    # Setting 1 trains one model for both label sets: every evaluated organ is a test organ of it
    test_values = dataset.test_values(label_set) if setting == 2 else list(dataset.evaluated)
    excluded = test_values if setting == 2 else []
    scans = {sid: layout.load_scan(data_dir, sid, dataset, superpixels=with_superpixels and sid in training,
                                   classmap=classmap) for sid in ids if sid in training or sid in test
             or sid == support or sid in held_out}
    for value in test_values:                          # the support must show every test organ
        if not layout.organ_slices(scans[support].label, value).size:
            raise UserError(f"{data_dir / f'label_{support}.nii.gz'}: the support scan of fold {fold} "
                            f"holds no {dataset.class_names[value]}: use the data set's complete labels")
    sizes = {tuple(layout.crop(scan.image).shape[:2]) for scan in scans.values()}
    if len(sizes) != 1 or len(set(next(iter(sizes)))) != 1:
        raise UserError(f"{data_dir}: scans have in-plane sizes {sorted(sizes)} after the [:256, :256] crop, "
                        "one square size is needed: use the data set as SSL-ALPNet's preprocessing wrote it")
    ct_stats = layout.ct_statistics([scans[s].image for s in training]) if dataset.modality == "CT" else None
    kept_counts, index = {}, {}
    with atomic_folder(out, overwrite, inputs=[data_dir]) as partial:
        for sub in ("train", "volumes/gold", "superpixels"):
            (partial / sub).mkdir(parents=True)
        for sid in training:
            scan = scans[sid]
            keep = layout.kept_slices(scan.label, excluded, rule)                           # Z
            rows = np.flatnonzero(keep)
            image = layout.normalise(scan.image, dataset, ct_stats)                          # 256 x 256 x Z
            label = layout.crop(layout.to_vocabulary(scan.label, dataset))                   # 256 x 256 x Z
            save_npy(partial / "train" / f"{sid}_image.npy", np.moveaxis(image[:, :, rows], 2, 0).copy())
            # 2.5D input: each kept row's (z - 1, z + 1), a dropped slice replaced by the centre itself
            save_npy(partial / "train" / train_file_name(str(sid), NEIGHBOURS),
                     np.ascontiguousarray(neighbour_stack(image, rows, 3, available=keep)[:, [0, 2]]))
            save_npy(partial / "train" / f"{sid}_label.npy", np.moveaxis(label[:, :, rows], 2, 0).copy())
            if with_superpixels:
                sp = layout.crop(scan.superpixels)[:, :, rows]
                save_npy(partial / "superpixels" / f"{sid}.npy",
                         np.moveaxis(sp, 2, 0).astype(np.uint16).copy())
            kept_counts[str(sid)] = {"slices": int(keep.size), "kept": int(rows.size)}
            for organ_index in np.unique(label[:, :, rows]):
                if organ_index == 0:
                    continue
                present = np.flatnonzero((label[:, :, rows] == organ_index).any(axis=(0, 1)))
                index.setdefault(str(int(organ_index)), []).extend(
                    [str(sid), int(row), int(rows[row])] for row in present)
        for sid in test + [support] + held_out:
            scan = scans[sid]
            save_npz_deterministic(partial / "volumes" / "gold" / f"{sid}.npz", {
                "image": layout.crop(scan.image).astype(np.float32),
                "label": layout.crop(layout.to_vocabulary(scan.label, dataset)),
                "affine": scan.affine, "original_affine": scan.affine,
                "original_shape": np.asarray(scan.image.shape, dtype=np.int64),
                "original_axcodes": np.asarray("as stored"), "spacing": np.abs(np.diag(scan.affine)[:3])})
        if with_superpixels:
            write_bytes_atomic(json.dumps({"format_version": 1,
                                           "params": {"method": "ssl-alpnet superpix-MIDDLE"},
                                           "volumes": {str(s): {} for s in training}}).encode(),
                               partial / "superpixels" / "meta.json")
        index = {key: index[key] for key in sorted(index, key=int)}
        test_organs = [dataset.vocabulary[v] for v in test_values]
        meta = {"format_version": FORMAT_VERSION,
                "source": {"dir": str(data_dir.resolve()), "layout": "alpnet", "dataset": dataset.name},
                "prep_size": next(iter(sizes))[0], "intensity": intensity_record(dataset, ct_stats),
                "selection": {"rule": "every slice" if setting == 1 else f"setting 2 ({rule} rule)"},
                "seed": 0, "splits": {"train": [str(s) for s in training], "val": [],
                                      "gold": [str(s) for s in test + [support] + held_out]},
                "classes": {key: INDEX_TO_NAME[int(key)] for key in index},
                "alpnet": {"gold_image": "as stored", "fold": fold, "setting": setting,
                           "label_set": label_set if setting == 2 else None,
                           "rule": rule,
                           "test": [str(s) for s in test], "support": str(support),
                           "validation": [str(s) for s in held_out],
                           "test_organs": test_organs, "excluded": [INDEX_TO_NAME[NAME_TO_INDEX[
                               dataset.vocabulary[v]]] for v in excluded], "kept": kept_counts}}
        write_bytes_atomic(json.dumps({"slices": index}).encode(), partial / "index.json")
        write_bytes_atomic(json.dumps(meta, indent=1).encode(), partial / "meta.json")
    return meta
