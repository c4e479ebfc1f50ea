"""Segment your own scan: few-shot segmentation of a new volume from annotated support volumes.

`segment_volume(checkpoint, supports=[(image, mask), ...], query, out=...)` runs the volumetric protocol
on a user's NIfTI files: loading and checks (dataloaders.nifti, label_map, plausibility), the support's
annotated slices, the query's organ range (given, or transferred from the supports: `transfer_query_range`,
same scan by physical z, else relative position in the body's axial extent, CT in HU only), the plan
(`segment_plan`), evaluation.inference.run_chunks, and the prediction written in the query's geometry.
README "Segment your own scan" has the rules."""
from __future__ import annotations

from dataclasses import dataclass
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
from dataloaders.nifti import NiftiVolume, check_same_grid, load_nifti, save_nifti_atomic, to_original
from dataloaders.organs import INDEX_TO_NAME, canonical_name
from dataloaders.transforms import needs_hounsfield
from evaluation.inference import run_chunks
from evaluation.protocols import centre_offsets, chunk_plan
from models.checkpoint import check_input_size, model_from_checkpoint, model_input
from util.cli import warn
from util.device import resolve_device
from util.errors import UserError
from util.paths import check_output_file

# ----------------------------------------------------------------- the query range and the plan
BODY_HU = -500.0            # body voxels: above this HU (air and lung-free outside are below)
BODY_SLICE_FRACTION = 0.1   # a body slice has >= this fraction of the fullest slice's body voxels
COVERAGE_WARN = 0.10        # body extents (mm) of query and support differ by more than this: warning
COVERAGE_REFUSE = 0.25      # ... by more than this: the relative transfer is refused (give --query-range)
GRID_TOLERANCE_MM = 1e-3    # same-scan test: world positions agree to this


@dataclass
class Support:
    """One support volume, canonical.  image X x Y x Z float32; mask X x Y x Z bool (the organ);
    annotated: sorted z of the annotated slices (> min_voxels organ voxels)."""
    image: np.ndarray
    mask: np.ndarray
    annotated: np.ndarray
    name: str
    label: str = ""                     # how the organ's label value was found (printed)
    spacing: np.ndarray | None = None   # (3,) mm, canonical axes
    affine: np.ndarray | None = None    # 4 x 4 canonical voxel -> world (mm)

    @property
    def organ_range(self) -> tuple[int, int]:
        return int(self.annotated[0]), int(self.annotated[-1])


# ------------------------------------------------------------------------ stored <-> canonical
def _axial_axis(query: NiftiVolume) -> tuple[int, int, bool]:
    """(stored axis that becomes canonical z, its length, stored superior -> inferior)."""
    ornt = nib.io_orientation(query.original_affine)
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return axis, int(query.original_shape[axis]), bool(ornt[axis, 1] < 0)


def canonical_to_stored_range(canonical_range: tuple[int, int], query: NiftiVolume) -> tuple[int, int]:
    """Inclusive canonical z range -> half-open range along the query file's axial axis (as --query-range)."""
    _, n, reversed_z = _axial_axis(query)
    z0, z1 = canonical_range
    return (n - 1 - z1, n - z0) if reversed_z else (z0, z1 + 1)


def stored_range_to_canonical(query_range: tuple[int, int], query: NiftiVolume) -> tuple[int, int]:
    """Half-open slice range along the query file's axial axis (as stored) -> canonical z, inclusive."""
    axis, n, reversed_z = _axial_axis(query)
    z0, z1 = query_range
    if not (0 <= z0 < z1 <= n):
        raise UserError(f"--query-range {z0}:{z1} is outside the query volume ({n} axial slices along "
                        f"stored axis {axis}): use 0 <= Z0 < Z1 <= {n}")
    return (n - z1, n - 1 - z0) if reversed_z else (z0, z1 - 1)


# ----------------------------------------------------------------------------- relative transfer
def body_extent(image: np.ndarray) -> tuple[int, int]:
    """First and last axial slice of the body: slices whose count of voxels > -500 HU is at least
    10% of the fullest slice's count. image X x Y x Z HU. The whole volume when nothing is > -500 HU."""
    counts = (image > BODY_HU).reshape(-1, image.shape[-1]).sum(axis=0)      # Z
    if counts.max() == 0:
        return 0, image.shape[-1] - 1
    slices = np.flatnonzero(counts >= BODY_SLICE_FRACTION * counts.max())
    return int(slices[0]), int(slices[-1])


def default_query_range(supports: Sequence[Support], query_image: np.ndarray) -> tuple[int, int]:
    """Organ range of the query (canonical z, inclusive): the organ's relative position in the supports'
    body extents (averaged) placed in the query's body extent. CT in HU, same body region (both checked
    by `transfer_query_range`)."""
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


def _extent_mm(image: np.ndarray, spacing_z: float) -> float:
    b0, b1 = body_extent(image)
    return (b1 - b0 + 1) * float(spacing_z)


# ----------------------------------------------------------------------------- same scan
def same_scan_offset(support: Support, query: NiftiVolume, query_image: np.ndarray) -> int | None:
    """k such that query slice z is support slice z + k of the same scan, or None.

    Same scan: identical in-plane grid and axis directions, origins apart by a whole number of axial
    slices, and a shared slice identical voxel for voxel (a crop of the scan, or the scan itself).
    """
    if support.affine is None or support.image.shape[:2] != query_image.shape[:2]:
        return None
    if not np.allclose(support.affine[:3, :3], query.affine[:3, :3], atol=1e-6, rtol=1e-6):
        return None
    shift = np.linalg.solve(support.affine[:3, :3], query.affine[:3, 3] - support.affine[:3, 3])  # voxels
    k = int(np.rint(shift[2]))
    step = np.abs(support.affine[:3, :3]).max()
    if np.abs(shift - (0, 0, k)).max() * step > GRID_TOLERANCE_MM:
        return None
    shared = np.arange(max(0, -k), min(query_image.shape[2], support.image.shape[2] - k))   # query z
    if shared.size == 0:
        return None
    z = int(shared[shared.size // 2])
    same = np.array_equal(np.asarray(query_image[:, :, z], dtype=np.float32), support.image[:, :, z + k])
    return k if same else None


# ------------------------------------------------------------------------------ the transfer
def transfer_query_range(supports: Sequence[Support], query: NiftiVolume, query_image: np.ndarray,
                         query_name: str) -> tuple[tuple[int, int], str, list[str]]:
    """(canonical inclusive range, how it was found, warnings) without --query-range; module docstring.

    UserError when the transfer is not trustworthy: non-HU volumes, body extents too far apart, an organ
    outside the query's coverage.
    """
    n_query = query_image.shape[2]
    for support in supports:
        k = same_scan_offset(support, query, query_image)
        if k is None:
            continue
        s0, s1 = support.organ_range
        start, stop = max(s0 - k, 0), min(s1 - k, n_query - 1)
        if start > stop:
            raise UserError(f"{query_name}: part of the same scan as {support.name}, but its slices do not "
                            f"reach the support organ (support slices {s0}..{s1}): give --query-range or a "
                            "query that covers the organ")
        notes = []
        if (start, stop) != (s0 - k, s1 - k):
            notes.append(f"{query_name}: covers only part of the support organ's slices ({stop - start + 1} "
                         f"of {s1 - s0 + 1}): the rest lies outside the query")
        how = ("transferred from the support by physical z position: the query is part of the scan of "
               f"{support.name}")
        return (start, stop), how, notes
    for image, name, role in [(query_image, query_name, "query")] + [(s.image, s.name, "support image")
                                                                    for s in supports]:
        problem = hounsfield_problem(image, name, role)
        if problem:
            raise UserError(f"{problem}: the default query range is found from the body's axial extent "
                            f"(voxels above {BODY_HU:g} HU), which needs CT in HU, and fields of view differ "
                            "from scan to scan: give --query-range Z0:Z1 (the organ's slices in the "
                            "query file)")
    query_spacing_z = float(np.sqrt((query.affine[:3, 2] ** 2).sum()))
    query_mm = _extent_mm(query_image, query_spacing_z)
    warnings = []
    for support in supports:
        spacing_z = float(support.spacing[2]) if support.spacing is not None else query_spacing_z
        support_mm = _extent_mm(support.image, spacing_z)
        difference = abs(query_mm - support_mm) / max(query_mm, support_mm)
        text = (f"{query_name}: its body covers {query_mm:.0f} mm axially, {support.name}'s "
                f"{support_mm:.0f} mm ({100 * difference:.0f}% apart)")
        if difference > COVERAGE_REFUSE:
            raise UserError(f"{text}: the scans cover different body regions (a crop or another field of "
                            "view), so the organ's relative position cannot be transferred: give "
                            "--query-range Z0:Z1 (the organ's slices in the query file)")
        if difference > COVERAGE_WARN:
            warnings.append(f"{text}: the transferred range may be shifted; check it or give --query-range")
    return default_query_range(supports, query_image), \
        "transferred from the support by relative body position; give --query-range to set it", warnings


# --------------------------------------------------------------------------------- the plan
def segment_plan(supports: Sequence[Support], canonical_range: tuple[int, int],
                 n_chunks: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(support z (k,), query z (m,)) per chunk: the protocol's plan (chunk_plan) for a query range of at
    least n_chunks slices; for a shorter one, query slice j gets the support chunk covering its centre,
    floor((j + 0.5) n / L). Then each support's slice moves to its nearest annotated slice."""
    q0, q1 = canonical_range
    length = q1 - q0 + 1
    ranges = [s.organ_range for s in supports]
    if length >= n_chunks:
        plan = chunk_plan(ranges, canonical_range, n_chunks)
    else:
        centres = np.stack([first + centre_offsets(last - first + 1, n_chunks)
                            for first, last in ranges], axis=1)                        # n x k
        chunks = ((2 * np.arange(length) + 1) * n_chunks) // (2 * length)             # L
        plan = [(centres[chunk], np.array([q0 + j])) for j, chunk in enumerate(chunks)]
    return snap_to_annotated(plan, supports)


def nearest_annotated(annotated: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target z, the nearest annotated z (ties: the lower one). Shapes (m,) -> (n,)."""
    distance = np.abs(annotated[None, :] - targets[:, None])                 # n x m
    return annotated[distance.argmin(axis=1)]


def snap_to_annotated(plan, supports: Sequence[Support]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A plan with each support's chunk centre moved to its nearest annotated slice."""
    return [(np.array([nearest_annotated(support.annotated, z[None])[0]
                       for support, z in zip(supports, support_z)]), query_z) for support_z, query_z in plan]


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
    """One support pair: validated, canonical, the organ's mask and annotated slices. The label value comes
    from dataloaders.label_map.resolve_support_label; implausible pairs (swapped, constant image) are
    one-line errors, doubtful ones (soft mask, tiny organ) warnings."""
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

    input_size and intensity: given, else what the checkpoint records (`models.checkpoint.model_input`).
    """
    if isinstance(checkpoint, torch.nn.Module):
        return (checkpoint.to(device).eval(),) + model_input({}, input_size, intensity)
    model, state = model_from_checkpoint(str(checkpoint), device)
    return (model,) + model_input(state, input_size, intensity)


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
    """(uint8 prediction in the query's original geometry, the NIfTI image written to `out` atomically) of
    `query` segmented from [(image, mask), ...] supports (k-shot) with a checkpoint. support_label: a mask
    value, an organ name (known labels: label_map, sidecar JSON, vocabulary='visceral') or None (single
    value); query_range: half-open stored indices, 'Z0:Z1', or None (`transfer_query_range`); intensity:
    None (the checkpoint's), 'minmax', 'zscore' or 'window:LO,HI'. README "Segment your own scan"."""
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
