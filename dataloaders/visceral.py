"""Reader for the VISCERAL Anatomy3 layout (docs/method.md, "VISCERAL data, folds and the paper's figures").

    CORPUS/Volumes/<pid>_1_CTce_ThAb.nii.gz                      one CT volume per patient
    CORPUS/Segmentations/<pid>_1_CTce_ThAb_<RadLexID>_<n>.nii.gz  one binary mask per structure

The RadLex id is the second-to-last underscore field and the patient id the first, so copies that
drop the modality/region fields (`<pid>_<RadLexID>_<n>.nii.gz`) read the same. Masks are merged into
one label volume with the official indices 1-20 (dataloaders/organs.py).

Overlap rule: where masks overlap, the structure with fewer voxels in that volume wins (a small
structure is not erased by a large neighbour); ties go to the higher index. Overlapping voxels are
counted in `LabeledVolume.overlap_voxels`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataloaders.nifti import NiftiVolume, check_same_grid, load_nifti
from dataloaders.organs import RADLEX_TO_INDEX
from util.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def volume_filename(pid: str) -> str:
    """VISCERAL volume file name of patient `pid` (8 digits)."""
    return f"{pid}_1_CTce_ThAb.nii.gz"


def mask_filename(pid: str, radlex: int, annotator: int = 1) -> str:
    """VISCERAL mask file name of structure `radlex` of patient `pid`."""
    return f"{pid}_1_CTce_ThAb_{radlex}_{annotator}.nii.gz"


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
    """A canonical CT volume with its merged label map.

    image.array: X x Y x Z int16 HU (canonical RAS+); label: X x Y x Z uint8 with indices 0-20.
    """
    pid: str
    image: NiftiVolume
    label: np.ndarray
    overlap_voxels: int = 0


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and strip_nifti_suffix(p.name))


def find_cases(corpus_dir: str | Path) -> list[Case]:
    """Cases of one corpus folder (e.g. ROOT/SilverCorpus), sorted by patient id.

    Unknown RadLex ids and masks without a volume are skipped with a warning; a volume without any
    mask, or a missing Volumes/Segmentations folder, is a UserError.
    """
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
    """Merge binary masks {label index: X x Y x Z} into one uint8 label volume.

    Overlaps: the structure with fewer voxels wins, ties to the higher index. Returns
    (label X x Y x Z uint8, number of voxels covered by two or more masks).
    """
    if not masks:
        raise ValueError("merge_masks needs at least one mask")
    shape = next(iter(masks.values())).shape
    label = np.zeros(int(np.prod(shape)), dtype=np.uint8)          # Fortran order, as NIfTI stores voxels
    coverage = np.zeros(label.size, dtype=np.uint8)
    voxels = {index: np.flatnonzero(np.ravel(mask, order="F")) for index, mask in masks.items()}
    order = sorted(voxels, key=lambda index: (-voxels[index].size, index))  # large first, small last
    for index in order:
        label[voxels[index]] = index
        coverage[voxels[index]] += 1
    return label.reshape(shape, order="F"), int((coverage > 1).sum())


def as_int16_hu(volume: NiftiVolume) -> NiftiVolume:
    """The volume with its array rounded and clipped to int16 (CT stored as float is accepted)."""
    if volume.array.dtype != np.int16:
        volume.array = np.clip(np.rint(volume.array), -32768, 32767).astype(np.int16)
    return volume


def load_case(case: Case) -> LabeledVolume:
    """Load a VISCERAL case: canonical int16 image and merged uint8 label map (indices 1-20)."""
    image = as_int16_hu(load_nifti(case.volume_path))
    masks = {}
    for index, path in sorted(case.mask_paths.items()):
        mask = load_nifti(path)
        check_same_grid(mask, image)
        masks[index] = mask.array
    label, overlaps = merge_masks(masks)
    return LabeledVolume(case.pid, image, label, overlaps)
