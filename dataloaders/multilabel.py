"""Reader for generic multi-label data sets (TotalSegmentator, BTCV or AMOS exports and the like).

A case is an image NIfTI plus a multi-label NIfTI on the same grid; a JSON map names the label
values. Prepare such a data set with

    python scripts/prepare_visceral.py --layout multilabel --visceral-dir ROOT --label-map map.json --out PREP

Folder layout. ROOT holds one training split and one test split, found by name (first match wins):
    training (silver: training + validation volumes): ROOT/SilverCorpus, ROOT/train, ROOT/Tr, ROOT/training
    test     (gold: evaluation volumes):               ROOT/GoldCorpus, ROOT/test, ROOT/Ts, ROOT/testing
Each split is laid out in one of two ways:
    a) nnU-Net / AMOS / BTCV style: SPLIT/images/<case>.nii.gz with SPLIT/labels/<case>.nii.gz (the
       same file name in both folders, .nii.gz or .nii; every image needs its label file; nnU-Net's own
       imagesTr/ labelsTr/ with the _0000 channel suffix must be renamed to images/ labels/ first);
    b) TotalSegmentator style, one folder per case: SPLIT/<case>/ct.nii.gz (or image / img) with
       SPLIT/<case>/labels.nii.gz (or label / seg / segmentation).
for example
    ROOT/train/images/amos_0001.nii.gz   ROOT/train/labels/amos_0001.nii.gz
    ROOT/test/s0011/ct.nii.gz            ROOT/test/s0011/labels.nii.gz
The case id is the file stem (a) or the folder name (b), with characters other than letters, digits,
'.', '_' and '-' replaced by '_' (dataloaders.prepare.case_id); ids must differ over both splits.

Images: CT in Hounsfield units, any storage type; prepare stores them exactly (int16 when int16 is
exact, else float32). Labels: integer values >= 0 (a float file holding integers is accepted), on
the image's world grid (another storage orientation, e.g. LPS next to RAS, is fine; a different shape
or affine is an error: resample first).

The label map (`--label-map map.json`, read by dataloaders/label_map.py): {"liver": 5, ...}
(name -> value) or {"5": "liver", ...} (value -> name), either optionally wrapped as
{"labels": {...}} (TotalSegmentator / nnU-Net dataset.json style). Names are mapped onto the project
vocabulary with `dataloaders.organs.canonical_name` (e.g. iliopsoas_left -> psoas_left, right_kidney
-> kidney_right); values whose names are not among the 20 structures become background. Every value
named in the map must occur in each label volume (a map of another data set is the usual cause)
unless --allow-missing-labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dataloaders.label_map import read_label_map  # noqa: F401  (the one label-map parser; prepare.py imports it here)
from dataloaders.nifti import check_same_grid, load_nifti
from dataloaders.organs import NAME_TO_INDEX, canonical_name
from dataloaders.visceral import LabeledVolume, as_int16_hu, strip_nifti_suffix
from util.errors import UserError

IMAGE_NAMES = ("ct", "image", "img")
LABEL_NAMES = ("labels", "label", "seg", "segmentation")
SPLIT_NAMES = {"silver": ("SilverCorpus", "train", "Tr", "training"),
               "gold": ("GoldCorpus", "test", "Ts", "testing")}


def vocabulary_lookup(label_map: dict[int, str]) -> dict[int, int]:
    """Label value -> project index (1-20) for the map entries that name one of the 20 structures."""
    lookup = {}
    for value, name in label_map.items():
        canonical = canonical_name(name)
        if canonical is not None:
            lookup[value] = NAME_TO_INDEX[canonical]
    return lookup


def load_multilabel_case(image_path: str | Path, label_path: str | Path, label_map: dict[int, str],
                         pid: str | None = None, allow_missing: bool = False) -> LabeledVolume:
    """Load one image + multi-label pair and map its labels onto the indices 1-20.

    Every value named in `label_map` must occur in the label volume (else a UserError naming the
    values: a map for another data set is the usual cause) unless `allow_missing`. Returns canonical
    image (int16 HU) and label (uint8, 0 = background or a structure outside the vocabulary).
    """
    image = as_int16_hu(load_nifti(image_path))
    labels = load_nifti(label_path)
    check_same_grid(labels, image)
    values = labels.array
    if np.issubdtype(values.dtype, np.floating):
        if not np.array_equal(values, np.rint(values)):
            raise UserError(f"{label_path}: label volume holds non-integer values: export it as an integer "
                            "multi-label map")
    values = values.astype(np.int64)
    present = set(np.unique(values).tolist())
    missing = sorted(value for value in label_map if value not in present)
    if missing and not allow_missing:
        names = ", ".join(f"{value} ({label_map[value]})" for value in missing[:6])
        raise UserError(f"{label_path}: label map names values absent from this volume: {names}: check that "
                        "the map belongs to this data set (or pass --allow-missing-labels)")
    lookup = vocabulary_lookup(label_map)
    if not lookup:
        raise UserError(f"{label_path}: the label map names none of the 20 structures (e.g. liver, spleen, "
                        "kidney_right): fix the names in the map")
    table = np.zeros(max(int(values.max()), max(lookup)) + 1, dtype=np.uint8)
    for value, index in lookup.items():
        table[value] = index
    if values.min() < 0:
        raise UserError(f"{label_path}: negative label values: export label values >= 0")
    pid = pid or strip_nifti_suffix(Path(image_path).name)
    return LabeledVolume(pid, image, table[values], 0)


def find_multilabel_cases(split_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(case id, image path, label path) of every case in a split folder, sorted by case id."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: folder missing: a multi-label data set needs train/ and test/ folders")
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
            cases.append((stem, image, label))
    else:
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = {strip_nifti_suffix(p.name): p for p in folder.iterdir() if strip_nifti_suffix(p.name)}
            image = next((files[n] for n in IMAGE_NAMES if n in files), None)
            label = next((files[n] for n in LABEL_NAMES if n in files), None)
            if image is None or label is None:
                raise UserError(f"{folder}: needs an image ({'/'.join(IMAGE_NAMES)}.nii.gz) and a label map "
                                f"({'/'.join(LABEL_NAMES)}.nii.gz): add the missing file")
            cases.append((folder.name, image, label))
    if not cases:
        raise UserError(f"{split_dir}: no cases found: use images/ + labels/ or one folder per case")
    return cases


def find_split(root: str | Path, split: str) -> Path:
    """The folder of split 'silver' (training) or 'gold' (test) under a multi-label ROOT."""
    root = Path(root)
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    raise UserError(f"{root}: no {'/'.join(SPLIT_NAMES[split])} folder for the {split} split: create one "
                    "(see dataloaders/multilabel.py for the layout)")
