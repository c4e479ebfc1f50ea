"""Segment your own scan: few-shot segmentation of a new CT volume from annotated support volumes.

`segment_volume(checkpoint, supports=[(image, mask), ...], query, out=...)` runs the volumetric
protocol (evaluation/protocol.py) on files a user has, outside any benchmark fold:

- Every file goes through `dataloaders.nifti.load_nifti` (validation, reorientation to canonical
  RAS+); masks must share their image's grid (`check_same_grid`).
- Support masks are binary or multi-label: the organ is picked by `support_label` (a label value, or
  an organ name looked up in the mask's own labels: `dataloaders.label_map`; unknown labels are an
  error, never a guess). Implausible files are refused or warned about (`dataloaders.plausibility`).
- The ANNOTATED slices of a support are the axial slices with more than `min_voxels` organ voxels.
  Its organ range is first..last annotated slice; a support annotated on only a few slices works:
  the centre of each chunk picks the NEAREST annotated slice (unannotated slices are never used as
  empty masks).
- k supports = k shots: for each chunk every support gives one slice (its nearest annotated slice to
  the chunk centre) and the model averages the k shots' prototypes (FewShotSegNet's k-shot rule).
- The query's organ range: `query_range` (half-open slice indices along the query FILE's axial axis,
  as stored) or, by default, transferred from the supports (evaluation/query_range.py: by physical
  z when the query is part of a support's scan, else by relative position within the body's axial
  extent, CT in HU only; a difference in axial coverage warns or is refused).
- A query range shorter than `n_chunks`: each query slice gets the support chunk covering its centre
  (`evaluation.query_range.segment_plan`).
- Intensity: the checkpoint's scaling (or `intensity`). A CT window needs CT in Hounsfield units:
  a volume without air (float CT in [0, 1], uint16 without rescale, int8, MR) is refused, never
  windowed silently; 'minmax' scales any modality per slice, 'zscore' per volume (MR).
- Arguments of the wrong type (a number where a path is wanted, an array, ...) are one-line
  UserErrors, as from the command line (`check_arguments`).
- The prediction (0 outside the query range) goes back to the query's stored orientation and is
  written as a uint8 NIfTI with the query's original shape and affine, atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from dataloaders.label_map import (
    field_of_view_warning,
    hounsfield_problem,
    image_problems,
    mask_label_map,
    mask_labels,
    read_label_map,
    resolve_support_label,
    support_size_warning,
    visceral_mask_structure,
)
from dataloaders.nifti import check_same_grid, load_nifti, save_nifti_atomic, to_original
from dataloaders.organs import INDEX_TO_NAME, canonical_name
from dataloaders.prepared import prepared_intensity
from dataloaders.transforms import needs_hounsfield
from evaluation.inference import run_chunks
from evaluation.query_range import (  # noqa: F401
    BODY_HU,
    Support,
    body_extent,
    canonical_to_stored_range,
    default_query_range,
    nearest_annotated,
    segment_plan,
    snap_to_annotated,
    stored_range_to_canonical,
    transfer_query_range,
)
from models.checkpoint import check_input_size, model_from_checkpoint, model_input, trained_input
from util.cli import warn
from util.device import resolve_device
from util.errors import UserError
from util.paths import check_output_file


# ---------------------------------------------------------------------------------- parsing
def parse_query_range(text: str) -> tuple[int, int]:
    """'Z0:Z1' -> (Z0, Z1), half-open slice indices (Z1 excluded, as a Python slice)."""
    try:
        z0, z1 = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise UserError(f"--query-range '{text}': expected Z0:Z1 with integer slice indices, e.g. "
                        "40:95") from None
    return z0, z1


def parse_intensity(spec) -> dict | None:
    """None | dict | 'minmax' | 'zscore' | 'window:LO,HI' -> the `scale_intensity` dict.

    None: the checkpoint's own scaling."""
    if spec is None or isinstance(spec, dict):
        return spec
    text = str(spec).strip().lower()
    if text in ("minmax", "zscore"):
        return {"mode": text}
    if text.startswith("window:"):
        try:
            lo, hi = (float(v) for v in text[len("window:"):].split(","))
        except ValueError:
            lo = hi = None
        if lo is not None and hi > lo:
            return {"mode": "window", "window": [lo, hi]}
    raise UserError(f"--intensity '{spec}': use 'minmax', 'zscore' or 'window:LO,HI' with LO < HI "
                    "(e.g. window:-125,275)")


PATH_TYPES = (str, Path)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_arguments(checkpoint, supports, query, out, support_label, label_map, query_range, n_chunks,
                    batch_size, min_voxels, input_size, intensity, device, vocabulary) -> None:
    """One-line UserError for an argument of `segment_volume` of the wrong type or value (before any I/O)."""
    def refuse(name: str, value, wanted: str):
        if isinstance(value, (list, tuple)) and any(isinstance(item, np.ndarray) for item in value):
            shown = "(" + ", ".join(type(item).__name__ for item in value) + ")"
        elif isinstance(value, np.ndarray):
            shown = f"an array of shape {value.shape}"
        else:
            shown = " ".join(repr(value).split())
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise UserError(f"{name}: got {shown} ({type(value).__name__}): give {wanted}")

    if not isinstance(checkpoint, PATH_TYPES + (torch.nn.Module,)):
        refuse("checkpoint", checkpoint, "the path (str or Path) of a train.py checkpoint")
    if isinstance(supports, PATH_TYPES) or not isinstance(supports, Sequence):
        refuse("supports", supports, "a list of (image path, mask path) pairs")
    for pair in supports:
        if isinstance(pair, PATH_TYPES) or not isinstance(pair, Sequence) or len(pair) != 2 \
                or not all(isinstance(path, PATH_TYPES) for path in pair):
            refuse("supports", pair,
                   "(image path, mask path) pairs of str or Path, e.g. [('s.nii.gz', 'm.nii.gz')]")
    if not isinstance(query, PATH_TYPES):
        refuse("query", query, "the path (str or Path) of a NIfTI volume")
    if out is not None and not isinstance(out, PATH_TYPES):
        refuse("out", out, "the path (str or Path) of the .nii.gz to write, or None")
    if support_label is not None and not (_is_int(support_label) or isinstance(support_label, str)):
        refuse("support_label", support_label, "a label value (int), an organ name (str) or None")
    if label_map is not None and not isinstance(label_map, PATH_TYPES + (dict,)):
        refuse("label_map", label_map, "a JSON path or a dict such as {'liver': 5}")
    if query_range is not None and not isinstance(query_range, str) and not (
            isinstance(query_range, Sequence) and len(query_range) == 2 and all(map(_is_int, query_range))):
        refuse("query_range", query_range, "(Z0, Z1) integer slice indices or 'Z0:Z1'")
    counts = (("n_chunks", n_chunks, 1), ("batch_size", batch_size, 1), ("min_voxels", min_voxels, 0))
    for name, value, low in counts:
        if not _is_int(value):
            refuse(name, value, "an integer")
        if value < low:
            flag = name.replace("_", "-")
            raise UserError(f"--{flag} {value}: must be >= {low}")
    if input_size is not None:
        if not _is_int(input_size):
            refuse("input_size", input_size, "an integer slice size, or None for the checkpoint's")
        check_input_size(input_size, "--input-size")
    if intensity is not None and not isinstance(intensity, (str, dict)):
        refuse("intensity", intensity, "'minmax', 'zscore', 'window:LO,HI', a dict, or None")
    if not isinstance(device, (str, torch.device)):
        refuse("device", device, "'auto', 'cpu' or 'cuda'")
    if vocabulary is not None and not isinstance(vocabulary, str):
        refuse("vocabulary", vocabulary, "'visceral' or None")


# --------------------------------------------------------------------------------- loading
def load_support(image_path, mask_path, support_label, label_map, min_voxels: int,
                 vocabulary: str | None = None) -> Support:
    """Load one support pair: validated, canonical, the organ's binary mask and its annotated slices.

    The organ's label value comes from `dataloaders.label_map.resolve_support_label` (an organ name
    needs known labels: label_map, a sidecar JSON, vocabulary='visceral' or a VISCERAL file name);
    implausible pairs (swapped image and mask, constant image) are one-line errors, doubtful ones
    (soft mask, tiny organ) print a warning.
    """
    image = load_nifti(image_path)
    mask = load_nifti(mask_path)
    check_same_grid(mask, image)
    values, note = mask_labels(mask.array, mask_path)                        # X x Y x Z int labels
    for problem in image_problems(image.array, image_path, "support image"):
        warn(problem)
    if note:
        warn(note)
    present = np.unique(values)
    present = present[present != 0]
    if present.size == 0:
        rule = " (soft mask: foreground = values >= 0.5)" if note else ""
        raise UserError(f"{mask_path}: the mask is empty (no foreground voxel{rule}): annotate the organ in "
                        "the support mask or give another mask")
    value, how = resolve_support_label(support_label, mask_path, present, label_map, vocabulary)
    organ = values == value                                                  # X x Y x Z bool
    counts = organ.reshape(-1, organ.shape[-1]).sum(axis=0)                  # Z
    annotated = np.flatnonzero(counts > min_voxels)
    if annotated.size == 0:
        found = ", ".join(map(str, present[:12])) or "none"
        raise UserError(f"{mask_path}: no slice with more than {min_voxels} voxels of label {value} "
                        f"(labels present: {found}): pick another --support-label or annotate the organ")
    label_map_known = mask_label_map(mask_path, label_map, vocabulary)[0] or {}
    organ_name = canonical_name(label_map_known.get(value, "")) if label_map_known else None
    organ_name = organ_name or (INDEX_TO_NAME.get(visceral_mask_structure(mask_path) or 0))
    spacing = image.spacing
    small = support_size_warning(int(counts.max()), float(spacing[0] * spacing[1]), organ_name,
                                 Path(mask_path).name, how)
    if small:
        warn(small)
    return Support(image=np.asarray(image.array, dtype=np.float32), mask=organ, annotated=annotated,
                   name=Path(image_path).name, label=how, spacing=np.asarray(spacing, dtype=float),
                   affine=np.asarray(image.affine, dtype=float))


def load_model(checkpoint, device: torch.device, input_size: int | None, intensity: dict | None):
    """(model in eval mode on device, input_size, intensity) from a train.py checkpoint (or a module).

    input_size and intensity: given, else what the checkpoint records (`models.checkpoint.model_input`);
    a snapshot that predates the intensity record falls back to meta.json of its training data.
    """
    if isinstance(checkpoint, torch.nn.Module):
        return (checkpoint.to(device).eval(),) + model_input({}, input_size, intensity)
    model, state = model_from_checkpoint(str(checkpoint), device)
    fallback = None
    if intensity is None and trained_input(state)[1] is None:
        fallback = _training_data_intensity(state.get("run_config") or {})
    return (model,) + model_input(state, input_size, intensity, fallback)


def _training_data_intensity(run_config: dict) -> dict | None:
    """meta.json's intensity of the prepared data an old checkpoint was trained on, when it is still there."""
    data_dir = (run_config.get("path") or {}).get("data_dir")
    if not data_dir:
        return None
    for folder in (Path(data_dir), Path(__file__).resolve().parents[1] / data_dir):  # cwd, then repo root
        intensity = prepared_intensity(folder)
        if intensity is not None:
            return intensity
    return None


def check_hounsfield(intensity: dict, volumes) -> None:
    """UserError when a volume that a CT window would scale is not in Hounsfield units.

    volumes: (array, path, role) triples. Float CT in [0, 1], uint16 stored without rescale, int8 or
    MR would be clipped to a constant by the window, and the model would see nothing.
    """
    lo, hi = intensity["window"]
    for array, path, role in volumes:
        problem = hounsfield_problem(array, path, role)
        if problem:
            raise UserError(f"{problem}: the checkpoint scales its input by the CT window [{lo:g}, {hi:g}] "
                            "HU; convert the volume to HU (apply the DICOM rescale slope and intercept), or "
                            "pass --intensity minmax to scale each slice by its own range instead")


def segment_volume(checkpoint, supports: Sequence[tuple[str, str]], query, out=None, support_label=None,
                   label_map=None, query_range: tuple[int, int] | str | None = None, n_chunks: int = 12,
                   device: str = "auto", batch_size: int = 16, progress: bool = True,
                   intensity=None, input_size: int | None = None, min_voxels: int = 0,
                   vocabulary: str | None = None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Segment `query` (a NIfTI path) from annotated support volumes with a few-shot checkpoint.

    checkpoint:    train.py checkpoint path (or a model with encode_support/segment, for tests)
    supports:      [(image_path, mask_path), ...]; k supports = k-shot prototypes per chunk
    support_label: mask value (int), organ name, or None for a mask with a single non-zero value. A
                   name needs known labels: label_map, a sidecar <mask>.json, vocabulary='visceral'
                   (the project's 1-20) or a VISCERAL mask file name (dataloaders/label_map.py)
    label_map:     JSON path or dict, any form of dataloaders.label_map ({"liver": 5}, {"5": "liver"},
                   {"labels": {...}})
    vocabulary:    'visceral' when the mask uses the project's indices 1-20, else None
    query_range:   (Z0, Z1) or 'Z0:Z1', half-open slice indices along the query file's axial axis as
                   stored; None: transferred from the supports (evaluation/query_range.py; refused for
                   MR / non-HU volumes and for scans of different axial coverage)
    intensity:     None (the checkpoint's, else per-slice min-max), 'minmax', 'zscore' or 'window:LO,HI'
    min_voxels:    a support slice is annotated when it has more than this many organ voxels
    Returns (prediction uint8 in the query's ORIGINAL array geometry, the nibabel image written to
    `out`, when given, atomically; nothing is written on any error).
    """
    check_arguments(checkpoint, supports, query, out, support_label, label_map, query_range, n_chunks,
                    batch_size, min_voxels, input_size, intensity, device, vocabulary)
    if out is not None:   # before any compute: never an input (path, symlink, hard link), writable, a file
        inputs = [query, *(path for pair in supports for path in pair)]
        inputs += [checkpoint] if isinstance(checkpoint, (str, Path)) else []
        inputs += [label_map] if isinstance(label_map, (str, Path)) else []
        out = check_output_file(out, inputs, "--out", suffixes=(".nii.gz",))
    if not supports:
        raise UserError("no support given: pass --support-image S.nii.gz --support-mask M.nii.gz")
    if isinstance(query_range, str):
        query_range = parse_query_range(query_range)
    intensity = parse_intensity(intensity)
    device = resolve_device(device)
    if label_map is not None:
        read_label_map(label_map)                      # a malformed map fails before any volume is read
    query_volume = load_nifti(query)
    query_name = Path(str(query)).name
    query_warnings = image_problems(query_volume.array, query, "query")
    canonical_range = None
    if query_range is not None:                        # a range outside the query: before the supports load
        canonical_range = stored_range_to_canonical(tuple(int(z) for z in query_range), query_volume)
    support_list = [load_support(image, mask, support_label, label_map, min_voxels, vocabulary)
                    for image, mask in supports]
    model, input_size, intensity = load_model(checkpoint, device, input_size, intensity)
    query_image = np.asarray(query_volume.array, dtype=np.float32)
    if needs_hounsfield(intensity):                    # a CT window on non-HU data is never applied silently
        check_hounsfield(intensity, [(query_image, query, "query")]
                         + [(s.image, path, "support image") for s, (path, _) in zip(support_list, supports)])
    fov = field_of_view_warning(query_volume.array.shape, query_volume.spacing,
                                [s.image.shape for s in support_list], [s.spacing for s in support_list],
                                query_name)
    for message in query_warnings + ([fov] if fov else []):
        warn(message)
    if canonical_range is not None:
        how = "given by --query-range"
    else:
        canonical_range, how, notes = transfer_query_range(support_list, query_volume, query_image,
                                                           query_name)
        for message in notes:
            warn(message)
    stored = canonical_to_stored_range(canonical_range, query_volume)
    print(f"support organ: {', '.join(f'{s.name}: {s.label}' for s in support_list)}; query range "
          f"{stored[0]}:{stored[1]} (slices along the query file's axial axis, {how})", flush=True)
    plan = segment_plan(support_list, canonical_range, int(n_chunks))
    prediction = run_chunks(model, [(s.image, s.mask) for s in support_list], plan, query_image, input_size,
                            intensity, device, int(batch_size), progress)
    array = to_original(prediction.astype(np.uint8), query_volume.original_axcodes)
    if tuple(array.shape) != tuple(query_volume.original_shape):   # to_original must invert load_nifti
        raise UserError(f"{query}: internal reorientation error: got {array.shape}, expected "
                        f"{query_volume.original_shape}; please report it")
    image = nib.Nifti1Image(array, query_volume.original_affine)
    image.set_qform(query_volume.original_affine, code=1)
    image.set_sform(query_volume.original_affine, code=1)
    if out is not None:
        save_nifti_atomic(array, query_volume.original_affine, out)
    if not array.any():
        warn(f"the output mask is empty: no voxel of {Path(str(query)).name} was segmented in query slices "
             f"{stored[0]}:{stored[1]}: check the support label, the query range and the checkpoint's organ")
    return array, image
