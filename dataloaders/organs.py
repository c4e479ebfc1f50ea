"""The project's organ vocabulary: the 20 VISCERAL Anatomy3 structures numbered 1-20 as the official code
(docs/method.md, "VISCERAL data, folds and the paper's figures"); every reader maps onto these indices.
"""
from __future__ import annotations

from util.errors import UserError

# index -> (canonical name, RadLex id)
STRUCTURES: dict[int, tuple[str, int]] = {
    1: ("liver", 58),
    2: ("spleen", 86),
    3: ("pancreas", 170),
    4: ("adrenal_right", 30324),
    5: ("adrenal_left", 30325),
    6: ("gallbladder", 187),
    7: ("rectus_abdominis_right", 40357),
    8: ("rectus_abdominis_left", 40358),
    9: ("urinary_bladder", 237),
    10: ("lumbar_vertebra_1", 29193),
    11: ("lung_right", 1302),
    12: ("lung_left", 1326),
    13: ("kidney_right", 29662),
    14: ("kidney_left", 29663),
    15: ("aorta", 480),
    16: ("sternum", 2473),
    17: ("psoas_right", 32248),
    18: ("psoas_left", 32249),
    19: ("thyroid", 7578),
    20: ("trachea", 1247),
}

NAME_TO_INDEX: dict[str, int] = {name: index for index, (name, _) in STRUCTURES.items()}
INDEX_TO_NAME: dict[int, str] = {index: name for index, (name, _) in STRUCTURES.items()}
RADLEX_TO_INDEX: dict[int, int] = {radlex: index for index, (_, radlex) in STRUCTURES.items()}

# The six test organs of the paper, in Table 1 order, and the four folds.
TEST_ORGANS: list[str] = ["liver", "spleen", "kidney_right", "kidney_left", "psoas_right", "psoas_left"]
FOLD_ORGANS: list[list[str]] = [["liver"], ["spleen"], ["kidney_right", "kidney_left"],
                                ["psoas_right", "psoas_left"]]
# Columns of the paper's Table 1: kidney and psoas are the means of left and right.
TABLE_COLUMNS: dict[str, list[str]] = {
    "liver": ["liver"],
    "spleen": ["spleen"],
    "kidney": ["kidney_right", "kidney_left"],
    "psoas": ["psoas_right", "psoas_left"],
}

# Names used by other data sets (TotalSegmentator, BTCV, AMOS, ...) for the same structures.
ALIASES: dict[str, str] = {
    "iliopsoas_right": "psoas_right", "iliopsoas_left": "psoas_left",
    "psoas_major_right": "psoas_right", "psoas_major_left": "psoas_left",
    "right_psoas": "psoas_right", "left_psoas": "psoas_left",
    "right_kidney": "kidney_right", "left_kidney": "kidney_left",
    "adrenal_gland_right": "adrenal_right", "adrenal_gland_left": "adrenal_left",
    "right_adrenal_gland": "adrenal_right", "left_adrenal_gland": "adrenal_left",
    "right_lung": "lung_right", "left_lung": "lung_left",
    "bladder": "urinary_bladder", "urinary_bladder": "urinary_bladder",
    "vertebrae_l1": "lumbar_vertebra_1", "l1": "lumbar_vertebra_1", "gall_bladder": "gallbladder",
}


def canonical_name(name: str) -> str | None:
    """Map a structure name from any supported vocabulary to ours; None when it is not one of the 20."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = ALIASES.get(key, key)
    return key if key in NAME_TO_INDEX else None


def organ_index(name: str) -> int:
    """Label index (1-20) of an organ name; a clear error for an unknown name."""
    canonical = canonical_name(name)
    if canonical is None:
        raise UserError(f"unknown organ '{name}': use one of {', '.join(NAME_TO_INDEX)}")
    return NAME_TO_INDEX[canonical]


CLASS_SETTINGS = ("six_organs", "all_structures")     # config class_setting: the pool of training classes


def training_classes(fold: int, class_setting: str) -> list[int]:
    """Label indices a model of `fold` may train on (other folds' test organs, or all 20 minus the fold's)."""
    pool = [NAME_TO_INDEX[name] for name in TEST_ORGANS] if class_setting == "six_organs" else STRUCTURES
    return [index for index in sorted(pool) if INDEX_TO_NAME[index] not in FOLD_ORGANS[fold]]
