"""Which mask value is which organ (label maps; sources and their order: docs/DESIGN.md "Conventions"), and
is an input what it claims to be (plausibility: UserErrors where a result would be meaningless, warning
strings where doubtful)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataloaders.layouts import strip_nifti_suffix
from dataloaders.organs import INDEX_TO_NAME, RADLEX_TO_INDEX, canonical_name
from util.errors import UserError

BACKGROUND_NAMES = {"background", "bg", "clear label", "clear_label"}


def _as_value(item) -> int | None:
    """An integer label value from an int or a digit string; None otherwise."""
    if isinstance(item, bool):
        return None
    if isinstance(item, (int, np.integer)) or (isinstance(item, float) and item.is_integer()):
        return int(item)
    if isinstance(item, str) and item.strip().lstrip("-").isdigit():
        return int(item.strip())
    if isinstance(item, str) and item.strip().replace(".", "", 1).isdigit() and float(item).is_integer():
        return int(float(item))                                          # '1.0': value 1
    return None


def read_label_map(source, what: str = "--label-map") -> dict[int, str]:
    """Label value -> name from a JSON file path or already parsed content (any accepted form)."""
    content = source
    if not isinstance(source, (dict, list)):
        path = Path(source)
        try:
            content = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{what} {path}: label map not found: check the path") from None
        except IsADirectoryError:
            raise UserError(f"{what} {path}: is a folder: give the JSON label map file") from None
        except ValueError as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:80]
            raise UserError(f"{what} {path}: not valid JSON ({reason}): fix the label map file") from None
        except OSError as error:
            raise UserError(f"{what} {path}: cannot read it ({error.strerror}): "
                            "check the path and permissions") from None
        what = f"{what} {path}"
    example = 'write it as {"liver": 5, "spleen": 1} or {"labels": {"5": "liver"}}'
    if isinstance(content, dict) and isinstance(content.get("labels"), (dict, list)):
        content = content["labels"]
    if isinstance(content, list):
        raise UserError(f"{what}: the label map is a JSON list, not an object: {example}")
    if not isinstance(content, dict) or not content:
        raise UserError(f"{what}: the label map must be a non-empty JSON object: {example}")
    keys_are_values = all(_as_value(key) is not None for key in content)
    values_are_values = all(_as_value(value) is not None for value in content.values())
    if keys_are_values and all(isinstance(name, str) for name in content.values()):
        pairs = [(_as_value(key), name) for key, name in content.items()]
    elif values_are_values and not keys_are_values:
        pairs = [(_as_value(value), str(name)) for name, value in content.items()]
    else:
        raise UserError(f"{what}: the label map mixes names and values (or has non-integer values): "
                        f"{example}")
    result: dict[int, str] = {}
    for value, name in pairs:
        if value == 0 or name.strip().lower() in BACKGROUND_NAMES:
            continue                                             # background: not a structure
        if value < 0:
            raise UserError(f"{what}: label value {value} ({name}) is negative: label values are >= 1")
        if value in result and result[value] != name:
            raise UserError(f"{what}: label value {value} is named twice ({result[value]}, {name}): "
                            "give each value one name")
        result[value] = name
    if not result:
        raise UserError(f"{what}: the label map names only background: {example}")
    return result


def value_of(name: str, label_map: dict[int, str]) -> int | None:
    """The value a map gives to organ `name` (exact, or the same structure under an alias); None if absent."""
    canonical = canonical_name(name)
    exact = [value for value, mapped in label_map.items() if mapped.strip().lower() == name.strip().lower()]
    alias = [value for value, mapped in label_map.items()
             if canonical is not None and canonical_name(mapped) == canonical]
    return (exact + alias + [None])[0]


def sidecar_path(mask_path: str | Path) -> Path:
    """`<mask name without .nii.gz/.nii>.json` in the mask's folder."""
    mask_path = Path(mask_path)
    stem = strip_nifti_suffix(mask_path.name)
    return mask_path.with_name((mask_path.name if stem is None else stem) + ".json")


def visceral_mask_structure(mask_path: str | Path) -> int | None:
    """Project index (1-20) of a VISCERAL mask name `<pid>_1_CTce_ThAb_<RadLex>_<n>.nii.gz`; else None."""
    stem = strip_nifti_suffix(Path(mask_path).name)
    fields = stem.split("_") if stem else []
    if (len(fields) < 6 or fields[2:4] != ["CTce", "ThAb"] or not fields[-2].isdigit()
            or not fields[-1].isdigit()):
        return None
    return RADLEX_TO_INDEX.get(int(fields[-2]))


def mask_label_map(mask_path: str | Path, label_map=None, vocabulary: str | None = None
                   ) -> tuple[dict[int, str] | None, str]:
    """(value -> name map or None, how it is known) for a support mask: --label-map, a sidecar
    `<mask stem>.json`, --vocabulary visceral (the CLI's only choice), in this order."""
    if label_map is not None:
        return read_label_map(label_map), "the --label-map"
    sidecar = sidecar_path(mask_path)
    if sidecar.is_file():
        return read_label_map(sidecar, "label map"), f"the sidecar {sidecar.name}"
    if vocabulary == "visceral":
        return dict(INDEX_TO_NAME), "--vocabulary visceral (indices 1-20 of dataloaders/organs.py)"
    return None, "unknown"


def resolve_support_label(support_label, mask_path: str | Path, present: np.ndarray, label_map=None,
                          vocabulary: str | None = None) -> tuple[int, str]:
    """(mask value of the support organ, a description for the console); `present`: the mask's sorted
    non-zero values; `support_label`: None (binary mask), a label value or an organ name."""
    present = np.asarray(present, dtype=np.int64)
    shown = ", ".join(map(str, present[:12])) + (" ..." if len(present) > 12 else "")
    mapping, how = mask_label_map(mask_path, label_map, vocabulary)
    if support_label is None or str(support_label).strip() == "":
        if len(present) == 1:
            return int(present[0]), f"label {int(present[0])} (the mask's only value)"
        raise UserError(f"{mask_path}: multi-label mask (values {shown}): pass --support-label VALUE, or an "
                        "organ name with --label-map / a sidecar JSON / --vocabulary visceral")
    value = _as_value(support_label)
    if value is not None:
        if value < 1:
            raise UserError(f"--support-label {support_label}: label values start at 1 (0 is background): "
                            f"use one of the mask's values ({shown})")
        name = mapping.get(value) if mapping else None
        return value, f"label {value}" + (f" ({name}, from {how})" if name else "")
    name = str(support_label).strip()
    if mapping is not None:
        found = value_of(name, mapping)
        if found is None:
            names = ", ".join(sorted(mapping.values())[:10])
            raise UserError(f"--support-label '{name}' is not in {how} (it names {names}): use one of those "
                            "names or a label value")
        return found, f"label {found} ({name}, from {how})"
    structure = visceral_mask_structure(mask_path)
    if structure is not None and len(present) == 1:
        organ = INDEX_TO_NAME[structure]
        if canonical_name(name) != organ:
            raise UserError(f"--support-label '{name}': {Path(mask_path).name} is the VISCERAL mask of "
                            f"{organ} (RadLex id in its name): drop --support-label or give the {name} mask")
        return int(present[0]), f"label {int(present[0])} ({organ}, from the VISCERAL file name)"
    raise UserError(f"--support-label '{name}': the labels of {Path(mask_path).name} are unknown (values "
                    f"{shown}), so an organ name cannot be looked up: pass --label-map map.json, put a "
                    f"sidecar {sidecar_path(mask_path).name} next to the mask, use --vocabulary visceral if "
                    "the mask uses the project's indices 1-20, or give the label VALUE")


# ------------------------------------------------------------------------------ plausibility
SOFT_MASK_THRESHOLD = 0.5       # soft masks (values in [0, 1]): foreground = value >= this
MAX_MASK_LABELS = 256           # a mask with more distinct values than this is an image
MANY_LABELS = 8                 # a "mask" with more distinct values than this over most of its voxels:
IMAGE_FOREGROUND_FRACTION = 0.5  # (more than this fraction non-zero) is an image
MAX_IMAGE_LABELS = 64           # an "image" of at most this many distinct whole values >= 0 is a label volume
AIR_HU = -500.0                 # CT: body voxels above this, air below
_SAMPLE = 200_000               # voxels looked at first (a strided sample) before a full count
OUTLIER_SPREAD = 10.0           # value range above this many times the 0.1-99.9 percentile spread: outliers
FOV_RATIO = 0.6                 # query in-plane extent below this fraction of the support's: warning
# Largest support slice below this area (mm^2): warning. About a tenth of the organ's largest cross-section
# on the real CT sample the project was checked on; 50 mm^2 for any other structure.
MIN_SLICE_AREA_MM2 = {"liver": 2800.0, "spleen": 860.0, "kidney_right": 370.0, "kidney_left": 370.0,
                      "psoas_right": 55.0, "psoas_left": 55.0}
DEFAULT_MIN_SLICE_AREA_MM2 = 50.0


def mask_labels(array: np.ndarray, path: str | Path) -> tuple[np.ndarray, str | None]:
    """(integer labels, note or None); a UserError for image-like content; a soft mask: foreground >= 0.5."""
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
        if np.array_equal(np.unique(values), [-1, 1]):
            return (values > 0).astype(np.int64), f"{name}: a -1/1 mask: foreground = the voxels of value 1"
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
    """Warnings about a CT volume (all air); UserError when it cannot be an image (constant, labels)."""
    values = np.asarray(array)
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise UserError(f"{path}: the {role} is constant (every voxel {low:g}): nothing to segment; give "
                        "the CT or MR volume")
    labels = None                 # a label volume: at most MAX_IMAGE_LABELS distinct whole values >= 0
    if low >= 0:
        flat = values.reshape(-1)
        for part in (flat[::max(1, flat.size // _SAMPLE)], flat):     # a strided sample first (cheap)
            labels = np.unique(part) if np.array_equal(part, np.rint(part)) else None
            if labels is None or labels.size > MAX_IMAGE_LABELS:
                labels = None
                break
    if labels is not None:
        shown = ", ".join(f"{v:g}" for v in labels[:8]) + (", ..." if labels.size > 8 else "")
        raise UserError(f"{path}: the {role} holds only {labels.size} distinct whole values ({shown}): "
                        "this looks like a mask (a label volume), not an image: check the order of the image "
                        "and mask arguments")
    if high <= AIR_HU:
        return [f"{path}: no voxel above {AIR_HU:g} HU (max {high:g}): the {role} is all air, or not CT in "
                "Hounsfield units; the result will not mean much"]
    return []


def outlier_warning(array: np.ndarray, path: str | Path, role: str, mode: str,
                    window: str = "--intensity window:LO,HI") -> str | None:
    """A warning when a few extreme voxels stretch the range that `mode` scales by (`window`: the fix)."""
    flat = np.asarray(array).reshape(-1)
    lo, hi = np.percentile(flat[::max(1, flat.size // _SAMPLE)], [0.1, 99.9])
    low, high = float(flat.min()), float(flat.max())
    if high - low <= OUTLIER_SPREAD * max(float(hi - lo), 1e-6):
        return None
    return (f"{path}: extreme intensity outliers in the {role} (values {low:g} .. {high:g}, 99.8% of them in "
            f"{lo:g} .. {hi:g}): {mode} scaling squeezes the anatomy into a few grey levels and the result "
            f"will be poor: clip the outliers, or pass {window} for CT")


def hounsfield_problem(array: np.ndarray, path: str | Path, role: str = "image") -> str | None:
    """Why the volume is not CT in Hounsfield units (no voxel at or below AIR_HU: no air), or None."""
    values = np.asarray(array)
    low, high = float(values.min()), float(values.max())
    return None if low <= AIR_HU else (f"{path}: the {role} is not CT in Hounsfield units (values {low:g} .. "
                                       f"{high:g}, {values.dtype}; no voxel at or below {AIR_HU:g} HU, where "
                                       "air is)")


def field_of_view_warning(query_shape, query_spacing, support_shapes, support_spacings,
                          query_name: str = "query") -> str | None:
    """A warning when the query's in-plane field of view (mm, X and Y) is much smaller than a support's."""
    query_fov = np.asarray(query_shape[:2], dtype=float) * np.asarray(query_spacing[:2], dtype=float)
    for shape, spacing in zip(support_shapes, support_spacings):
        support_fov = np.asarray(shape[:2], dtype=float) * np.asarray(spacing[:2], dtype=float)
        if (query_fov / np.maximum(support_fov, 1e-6) < FOV_RATIO).any():
            return (f"{query_name}: in-plane field of view {query_fov[0]:.0f} x {query_fov[1]:.0f} mm is "
                    f"much smaller than the support's {support_fov[0]:.0f} x {support_fov[1]:.0f} mm: "
                    "position-based chunks assume comparable scans; crop the support alike or check the "
                    "result")
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
