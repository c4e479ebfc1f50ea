"""Label maps: which mask value is which organ. One parser for every entry point.

Accepted JSON forms (a file, or the same content as a dict):
    {"liver": 5, "spleen": 1}                      name -> value
    {"5": "liver", "1": "spleen"}                  value -> name
    {"labels": {...either form...}, ...}          TotalSegmentator / nnU-Net dataset.json style
Value 0 is background: an entry 0 (or named 'background') is dropped; negative values, non-integer
values, an empty map, a JSON list and a map that mixes both directions are one-line UserErrors.

How the labels of a support mask are known (`mask_label_map`), in this order:
    1. `--label-map FILE` given by the user;
    2. a sidecar JSON next to the mask: `<mask name without .nii/.nii.gz>.json`
       (e.g. labels.nii.gz + labels.json, as TotalSegmentator exports);
    3. `--vocabulary visceral`: the mask uses the project's indices 1-20 (dataloaders/organs.py),
       as prepared label volumes do;
    4. a VISCERAL mask file name `<pid>_1_CTce_ThAb_<RadLexID>_<n>.nii.gz`: a binary mask of the
       structure with that RadLex id.
Otherwise the labels are unknown, and an organ NAME as `--support-label` is an error (a label
VALUE, or no label for a binary mask, still works): guessing would silently segment another organ.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataloaders.organs import INDEX_TO_NAME, RADLEX_TO_INDEX, canonical_name
from util.errors import UserError

VOCABULARIES = ("visceral",)
BACKGROUND_NAMES = {"background", "bg", "clear label", "clear_label"}


def _as_value(item) -> int | None:
    """An integer label value from an int or a digit string; None otherwise."""
    if isinstance(item, bool):
        return None
    if isinstance(item, (int, np.integer)):
        return int(item)
    if isinstance(item, float) and item.is_integer():
        return int(item)
    if isinstance(item, str) and item.strip().lstrip("-").isdigit():
        return int(item.strip())
    return None


def parse_label_map(content, source: str = "--label-map") -> dict[int, str]:
    """Label value -> name from parsed JSON content (any accepted form); UserError naming `source`."""
    example = 'write it as {"liver": 5, "spleen": 1} or {"labels": {"5": "liver"}}'
    if isinstance(content, dict) and isinstance(content.get("labels"), (dict, list)):
        content = content["labels"]
    if isinstance(content, list):
        raise UserError(f"{source}: the label map is a JSON list, not an object: {example}")
    if not isinstance(content, dict) or not content:
        raise UserError(f"{source}: the label map must be a non-empty JSON object: {example}")
    keys_are_values = all(_as_value(key) is not None for key in content)
    values_are_values = all(_as_value(value) is not None for value in content.values())
    if keys_are_values and all(isinstance(name, str) for name in content.values()):
        pairs = [(_as_value(key), name) for key, name in content.items()]
    elif values_are_values and not keys_are_values:
        pairs = [(_as_value(value), str(name)) for name, value in content.items()]
    else:
        raise UserError(f"{source}: the label map mixes names and values (or has non-integer values): "
                        f"{example}")
    result: dict[int, str] = {}
    for value, name in pairs:
        if value == 0 or name.strip().lower() in BACKGROUND_NAMES:
            continue                                             # background: not a structure
        if value < 0:
            raise UserError(f"{source}: label value {value} ({name}) is negative: label values are >= 1")
        if value in result and result[value] != name:
            raise UserError(f"{source}: label value {value} is named twice ({result[value]}, {name}): "
                            "give each value one name")
        result[value] = name
    if not result:
        raise UserError(f"{source}: the label map names only background: {example}")
    return result


def read_label_map(source, what: str = "--label-map") -> dict[int, str]:
    """Label value -> name from a JSON file path or an already parsed dict/list."""
    if isinstance(source, (dict, list)):
        return parse_label_map(source, what)
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
    return parse_label_map(content, f"{what} {path}")


def value_of(name: str, label_map: dict[int, str]) -> int | None:
    """The value a map gives to organ `name` (exact, or the same structure under an alias); None if absent."""
    wanted = name.strip().lower()
    canonical = canonical_name(name)
    for value, mapped in label_map.items():
        if mapped.strip().lower() == wanted:
            return value
    for value, mapped in label_map.items():
        if canonical is not None and canonical_name(mapped) == canonical:
            return value
    return None


def sidecar_path(mask_path: str | Path) -> Path:
    """`<mask name without .nii.gz/.nii>.json` in the mask's folder."""
    mask_path = Path(mask_path)
    name = mask_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return mask_path.with_name(name + ".json")


def visceral_mask_structure(mask_path: str | Path) -> int | None:
    """Project index (1-20) of a VISCERAL mask file name `<pid>_1_CTce_ThAb_<RadLex>_<n>.nii.gz`;
    else None."""
    name = Path(mask_path).name
    stem = (name[: -len(".nii.gz")] if name.endswith(".nii.gz")
            else name[: -len(".nii")] if name.endswith(".nii") else None)
    fields = stem.split("_") if stem else []
    if (len(fields) < 6 or fields[2:4] != ["CTce", "ThAb"] or not fields[-2].isdigit()
            or not fields[-1].isdigit()):
        return None
    return RADLEX_TO_INDEX.get(int(fields[-2]))


def mask_label_map(mask_path: str | Path, label_map=None, vocabulary: str | None = None
                   ) -> tuple[dict[int, str] | None, str]:
    """(value -> name map or None, how it is known) for a support mask; see the module docstring.

    For a VISCERAL mask file the map is {None: organ}: the organ of its (binary) non-zero value.
    """
    if vocabulary is not None and vocabulary not in VOCABULARIES:
        raise UserError(f"--vocabulary {vocabulary}: unknown: use {' or '.join(VOCABULARIES)} "
                        "(or give --label-map)")
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
    """(mask value of the support organ, a description for the console) or a one-line UserError.

    present: the non-zero values found in the mask (sorted). support_label: None (binary mask), a
    label value (int or digit string) or an organ name, which needs known labels (module docstring).
    """
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
