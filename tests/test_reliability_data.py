"""Reliability of data preparation, checking, superpixels and figures: each class of failure fixed at one
root check and tested for several inputs of that class (same contract as tests/test_bad_inputs.py: one
`error:` line, exit code 2, no traceback, nothing written or changed).

| class (root check)                                 | cases                                          |
|----------------------------------------------------|------------------------------------------------|
| A stored image != file (dataloaders.prepare        | float [0, 1] CT (visceral, multilabel, images- |
|   .exact_image, .check_window_fits)                | only), non-integer HU, float holding integers, |
|                                                    | uint16 above 32767, int16 with scl_slope 0.5;  |
|                                                    | HU window on a [0, 1] image / on a mask image  |
| B --out inside the input tree, --overwrite of a    | out in ROOT, in ROOT/SilverCorpus/Volumes,     |
|   foreign folder (prepare.check_out_location)      | through a symlink, images-only, make_super-    |
|                                                    | pixels --out in --images; --overwrite a folder |
|                                                    | that is not a prepared one                     |
| C figures replaced before failing (evaluation      | 2nd run corrupt, presets differ, malformed     |
|   .figures.render_figures, make_figures.py)        | results.json, --table = a figure, a run twice  |
| D make_superpixels checks after preparing          | bad parameter, --figure a folder / not .png /  |
|   (make_superpixels.check_options)                 | in a missing folder, --figure-slices 0; ok:    |
|                                                    | --figure inside the new --out (README example) |
| E writer and checker disagree on case ids          | ids image_1 (multilabel, images-only), 'case 1'|
|   (prepare.case_id / train_file_case)              | sanitised; same id in both splits; two names   |
|                                                    | one id; stray train file; unusable id in meta; |
|                                                    | ok: hidden ._x.nii.gz skipped; z-scored slices |
|                                                    | (SSL-ALPNet writer) ok, refused under minmax   |
| F mask-copy mean over 6 sides, not 4 organs        | the printed mean = 4-organ reference; a side   |
|   (dataset_check.format_mask_copy)                 | missing                                        |

Counted: 37 cases (one parametrized id each, each with its own assertions): 35 unusual inputs over 4
entry points (prepare_visceral, check_dataset, make_superpixels, make_figures), 23 of them refused with
one line and 12 accepted with the right answer (classes A, E and the README's make_superpixels
example), plus 2 checks of the mask-copy mean (class F). The create-dataset notebook's output
location: tests/test_notebook_create_dataset.py (4 cases, 2 refused).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_PHANTOM
from test_bad_inputs import assert_one_line_error, mini_source, run_script, tree

from dataloaders.layouts import find_cases, load_case
from dataloaders.nifti import load_nifti, to_original
from evaluation.dataset_check import format_mask_copy, mask_copy_dice

PREP_ARGS = ["--size", str(TINY_PHANTOM["size"]), "--n-val", "0", "--min-voxels", "5", "--workers", "1"]


def rewrite_volumes(root: Path, change) -> list[Path]:
    """Replace every CT volume under root/*Corpus/Volumes by change(int16 array) (a new NIfTI image)."""
    paths = sorted(root.glob("*Corpus/Volumes/*.nii.gz"))
    for path in paths:
        source = nib.load(str(path))
        image = change(np.asarray(source.dataobj), source.affine)
        path.unlink()
        nib.save(image, str(path))
    return paths


def reference_minmax(slice_xy: np.ndarray) -> np.ndarray:
    """Slow, obviously correct per-slice min-max scaling of one slice (constant slice -> zeros)."""
    values = slice_xy.astype(np.float64)
    out = np.zeros(values.shape)
    low, high = values.min(), values.max()
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[i, j] = (values[i, j] - low) / (high - low) if high > low else 0.0
    return out


def to_unit(array, affine):
    """A float32 CT in [0, 1] (the phantom's -1024..3071 HU rescaled): int16 rounding would make it 0/1."""
    return nib.Nifti1Image(((array.astype(np.float32) + 1024) / 4095).astype(np.float32), affine)


def fractional_hu(array, affine):
    noise = np.random.default_rng(0).uniform(-0.45, 0.45, array.shape)
    return nib.Nifti1Image(array.astype(np.float64) + noise, affine)


def integral_float(array, affine):
    return nib.Nifti1Image(array.astype(np.float64), affine)


def large_uint16(array, affine):
    shifted = array.astype(np.int32) - int(array.min()) + 32000                  # 32000 .. above 32767
    assert shifted.max() <= np.iinfo(np.uint16).max
    return nib.Nifti1Image(shifted.astype(np.uint16), affine)


def int16_half_slope(array, affine):
    image = nib.Nifti1Image(array.astype(np.int16), affine)
    image.header.set_slope_inter(0.5, 0.0)                                   # voxels = stored / 2
    return image


STORED = {  # name: (change, expected stored dtype)
    "float32 CT in [0, 1]": (to_unit, np.float32),
    "float64 non-integer HU": (fractional_hu, np.float32),
    "float64 holding integers": (integral_float, np.int16),
    "uint16 above 32767": (large_uint16, np.float32),
    "int16 with scl_slope 0.5": (int16_half_slope, np.float32),
}


# ------------------------------------------------------------------ A. the stored image equals the file
@pytest.mark.parametrize("case", sorted(STORED))
def test_prepare_stores_every_image_exactly(tiny_phantom, tmp_path, capsys, case):
    change, dtype = STORED[case]
    source = mini_source(tiny_phantom, tmp_path / "src")
    paths = rewrite_volumes(source, change)
    out = tmp_path / "prep"
    code, err = run_script("prepare_visceral", ["--visceral-dir", source, "--out", out, *PREP_ARGS], capsys)
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    index = json.loads((out / "index.json").read_text())["slices"]
    for path in paths:
        pid = path.name.split("_")[0]
        expected = load_nifti(path).array                       # canonical voxels as the file holds them
        assert meta["volumes"][pid]["image_dtype"] == np.dtype(dtype).name
        if pid in meta["splits"]["gold"]:
            with np.load(out / "volumes" / "gold" / f"{pid}.npz") as data:
                assert data["image"].dtype == dtype
                assert np.array_equal(data["image"], expected.astype(dtype))
                assert np.allclose(data["image"], expected, rtol=1e-6, atol=0)
        else:
            images = np.load(out / "train" / f"{pid}_image.npy")
            rows = sorted({(row, z) for entries in index.values() for p, row, z in entries if p == pid})
            assert rows
            for row, z in rows[:4]:                              # prep size = source size: no resize
                assert np.allclose(images[row], reference_minmax(expected[:, :, z]), atol=1e-6)
            assert len(np.unique(images[rows[0][0]])) > 20       # grey levels, not the 0/1 of a truncation
    assert run_script("check_dataset", [out], capsys)[0] == 0   # the checker accepts what prepare wrote


@pytest.mark.parametrize("layout", ["multilabel", "images-only"])
def test_a_unit_float_ct_is_kept_exact_in_the_other_layouts(tiny_phantom, tmp_path, capsys, layout):
    cases = {"silver": find_cases(tiny_phantom / "SilverCorpus")[:2],
             "gold": find_cases(tiny_phantom / "GoldCorpus")[:2]}
    root = tmp_path / "src"
    sources = {}
    for split, folder in (("silver", "train"), ("gold", "test")):
        for case in cases[split]:
            stored = nib.load(str(case.volume_path))
            image = to_unit(np.asarray(stored.dataobj), stored.affine)
            if layout == "images-only":
                if split == "gold":
                    continue
                root.mkdir(exist_ok=True)
                path = root / f"image_{case.pid}.nii.gz"
            else:
                (root / folder / case.pid).mkdir(parents=True)
                path = root / folder / case.pid / "ct.nii.gz"
                label = load_case(case).label
                nib.save(nib.Nifti1Image(to_original(label, load_nifti(case.volume_path).original_axcodes),
                                         stored.affine), str(path.with_name("labels.nii.gz")))
            nib.save(image, str(path))
            sources[path.name.split(".")[0] if layout == "images-only" else case.pid] = path
    (tmp_path / "map.json").write_text(json.dumps({"liver": 1, "spleen": 2}))
    extra = ["--label-map", tmp_path / "map.json"] if layout == "multilabel" else []
    out = tmp_path / "prep"
    args = ["--visceral-dir", root, "--out", out, "--layout", layout, *extra, *PREP_ARGS]
    code, err = run_script("prepare_visceral", args, capsys)
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    for pid, path in sources.items():
        expected = load_nifti(path).array
        if pid in meta["splits"]["gold"]:
            with np.load(out / "volumes" / "gold" / f"{pid}.npz") as data:
                assert data["image"].dtype == np.float32 and np.array_equal(data["image"], expected)
        elif layout == "images-only":                            # every axial slice, row = z
            images = np.load(out / "train" / f"{pid}_image.npy")
            for z in (0, images.shape[0] // 2, images.shape[0] - 1):
                assert np.allclose(images[z], reference_minmax(expected[:, :, z]), atol=1e-6)
    code, err = run_script("check_dataset", [out], capsys)
    assert code == 0, err


@pytest.mark.parametrize("change, words", [
    (to_unit, ["not Hounsfield units", "leave --window out"]),            # the line's end (paths are long)
    (lambda a, f: nib.Nifti1Image((a > 0).astype(np.uint8), f),         # a 0/1 mask given as the image
     ["not Hounsfield units", "convert the volume"]),
])
def test_an_hu_window_on_an_image_not_in_hu_is_one_line(tiny_phantom, tmp_path, capsys, change, words):
    source = mini_source(tiny_phantom, tmp_path / "src")
    rewrite_volumes(source, change)
    before = tree(tmp_path)
    code, err = run_script("prepare_visceral", ["--visceral-dir", source, "--out", tmp_path / "prep",
                                                *PREP_ARGS, "--window", "-125", "275"], capsys)
    assert_one_line_error(code, err, *words)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ B. --out never inside the input tree
@pytest.mark.parametrize("where", ["root", "SilverCorpus/Volumes", "symlink", "images-only"])
def test_prepare_refuses_an_out_inside_its_input(tiny_phantom, tmp_path, capsys, where):
    source = mini_source(tiny_phantom, tmp_path / "src")
    layout = []
    if where == "images-only":
        layout = ["--layout", "images-only"]
        source = source / "SilverCorpus" / "Volumes"
        out = source / "prep"
    elif where == "symlink":
        (tmp_path / "link").symlink_to(source / "GoldCorpus")
        out = tmp_path / "link" / "prep"
    else:
        out = source / where / "prep" if where != "root" else source / "prep"
    before = tree(tmp_path)
    code, err = run_script("prepare_visceral", ["--visceral-dir", source, "--out", out, *layout, *PREP_ARGS],
                           capsys)
    assert_one_line_error(code, err, "lies inside the input folder", "give an --out outside")
    assert tree(tmp_path) == before


def test_make_superpixels_refuses_an_out_inside_its_images(tiny_phantom, tmp_path, capsys):
    images = mini_source(tiny_phantom, tmp_path / "src") / "SilverCorpus" / "Volumes"
    before = tree(tmp_path)
    code, err = run_script("make_superpixels", ["--images", images, "--out", images / "prep", "--size", "32",
                                                "--workers", "1"], capsys)
    assert_one_line_error(code, err, "lies inside the input folder")
    assert tree(tmp_path) == before


def test_overwrite_replaces_only_a_prepared_folder(tiny_phantom, tmp_path, capsys):
    source = mini_source(tiny_phantom, tmp_path / "src")
    mine = tmp_path / "my_documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    code, err = run_script("prepare_visceral", ["--visceral-dir", source, "--out", mine, "--overwrite",
                                                *PREP_ARGS], capsys)
    assert_one_line_error(code, err, "--overwrite replaces only a prepared folder")
    assert tree(mine) == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "keep me"


# ------------------------------------------------------------------ C. make_figures: check all, then write
@pytest.fixture(scope="module")
def evaluated_runs(tmp_path_factory):
    """Two evaluation run folders (liver fold 0, spleen fold 1) written by evaluation.evaluate."""
    from test_figures import _evaluated
    root = tmp_path_factory.mktemp("figure_runs")
    return _evaluated(root, ["liver"], 0, "a"), _evaluated(root, ["spleen"], 1, "b")


def _corrupt_figure_data(run: Path) -> None:
    data = (run / "figure_data.npz").read_bytes()
    (run / "figure_data.npz").write_bytes(data[: len(data) // 3])


def _other_preset(run: Path) -> None:
    results = json.loads((run / "results.json").read_text())
    results["preset"]["n_chunks"] = 3 if results["preset"]["n_chunks"] != 3 else 5
    (run / "results.json").write_text(json.dumps(results))


def _malformed_results(run: Path) -> None:
    results = json.loads((run / "results.json").read_text())
    for organs in results["results"].values():
        for entry in organs.values():
            entry.pop("per_volume", None)
            entry.pop("range", None)
    (run / "results.json").write_text(json.dumps(results))


FIGURE_CASES = {
    "second run: truncated figure_data.npz": (_corrupt_figure_data, [],
                                              ["figure_data.npz", "corrupt or truncated"]),
    "runs of two presets": (_other_preset, ["--table", "TABLE"], ["different protocol presets"]),
    "malformed results.json": (_malformed_results, [], ["unexpected form", "run test.py again"]),
    "--table is a figure of a run": (None, ["--table", "A/results.png"], ["is the figure", "results.png"]),
    "the same run twice": (None, ["A", "--table", "TABLE"], ["appears in two runs"]),
}


@pytest.mark.parametrize("case", sorted(FIGURE_CASES))
def test_make_figures_writes_nothing_when_any_input_is_bad(evaluated_runs, tmp_path, capsys, case):
    damage, extra, words = FIGURE_CASES[case]
    a, b = (shutil.copytree(run, tmp_path / name) for run, name in zip(evaluated_runs, "ab"))
    for run in (a, b):
        for name in ("results.png", "misalignment.png"):
            (run / name).write_bytes(b"the figure of an earlier run")
    if damage is not None:
        damage(b)
    table = tmp_path / "table.md"
    argv = [a, b] + [{"TABLE": table, "A": a, "A/results.png": a / "results.png"}.get(x, x) for x in extra]
    code, err = run_script("make_figures", argv, capsys)
    assert_one_line_error(code, err, *words)
    for run in (a, b):
        for name in ("results.png", "misalignment.png"):
            assert (run / name).read_bytes() == b"the figure of an earlier run", (run, name)
    assert not table.exists()


# ------------------------------------------------------------------ D. make_superpixels: check first
def _images_dir(tiny_phantom: Path, root: Path) -> Path:
    root.mkdir()
    volume = sorted((tiny_phantom / "SilverCorpus" / "Volumes").iterdir())[0]
    (root / "image_1.nii.gz").symlink_to(volume)
    return root


@pytest.mark.parametrize("extra, words", [
    (["--scale", "-1"], ["superpixel parameters", "scale > 0"]),
    (["--figure", "FOLDER"], ["--figure", "is a folder", ".png"]),
    (["--figure", "overlay.txt"], ["--figure", "ending in .png"]),
    (["--figure", "missing/overlay.png"], ["--figure", "does not exist"]),
    (["--figure", "overlay.png", "--figure-slices", "0"], ["--figure-slices 0"]),
])
def test_make_superpixels_bad_option_is_one_line_before_preparing(tiny_phantom, tmp_path, capsys, extra,
                                                                   words):
    images = _images_dir(tiny_phantom, tmp_path / "ct")
    (tmp_path / "FOLDER").mkdir()
    extra = [str(tmp_path / x) if x in ("FOLDER", "overlay.txt", "missing/overlay.png", "overlay.png") else x
             for x in extra]
    before = tree(tmp_path)
    code, err = run_script("make_superpixels", ["--images", images, "--out", tmp_path / "prep",
                                                "--size", "32", "--workers", "1", *extra], capsys)
    assert_one_line_error(code, err, *words)
    assert tree(tmp_path) == before                          # no prepared folder left behind


def test_make_superpixels_figure_inside_the_new_out_folder(tiny_phantom, tmp_path, capsys):
    """README's example: --figure data/my_unlabeled/overlay.png with --out data/my_unlabeled (made by
    the run)."""
    images = _images_dir(tiny_phantom, tmp_path / "ct")
    out = tmp_path / "unlabeled"
    code, err = run_script("make_superpixels", ["--images", images, "--out", out, "--size", "32",
                                                "--workers", "1", "--min-size", "20",
                                                "--figure", out / "overlay.png", "--figure-slices", "2"],
                           capsys)
    assert code == 0, err
    assert (out / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "superpixels" / "image_1.npy").is_file()
    code, err = run_script("check_dataset", [out], capsys)
    assert code == 0, err


# ------------------------------------------------------------------ E. one case-id rule (writer, checker)
def _multilabel_tree(tiny_phantom: Path, root: Path, names: dict[str, list[str]],
                     per_case_folder: bool) -> None:
    """A multi-label data set: names = {'train': [case names], 'test': [...]} made from phantom cases."""
    cases = find_cases(tiny_phantom / "SilverCorpus") + find_cases(tiny_phantom / "GoldCorpus")
    for split, case_names in names.items():
        for name, case in zip(case_names, cases if split == "train" else cases[::-1]):
            stored = nib.load(str(case.volume_path))
            label = to_original(load_case(case).label, load_nifti(case.volume_path).original_axcodes)
            if per_case_folder:
                image_path = root / split / name / "ct.nii.gz"
                label_path = root / split / name / "labels.nii.gz"
            else:
                image_path = root / split / "images" / f"{name}.nii.gz"
                label_path = root / split / "labels" / f"{name}.nii.gz"
            for path in (image_path, label_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            image_path.symlink_to(case.volume_path)
            nib.save(nib.Nifti1Image(label, stored.affine), str(label_path))
    (root / "map.json").write_text(json.dumps({"liver": 1, "spleen": 2}))


def _prepare_multilabel(root: Path, out: Path, capsys) -> tuple[int, str]:
    return run_script("prepare_visceral", ["--visceral-dir", root, "--out", out, "--layout", "multilabel",
                                           "--label-map", root / "map.json", *PREP_ARGS], capsys)


@pytest.mark.parametrize("names, per_case_folder, ids", [
    ({"train": ["image_1", "image_2"], "test": ["image_3", "image_4"]}, False, ["image_1", "image_3"]),
    ({"train": ["case 1", "case 2"], "test": ["case 3", "case 4"]}, True, ["case_1", "case_3"]),
])
def test_check_dataset_accepts_what_prepare_wrote_with_underscore_ids(tiny_phantom, tmp_path, capsys, names,
                                                                      per_case_folder, ids):
    _multilabel_tree(tiny_phantom, tmp_path / "src", names, per_case_folder)
    code, err = _prepare_multilabel(tmp_path / "src", tmp_path / "prep", capsys)
    assert code == 0, err
    assert (tmp_path / "prep" / "train" / f"{ids[0]}_image.npy").is_file()
    assert (tmp_path / "prep" / "volumes" / "gold" / f"{ids[1]}.npz").is_file()
    code, err = run_script("check_dataset", [tmp_path / "prep"], capsys)
    assert code == 0, err


def test_check_dataset_accepts_an_images_only_folder_and_skips_hidden_files(tiny_phantom, tmp_path, capsys):
    images = _images_dir(tiny_phantom, tmp_path / "ct")
    (images / "._image_1.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS metadata")    # an AppleDouble file
    out = tmp_path / "prep"
    code, err = run_script("prepare_visceral", ["--visceral-dir", images, "--out", out,
                                                "--layout", "images-only", "--size", "32", "--workers", "1"],
                           capsys)
    assert code == 0, err
    assert json.loads((out / "meta.json").read_text())["splits"]["train"] == ["image_1"]
    capsys.readouterr()
    from conftest import load_script

    from util.cli import run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_script("check_dataset").main, [str(out)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    assert "images only (no labels)" in captured.out and "OK" in captured.out


@pytest.mark.parametrize("names, per_case_folder, words", [
    ({"train": ["c1", "c2"], "test": ["c2", "c3"]}, False, ["case id c2 names two volumes"]),
    ({"train": ["case 1", "case_1"], "test": ["c3"]}, True, ["case id case_1 names two volumes"]),
])
def test_prepare_refuses_clashing_case_ids(tiny_phantom, tmp_path, capsys, names, per_case_folder, words):
    _multilabel_tree(tiny_phantom, tmp_path / "src", names, per_case_folder)
    code, err = _prepare_multilabel(tmp_path / "src", tmp_path / "prep", capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "prep").exists()


def _stray_file(prep: Path) -> None:
    np.save(prep / "train" / "notes.npy", np.zeros(3))


def _bad_id_in_meta(prep: Path) -> None:
    meta = json.loads((prep / "meta.json").read_text())
    meta["splits"]["val"].append("../evil")
    (prep / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, words", [
    (_stray_file, ["notes.npy", "not <id>_image.npy"]),
    (_bad_id_in_meta, ["case id '../evil'", "cannot name prepared files"]),
])
def test_check_dataset_names_files_and_ids_outside_the_rule(tiny_prepared, tmp_path, capsys, damage, words):
    prep = shutil.copytree(tiny_prepared, tmp_path / "prep")
    damage(prep)
    code, err = run_script("check_dataset", [prep], capsys)
    assert_one_line_error(code, err, *words, "re-run")


def _as_zscore_folder(prep: Path, mode: str) -> None:
    """Training slices and gold images stored normalised, not in [0, 1], as the SSL-ALPNet writer
    (dataloaders/alpnet_prepare.py) stores them; gold volumes kept as read ('as stored', cropped)."""
    meta = json.loads((prep / "meta.json").read_text())
    meta["intensity"] = {"mode": mode}
    (prep / "meta.json").write_text(json.dumps(meta))
    for path in (prep / "train").glob("*_image.npy"):
        np.save(path, (np.load(path) * 4 - 2).astype(np.float32))              # z-like values in [-2, 2]
    for path in (prep / "volumes" / "gold").glob("*.npz"):
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        arrays["image"] = (arrays["image"] / 500.0).astype(np.float32)
        arrays["original_axcodes"] = np.asarray("as stored")
        arrays["original_shape"] = np.asarray(arrays["image"].shape) + np.array([1, 1, 0])   # a crop
        np.savez(path, **arrays)


@pytest.mark.parametrize("mode, accepted", [("zscore", True), ("minmax", False)])
def test_check_dataset_on_normalised_slices_follows_the_recorded_intensity(tiny_prepared, tmp_path, capsys,
                                                                           mode, accepted):
    prep = shutil.copytree(tiny_prepared, tmp_path / "prep")
    _as_zscore_folder(prep, mode)
    code, err = run_script("check_dataset", [prep], capsys)
    if accepted:
        assert code == 0, err
    else:
        assert_one_line_error(code, err, "image values outside [0, 1]", "re-run")


# ------------------------------------------------------------------ F. mask copy over the README's 4 organs
def test_mask_copy_mean_is_over_the_four_table_organs(tiny_prepared, capsys):
    from conftest import load_script

    from util.cli import run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_script("check_dataset").main, [str(tiny_prepared), "--mask-copy", "--preset", "alpnet"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    labels = {}
    for path in sorted((tiny_prepared / "volumes" / "gold").glob("*.npz")):
        with np.load(path) as data:
            labels[path.stem] = data["label"]
    side = {organ: result["mean"] for organ, result in mask_copy_dice(labels, preset="alpnet").items()}
    assert all(np.isfinite(list(side.values())))
    four = [side["liver"], side["spleen"], (side["kidney_right"] + side["kidney_left"]) / 2,
            (side["psoas_right"] + side["psoas_left"]) / 2]
    mean_line = next(line for line in out.splitlines() if line.strip().startswith("mean "))
    assert float(mean_line.split()[1]) == pytest.approx(np.mean(four), abs=5e-4)
    assert "preset alpnet" in out and "kidney, psoas: mean of right and left" in out
    assert "mean of the 4 organs liver, spleen, kidney, psoas" in out


def test_mask_copy_table_organ_with_one_side_scored():
    results = {"liver": {"mean": 0.5, "median": 0.5, "n": 2},
               "spleen": {"mean": float("nan"), "median": 0, "n": 0},
               "kidney_right": {"mean": float("nan"), "median": 0, "n": 0},
               "kidney_left": {"mean": 0.3, "median": 0.3, "n": 2}}
    text = format_mask_copy(results, "s", "inclusive")
    assert "liver 0.500, kidney 0.300" in text and "spleen 0" not in text.split("README table")[1]
    assert "0.400  (mean of the 2 organs liver, kidney" in text
