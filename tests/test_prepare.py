"""Preparation: slice selection, intensity scaling, the PREP layout, splits, layouts and atomic output."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_PHANTOM, TINY_PREP, load_script

from dataloaders.layouts import find_cases, load_case
from dataloaders.nifti import load_nifti, to_original
from dataloaders.prepare import Selection, prepare_dataset, select_slices
from dataloaders.transforms import scale_intensity
from util.errors import UserError


# ---------------------------------------------------------------- selection and scaling
@pytest.mark.parametrize("n_qualifying", [0, 3, 20, 21, 40])
def test_official_selection_rule(n_qualifying):
    label = np.zeros((20, 20, 50), np.uint8)
    z_qualifying = np.arange(n_qualifying) + 5
    label[:, :8, z_qualifying] = 1                                 # 160 voxels > 150
    label[:, :7, 2] = 1                                            # 140 voxels: not enough
    rule = Selection()
    chosen = select_slices(label, 1, np.random.default_rng(0), rule)
    if n_qualifying <= 20:
        assert chosen.tolist() == z_qualifying.tolist()
    else:
        assert len(chosen) == 5 and len(set(chosen)) == 5 and set(chosen) <= set(z_qualifying)
        assert chosen.tolist() == select_slices(label, 1, np.random.default_rng(0), rule).tolist()
    assert select_slices(label, 1, np.random.default_rng(0), Selection(keep_all=True)).tolist() == \
        z_qualifying.tolist()


def test_window_scaling_matches_a_reference():
    """Min-max scaling is held against a slow reference in test_errors (prepared images stored exactly)."""
    stack = np.random.default_rng(0).normal(0, 300, (3, 5, 6)).astype(np.float32)
    stack[2] = 7.0                                                 # a constant slice
    scaled = scale_intensity(stack, {"mode": "minmax"})
    assert (scaled[2] == 0).all() and scaled.dtype == np.float32
    window = scale_intensity(stack, {"mode": "window", "window": [-125, 275]})
    assert np.allclose(window, (np.clip(stack, -125, 275) + 125) / 400, atol=1e-6)
    for bad in ({"mode": "window", "window": [5, 5]}, {"mode": "gamma"}, {"mode": "window"}):
        with pytest.raises(UserError):
            scale_intensity(stack, bad)


# ---------------------------------------------------------------- the prepared folder
def test_prepared_layout_and_splits(tiny_prepared):
    meta = json.loads((tiny_prepared / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["prep_size"] == TINY_PREP["size"]
    assert meta["intensity"] == {"mode": "minmax"} and meta["source"]["layout"] == "visceral"
    splits = meta["splits"]
    assert len(splits["val"]) == TINY_PREP["n_val"]
    assert len(splits["train"]) + len(splits["val"]) == TINY_PHANTOM["n_silver"]
    assert len(splits["gold"]) == TINY_PHANTOM["n_gold"] and not set(splits["gold"]) & set(splits["train"])
    for pid in splits["train"]:
        image = np.load(tiny_prepared / "train" / f"{pid}_image.npy")
        label = np.load(tiny_prepared / "train" / f"{pid}_label.npy")
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert image.shape[1:] == (64, 64) and 0 <= image.min() and image.max() <= 1
    for split in ("val", "gold"):
        assert sorted(p.stem for p in (tiny_prepared / "volumes" / split).iterdir()) == sorted(splits[split])
    index = json.loads((tiny_prepared / "index.json").read_text())["slices"]
    assert {"1", "2", "13", "14", "17", "18"} <= set(index)


def test_training_rows_equal_scaled_source_slices(tiny_phantom, tiny_prepared):
    index = json.loads((tiny_prepared / "index.json").read_text())["slices"]
    cases = {case.pid: case for case in find_cases(tiny_phantom / "SilverCorpus")}
    for klass in ("13", "18"):
        pid, row, z = index[klass][0]
        source = load_case(cases[pid])
        image = np.load(tiny_prepared / "train" / f"{pid}_image.npy")[row]
        label = np.load(tiny_prepared / "train" / f"{pid}_label.npy")[row]
        expected = scale_intensity(source.image.array[:, :, z], {"mode": "minmax"})   # 64 -> 64: no resize
        assert np.allclose(image, expected, atol=1e-6)
        assert (np.array_equal(label, source.label[:, :, z])
                and (label == int(klass)).sum() > TINY_PREP["min_voxels"])


def test_gold_volumes_keep_the_original_geometry(tiny_phantom, tiny_prepared):
    for case in find_cases(tiny_phantom / "GoldCorpus"):
        with np.load(tiny_prepared / "volumes" / "gold" / f"{case.pid}.npz") as data:
            stored = load_nifti(case.volume_path)
            source = load_case(case)
            assert np.array_equal(data["image"], stored.array) and data["image"].dtype == np.int16
            assert np.array_equal(data["label"], source.label)
            assert np.allclose(data["original_affine"], nib.load(str(case.volume_path)).affine)
            original = to_original(data["label"], str(data["original_axcodes"]))
            assert original.shape == tuple(data["original_shape"])
            liver_file = case.mask_paths[1]
            assert np.array_equal(original == 1, np.asarray(nib.load(str(liver_file)).dataobj) > 0)


def test_multilabel_layout_gives_the_same_labels(tiny_phantom, tmp_path):
    root = tmp_path / "multi"
    values = {1: 11, 2: 12, 13: 21, 14: 22, 17: 31, 18: 32}
    names = {"liver": 11, "spleen": 12, "right_kidney": 21, "kidney_left": 22, "iliopsoas_right": 31,
             "iliopsoas_left": 32}
    for corpus, split in (("SilverCorpus", "train"), ("GoldCorpus", "test")):
        for case in find_cases(tiny_phantom / corpus):
            source = load_case(case)
            stored = nib.load(str(case.volume_path))
            label = np.zeros(source.label.shape, np.uint8)
            for index, value in values.items():
                label[source.label == index] = value
            folder = root / split / case.pid
            folder.mkdir(parents=True)
            shutil.copy(case.volume_path, folder / "ct.nii.gz")
            nib.save(nib.Nifti1Image(to_original(label, source.image.original_axcodes), stored.affine),
                     str(folder / "labels.nii.gz"))
    (tmp_path / "map.json").write_text(json.dumps(names))
    meta = prepare_dataset(root, tmp_path / "p", layout="multilabel", label_map=tmp_path / "map.json",
                           size=64,
                           n_val=1, rule=Selection(min_voxels=5), workers=1)
    assert meta["source"]["layout"] == "multilabel"
    case = find_cases(tiny_phantom / "GoldCorpus")[0]
    with np.load(tmp_path / "p" / "volumes" / "gold" / f"{case.pid}.npz") as data:
        reference = load_case(case).label
        expected = np.where(np.isin(reference, list(values)), reference, 0)
        assert np.array_equal(data["label"], expected)


def test_script_options_window_keep_all_and_resize(tiny_phantom, tmp_path, capsys):
    script = load_script("prepare_visceral")
    out = tmp_path / "p"
    args = ["--visceral-dir", str(tiny_phantom), "--out", str(out), "--size", "32", "--min-voxels", "5",
            "--workers", "1", "--window", "-125", "275", "--keep-all-slices", "--n-val", "2"]
    assert script.main(args) == 0
    assert "train 4, val 2, gold 3" in capsys.readouterr().out
    assert script.main(args + ["--skip-existing"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["selection"]["keep_all"] and meta["intensity"]["window"] == [-125.0, 275.0]
    image = np.load(out / "train" / f"{meta['splits']['train'][0]}_image.npy")
    assert image.shape[1:] == (32, 32) and 0 <= image.min() and image.max() <= 1
