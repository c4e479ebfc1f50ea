"""Where the organ lies in the user's query scan, and which support slice segments which query slice.

Used by evaluation/segment.py (segment your own scan). Volumes are canonical RAS+ `X x Y x Z` arrays
(docs/DESIGN.md); ranges are inclusive canonical z unless they say they are stored (half-open indices
along the query FILE's axial axis, as --query-range).

Without --query-range the organ's range in the query is transferred from the supports
(`transfer_query_range`), in this order:
1. Same scan: when the query is (a crop of) a support's scan, i.e. the two grids coincide in world
   space up to whole axial slices and the voxels of a shared slice are identical, the support's organ
   slices are mapped by their physical z position: exact, for any modality and any coverage.
2. Otherwise the organ's relative position inside each support's body extent (axial slices with
   voxels above BODY_HU = -500 HU) is placed at the same relative position inside the query's body
   extent (`default_query_range`). That needs CT in Hounsfield units (MR and other non-HU volumes
   have no such threshold, and MR fields of view differ from scan to scan): refused, with the advice
   to give --query-range. It also assumes that support and query cover the same body region: the
   body extents are compared in millimetres; more than COVERAGE_WARN apart gives a warning, more than
   COVERAGE_REFUSE apart (a crop, a short field of view, an abdomen-only query against a whole-trunk
   support) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np

from dataloaders.label_map import hounsfield_problem
from dataloaders.nifti import NiftiVolume
from evaluation.protocol import centre_offsets, chunk_plan
from util.errors import UserError

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
    """Organ range of the query (canonical z, inclusive) by relative position in the body extent.

    The organ's relative position inside each support's body extent (fractions of the extent, averaged
    over the supports) is placed at the same relative position inside the query's body extent. CT in
    HU; assumes support and query scans cover the same body region (`transfer_query_range` checks both).
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
    """Which support slices segment which query slices: (support z (k,), query z (m,)) per chunk.

    A query range of at least n_chunks slices: the protocol's plan (`evaluation.protocol.chunk_plan`).
    A shorter one: query slice j (0 <= j < L) covers the relative interval [j / L, (j + 1) / L) of the
    range and gets the support chunk that covers its centre, floor((j + 0.5) n / L), instead of the
    chunk where that slice would start under the protocol's rule (which pairs it with a chunk near
    the interval's lower end). Then each support's slice moves to its nearest annotated slice.
    """
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
