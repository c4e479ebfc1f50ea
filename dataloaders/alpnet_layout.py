"""Reader of the SSL-ALPNet data layout (Ouyang et al., ECCV 2020): CHAOS-T2 abdominal MRI and SABS CT.

A folder in that layout (SSL-ALPNet's `chaos_MR_T2_normalized` / `sabs_CT_normalized`) holds
  image_<id>.nii.gz            the scan, already resampled by SSL-ALPNet's preprocessing notebooks
  label_<id>.nii.gz            organ labels on the same grid (the data set's own label values)
  superpix-MIDDLE_<id>.nii.gz  SSL-ALPNet's 2D Felzenszwalb superpixels per axial slice (optional)
  classmap_1.json              {class name: {str(id): [slices holding >= 1 voxel of the class]}}
Ids: the last run of digits of each image file name, sorted as integers (as SSL-ALPNet's loaders).

Read as SSL-ALPNet's loaders read it: SimpleITK's array [Z, Y, X] transposed to [Y, X, Z], i.e. the
nibabel array X x Y x Z with its first two axes swapped; no reorientation, no flip, no resize; a 2D
sample is `volume[:, :, z]` (rows Y, columns X) cropped to [:256, :256]. Normalisation before the
crop: MR z-scored per volume, (x - mean) / std over the whole volume, no eps; CT with one global mean
and std over every voxel of the fold's training scans (`ct_statistics`). Nothing here assumes
Hounsfield units.

Labels are mapped onto this project's organ vocabulary (dataloaders/organs.py) by `to_vocabulary`;
data set label values without a vocabulary entry (SABS esophagus, stomach, IVC, portal/splenic vein)
become background (0).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from dataloaders.organs import NAME_TO_INDEX
from util.errors import UserError

CROP = 256                                  # both loaders crop [:256, :256] (SABS is stored 257 x 257)
CLASSMAP = "classmap_1.json"
SUPERPIXELS = "superpix-MIDDLE"             # the only superpixel mode SSL-ALPNet has


@dataclass(frozen=True)
class AlpnetDataset:
    """One data set of the SSL-ALPNet layout: modality, label values, folds and label sets."""
    name: str
    # 'MR' (z-score per volume) or 'CT' (global training statistics)
    modality: str
    class_names: dict[int, str]                 # label value -> classmap name (every value of the data set)
    vocabulary: dict[int, str]                  # label value -> organ name of dataloaders/organs.py
    separators: tuple[int, ...]                 # fold k = ids[sep[k] : sep[k + 1]] (+ the next id as support)
    label_groups: tuple[tuple[int, ...], ...]   # label_sets g tests all evaluated values minus groups[g]
    evaluated: tuple[int, ...] = field(default=())   # values ever tested

    def test_values(self, label_set: int) -> list[int]:
        """Label values tested under `label_set` (SSL-ALPNet: all evaluated minus label_groups[label_set])."""
        if label_set not in range(len(self.label_groups)):
            raise UserError(f"label set {label_set} does not exist for {self.name}: use 0 (kidneys) or "
                            "1 (liver and spleen)")
        return [v for v in self.evaluated if v not in self.label_groups[label_set]]

    def test_organs(self, label_set: int) -> list[str]:
        """Organ names (this project's vocabulary) tested under `label_set`."""
        return [self.vocabulary[v] for v in self.test_values(label_set)]


CHAOS_T2 = AlpnetDataset(
    name="chaos_t2", modality="MR",
    class_names={0: "BG", 1: "LIVER", 2: "RK", 3: "LK", 4: "SPLEEN"},
    vocabulary={1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"},
    separators=(0, 4, 8, 12, 16, 20), label_groups=((1, 4), (2, 3)), evaluated=(1, 2, 3, 4))
SABS = AlpnetDataset(
    name="sabs", modality="CT",
    class_names={0: "BGD", 1: "SPLEEN", 2: "KID_R", 3: "KID_l", 4: "GALLBLADDER", 5: "ESOPHAGUS", 6: "LIVER",
                 7: "STOMACH", 8: "AORTA", 9: "IVC", 10: "PS_VEIN", 11: "PANCREAS", 12: "AG_R", 13: "AG_L"},
    vocabulary={1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 6: "liver", 8: "aorta",
                11: "pancreas", 12: "adrenal_right", 13: "adrenal_left"},
    separators=(0, 6, 12, 18, 24, 30), label_groups=((1, 6), (2, 3)), evaluated=(1, 2, 3, 6))
DATASETS = {CHAOS_T2.name: CHAOS_T2, SABS.name: SABS}
N_FOLDS = 5


def _hint(folder: Path) -> str:
    return (f"point --data at a folder in SSL-ALPNet's layout (image_<id>.nii.gz, label_<id>.nii.gz, "
            f"{CLASSMAP}), e.g. its chaos_MR_T2_normalized or sabs_CT_normalized folder; {folder} is not one")


def read_classmap(folder: str | Path) -> dict[str, dict[str, list[int]]]:
    """classmap_1.json of the folder; one-line errors for a missing or malformed file."""
    path = Path(folder) / CLASSMAP
    if not path.is_file():
        raise UserError(f"{path}: missing: {_hint(Path(folder))}")
    try:
        raw = json.loads(path.read_text())
        return {str(name): {str(sid): [int(z) for z in zs] for sid, zs in scans.items()}
                for name, scans in raw.items()}
    except (ValueError, AttributeError, TypeError) as error:
        raise UserError(f"{path}: unreadable ({type(error).__name__}: {error}): regenerate it with "
                        "SSL-ALPNet's class_slice_index_gen notebook") from None


def detect_dataset(folder: str | Path) -> AlpnetDataset:
    """CHAOS-T2 or SABS, told apart by the class names of classmap_1.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: data folder not found: {_hint(folder)}")
    if not any(folder.glob("image_*.nii.gz")):
        raise UserError(f"{folder}: no image_<id>.nii.gz files: {_hint(folder)}")
    names = set(read_classmap(folder))
    for dataset in DATASETS.values():
        if {dataset.class_names[v] for v in dataset.evaluated} <= names:
            return dataset
    raise UserError(f"{folder / CLASSMAP}: class names {sorted(names)} are neither CHAOS-T2's "
                    "(LIVER, RK, LK, SPLEEN) nor SABS's (SPLEEN, KID_R, KID_l, LIVER): "
                    "use SSL-ALPNet's classmap of that data set")


def _digits(path: Path) -> int:
    """The last run of digits of a file name (SSL-ALPNet takes it from the full path)."""
    runs = re.findall(r"\d+", path.name)
    if not runs:
        raise UserError(f"{path}: no scan id in the name: name it image_<id>.nii.gz")
    return int(runs[-1])


def scan_ids(folder: str | Path) -> list[int]:
    """Scan ids of the folder, sorted as integers; every image must have its label and vice versa."""
    folder = Path(folder)
    images = {_digits(p): p for p in folder.glob("image_*.nii.gz")}
    labels = {_digits(p): p for p in folder.glob("label_*.nii.gz")}
    if not images:
        raise UserError(f"{folder}: no image_<id>.nii.gz files: {_hint(folder)}")
    lonely = sorted(set(images) - set(labels))
    if lonely:
        raise UserError(f"{images[lonely[0]]}: no label_{lonely[0]}.nii.gz beside it (ids without labels: "
                        f"{lonely}): add the label volumes or remove those images")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise UserError(f"{labels[orphans[0]]}: no image_{orphans[0]}.nii.gz beside it "
                        f"(labels without images: {orphans}): add the images or remove those labels")
    return sorted(images)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array Y x X x Z as SSL-ALPNet's transpose of SimpleITK's [Z, Y, X], affine) of one NIfTI file."""
    if not path.is_file():
        raise UserError(f"{path}: file not found: {_hint(path.parent)}")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float64)
    except Exception as error:  # nibabel raises many kinds for corrupt files
        raise UserError(f"{path}: cannot read NIfTI ({type(error).__name__}): "
                        "copy or export it again") from None
    if data.ndim != 3:
        raise UserError(f"{path}: {data.ndim} dimensions {data.shape}, expected one 3D scan: export it again")
    if not np.isfinite(data).all():
        raise UserError(f"{path}: NaN/inf voxels: fix or re-export the scan")
    return np.ascontiguousarray(data.transpose(1, 0, 2)), np.asarray(image.affine, dtype=np.float64)


@dataclass
class AlpnetScan:
    """One scan as SSL-ALPNet reads it, before normalisation and crop (arrays Y x X x Z)."""
    sid: int
    image: np.ndarray               # Y x X x Z float64, stored intensities
    label: np.ndarray               # Y x X x Z uint8, the data set's own label values
    affine: np.ndarray              # 4 x 4, as stored
    superpixels: np.ndarray | None  # Y x X x Z int32 or None


def load_scan(folder: str | Path, sid: int, dataset: AlpnetDataset, superpixels: bool = False,
              classmap: dict | None = None) -> AlpnetScan:
    """Read and check one scan: label on the image's grid, known values, classmap agreeing with the label."""
    folder = Path(folder)
    image, affine = _read(folder / f"image_{sid}.nii.gz")
    label_path = folder / f"label_{sid}.nii.gz"
    label, label_affine = _read(label_path)
    if label.shape != image.shape or not np.allclose(label_affine, affine, atol=1e-3):
        raise UserError(f"{label_path}: on another grid than image_{sid}.nii.gz (shape {label.shape} vs "
                        f"{image.shape}, or another affine): resample the label onto the image grid")
    values = np.unique(label)
    unknown = [v for v in values if v not in dataset.class_names or v != np.rint(v)]
    if unknown:
        raise UserError(f"{label_path}: label values {unknown[:5]} are not {dataset.name}'s "
                        f"({sorted(dataset.class_names)}): use the data set's own label volumes")
    label = label.astype(np.uint8)
    scan = AlpnetScan(sid, image, label, affine, None)
    if classmap is not None:
        check_classmap(classmap, scan, dataset, folder / CLASSMAP)
    if superpixels:
        sp_path = folder / f"{SUPERPIXELS}_{sid}.nii.gz"
        if not sp_path.is_file():
            raise UserError(f"{sp_path}: missing, self-supervised training needs SSL-ALPNet's superpixels: "
                            "make them with its pseudolabel_gen notebook, or train with labels")
        sp, _ = _read(sp_path)
        if sp.shape != image.shape:
            raise UserError(f"{sp_path}: shape {sp.shape} differs from image_{sid}.nii.gz {image.shape}: "
                            "make the superpixels again from that image")
        scan.superpixels = np.rint(sp).astype(np.int32)
    return scan


def organ_slices(label: np.ndarray, value: int) -> np.ndarray:
    """Ascending z of the slices of a Y x X x Z label volume holding >= 1 voxel of `value` (classmap_1)."""
    return np.flatnonzero((label == value).any(axis=(0, 1)))


def check_classmap(classmap: dict, scan: AlpnetScan, dataset: AlpnetDataset, path: Path) -> None:
    """classmap_1[c][id] must list exactly the slices of the label volume holding class c (evaluated c)."""
    for value in dataset.evaluated:
        name = dataset.class_names[value]
        listed = classmap.get(name, {}).get(str(scan.sid))
        actual = organ_slices(scan.label, value).tolist()
        if listed is None and not actual:
            continue
        if listed != actual:
            raise UserError(f"{path}: {name} of scan {scan.sid} lists slices {_span(listed)} but "
                            f"label_{scan.sid}.nii.gz holds it in {_span(actual)}: "
                            f"regenerate {CLASSMAP} from the labels "
                            "(SSL-ALPNet's class_slice_index_gen notebook)")


def _span(zs) -> str:
    if not zs:
        return "none"
    return f"{zs[0]}-{zs[-1]} ({len(zs)} slices)"


def zscore(image: np.ndarray) -> np.ndarray:
    """MR: (x - mean) / std over the whole volume, no eps (SSL-ALPNet's get_normalize_op)."""
    std = float(image.std())
    if std == 0.0:
        raise UserError("scan is constant (std 0): z-scoring is undefined: check the image file")
    return ((image - image.mean()) / std).astype(np.float32)


def ct_statistics(images: list[np.ndarray]) -> tuple[float, float]:
    """CT: one mean and std over every voxel of the fold's training scans (full stored volumes)."""
    total = sum(float(a.sum()) for a in images)
    count = sum(a.size for a in images)
    mean = total / count
    var = sum(float(((a - mean) ** 2).sum()) for a in images) / count
    return mean, float(np.sqrt(var))


def normalise(image: np.ndarray, dataset: AlpnetDataset,
              ct_stats: tuple[float, float] | None = None) -> np.ndarray:
    """Normalised and cropped Y x X x Z float32: MR z-score per volume, CT by the training statistics."""
    if dataset.modality == "MR":
        out = zscore(image)
    else:
        if ct_stats is None:
            raise UserError(f"{dataset.name}: CT normalisation needs the training scans' mean and std "
                            "(ct_statistics)")
        out = ((image - ct_stats[0]) / ct_stats[1]).astype(np.float32)
    return crop(out)


def crop(volume: np.ndarray) -> np.ndarray:
    """[:256, :256] in-plane (SSL-ALPNet's loaders)."""
    return np.ascontiguousarray(volume[:CROP, :CROP])


def to_vocabulary(label: np.ndarray, dataset: AlpnetDataset) -> np.ndarray:
    """Data set label values -> this project's organ indices (unmapped values -> 0), uint8."""
    table = np.zeros(max(dataset.class_names) + 1, dtype=np.uint8)
    for value, organ in dataset.vocabulary.items():
        table[value] = NAME_TO_INDEX[organ]
    return table[label]


def fold_scans(ids: list[int], fold: int, dataset: AlpnetDataset) -> tuple[list[int], int, list[int]]:
    """(test ids, support id, training ids) of a fold: SSL-ALPNet's circular split.

    Ids sorted as integers in a circular list; fold k = ids[sep[k] : sep[k + 1] + 1] with wrap-around:
    the fold's test scans plus the next scan in sorted order as the support. Training uses every
    other scan (the support is left out of training too).
    """
    if not isinstance(fold, int) or fold not in range(N_FOLDS):
        raise UserError(f"fold {fold!r} does not exist: use 0-{N_FOLDS - 1} (SSL-ALPNet's five folds)")
    ordered = sorted(int(i) for i in ids)
    sep, n = dataset.separators, len(ordered)
    picked = [ordered[i % n] for i in range(sep[fold], sep[fold + 1] + 1)]   # CircularList slice
    test, support = picked[:-1], picked[-1]
    training = [i for i in ordered if i not in picked]
    if len(set(picked)) < len(picked) or not training:
        raise UserError(f"fold {fold} of {dataset.name} needs {sep[fold + 1] - sep[fold] + 2} distinct scans "
                        f"(test, support, training), the folder has {n}: use the complete data set "
                        f"({sep[-1]} scans) or fold 0")
    return test, support, training


def validation_scan(ids: list[int], fold: int, dataset: AlpnetDataset) -> int:
    """This project's validation scan of a fold (not SSL-ALPNet's: it has none): the first training scan
    after the support in circular sorted order. Options are chosen on it, never on the test scans."""
    _, support, training = fold_scans(ids, fold, dataset)
    ordered = sorted(int(i) for i in ids)
    after = ordered.index(support) + 1
    return next(sid for sid in ordered[after:] + ordered[:after] if sid in training)


def kept_slices(label: np.ndarray, excluded: list[int], rule: str = "or") -> np.ndarray:
    """Bool per z of a Y x X x Z label volume: may the slice train under Setting 2?

    'or' (SSL-ALPNet): dropped when ANY excluded value has >= 1 voxel in it; 'and' (the Q-Net lineage):
    dropped only when ALL of them do. No excluded value (Setting 1): every slice is kept.
    """
    present = np.stack([(label == v).any(axis=(0, 1)) for v in excluded]) if excluded else None  # E x Z
    if present is None:
        return np.ones(label.shape[2], dtype=bool)
    if rule == "or":
        return ~present.any(axis=0)
    if rule == "and":
        return ~present.all(axis=0)
    raise UserError(f"exclusion rule '{rule}' is unknown: use 'or' (SSL-ALPNet) or 'and' (Q-Net lineage)")
