"""Is this input what it claims to be? Checks of CT images and masks before any compute.

Errors (UserError) where a result would be meaningless, warnings (returned as one-line strings for
the caller to print) where it would merely be doubtful:

- `mask_labels(array, path)`: integer label values of a mask. A float mask holding non-integer values
  is a soft (probability) mask when its values lie in [0, 1]: foreground = value >= 0.5
  (SOFT_MASK_THRESHOLD, stated in the returned note); other non-integer values are an error. A "mask"
  is an image (swapped arguments?) when it has negative values, more than MAX_MASK_LABELS distinct
  values, or more than MANY_LABELS distinct values over more than IMAGE_FOREGROUND_FRACTION of its
  voxels. None of these rules needs Hounsfield units: an MR image given as a mask is refused too.
- `image_problems(array, path)`: an "image" whose values are at most MAX_IMAGE_LABELS distinct whole
  numbers >= 0 is a label volume (error; a 0/1 body mask, a CT or an MR label file alike); a constant
  volume is an error; a volume with no voxel above -500 HU is all air (warning; only for volumes with
  values that low, so never for MR or other non-HU data).
- `hounsfield_problem(array, path)`: why a volume is not CT in Hounsfield units (no voxel at or below
  AIR_HU: float CT in [0, 1], uint16 stored without its rescale, int8, MR), or None. The callers refuse
  a CT window or a body-extent rule (-500 HU) on such a volume instead of applying it silently.
- `field_of_view_warning(query, supports)`: the query's in-plane field of view is less than
  FOV_RATIO of a support's along an axis (warning: the position-based chunks and range transfer assume
  comparable fields of view).
- `support_size_warning(...)`: the support organ's largest slice is far smaller than that organ's
  (MIN_SLICE_AREA_MM2) or than any abdominal structure's (warning: the wrong label value?).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from util.errors import UserError

SOFT_MASK_THRESHOLD = 0.5       # soft masks (values in [0, 1]): foreground = value >= this
MAX_MASK_LABELS = 256           # a mask with more distinct values than this is an image
MANY_LABELS = 8                 # a "mask" with more distinct values than this over most of its voxels:
IMAGE_FOREGROUND_FRACTION = 0.5  # (more than this fraction non-zero) is an image
MAX_IMAGE_LABELS = 64           # an "image" of at most this many distinct whole values >= 0 is a label volume
AIR_HU = -500.0                 # CT: body voxels above this, air below (as evaluation/segment.BODY_HU)
_SAMPLE = 200_000               # voxels looked at first (a strided sample) before a full count
FOV_RATIO = 0.6                 # query in-plane extent below this fraction of the support's: warning
# Largest support slice below this area (mm^2): warning. About a tenth of the largest cross-section of
# the organ on the real CT sample the project was checked on (an ellipse of the organ's in-plane
# extent); 50 mm^2 for any other structure.
MIN_SLICE_AREA_MM2 = {"liver": 2800.0, "spleen": 860.0, "kidney_right": 370.0, "kidney_left": 370.0,
                      "psoas_right": 55.0, "psoas_left": 55.0}
DEFAULT_MIN_SLICE_AREA_MM2 = 50.0


def mask_labels(array: np.ndarray, path: str | Path) -> tuple[np.ndarray, str | None]:
    """(integer label array of the mask's shape, note or None); a UserError for image-like content."""
    values = np.asarray(array)
    name = Path(path).name
    if np.issubdtype(values.dtype, np.floating):
        rounded = np.rint(values)
        if not np.array_equal(values, rounded):
            low, high = float(values.min()), float(values.max())
            if 0.0 <= low and high <= 1.0:
                foreground = values >= SOFT_MASK_THRESHOLD
                note = (f"{name}: soft mask (non-integer values in [{low:g}, {high:g}]): foreground = values "
                        f">= {SOFT_MASK_THRESHOLD:g} ({int(foreground.sum())} voxels)")
                return foreground.astype(np.uint8), note
            distinct = np.unique(values).size
            if distinct > MAX_MASK_LABELS:
                raise UserError(f"{path}: {distinct} distinct non-integer values: this looks like an image, "
                                "not a mask: check the order of the image and mask arguments")
            raise UserError(f"{path}: non-integer mask values outside [0, 1] ({low:g} .. {high:g}): export "
                            "integer labels, or a soft mask in [0, 1] "
                            f"(foreground >= {SOFT_MASK_THRESHOLD:g})")
        values = rounded
    if values.size and values.min() < 0:
        raise UserError(f"{path}: negative values (min {values.min():g}): this looks like an image (CT in "
                        "HU), not a mask: check the order of the image and mask arguments")
    distinct = np.unique(values).size
    if distinct > MAX_MASK_LABELS:
        raise UserError(f"{path}: {distinct} distinct values: this looks like an image, not a mask: check "
                        "the order of the image and mask arguments")
    foreground = float(np.count_nonzero(values)) / max(values.size, 1)
    if distinct > MANY_LABELS and foreground > IMAGE_FOREGROUND_FRACTION:
        raise UserError(f"{path}: {distinct} distinct values over {100 * foreground:.0f}% of the voxels: "
                        "this looks like an image, not a mask: check the order of the image and mask "
                        "arguments")
    return values.astype(np.int64), None


def image_problems(array: np.ndarray, path: str | Path, role: str = "image") -> list[str]:
    """Warnings about a CT volume; UserError when it cannot be an image at all (mask-like, constant)."""
    values = np.asarray(array)
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise UserError(f"{path}: the {role} is constant (every voxel {low:g}): nothing to segment; give "
                        "the CT or MR volume")
    labels = label_values(values) if low >= 0 else None
    if labels is not None:
        shown = ", ".join(f"{v:g}" for v in labels[:8]) + (", ..." if labels.size > 8 else "")
        raise UserError(f"{path}: the {role} holds only {labels.size} distinct whole values ({shown}): "
                        "this looks like a mask (a label volume), not an image: check the order of the image "
                        "and mask arguments")
    if high <= AIR_HU:
        return [f"{path}: no voxel above {AIR_HU:g} HU (max {high:g}): the {role} is all air, or not CT in "
                "Hounsfield units; the result will not mean much"]
    return []


def label_values(values: np.ndarray) -> np.ndarray | None:
    """The sorted distinct values when `values` holds at most MAX_IMAGE_LABELS distinct whole numbers >= 0
    (a label volume), else None. A strided sample is looked at first, so an image costs little."""
    flat = np.asarray(values).reshape(-1)
    sample = flat[::max(1, flat.size // _SAMPLE)]
    for part in (sample, flat):
        if part.size and (part.min() < 0 or not np.array_equal(part, np.rint(part))):
            return None
        distinct = np.unique(part)
        if distinct.size > MAX_IMAGE_LABELS:
            return None
    return distinct


def hounsfield_problem(array: np.ndarray, path: str | Path, role: str = "image") -> str | None:
    """Why the volume is not CT in Hounsfield units (one clause naming its value range), or None.

    CT in HU always holds air (about -1000 HU, outside the body or in the bowel and lungs): a volume with
    no voxel at or below AIR_HU is not in HU (float CT scaled to [0, 1], uint16 stored without its
    rescale slope/intercept, int8, MR).
    """
    values = np.asarray(array)
    low, high = float(values.min()), float(values.max())
    if low <= AIR_HU:
        return None
    return (f"{path}: the {role} is not CT in Hounsfield units (values {low:g} .. {high:g}, {values.dtype}; "
            f"no voxel at or below {AIR_HU:g} HU, where air is)")


def field_of_view_warning(query_shape, query_spacing, support_shapes, support_spacings,
                          query_name: str = "query") -> str | None:
    """A warning when the query's in-plane field of view is much smaller than a support's (mm, canonical
    X, Y)."""
    query_fov = np.asarray(query_shape[:2], dtype=float) * np.asarray(query_spacing[:2], dtype=float)
    for shape, spacing in zip(support_shapes, support_spacings):
        support_fov = np.asarray(shape[:2], dtype=float) * np.asarray(spacing[:2], dtype=float)
        ratio = query_fov / np.maximum(support_fov, 1e-6)
        if (ratio < FOV_RATIO).any():
            return (f"{query_name}: in-plane field of view {query_fov[0]:.0f} x {query_fov[1]:.0f} mm is "
                    f"much smaller than the support's {support_fov[0]:.0f} x {support_fov[1]:.0f} mm: "
                    "position-based "
                    "chunks assume comparable scans; crop the support alike or check the result")
    return None


def support_size_warning(largest_slice_voxels: int, voxel_area_mm2: float, organ: str | None, mask_name: str,
                         label_text: str) -> str | None:
    """A warning when the support organ's largest slice is far smaller than expected (wrong label?)."""
    minimum = MIN_SLICE_AREA_MM2.get(organ or "", DEFAULT_MIN_SLICE_AREA_MM2)
    area = float(largest_slice_voxels) * float(voxel_area_mm2)
    if area < minimum:
        expected = f"a {organ}" if organ in MIN_SLICE_AREA_MM2 else "an abdominal structure"
        return (f"{mask_name}: {label_text} covers at most {largest_slice_voxels} voxels ({area:.0f} mm^2) "
                f"in any slice, far fewer than expected for {expected} (>= {minimum:.0f} mm^2): check "
                "--support-label / the label map")
    return None
