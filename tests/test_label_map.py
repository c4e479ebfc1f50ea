"""dataloaders/label_map.py: one label-map parser, how a mask's labels are known, and plausibility
(swapped image/mask, soft masks, constant or all-air scans, field of view)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dataloaders.label_map import (
    field_of_view_warning,
    image_problems,
    mask_labels,
    read_label_map,
    resolve_support_label,
    sidecar_path,
    support_size_warning,
)
from util.errors import UserError

TOTALSEG = {"description": "values of labels.nii.gz", "labels": {"1": "spleen", "2": "kidney_right",
                                                                 "5": "liver"}}


@pytest.mark.parametrize("content", [
    {"spleen": 1, "kidney_right": 2, "liver": 5},
    {"1": "spleen", "2": "kidney_right", "5": "liver"},
    TOTALSEG,
    {"labels": {"background": 0, "spleen": 1, "kidney_right": 2, "liver": 5}},     # nnU-Net dataset.json
    {"0": "background", "1": "spleen", "2": "kidney_right", "5": "liver"},
])
def test_every_accepted_form_gives_the_same_map(tmp_path, content):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(content))
    expected = {1: "spleen", 2: "kidney_right", 5: "liver"}
    assert read_label_map(path) == expected
    assert read_label_map(content) == expected


@pytest.mark.parametrize("content, words", [
    (["liver", "spleen"], "JSON list"), ({"labels": ["liver"]}, "JSON list"), ({}, "non-empty"),
    ({"liver": 5, "6": "spleen"}, "mixes"), ({"liver": 2.5}, "mixes"), ({"liver": -3}, "negative"),
    ({"background": 0}, "only background"), ("liver", "non-empty JSON object"),
])
def test_malformed_maps_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=words) as error:
        read_label_map(path)
    assert "\n" not in str(error.value) and "map.json" in str(error.value)


def test_unreadable_map_files(tmp_path):
    (tmp_path / "bad.json").write_text("{liver: 5")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        read_label_map(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        read_label_map(tmp_path / "absent.json")
    with pytest.raises(UserError, match="is a folder"):
        read_label_map(tmp_path)


PRESENT = np.array([1, 2, 3, 5, 13, 52])                 # a TotalSegmentator-style mask's values


def test_an_organ_name_without_known_labels_is_an_error_not_the_project_vocabulary(tmp_path):
    mask = tmp_path / "seg.nii.gz"                      # no sidecar, no map: labels unknown
    with pytest.raises(UserError, match="labels of seg.nii.gz are unknown.*--label-map.*sidecar seg.json"):
        resolve_support_label("liver", mask, PRESENT)
    assert resolve_support_label("5", mask, PRESENT)[0] == 5           # a VALUE needs no map
    assert resolve_support_label(None, mask, np.array([7]))[0] == 7     # a binary mask needs no label


def test_names_resolve_through_map_sidecar_or_explicit_vocabulary(tmp_path):
    mask = tmp_path / "labels.nii.gz"
    assert resolve_support_label("liver", mask, PRESENT, label_map=TOTALSEG)[0] == 5
    # alias
    assert resolve_support_label("right_kidney", mask, PRESENT, label_map={"kidney_right": 2})[0] == 2
    with pytest.raises(UserError, match="'psoas_left' is not in the --label-map"):
        resolve_support_label("psoas_left", mask, PRESENT, label_map=TOTALSEG)
    sidecar_path(mask).write_text(json.dumps(TOTALSEG))                  # labels.json next to labels.nii.gz
    assert sidecar_path(mask).name == "labels.json"
    value, how = resolve_support_label("kidney_right", mask, PRESENT)
    assert value == 2 and "sidecar labels.json" in how
    other = tmp_path / "prepared_label.nii.gz"
    assert resolve_support_label("kidney_right", other, PRESENT, vocabulary="visceral")[0] == 13


def test_visceral_binary_mask_names_its_organ_and_a_wrong_name_is_refused(tmp_path):
    spleen = tmp_path / "10000132_1_CTce_ThAb_86_1.nii.gz"              # RadLex 86 = spleen
    assert resolve_support_label("spleen", spleen, np.array([1]))[0] == 1
    with pytest.raises(UserError, match="VISCERAL mask of spleen"):
        resolve_support_label("liver", spleen, np.array([1]))


def test_soft_and_swapped_masks():
    soft = np.zeros((4, 4, 3), np.float32)
    soft[1:3, 1:3, 1] = 0.5
    labels, note = mask_labels(soft, "soft.nii.gz")
    assert labels.sum() == 4 and "values >= 0.5" in note                # not "empty (no non-zero voxel)"
    # 0.45 < 0.5: empty, and the note says so
    assert mask_labels(soft * 0.9, "low.nii.gz")[0].sum() == 0
    assert "foreground = values >= 0.5 (0 voxels)" in mask_labels(soft * 0.9, "low.nii.gz")[1]
    assert mask_labels(soft * 510, "x")[0].max() == 255                  # integer-valued float: plain labels
    ct = np.random.default_rng(0).integers(-1000, 1500, size=(20, 20, 10)).astype(np.int16)
    with pytest.raises(UserError, match="looks like an image"):
        mask_labels(ct, "ct_as_mask.nii.gz")
    with pytest.raises(UserError, match="looks like an image"):
        mask_labels(np.abs(ct), "ct_as_mask.nii.gz")                      # no negatives, thousands of values
    with pytest.raises(UserError, match="outside \\[0, 1\\]"):
        mask_labels(soft * 3, "x")


def test_all_air_images():
    """Swapped and constant images are rows of test_errors."""
    air = np.full((8, 8, 4), -1000, np.int16)
    air[0, 0, 0] = -900
    assert "all air" in image_problems(air, "air.nii.gz", "query")[0]
    body = air.copy()
    body[2:6, 2:6] = 40
    assert image_problems(body, "ct.nii.gz") == []


def test_field_of_view_and_support_size_warnings():
    assert field_of_view_warning((256, 256, 60), (1.5, 1.5, 3), [(256, 256, 70)], [(1.6, 1.6, 3)]) is None
    warning = field_of_view_warning((128, 256, 60), (1.0, 1.5, 3), [(256, 256, 70)], [(1.6, 1.6, 3)])
    assert "128 x 384 mm is much smaller than the support's 410 x 410 mm" in warning
    assert support_size_warning(5000, 0.6, "liver", "m.nii.gz", "label 1") is None
    assert "far fewer than expected for a liver" in support_size_warning(300, 0.6, "liver", "m.nii.gz",
                                                                         "label 1")
    assert "abdominal structure" in support_size_warning(10, 1.0, None, "m.nii.gz", "label 13")
