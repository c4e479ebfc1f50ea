"""The prepared-data checker: passes a good folder, and names the file and the fix for each defect."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import load_script

from dataloaders.prepared import check_folder as check_prepared
from util.errors import UserError


@pytest.fixture
def prep(tiny_prepared, tmp_path):
    """A private copy of the tiny prepared folder that a test may damage."""
    return shutil.copytree(tiny_prepared, tmp_path / "prep")


def run_checker(path, capsys):
    """Run scripts/check_dataset.py through run_cli; returns (exit code, stdout, stderr)."""
    from util.cli import run_cli
    script = load_script("check_dataset")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, [str(path)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_good_folder_passes_with_a_per_class_table(tiny_prepared, capsys):
    code, out, err = run_checker(tiny_prepared, capsys)
    assert code == 0 and err == ""
    assert "liver" in out and "kidney_left" in out and "OK" in out
    report = check_prepared(tiny_prepared)
    index = json.loads((tiny_prepared / "index.json").read_text())["slices"]
    rows = {row["index"]: row for row in report["rows"]}
    assert rows[1]["slices"] == len(index["1"])
    assert rows[1]["volumes"] == len({entry[0] for entry in index["1"]})
    assert "gold vol" in load_script("check_dataset").format_table(report)


def damage_meta(prep):
    meta = json.loads((prep / "meta.json").read_text())
    meta["splits"]["val"].append(meta["splits"]["train"][0])
    (prep / "meta.json").write_text(json.dumps(meta))


def damage_index(prep):
    index = json.loads((prep / "index.json").read_text())
    index["slices"]["1"][0][1] = 999
    (prep / "index.json").write_text(json.dumps(index))


def damage_index_class(prep):
    index = json.loads((prep / "index.json").read_text())
    pid, row, z = index["slices"]["1"][0]
    label = np.load(prep / "train" / f"{pid}_label.npy")
    index["slices"]["1"][0][1] = int(next(r for r in range(label.shape[0]) if not (label[r] == 1).any()))
    (prep / "index.json").write_text(json.dumps(index))


def damage_label_values(prep):
    path = next((prep / "train").glob("*_label.npy"))
    label = np.load(path)
    label[0, 0, 0] = 42
    np.save(path, label)


def damage_image_shape(prep):
    path = next((prep / "train").glob("*_image.npy"))
    np.save(path, np.load(path)[:, :10])


def damage_gold_keys(prep):
    path = next((prep / "volumes" / "gold").glob("*.npz"))
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files if key != "original_affine"}
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "meta.json").unlink(), "meta.json: missing"),
    (damage_meta, "is in both train and val"),
    (lambda p: (p / "index.json").write_text("{"), "index.json: not valid JSON"),
    (damage_index, "row out of range"),
    (damage_index_class, "has no voxel of class 1"),
    (damage_label_values, "label value 42 > 20"),
    (damage_image_shape, "_image.npy: float32"),
    (lambda p: next((p / "train").glob("*_label.npy")).unlink(), "_label.npy: missing training file"),
    (lambda p: next((p / "volumes" / "gold").glob("*.npz")).unlink(), ".npz: missing evaluation volume"),
    (damage_gold_keys, "keys original_affine missing"),
    (lambda p: shutil.copy(next((p / "train").glob("*_image.npy")), p / "train" / "99999999_image.npy"),
     "99999999 which is not in splits.train"),
])
def test_each_defect_is_one_actionable_line(prep, capsys, damage, message):
    damage(prep)
    code, out, err = run_checker(prep, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err and ("re-run" in err or "prepare" in err)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="folder not found: run scripts/prepare_visceral.py"):
        check_prepared(tmp_path / "nothing")
