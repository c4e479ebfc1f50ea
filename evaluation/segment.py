"""Segment your own scan (NIfTI or DICOM) from annotated supports; docs/usage.md "Segmenting a scan".

`segment_volume`: one organ of (image, mask) supports; `segment` / `segment_queries`: every organ of
multi-label supports in one pass, the range found without labels. Both run `segment_scan`.
"""
from __future__ import annotations

import json
import reprlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from dataloaders.dicom import is_dicom_path, read_dicom_series
from dataloaders.label_map import (
    AIR_HU,
    field_of_view_warning,
    hounsfield_problem,
    image_problems,
    mask_label_map,
    mask_labels,
    outlier_warning,
    read_label_map,
    resolve_support_label,
    sidecar_path,
    support_size_warning,
    value_of,
    visceral_mask_structure,
)
from dataloaders.nifti import NiftiVolume, check_same_grid, load_nifti, save_nifti_atomic, to_original
from dataloaders.organs import INDEX_TO_NAME, canonical_name
from dataloaders.transforms import needs_hounsfield, neighbour_stack, volume_intensity
from evaluation.inference import images_to_input, support_prototypes
from evaluation.protocols import centre_offsets, chunk_plan, resize_nearest
from models.checkpoint import check_input_size, model_from_checkpoint, model_input
from models.fewshot import FewShotSegNet, model_input_slices
from util.cli import warn
from util.device import resolve_device
from util.errors import UserError
from util.io import check_output_file, write_text_atomic

# ----------------------------------------------------------------- the query range and the plan

BODY_SLICE_FRACTION = 0.1   # a body slice has >= this fraction of the fullest slice's body voxels
COVERAGE_WARN = 0.10        # body extents (mm) of query and support differ by more than this: warning
COVERAGE_REFUSE = 0.25      # ... by more than this: the relative transfer is refused (give --query-range)
GRID_TOLERANCE_MM = 1e-3    # same-scan test: world positions agree to this
MR_BODY_FRACTION = 0.1      # a non-HU volume's body: voxels above this fraction of its 99th percentile
RANGE_MARGIN = 0.5          # several organs: the transferred organ range widened by this fraction each side
OBLIQUE_DEGREES = 30.0      # the stored slice axis further than this from superior-inferior: oblique
MAX_CHUNKS = 1000           # --n-chunks above this: more chunks than any scan has slices
BODY_SHARE_WARN = 0.6       # a support organ over more than this share of the body in its slices: warning


@dataclass
class Support:
    """One support volume, canonical; annotated: sorted z of the slices with > min_voxels organ voxels."""
    image: np.ndarray                   # X x Y x Z float32
    mask: np.ndarray                    # X x Y x Z bool, the organ
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


def slice_axis_text(query: NiftiVolume) -> tuple[str, bool]:
    """('stored axis k[, N degrees from superior-inferior]', oblique: more than OBLIQUE_DEGREES off)."""
    axis = _axial_axis(query)[0]
    column = query.original_affine[:3, axis]
    degrees = float(np.degrees(np.arccos(min(1.0, abs(column[2]) / np.linalg.norm(column)))))
    tilt = f", {degrees:.0f} degrees from superior-inferior" if degrees >= 1 else ""
    return f"stored axis {axis}{tilt}", degrees > OBLIQUE_DEGREES


def oblique_warning(volume: NiftiVolume, name: str) -> str | None:
    """The warning for an oblique or rotated query (its slices are taken along a tilted stored axis)."""
    where, oblique = slice_axis_text(volume)
    return (f"{name}: oblique or rotated ({where}): its slices are taken along that stored axis; check the "
            "result, or reslice the query onto an axial grid") if oblique else None


def canonical_to_stored_range(canonical_range: tuple[int, int], query: NiftiVolume) -> tuple[int, int]:
    """Inclusive canonical z range -> half-open range along the query file's axial axis (as --query-range)."""
    _, n, reversed_z = _axial_axis(query)
    z0, z1 = canonical_range
    return (n - 1 - z1, n - z0) if reversed_z else (z0, z1 + 1)


def stored_range_to_canonical(query_range: tuple[int, int] | None, query: NiftiVolume):
    """Half-open slice range along the query file's axial axis (as stored) -> canonical z, inclusive."""
    if query_range is None:
        return None
    axis, n, reversed_z = _axial_axis(query)
    z0, z1 = query_range
    where, oblique = slice_axis_text(query)
    if oblique:
        raise UserError(f"--query-range {z0}:{z1}: the query is oblique or rotated (slices along {where}), "
                        "so which stored axis is axial is ambiguous: reslice the query onto an axial grid "
                        "first")
    if not (0 <= z0 < z1 <= n):
        raise UserError(f"--query-range {z0}:{z1} is outside the query volume ({n} axial slices along "
                        f"stored axis {axis}): use 0 <= Z0 < Z1 <= {n}")
    return (n - z1, n - 1 - z0) if reversed_z else (z0, z1 - 1)


# ----------------------------------------------------------------------------- relative transfer
def body_extent(image: np.ndarray, threshold: float = AIR_HU) -> tuple[int, int]:
    """First and last axial slice with >= BODY_SLICE_FRACTION of the fullest slice's voxels > threshold."""
    counts = (image > threshold).reshape(-1, image.shape[-1]).sum(axis=0)    # Z
    if counts.max() == 0:
        return 0, image.shape[-1] - 1
    slices = np.flatnonzero(counts >= BODY_SLICE_FRACTION * counts.max())
    return int(slices[0]), int(slices[-1])


def default_query_range(supports: Sequence[Support], query_image: np.ndarray) -> tuple[int, int]:
    """Organ range of the query (canonical z, inclusive): the organ's relative position in the supports'
    body extents (averaged) placed in the query's body extent (`body_threshold`: CT or MR)."""
    fractions = []
    for support in supports:
        b0, b1 = body_extent(support.image, body_threshold(support.image))
        length = b1 - b0 + 1
        s0, s1 = support.organ_range
        fractions.append(((s0 - b0) / length, (s1 + 1 - b0) / length))
    f0, f1 = np.clip(np.mean(fractions, axis=0), 0.0, 1.0)
    q0, q1 = body_extent(query_image, body_threshold(query_image))
    length = q1 - q0 + 1
    start = int(np.clip(np.floor(q0 + f0 * length + 0.5), q0, q1))
    stop = int(np.clip(np.floor(q0 + f1 * length + 0.5) - 1, start, q1))
    return start, stop


# ----------------------------------------------------------------------------- same scan
def same_scan_offset(support: Support, query: NiftiVolume, query_image: np.ndarray) -> int | None:
    """k such that query slice z is support slice z + k of the same scan (same grid and axes, origins a
    whole number of slices apart, a shared slice identical voxel for voxel), or None."""
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


def same_scan_range(supports: Sequence[Support], query: NiftiVolume, query_image: np.ndarray,
                    query_name: str) -> tuple[tuple[int, int], tuple[int, int], Support] | None:
    """(query range clipped to the query, unclipped, the support) when the query is part of a support's
    scan (canonical z, inclusive); None otherwise. A query that misses the organ is a one-line error."""
    for support in supports:
        k = same_scan_offset(support, query, query_image)
        if k is None:
            continue
        s0, s1 = support.organ_range
        start, stop = max(s0 - k, 0), min(s1 - k, query_image.shape[2] - 1)
        if start > stop:
            raise UserError(f"{query_name}: part of the same scan as {support.name}, but its slices do not "
                            f"reach the support organ (support slices {s0}..{s1}): give --query-range or a "
                            "query that covers the organ")
        return (start, stop), (s0 - k, s1 - k), support
    return None


def transfer_query_range(supports: Sequence[Support], query: NiftiVolume, query_image: np.ndarray,
                         query_name: str) -> tuple[tuple[int, int], str, list[str]]:
    """(canonical inclusive range, how it was found, warnings) without --query-range. UserError when the
    transfer is not trustworthy: non-HU volumes, body extents too far apart."""
    same = same_scan_range(supports, query, query_image, query_name)
    if same is not None:
        (start, stop), (s0, s1), support = same
        notes = [] if (start, stop) == (s0, s1) else [
            f"{query_name}: covers only part of the support organ's slices ({stop - start + 1} of "
            f"{s1 - s0 + 1}): the rest lies outside the query"]
        how = ("transferred from the support by physical z position: the query is part of the scan of "
               f"{support.name}")
        return (start, stop), how, notes
    for image, name, role in [(query_image, query_name, "query")] + [(s.image, s.name, "support image")
                                                                    for s in supports]:
        problem = hounsfield_problem(image, name, role)
        if problem:
            raise UserError(f"{problem}: the default query range is found from the body's axial extent "
                            f"(voxels above {AIR_HU:g} HU), which needs CT in HU, and fields of view differ "
                            "from scan to scan: give --query-range Z0:Z1 (the organ's slices in the "
                            "query file)")
    b0, b1 = body_extent(query_image)
    query_mm = (b1 - b0 + 1) * float(np.sqrt((query.affine[:3, 2] ** 2).sum()))
    warnings = []
    for support in supports:
        b0, b1 = body_extent(support.image)
        support_mm = (b1 - b0 + 1) * float(support.spacing[2])
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
    return [(np.array([nearest_annotated(s.annotated, z[None])[0] for s, z in zip(supports, support_z)]),
             query_z) for support_z, query_z in plan]


def nearest_annotated(annotated: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target z, the nearest annotated z (ties: the lower one). Shapes (m,) -> (n,)."""
    distance = np.abs(annotated[None, :] - targets[:, None])                 # n x m
    return annotated[distance.argmin(axis=1)]


# ---------------------------------------------------------------------------------- parsing
def parse_query_range(text) -> tuple[int, int] | None:
    """'Z0:Z1' (or a pair, or None) -> (Z0, Z1), half-open slice indices (Z1 excluded, as a Python slice)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return int(text[0]), int(text[1])
    try:
        z0, z1 = (int(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"--query-range '{text}': expected Z0:Z1 with integer slice indices, e.g. "
                        "40:95") from None
    return z0, z1


def parse_intensity(spec) -> dict | None:
    """None (the checkpoint's) | dict | 'minmax' | 'zscore' | 'window:LO,HI' -> the `scale_intensity` dict."""
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


def _refuse(name: str, value, wanted: str) -> UserError:
    shown = " ".join(reprlib.repr(value).split())                       # short and on one line
    return UserError(f"{name}: got {shown} ({type(value).__name__}): give {wanted}")


def check_counts(n_chunks, batch_size, min_voxels) -> None:
    """n_chunks, batch_size (>= 1) and min_voxels (>= 0) as integers in range; one line otherwise."""
    for name, value, low in (("n_chunks", n_chunks, 1), ("batch_size", batch_size, 1),
                             ("min_voxels", min_voxels, 0)):
        if not _is_int(value):
            raise _refuse(name, value, "an integer")
        if value < low:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be >= {low}")
    if n_chunks > MAX_CHUNKS:
        raise UserError(f"--n-chunks {n_chunks}: at most {MAX_CHUNKS} (one chunk per slice is the finest "
                        "plan)")


def check_arguments(checkpoint, supports, query, out, support_label, label_map, query_range,
                    input_size, intensity, device, vocabulary) -> None:
    """One-line UserError for an argument of `segment_volume` of the wrong type or value (before any I/O)."""
    pairs = not isinstance(supports, PATH_TYPES) and isinstance(supports, Sequence) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, PATH_TYPES) for p in pair)
        for pair in supports)
    rules = [
        ("checkpoint", checkpoint, isinstance(checkpoint, PATH_TYPES + (torch.nn.Module,)),
         "the path (str or Path) of a train.py checkpoint"),
        ("supports", supports, pairs, "a list of (image, mask) path pairs, e.g. [('s.nii.gz', 'm.nii.gz')]"),
        ("query", query, isinstance(query, PATH_TYPES), "the path (str or Path) of a NIfTI volume"),
        ("out", out, out is None or isinstance(out, PATH_TYPES),
         "the path (str or Path) of the .nii.gz to write, or None"),
        ("support_label", support_label, support_label is None or _is_int(support_label)
         or isinstance(support_label, str), "a label value (int), an organ name (str) or None"),
        ("label_map", label_map, label_map is None or isinstance(label_map, PATH_TYPES + (dict,)),
         "a JSON path or a dict such as {'liver': 5}"),
        ("query_range", query_range, query_range is None or isinstance(query_range, str) or (
            isinstance(query_range, Sequence) and len(query_range) == 2 and all(map(_is_int, query_range))),
         "(Z0, Z1) integer slice indices or 'Z0:Z1'"),
        ("input_size", input_size, input_size is None or _is_int(input_size),
         "an integer slice size, or None for the checkpoint's"),
        ("intensity", intensity, intensity is None or isinstance(intensity, (str, dict)),
         "'minmax', 'zscore', 'window:LO,HI', a dict, or None"),
        ("device", device, isinstance(device, (str, torch.device)), "'auto', 'cpu' or 'cuda'"),
        ("vocabulary", vocabulary, vocabulary is None or isinstance(vocabulary, str), "'visceral' or None")]
    for name, value, ok, wanted in rules:
        if not ok:
            raise _refuse(name, value, wanted)
    if input_size is not None:
        check_input_size(input_size, "--input-size")


# --------------------------------------------------------------------------------- loading
def load_support(image_path, mask_path, support_label, label_map, min_voxels: int,
                 vocabulary: str | None = None) -> Support:
    """One (image, mask) pair, canonical, its organ chosen by `resolve_support_label`; implausible pairs
    are one-line errors, doubtful ones (soft mask, tiny organ) warnings."""
    image = read_volume(image_path)
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
    body = image.array[..., annotated] > AIR_HU                 # CT in HU only: MR has no reliable body
    share = float((organ[..., annotated] & body).sum()) / max(int(body.sum()), 1)
    if share > BODY_SHARE_WARN and modality(image.array) == "CT":
        warn(f"{Path(mask_path).name}: {how} covers {100 * share:.0f}% of the body in its slices, more than "
             "any organ: a background or off-by-one label value? check --support-label / the mask")
    return Support(image=np.asarray(image.array, dtype=np.float32), mask=organ, annotated=annotated,
                   name=Path(image_path).name, label=how, spacing=np.asarray(spacing, dtype=float),
                   affine=np.asarray(image.affine, dtype=float))


def load_model(checkpoint, device: torch.device, input_size: int | None, intensity: dict | None):
    """(model in eval mode on device, input_size, intensity) of a train.py checkpoint or a module;
    input_size, intensity: given, else the checkpoint's (`models.checkpoint.model_input`)."""
    if isinstance(checkpoint, torch.nn.Module):
        return (checkpoint.to(device).eval(),) + model_input({}, input_size, intensity)
    model, state = model_from_checkpoint(str(checkpoint), device)
    return (model,) + model_input(state, input_size, intensity)


def intensity_warnings(intensity: dict, volumes) -> list[str]:
    """Outlier warnings of (array, path, role) volumes under min-max or z-score; under a CT window (which
    clips outliers) a volume not in HU is a one-line error: the window would make it a constant."""
    if not needs_hounsfield(intensity):
        return [m for m in (outlier_warning(a, p, r, intensity["mode"]) for a, p, r in volumes) if m]
    lo, hi = intensity["window"]
    for array, path, role in volumes:
        problem = hounsfield_problem(array, path, role)
        if problem:
            raise UserError(f"{problem}: the checkpoint scales its input by the CT window [{lo:g}, {hi:g}] "
                            "HU; convert the volume to HU (apply the DICOM rescale slope and intercept), or "
                            "pass --intensity minmax to scale each slice by its own range instead")
    return []


def segment_volume(checkpoint, supports: Sequence[tuple[str, str]], query, out=None, support_label=None,
                   label_map=None, query_range: tuple[int, int] | str | None = None, n_chunks: int = 12,
                   device: str = "auto", batch_size: int = 16, progress: bool = True,
                   intensity=None, input_size: int | None = None, min_voxels: int = 0,
                   vocabulary: str | None = None, series: str | None = None
                   ) -> tuple[np.ndarray, nib.Nifti1Image]:
    """(uint8 prediction in the query's stored geometry, its NIfTI image, written to `out` atomically) of
    one organ of `query` (NIfTI or DICOM folder) from [(image, mask), ...] supports; the options are
    scripts/segment_volume.py's (query_range None: `transfer_query_range`)."""
    check_arguments(checkpoint, supports, query, out, support_label, label_map, query_range, input_size,
                    intensity, device, vocabulary)
    check_counts(n_chunks, batch_size, min_voxels)
    if out is not None:   # before any compute: never an input (path, symlink, hard link), writable, a file
        inputs = [query, *(path for pair in supports for path in pair)]
        inputs += [checkpoint] if isinstance(checkpoint, (str, Path)) else []
        inputs += [label_map] if isinstance(label_map, (str, Path)) else []
        out = check_output_file(out, inputs, "--out", suffixes=(".nii.gz",))
    if not supports:
        raise UserError("no support given: pass --support-image S.nii.gz --support-mask M.nii.gz")
    query_range = parse_query_range(query_range)
    intensity = parse_intensity(intensity)
    device = resolve_device(device)
    if label_map is not None:
        read_label_map(label_map)                      # a malformed map fails before any volume is read
    query_volume = read_volume(query, series)
    query_name = Path(str(query)).name
    query_warnings = image_problems(query_volume.array, query, "query")
    canonical_range = stored_range_to_canonical(query_range, query_volume)   # before the supports load
    support_list = [load_support(image, mask, support_label, label_map, min_voxels, vocabulary)
                    for image, mask in supports]
    model, input_size, intensity = load_model(checkpoint, device, input_size, intensity)
    query_image = np.asarray(query_volume.array, dtype=np.float32)
    query_warnings += intensity_warnings(intensity, [(query_image, query, "query")] + [
        (s.image, path, "support image") for s, (path, _) in zip(support_list, supports)])
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
    kinds = {modality(s.image) for s in support_list}   # CT in HU has air near -1000 HU, MR none
    if kinds != {modality(query_image)}:
        names = {"CT": "CT in HU", "MR": "MR (or CT not in HU)"}
        warn(f"{query_name}: the query is {names[modality(query_image)]} but the supports are "
             f"{' and '.join(names[k] for k in sorted(kinds))} ({support_list[0].name}; air near -1000 HU "
             "tells CT): across modalities the result means nothing; give supports of the query's modality")
    where, _ = slice_axis_text(query_volume)
    for note in filter(None, [oblique_warning(query_volume, query_name)]):
        warn(note)
    print(f"support organ: {', '.join(f'{s.name}: {s.label}' for s in support_list)}; query range "
          f"{stored[0]}:{stored[1]} (slices along the query file's axial axis, {where}; {how})", flush=True)
    prediction, _ = segment_scan(model, {1: ("organ", support_list)}, query_volume, query_image, input_size,
                                 intensity, device, batch_size, n_chunks, {}, canonical_range,
                                 progress)                               # X x Y x Z, 0 outside the plan
    array = to_original(prediction, query_volume.original_axcodes)
    image = nib.Nifti1Image(array, query_volume.original_affine)
    image.set_qform(query_volume.original_affine, code=query_volume.codes[0])
    image.set_sform(query_volume.original_affine, code=query_volume.codes[1])
    if out is not None:
        save_nifti_atomic(array, query_volume.original_affine, out, query_volume.codes)
    if not array.any():
        warn(f"the output mask is empty: no voxel of {Path(str(query)).name} was segmented in query slices "
             f"{stored[0]}:{stored[1]}: check the support label, the query range and the checkpoint's organ")
    return array, image


@dataclass
class LabelledScan:
    """One support scan, canonical: image X x Y x Z float32, labels X x Y x Z int, names {value: name}."""
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    names: dict
    name: str


def read_volume(path, series: str | None = None) -> NiftiVolume:
    """A NIfTI file or a DICOM series folder (dataloaders.dicom) as a canonical NiftiVolume."""
    if Path(path).is_dir() and not is_dicom_path(path):
        raise UserError(f"{path}: a folder without DICOM files (.dcm or DICM header): give a NIfTI file or "
                        "a DICOM series folder")
    if not is_dicom_path(path):
        return load_nifti(path)
    array, affine = read_dicom_series(path, series)                           # X x Y x Z, RAS affine
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return NiftiVolume(array=np.asfortranarray(canonical.dataobj),
                       affine=np.asarray(canonical.affine, dtype=np.float64), original_affine=affine,
                       original_shape=tuple(int(s) for s in array.shape),
                       original_axcodes="".join(nib.aff2axcodes(affine)), path=Path(path))


def modality(image: np.ndarray) -> str:
    """'CT' (air near -1000 HU present) or 'MR' (any volume without air in HU)."""
    return "CT" if hounsfield_problem(image, "", "") is None else "MR"


def body_threshold(image: np.ndarray) -> float:
    """Body voxels lie above this: AIR_HU for CT in HU, else a fraction of the 99th percentile (MR)."""
    return AIR_HU if modality(image) == "CT" else MR_BODY_FRACTION * float(np.percentile(image, 99))


def support_pairs(supports) -> list[tuple[Path, Path]]:
    """(image, labels) pairs: given, or a support folder's image_<id>.nii.gz (or image_<id>/, a DICOM
    folder) with label_<id>.nii.gz."""
    if not isinstance(supports, (str, Path)):
        return [(Path(image), Path(labels)) for image, labels in supports]
    folder = Path(supports)
    if not folder.is_dir():
        raise UserError(f"--support-dir {folder}: not a folder")
    pairs = []
    for image in sorted(folder.glob("image_*")):
        scan_id = image.name[len("image_"):].removesuffix(".nii.gz").removesuffix(".nii")
        labels = folder / f"label_{scan_id}.nii.gz"
        if labels.is_file():
            pairs.append((image, labels))
    if not pairs:
        raise UserError(f"--support-dir {folder}: no image_<id>.nii.gz (or image_<id>/ DICOM folder) with "
                        "its label_<id>.nii.gz: put the annotated scans there under these names")
    return pairs


def load_support_set(supports, label_map=None) -> list[LabelledScan]:
    """Support scans with their label maps (given, <folder>/labels.json or each mask's sidecar), read once;
    maps that disagree are a one-line error."""
    if label_map is None and isinstance(supports, (str, Path)) and (Path(supports) / "labels.json").is_file():
        label_map = Path(supports) / "labels.json"
    scans, seen = [], {}
    for image_path, labels_path in support_pairs(supports):
        image, labels = read_volume(image_path), load_nifti(labels_path)
        check_same_grid(labels, image)
        names, how = mask_label_map(labels_path, label_map)
        if not names:
            raise UserError(f"{labels_path}: its labels are unknown: pass --label-map map.json, or put labels"
                            f".json in the support folder or a sidecar {sidecar_path(labels_path).name}")
        for value, name in names.items():
            organ = canonical_name(name) or name.strip().lower()
            for key, other in ((("organ", organ), value), (("value", value), organ)):
                if seen.setdefault(key, (other, labels_path))[0] != other:
                    raise UserError(f"support label maps disagree: {key[1]} is {other} in {labels_path.name} "
                                    f"but {seen[key][0]} in {seen[key][1].name}: relabel the supports alike")
        values, _ = mask_labels(labels.array, labels_path)
        scans.append(LabelledScan(np.asarray(image.array, dtype=np.float32), values,
                                  np.asarray(image.affine, dtype=float), names, Path(image_path).name))
    kinds = {modality(scan.image) for scan in scans}
    if len(kinds) > 1:
        raise UserError(f"the supports mix CT and MR ({', '.join(s.name for s in scans)}): use one modality")
    return scans


def organ_supports(scans: Sequence[LabelledScan], organs, min_voxels: int = 0) -> dict[int, tuple[str, list]]:
    """{value: (name, [Support of each scan annotating it])} for the organs asked (names or values;
    None: all in the supports). An organ in no support is a one-line error."""
    names = {value: name for scan in scans for value, name in scan.names.items()}
    wanted = sorted(names) if organs is None else []
    for organ in ([] if organs is None else organs):
        value = int(organ) if str(organ).strip().isdigit() else value_of(str(organ), names)
        if value is None or value not in names:
            raise UserError(f"organ '{organ}' is in no support label map (they name "
                            f"{', '.join(sorted(set(names.values())))}): pick one of those")
        wanted.append(value)
    result = {}
    for value in dict.fromkeys(wanted):
        found = []
        for scan in scans:
            mask = scan.labels == value                                          # X x Y x Z bool
            annotated = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).sum(axis=0) > min_voxels)
            if annotated.size:
                spacing = np.sqrt((scan.affine[:3, :3] ** 2).sum(axis=0))
                found.append(Support(scan.image, mask, annotated, scan.name, spacing=spacing,
                                     affine=scan.affine))
        if not found:
            if organs is None:
                continue                                     # named in a map, annotated nowhere: skipped
            raise UserError(f"organ '{names[value]}' (label {value}) is annotated in no support scan: "
                            "annotate it in at least one support or leave it out")
        result[value] = (names[value], found)
    return result


def organ_window(supports: Sequence[Support], query: NiftiVolume, query_image: np.ndarray, n_chunks: int):
    """(plan over the scored slices, scored canonical range, how) without a given range: the organ's
    range transferred (same scan by z, else its relative position in the body's axial extent, CT and MR
    alike), widened by RANGE_MARGIN of its length each side; the largest 3D component is kept later."""
    n = query_image.shape[2]
    same = same_scan_range(supports, query, query_image, query.path.name)
    if same is not None:
        core, how = same[0], f"same scan as {same[2].name} (physical z)"
    else:
        core, how = default_query_range(supports, query_image), "relative position in the body's axial extent"
    margin = int(np.ceil(RANGE_MARGIN * (core[1] - core[0] + 1)))
    scored = (max(core[0] - margin, 0), min(core[1] + margin, n - 1))
    plan = segment_plan(supports, core, n_chunks)
    plan[0] = (plan[0][0], np.concatenate([np.arange(scored[0], core[0]), plan[0][1]]))
    plan[-1] = (plan[-1][0], np.concatenate([plan[-1][1], np.arange(core[1] + 1, scored[1] + 1)]))
    return plan, scored, (f"scored slices around the range found by {how}, kept the organ's largest 3D "
                          "connected component")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a bool volume (all False when empty)."""
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(sizes.argmax())


def score_organs(model, organ_plans: dict, query_image: np.ndarray, input_size: int, intensity: dict,
                 device, batch_size: int, prototypes: dict, progress: bool = False) -> dict:
    """{value: (z0, X x Y x W float32 foreground - background logit of slices z0..)} of organ_plans
    {value: (supports, plan)}; query slices encoded once for all organs, in fixed blocks of batch_size;
    prototypes cached across queries. model None: mask copy (support masks' vote fraction - 0.5)."""
    windows = {value: (min(int(z.min()) for _, z in plan), max(int(z.max()) for _, z in plan))
               for value, (_, plan) in organ_plans.items()}
    scores = {value: np.full(query_image.shape[:2] + (z1 - z0 + 1,), -np.inf, dtype=np.float32)
              for value, (z0, z1) in windows.items()}                             # X x Y x window
    if model is None:
        for value, (supports, plan) in organ_plans.items():
            for support_z, query_z in plan:
                votes = np.mean([resize_nearest(s.mask[:, :, z], query_image.shape[:2])
                                 for s, z in zip(supports, support_z)], axis=0)          # X x Y
                scores[value][:, :, query_z - windows[value][0]] = (votes - 0.5)[:, :, None]
        return {value: (windows[value][0], score_window) for value, score_window in scores.items()}
    split = isinstance(model, FewShotSegNet)         # encoder once, then each organ's head
    encode = (lambda x: model.encoder(x.flatten(0, 1)).unflatten(0, (1, -1))) if split else (lambda x: x)
    score = model.head.score if split else model.segment
    slices = model_input_slices(model)
    query_scale = volume_intensity(query_image, intensity, "query image")
    scales = prototypes.setdefault("scales", {})
    needed = sorted({int(z) for _, plan in organ_plans.values() for _, query_z in plan for z in query_z})
    blocks = sorted({z // batch_size for z in needed})
    with torch.inference_mode():
        for block in tqdm(blocks, desc="segment", unit="block", disable=not progress, file=sys.stderr):
            zs = np.arange(block * batch_size, min((block + 1) * batch_size, query_image.shape[2]))
            feats = encode(images_to_input(neighbour_stack(query_image, zs, slices), query_scale,
                                           input_size, device)[None])            # 1 x Q x ...
            for value, (supports, plan) in organ_plans.items():
                for support_z, query_z in plan:
                    chosen = np.flatnonzero(np.isin(zs, query_z))
                    if chosen.size == 0:
                        continue
                    key = (value, tuple(id(s.image) for s in supports), tuple(int(z) for z in support_z))
                    if key not in prototypes:
                        for s in supports:
                            if id(s.image) not in scales:
                                scales[id(s.image)] = volume_intensity(s.image, intensity, "support image")
                        prototypes[key] = support_prototypes(model, [(s.image, s.mask) for s in supports],
                                                             support_z, input_size, scales, device, slices)
                    logits = score(prototypes[key], feats[:, chosen])
                    logits = (logits[0] if isinstance(logits, (tuple, list)) else logits)[0]  # Q x 2 x S x S
                    logits = F.interpolate(logits.float(), size=tuple(query_image.shape[:2]), mode="bilinear",
                                           align_corners=False)                  # Q x 2 x X x Y
                    difference = (logits[:, 1] - logits[:, 0]).permute(1, 2, 0)  # X x Y x Q
                    scores[value][:, :, zs[chosen] - windows[value][0]] = difference.cpu().numpy()
    return {value: (windows[value][0], score_window) for value, score_window in scores.items()}


def segment_scan(model, by_organ: dict, volume: NiftiVolume, query_image: np.ndarray, input_size: int,
                 intensity: dict, device, batch_size: int, n_chunks: int, prototypes: dict,
                 query_range: tuple[int, int] | None = None, progress: bool = False) -> tuple:
    """(X x Y x Z labels, {value: (how, scored range, found range or None)}, canonical z inclusive) of one
    query: every organ of by_organ {value: (name, supports)} in one `score_organs` pass, the highest score
    winning. Without query_range: `organ_window`, the largest 3D component."""
    plans, ranges = {}, {}
    for value, (_, supports) in by_organ.items():
        if query_range is not None:
            plan, scored = segment_plan(supports, query_range, n_chunks), query_range
            how = "given by --query-range"
        else:
            plan, scored, how = organ_window(supports, volume, query_image, n_chunks)
        plans[value], ranges[value] = (supports, plan), (how, scored)
    scores = score_organs(model, plans, query_image, input_size, intensity, device, batch_size, prototypes,
                          progress)
    labels = np.zeros(query_image.shape, dtype=np.uint8 if max(by_organ) < 256 else np.uint16)
    best = np.full(query_image.shape, -np.inf, dtype=np.float32)
    for value, (z0, score) in scores.items():
        window = slice(z0, z0 + score.shape[2])
        mask = score > 0                                                       # X x Y x W
        mask = mask if query_range is not None else largest_component(mask)
        take = mask & (score > best[:, :, window])                              # highest score wins
        labels[:, :, window][take] = value
        best[:, :, window][take] = score[take]
        found = np.flatnonzero(mask.any(axis=(0, 1)))
        ranges[value] += ((z0 + int(found[0]), z0 + int(found[-1])) if found.size else None,)
    return labels, ranges


def segment_queries(queries: Sequence, supports, organs=None, checkpoint=None, outs: Sequence | None = None,
                    label_map=None, query_range=None, series: str | None = None, n_chunks: int = 12,
                    device: str = "auto", batch_size: int = 16, intensity=None, input_size: int | None = None,
                    min_voxels: int = 0, progress: bool = False) -> list[tuple]:
    """`segment` for several queries: the supports, the model and the support prototypes are made once.
    Per query (labels, names, affine, ranges); outs: one .nii.gz per query (+ its .json sidecar) or None."""
    loaded = isinstance(supports, list) and bool(supports) and isinstance(supports[0], LabelledScan)
    if outs is not None:
        inputs = [*queries] + ([checkpoint] if isinstance(checkpoint, (str, Path)) else [])
        inputs += [] if loaded else [path for pair in support_pairs(supports) for path in pair]
        inputs += [label_map] if isinstance(label_map, (str, Path)) else []
        inputs += [Path(supports) / "labels.json"] if isinstance(supports, (str, Path)) else []
        outs = [check_output_file(out, inputs, "--out", suffixes=(".nii.gz",), create_parent=True)
                for out in outs]
        for out in outs:                                   # its sidecar may not replace a label map either
            check_output_file(sidecar_path(out), inputs, "--out's sidecar", create_parent=True)
    for query in queries:
        if not Path(query).exists():
            raise UserError(f"{query}: query not found: check the path")
    query_range = parse_query_range(query_range)
    check_counts(n_chunks, batch_size, min_voxels)
    scans = supports if loaded else load_support_set(supports, label_map)
    by_organ = organ_supports(scans, organs, min_voxels)
    names = {value: name for value, (name, _) in by_organ.items()}
    device = resolve_device(device)
    model, input_size, intensity = load_model(checkpoint, device, input_size, parse_intensity(intensity))
    support_kind, prototypes, results = modality(scans[0].image), {}, []
    for index, query in enumerate(queries):
        start = time.perf_counter()
        volume = read_volume(query, series)
        query_image = np.asarray(volume.array, dtype=np.float32)
        if modality(query_image) != support_kind:
            raise UserError(f"{query}: the query is {modality(query_image)} but the supports are "
                            f"{support_kind} ({scans[0].name}; air near -1000 HU tells CT): give supports "
                            "of the query's modality")
        notes = intensity_warnings(intensity, [(query_image, query, "query")])
        for note in filter(None, notes + [oblique_warning(volume, str(query))]):
            warn(note)
        scored = stored_range_to_canonical(query_range, volume)
        labels, found = segment_scan(model, by_organ, volume, query_image, input_size, intensity, device,
                                     batch_size, n_chunks, prototypes, scored, progress)
        ranges = {}
        for value, (how, window, span) in found.items():
            entry = ranges[names[value]] = {
                "value": value, "method": how, "scored": list(canonical_to_stored_range(window, volume)),
                "found": None if span is None else list(canonical_to_stored_range(span, volume))}
            if span is None:
                warn(f"{Path(str(query)).name}: no {names[value]} found in slices {entry['scored'][0]}:"
                     f"{entry['scored'][1]} (stored axial indices): the output has none; the query may not "
                     "cover it, or the supports or the checkpoint do not fit this scan")
        array = to_original(labels, volume.original_axcodes)
        seconds = time.perf_counter() - start
        print(f"{Path(str(query)).name}: " + "; ".join(
            f"{name} {entry['found'][0]}:{entry['found'][1]}" if entry["found"] else f"{name} none"
            for name, entry in ranges.items()) + f" ({seconds:.1f} s)", flush=True)
        if outs is not None:
            outs[index].parent.mkdir(parents=True, exist_ok=True)
            save_nifti_atomic(array, volume.original_affine, outs[index], volume.codes)
            write_text_atomic(json.dumps({"labels": {str(v): n for v, n in names.items()}, "organs": ranges,
                                          "ranges_are": "stored axial slice indices Z0:Z1 (Z1 excluded)",
                                          "seconds": round(seconds, 2)}, indent=1), sidecar_path(outs[index]))
        results.append((array, names, volume.original_affine, ranges))
    return results


def segment(query, supports, organs=None, checkpoint=None, out=None, **options
            ) -> tuple[np.ndarray, dict, np.ndarray]:
    """(labels in the query's stored geometry, {value: organ name}, its affine) of a NIfTI file or DICOM
    series folder segmented for `organs` (names or values; None: every organ of the supports) in one pass.
    supports: a folder (image_<id> + label_<id>.nii.gz [+ labels.json]), (image, labels) pairs, or
    `load_support_set`'s result; options as `segment_queries`. docs/usage.md "Segmenting a scan"."""
    labels, names, affine, _ = segment_queries([query], supports, organs, checkpoint,
                                               None if out is None else [out], **options)[0]
    return labels, names, affine
