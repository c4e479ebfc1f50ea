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
  as stored) or, by default, transferred by relative position within the body's axial extent
  (see `default_query_range`).
- The prediction (0 outside the query range) goes back to the query's stored orientation and is
  written as a uint8 NIfTI with the query's original shape and affine, atomically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from dataloaders.label_map import mask_label_map, read_label_map, resolve_support_label, visceral_mask_structure
from dataloaders.nifti import NiftiVolume, check_same_grid, load_nifti, save_nifti_atomic, to_original
from dataloaders.organs import INDEX_TO_NAME, canonical_name
from dataloaders.plausibility import field_of_view_warning, image_problems, mask_labels, support_size_warning
from dataloaders.prepared import prepared_intensity
from models.checkpoint import model_from_checkpoint, model_input, trained_input
from util.device import resolve_device
from util.cli import warn
from util.errors import UserError
from util.paths import check_output_file
from evaluation.inference import run_chunks
from evaluation.protocol import chunk_plan

BODY_HU = -500.0            # body voxels: above this HU (air and lung-free outside are below)
BODY_SLICE_FRACTION = 0.1   # a slice is in the body extent with >= this fraction of the fullest slice's body voxels


@dataclass
class Support:
    """One support volume, canonical.  image X x Y x Z float32 HU; mask X x Y x Z bool (the organ);
    annotated: sorted z of the annotated slices (> min_voxels organ voxels)."""
    image: np.ndarray
    mask: np.ndarray
    annotated: np.ndarray
    name: str
    label: str = ""                 # how the organ's label value was found (printed)
    spacing: np.ndarray | None = None   # (3,) mm, canonical axes

    @property
    def organ_range(self) -> tuple[int, int]:
        return int(self.annotated[0]), int(self.annotated[-1])


# ---------------------------------------------------------------------------------- parsing
def parse_query_range(text: str) -> tuple[int, int]:
    """'Z0:Z1' -> (Z0, Z1), half-open slice indices (Z1 excluded, as a Python slice)."""
    try:
        z0, z1 = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise UserError(f"--query-range '{text}': expected Z0:Z1 with integer slice indices, e.g. 40:95") from None
    return z0, z1


def parse_intensity(spec) -> dict | None:
    """None | dict | 'minmax' | 'window:LO,HI' -> the `scale_intensity` dict (None: from the checkpoint)."""
    if spec is None or isinstance(spec, dict):
        return spec
    text = str(spec).strip().lower()
    if text == "minmax":
        return {"mode": "minmax"}
    if text.startswith("window:"):
        try:
            lo, hi = (float(v) for v in text[len("window:"):].split(","))
        except ValueError:
            lo = hi = None
        if lo is not None and hi > lo:
            return {"mode": "window", "window": [lo, hi]}
    raise UserError(f"--intensity '{spec}': use 'minmax' or 'window:LO,HI' with LO < HI (e.g. window:-125,275)")


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
        raise UserError(f"{mask_path}: the mask is empty (no foreground voxel{rule}): annotate the organ in the "
                        "support mask or give another mask")
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
                   name=Path(image_path).name, label=how, spacing=np.asarray(spacing, dtype=float))


def body_extent(image: np.ndarray) -> tuple[int, int]:
    """First and last axial slice of the body: slices whose count of voxels > -500 HU is at least
    10% of the fullest slice's count. image X x Y x Z HU. The whole volume when nothing is > -500 HU."""
    counts = (image > BODY_HU).reshape(-1, image.shape[-1]).sum(axis=0)      # Z
    if counts.max() == 0:
        return 0, image.shape[-1] - 1
    slices = np.flatnonzero(counts >= BODY_SLICE_FRACTION * counts.max())
    return int(slices[0]), int(slices[-1])


def default_query_range(supports: Sequence[Support], query_image: np.ndarray) -> tuple[int, int]:
    """Organ range of the query (canonical z, inclusive) without --query-range.

    The organ's relative position inside each support's body extent (fractions of the extent, averaged
    over the supports) is placed at the same relative position inside the query's body extent.
    Assumes support and query scans cover the same body region (e.g. both thorax-abdomen); a different
    field of view (e.g. an abdomen-only query with a whole-trunk support) shifts the range.
    """
    fractions = []
    for support in supports:
        b0, b1 = body_extent(support.image)
        length = b1 - b0 + 1
        s0, s1 = support.organ_range
        fractions.append(((s0 - b0) / length, (s1 + 1 - b0) / length))
    f0, f1 = np.clip(np.mean(fractions, axis=0), 0.0, 1.0)
    q0, q1 = body_extent(query_image)
    length = q1 - q0 + 1
    start = int(np.clip(np.floor(q0 + f0 * length + 0.5), q0, q1))
    stop = int(np.clip(np.floor(q0 + f1 * length + 0.5) - 1, start, q1))
    return start, stop


def canonical_to_stored_range(canonical_range: tuple[int, int], query: NiftiVolume) -> tuple[int, int]:
    """Inclusive canonical z range -> half-open range along the query file's axial axis (as --query-range)."""
    ornt = nib.io_orientation(query.original_affine)
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    n = int(query.original_shape[axis])
    z0, z1 = canonical_range
    if ornt[axis, 1] < 0:                                   # stored superior -> inferior
        return n - 1 - z1, n - z0
    return z0, z1 + 1


def stored_range_to_canonical(query_range: tuple[int, int], query: NiftiVolume) -> tuple[int, int]:
    """Half-open slice range along the query file's axial axis (as stored) -> canonical z, inclusive."""
    ornt = nib.io_orientation(query.original_affine)
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])          # the stored axis that becomes canonical z
    n = int(query.original_shape[axis])
    z0, z1 = query_range
    if not (0 <= z0 < z1 <= n):
        raise UserError(f"--query-range {z0}:{z1} is outside the query volume ({n} axial slices along "
                        f"stored axis {axis}): use 0 <= Z0 < Z1 <= {n}")
    if ornt[axis, 1] < 0:                                   # stored superior -> inferior
        return n - z1, n - 1 - z0
    return z0, z1 - 1


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


# ------------------------------------------------------------------------------- inference
def nearest_annotated(annotated: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target z, the nearest annotated z (ties: the lower one). Shapes (m,) -> (n,)."""
    distance = np.abs(annotated[None, :] - targets[:, None])                 # n x m
    return annotated[distance.argmin(axis=1)]


def snap_to_annotated(plan, supports: Sequence[Support]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A `chunk_plan` with each support's chunk centre moved to its nearest annotated slice."""
    return [(np.array([nearest_annotated(support.annotated, z[None])[0] for support, z in zip(supports, support_z)]),
             query_z) for support_z, query_z in plan]


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
                   stored; None: transferred from the supports by relative body position
    intensity:     None (the checkpoint's, else per-slice min-max), 'minmax' or 'window:LO,HI'
    min_voxels:    a support slice is annotated when it has more than this many organ voxels
    Returns (prediction uint8 in the query's ORIGINAL array geometry, the nibabel image written to
    `out`, when given, atomically; nothing is written on any error).
    """
    if out is not None:   # before any compute: never an input (path, symlink, hard link), writable, a file
        inputs = [query, *(path for pair in supports for path in pair)]
        inputs += [checkpoint] if isinstance(checkpoint, (str, Path)) else []
        inputs += [label_map] if isinstance(label_map, (str, Path)) else []
        out = check_output_file(out, inputs, "--out", suffixes=(".nii.gz",))
    if not supports:
        raise UserError("no support given: pass --support-image S.nii.gz --support-mask M.nii.gz")
    if int(n_chunks) < 1 or int(batch_size) < 1:
        raise UserError(f"--n-chunks {n_chunks} / --batch-size {batch_size}: both must be >= 1")
    if input_size is not None and int(input_size) < 16:
        raise UserError(f"--input-size {input_size} is too small: use at least 16 (or leave it out: the "
                        "checkpoint's training size)")
    if int(min_voxels) < 0:
        raise UserError(f"--min-voxels {min_voxels} is negative: use 0 or more")
    if isinstance(query_range, str):
        query_range = parse_query_range(query_range)
    intensity = parse_intensity(intensity)
    device = resolve_device(device)
    if label_map is not None:
        read_label_map(label_map)                      # a malformed map fails before any volume is read
    query_volume = load_nifti(query)
    query_warnings = image_problems(query_volume.array, query, "query")
    support_list = [load_support(image, mask, support_label, label_map, min_voxels, vocabulary)
                    for image, mask in supports]
    fov = field_of_view_warning(query_volume.array.shape, query_volume.spacing,
                                [s.image.shape for s in support_list], [s.spacing for s in support_list],
                                Path(str(query)).name)
    for message in query_warnings + ([fov] if fov else []):
        warn(message)
    if query_range is not None:
        canonical_range = stored_range_to_canonical(tuple(query_range), query_volume)
        how = "given by --query-range"
    else:
        canonical_range = default_query_range(support_list, np.asarray(query_volume.array, dtype=np.float32))
        how = "transferred from the support by relative body position; give --query-range to set it"
    stored = canonical_to_stored_range(canonical_range, query_volume)
    print(f"support organ: {', '.join(f'{s.name}: {s.label}' for s in support_list)}; query range "
          f"{stored[0]}:{stored[1]} (slices along the query file's axial axis, {how})", flush=True)
    model, input_size, intensity = load_model(checkpoint, device, input_size, intensity)
    plan = snap_to_annotated(chunk_plan([s.organ_range for s in support_list], canonical_range, int(n_chunks)),
                             support_list)
    prediction = run_chunks(model, [(s.image, s.mask) for s in support_list], plan,
                            np.asarray(query_volume.array, dtype=np.float32), input_size, intensity, device,
                            int(batch_size), progress)
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
