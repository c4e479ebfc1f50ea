"""Readers of the source layouts (VISCERAL Anatomy3, multi-label exports, SSL-ALPNet's CHAOS-T2 / SABS
folders), labels mapped onto the organ indices of dataloaders/organs.py (others: background). The layouts:
docs/usage.md "Data"; what prepare.py makes of them: docs/DESIGN.md "Prepared data folder".
"""
from __future__ import annotations

import json
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataloaders.nifti import NiftiVolume, check_same_grid, load_nifti, read_nifti
from dataloaders.organs import NAME_TO_INDEX, RADLEX_TO_INDEX, canonical_name
from dataloaders.prepared import case_id
from util.errors import UserError
from util.io import check_input_folder

# ------------------------------------------------------------------------------ VISCERAL Anatomy3
# CORPUS/Volumes/<pid>_1_CTce_ThAb.nii.gz, CORPUS/Segmentations/<pid>_1_CTce_ThAb_<RadLexID>_<n>.nii.gz:
# the RadLex id is the second-to-last field, the patient id the first (`<pid>_<RadLexID>_<n>` reads alike).
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def volume_filename(pid: str) -> str:
    """VISCERAL volume file name of patient `pid` (8 digits)."""
    return f"{pid}_1_CTce_ThAb.nii.gz"


def mask_filename(pid: str, radlex: int) -> str:
    """VISCERAL mask file name of structure `radlex` of patient `pid` (first annotator)."""
    return f"{pid}_1_CTce_ThAb_{radlex}_1.nii.gz"


def strip_nifti_suffix(name: str) -> str | None:
    """File name without .nii.gz / .nii; None when it is not a NIfTI name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def parse_mask_name(name: str) -> tuple[str, int] | None:
    """(patient id, RadLex id) of a mask file name; None when the name does not fit the pattern."""
    stem = strip_nifti_suffix(name)
    fields = stem.split("_") if stem else []
    if len(fields) < 3 or not fields[-2].isdigit() or not fields[-1].isdigit():
        return None
    return fields[0], int(fields[-2])


@dataclass
class Case:
    """One patient of a VISCERAL corpus: its volume and its masks by label index (1-20)."""
    pid: str
    volume_path: Path
    mask_paths: dict[int, Path] = field(default_factory=dict)


@dataclass
class LabeledVolume:
    """A canonical volume (image.array X x Y x Z, RAS+, see `exact_image`) and its labels X x Y x Z uint8."""
    pid: str
    image: NiftiVolume
    label: np.ndarray
    overlap_voxels: int = 0


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and strip_nifti_suffix(p.name))


def find_cases(corpus_dir: str | Path) -> list[Case]:
    """Cases of one corpus folder (e.g. ROOT/SilverCorpus), sorted by patient id; stray masks warned of."""
    corpus_dir = Path(corpus_dir)
    volume_dir, mask_dir = corpus_dir / "Volumes", corpus_dir / "Segmentations"
    for folder in (volume_dir, mask_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder missing: a VISCERAL corpus needs Volumes/ and Segmentations/ "
                            "(or generate a phantom with scripts/make_phantom.py)")
    cases: dict[str, Case] = {}
    for path in _nifti_files(volume_dir):
        pid = strip_nifti_suffix(path.name).split("_")[0]
        if pid in cases:
            raise UserError(f"{path}: a second volume for patient {pid} ({cases[pid].volume_path.name}): "
                            "keep one volume per patient in Volumes/")
        cases[pid] = Case(pid, path)
    if not cases:
        raise UserError(f"{volume_dir}: no .nii.gz volumes: copy the corpus volumes here")
    for path in _nifti_files(mask_dir):
        parsed = parse_mask_name(path.name)
        if parsed is None:
            warnings.warn(f"{path}: not a VISCERAL mask name <pid>_..._<RadLexID>_<n>.nii.gz: skipped")
            continue
        pid, radlex = parsed
        if radlex not in RADLEX_TO_INDEX:
            warnings.warn(f"{path}: RadLex id {radlex} is not one of the 20 VISCERAL structures: skipped")
            continue
        if pid not in cases:
            warnings.warn(f"{path}: no volume for patient {pid} in {volume_dir}: mask skipped")
            continue
        index = RADLEX_TO_INDEX[radlex]
        if index in cases[pid].mask_paths:
            warnings.warn(f"{path}: a second mask of RadLex {radlex} for {pid}: kept "
                          f"{cases[pid].mask_paths[index].name}")
            continue
        cases[pid].mask_paths[index] = path
    for case in cases.values():
        if not case.mask_paths:
            raise UserError(f"{case.volume_path}: no masks in {mask_dir} for patient {case.pid}: add its "
                            f"{case.pid}_..._<RadLexID>_<n>.nii.gz masks or remove the volume")
    return [cases[pid] for pid in sorted(cases)]


def merge_masks(masks: dict[int, np.ndarray]) -> tuple[np.ndarray, int]:
    """Binary masks {label index: X x Y x Z} -> (label X x Y x Z uint8, voxels covered twice or more); an
    overlap goes to the structure with fewer voxels (ties: the higher index)."""
    assert masks, "merge_masks needs at least one mask"
    shape = next(iter(masks.values())).shape
    label = np.zeros(int(np.prod(shape)), dtype=np.uint8)          # Fortran order, as NIfTI stores voxels
    coverage = np.zeros(label.size, dtype=np.uint8)
    voxels = {index: np.flatnonzero(np.ravel(mask, order="F")) for index, mask in masks.items()}
    order = sorted(voxels, key=lambda index: (-voxels[index].size, index))  # large first, small last
    for index in order:
        label[voxels[index]] = index
        coverage[voxels[index]] += 1
    return label.reshape(shape, order="F"), int((coverage > 1).sum())


def exact_image(volume: NiftiVolume) -> NiftiVolume:
    """The volume with its array as int16 when int16 holds every voxel exactly, else as float32."""
    if volume.array.dtype != np.int16:
        rounded = np.clip(np.rint(volume.array), -32768, 32767)
        exact = np.array_equal(rounded, volume.array)
        volume.array = rounded.astype(np.int16) if exact else np.asfortranarray(volume.array, np.float32)
    return volume


def load_case(case: Case) -> LabeledVolume:
    """Load a VISCERAL case: canonical int16 image and merged uint8 label map (indices 1-20)."""
    image = exact_image(load_nifti(case.volume_path))
    masks = {}
    for index, path in sorted(case.mask_paths.items()):
        mask = load_nifti(path)
        check_same_grid(mask, image)
        masks[index] = mask.array
    label, overlaps = merge_masks(masks)
    return LabeledVolume(case.pid, image, label, overlaps)


# ------------------------------------------------------------------------------ multi-label data sets
# ROOT/<split>/images/<case>.nii.gz + labels/<case>.nii.gz, or ROOT/<split>/<case>/ct.nii.gz + labels.nii.gz
# (docs/usage.md "Multi-label layout"); names of the label map become indices by organs.canonical_name.
IMAGE_NAMES = ("ct", "image", "img")
LABEL_NAMES = ("labels", "label", "seg", "segmentation")
SPLIT_NAMES = {"silver": ("SilverCorpus", "train", "Tr", "training"),
               "gold": ("GoldCorpus", "test", "Ts", "testing")}


def load_multilabel_case(image_path: str | Path, label_path: str | Path, label_map: dict[int, str], pid: str,
                         allow_missing: bool = False) -> LabeledVolume:
    """One image + multi-label pair, labels mapped onto the indices 1-20 (others: background)."""
    image = exact_image(load_nifti(image_path))
    labels = load_nifti(label_path)
    check_same_grid(labels, image)
    values = labels.array
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.rint(values)):
        raise UserError(f"{label_path}: label volume holds non-integer values: export it as an integer "
                        "multi-label map")
    values = values.astype(np.int64)
    present = set(np.unique(values).tolist())
    missing = sorted(value for value in label_map if value not in present)
    if missing and not allow_missing:
        names = ", ".join(f"{value} ({label_map[value]})" for value in missing[:6])
        raise UserError(f"{label_path}: label map names values absent from this volume: {names}: check that "
                        "the map belongs to this data set (or pass --allow-missing-labels)")
    canonical = {value: canonical_name(name) for value, name in label_map.items()}
    lookup = {value: NAME_TO_INDEX[name] for value, name in canonical.items() if name is not None}
    if not lookup:
        raise UserError(f"{label_path}: the label map names none of the 20 structures (e.g. liver, spleen, "
                        "kidney_right): fix the names in the map")
    table = np.zeros(max(int(values.max()), max(lookup)) + 1, dtype=np.uint8)
    table[list(lookup)] = list(lookup.values())
    if values.min() < 0:
        raise UserError(f"{label_path}: negative label values: export label values >= 0")
    return LabeledVolume(pid, image, table[values], 0)


def find_multilabel_cases(root: str | Path, split: str) -> list[tuple[str, Path, Path]]:
    """(file-safe case id, image, label) of each case of split 'silver' or 'gold' under a multi-label ROOT."""
    split_dir = next((Path(root) / name for name in SPLIT_NAMES[split] if (Path(root) / name).is_dir()), None)
    if split_dir is None:
        raise UserError(f"{root}: no {'/'.join(SPLIT_NAMES[split])} folder for the {split} split: create one "
                        "(see docs/usage.md for the layout)")
    cases = []
    if (split_dir / "images").is_dir() and (split_dir / "labels").is_dir():
        for image in sorted((split_dir / "images").iterdir()):
            stem = strip_nifti_suffix(image.name)
            if stem is None:
                continue
            label = next((split_dir / "labels" / f"{stem}{s}" for s in (".nii.gz", ".nii")
                          if (split_dir / "labels" / f"{stem}{s}").is_file()), None)
            if label is None:
                raise UserError(f"{image}: no label file {stem}.nii.gz in {split_dir / 'labels'}: add it or "
                                "remove the image")
            cases.append((case_id(stem), image, label))
    else:
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = {strip_nifti_suffix(p.name): p for p in folder.iterdir() if strip_nifti_suffix(p.name)}
            image = next((files[n] for n in IMAGE_NAMES if n in files), None)
            label = next((files[n] for n in LABEL_NAMES if n in files), None)
            if image is None or label is None:
                raise UserError(f"{folder}: needs an image ({'/'.join(IMAGE_NAMES)}.nii.gz) and a label map "
                                f"({'/'.join(LABEL_NAMES)}.nii.gz): add the missing file")
            cases.append((case_id(folder.name), image, label))
    if not cases:
        raise UserError(f"{split_dir}: no cases found: use images/ + labels/ or one folder per case")
    return cases


# ------------------------------------------------------------------------------ images-only
def find_image_volumes(root: Path) -> list[tuple[str, Path]]:
    """(pid, path) of the NIfTI volumes directly in `root` (else in root/Volumes); pid = file stem."""
    for folder in (root, root / "Volumes"):
        paths = sorted(p for p in folder.glob("*") if p.is_file() and strip_nifti_suffix(p.name)
                       and not p.name.startswith(".")) if folder.is_dir() else []   # '._x.nii.gz': macOS
        if paths:
            break
    if not paths:
        raise UserError(f"{root}: no CT volumes (.nii.gz / .nii) in it or in its Volumes/ folder: give a "
                        "folder of NIfTI CT volumes")
    found: dict[str, Path] = {}
    for path in paths:
        pid = case_id(strip_nifti_suffix(path.name))
        if pid in found:
            raise UserError(f"{path}: same name as {found[pid].name} once made a file name: rename one of "
                            "them")
        found[pid] = path
    return list(found.items())


def load_unlabeled(path: Path, pid: str) -> LabeledVolume:
    """A CT volume without labels (canonical, `exact_image`; the label map is all background)."""
    image = exact_image(load_nifti(path))
    return LabeledVolume(pid, image, np.zeros(image.array.shape, dtype=np.uint8))


# ------------------------------------------------------------------------------ SSL-ALPNet's layout
# image_<id>.nii.gz, label_<id>.nii.gz, optional superpix-MIDDLE_<id>.nii.gz and classmap_1.json
# {class: {str(id): [slices holding it]}}; ids = last digit run, sorted as integers. Read as SSL-ALPNet:
# nibabel's X x Y x Z with axes 0 and 1 swapped, no reorientation or resize, cropped [:256, :256].
CROP = 256                                  # both loaders crop [:256, :256] (SABS is stored 257 x 257)
CLASSMAP = "classmap_1.json"
SUPERPIXELS = "superpix-MIDDLE"             # the only superpixel mode SSL-ALPNet has


def superpixel_path(folder: str | Path, sid: int) -> Path:
    """SSL-ALPNet's superpixel file of scan `sid` in `folder`."""
    return Path(folder) / f"{SUPERPIXELS}_{sid}.nii.gz"


def missing_superpixels(folder: str | Path, ids) -> list[int]:
    """The scans of `ids` without a superpixel file in `folder`."""
    return [sid for sid in ids if not superpixel_path(folder, sid).is_file()]


@dataclass(frozen=True)
class AlpnetDataset:
    """One data set of the SSL-ALPNet layout: modality, label values, folds and label sets."""
    name: str
    modality: str                               # 'MR' (z-score per volume) or 'CT' (global statistics)
    class_names: dict[int, str]                 # label value -> classmap name (every value of the data set)
    vocabulary: dict[int, str]                  # label value -> organ name of dataloaders/organs.py
    separators: tuple[int, ...]                 # fold k = ids[sep[k] : sep[k + 1]] (+ the next id as support)
    label_groups: tuple[tuple[int, ...], ...]   # label_sets g tests all evaluated values minus groups[g]
    evaluated: tuple[int, ...] = field(default=())   # values ever tested
    background_is_foreground: bool = False      # classmap's class 0 lists the slices with any foreground

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
    separators=(0, 4, 8, 12, 16, 20), label_groups=((1, 4), (2, 3)), evaluated=(1, 2, 3, 4),
    background_is_foreground=True)
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
    return (f"give a folder in SSL-ALPNet's layout (image_<id>.nii.gz, label_<id>.nii.gz), "
            f"e.g. its chaos_MR_T2_normalized or sabs_CT_normalized folder; {folder} is not one")


def read_classmap(folder: str | Path) -> dict[str, dict[str, list[int]]] | None:
    """classmap_1.json of the folder, None when absent; one-line error for a malformed file."""
    path = Path(folder) / CLASSMAP
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return {str(name): {str(sid): [int(z) for z in zs] for sid, zs in scans.items()}
                for name, scans in raw.items()}
    except (ValueError, AttributeError, TypeError) as error:
        raise UserError(f"{path}: unreadable ({type(error).__name__}: {error}): move it away, it is then "
                        "computed from the labels") from None


def compute_classmap(folder: str | Path, dataset: AlpnetDataset) -> dict[str, dict[str, list[int]]]:
    """classmap_1.json from the label volumes by SSL-ALPNet's rule (class 0 of CHAOS-T2: any foreground)."""
    classmap: dict[str, dict[str, list[int]]] = {name: {} for name in dataset.class_names.values()}
    for sid in scan_ids(folder):
        label, _ = _read(Path(folder) / f"label_{sid}.nii.gz")                              # Y x X x Z
        for value, name in dataset.class_names.items():
            if value == 0 and dataset.background_is_foreground:
                classmap[name][str(sid)] = np.flatnonzero((label > 0).any(axis=(0, 1))).tolist()
            else:
                classmap[name][str(sid)] = organ_slices(label, value).tolist()
    return classmap


def detect_dataset(folder: str | Path) -> AlpnetDataset:
    """CHAOS-T2 or SABS, by the class names of classmap_1.json, else by the first scan's label values."""
    folder = check_input_folder(folder, "", _hint(folder))
    first = scan_ids(folder)[0]
    classmap = read_classmap(folder)
    if classmap is None:
        values = set(np.unique(_read(folder / f"label_{first}.nii.gz")[0]).tolist())
        for dataset in DATASETS.values():
            if values <= set(dataset.class_names):
                return dataset
        raise UserError(f"{folder / f'label_{first}.nii.gz'}: label values {sorted(values)[:8]} are neither "
                        "CHAOS-T2's (0-4) nor SABS's (0-13): use the data set's own label volumes")
    names = set(classmap)
    for dataset in DATASETS.values():
        if {dataset.class_names[v] for v in dataset.evaluated} <= names:
            return dataset
    raise UserError(f"{folder / CLASSMAP}: class names {sorted(names)} are neither CHAOS-T2's "
                    "(LIVER, RK, LK, SPLEEN) nor SABS's (SPLEEN, KID_R, KID_l, LIVER): "
                    "use SSL-ALPNet's classmap of that data set, or move it away (computed from the labels)")


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
    data, affine, _ = read_nifti(path, np.float64)
    return np.ascontiguousarray(data.transpose(1, 0, 2)), affine


@dataclass
class AlpnetScan:
    """One scan as SSL-ALPNet reads it, before normalisation and crop (arrays Y x X x Z)."""
    sid: int
    image: np.ndarray               # Y x X x Z float64, stored intensities
    label: np.ndarray               # Y x X x Z uint8, the data set's own label values
    affine: np.ndarray              # 4 x 4, as stored
    superpixels: np.ndarray | None  # Y x X x Z int32 or None


def load_scan(folder: str | Path, sid: int, dataset: AlpnetDataset, superpixels: bool = False,
              classmap: dict | None = None, superpixel_dir: str | Path | None = None) -> AlpnetScan:
    """Read and check one scan (grid, label values, classmap); superpixels from `superpixel_dir`/`folder`."""
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
        sp_path = superpixel_path(superpixel_dir or folder, sid)
        if not sp_path.is_file():
            raise UserError(f"{sp_path}: missing, self-supervised training needs SSL-ALPNet's superpixels: "
                            f"{make_superpixels_command(folder)}")
        sp, _ = _read(sp_path)
        if sp.shape != image.shape:
            raise UserError(f"{sp_path}: shape {sp.shape} differs from image_{sid}.nii.gz {image.shape}: "
                            "make the superpixels again from that image")
        scan.superpixels = np.rint(sp).astype(np.int32)
    return scan


def make_superpixels_command(folder: str | Path) -> str:
    """The command that adds SSL-ALPNet's superpixels to a folder of its layout (for error messages)."""
    return f"make them with `python scripts/make_superpixels.py --alpnet {shlex.quote(str(folder))}`"


def organ_slices(label: np.ndarray, value: int) -> np.ndarray:
    """Ascending z of the slices of a Y x X x Z label volume holding >= 1 voxel of `value` (classmap_1)."""
    return np.flatnonzero((label == value).any(axis=(0, 1)))


def check_classmap(classmap: dict, scan: AlpnetScan, dataset: AlpnetDataset, path: Path) -> None:
    """classmap_1[c][id] must list exactly the slices of the label volume holding class c (evaluated c)."""
    for value in dataset.evaluated:
        name = dataset.class_names[value]
        listed = classmap.get(name, {}).get(str(scan.sid))
        actual = organ_slices(scan.label, value).tolist()
        if (listed is not None or actual) and listed != actual:
            raise UserError(f"{path}: {name} of scan {scan.sid} lists slices {_span(listed)} but "
                            f"label_{scan.sid}.nii.gz holds it in {_span(actual)}: "
                            f"move {CLASSMAP} away, it is then computed from the labels")


def _span(zs) -> str:
    return f"{zs[0]}-{zs[-1]} ({len(zs)} slices)" if zs else "none"


def ct_statistics(images: list[np.ndarray]) -> tuple[float, float]:
    """CT: one mean and std over every voxel of the fold's training scans (full stored volumes)."""
    total = sum(float(a.sum()) for a in images)
    count = sum(a.size for a in images)
    mean = total / count
    var = sum(float(((a - mean) ** 2).sum()) for a in images) / count
    return mean, float(np.sqrt(var))


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
    """(test ids, support id, training ids): SSL-ALPNet's circular split of the sorted ids (method.md)."""
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
    """This project's validation scan of a fold (SSL-ALPNet has none): the training scan after the support."""
    _, support, training = fold_scans(ids, fold, dataset)
    ordered = sorted(int(i) for i in ids)
    after = ordered.index(support) + 1
    return next(sid for sid in ordered[after:] + ordered[:after] if sid in training)


def kept_slices(label: np.ndarray, excluded: list[int], rule: str = "or") -> np.ndarray:
    """Bool per z of a Y x X x Z label volume: may the slice train under Setting 2? 'or' (SSL-ALPNet): not
    when ANY excluded value is in it; 'and' (Q-Net lineage): not when ALL are. None excluded: every slice."""
    if not excluded:
        return np.ones(label.shape[2], dtype=bool)
    present = np.stack([(label == v).any(axis=(0, 1)) for v in excluded])                      # E x Z
    assert rule in ("or", "and"), rule
    return ~present.any(axis=0) if rule == "or" else ~present.all(axis=0)
