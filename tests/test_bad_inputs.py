"""Bad-input matrix: every entry point, fed broken input, ends with ONE clear `error:` line, exit code 2,
no Python traceback, and no (partial) output left behind.

Scripts (make_phantom, prepare_visceral, check_dataset, segment_volume) run in-process through
`util.cli.run_cli` (an unexpected exception would fail the test: that is the traceback case). The
Sacred entry points (train.py, test.py) run in ONE subprocess each (`SACRED_DRIVER`) that calls
`config.run_sacred` once per case with stderr captured, so each case costs no extra torch import;
`test_real_processes_*` run the real `python X.py` for the process contract and the --debug switch.

Cases already covered elsewhere are not repeated here (column "elsewhere"); "ok" rows are input that
is legitimate and must give the RIGHT answer instead of an error (asserted too).

| #  | input                                 | make_phantom | prepare_visceral   | check_dataset      | train.py            | test.py              | segment_volume        |
|----|---------------------------------------|--------------|--------------------|--------------------|---------------------|----------------------|-----------------------|
| 1  | path that does not exist              | n/a (output) | --visceral-dir     | PREP               | path.data_dir       | path.data_dir        | query, checkpoint     |
| 2  | empty folder                          | --out exists | --visceral-dir     | PREP               | path.data_dir       | path.data_dir        | query is a folder     |
| 3  | truncated file                        | n/a          | volume .nii.gz     | train .npy, .npz   | train .npy          | gold .npz, snapshot  | query .nii.gz, ckpt   |
| 4  | mask shape differs from image         | n/a          | VISCERAL mask      | gold label shape   | elsewhere (check)   | elsewhere (check)    | elsewhere             |
| 5  | mask affine differs from image        | n/a          | VISCERAL mask      | n/a                | n/a                 | n/a                  | elsewhere             |
| 6  | all-empty support mask                | n/a          | ok: organ absent   | n/a                | n/a                 | n/a                  | mask                  |
| 7  | organ absent from a query             | n/a          | n/a                | n/a                | n/a                 | elsewhere (evaluate) | label absent: elsewh. |
| 8  | NaN / inf voxels                      | n/a          | NaN volume         | NaN in train .npy  | n/a                 | n/a                  | NaN support, inf query|
| 9  | float mask with values 0/255          | n/a          | ok: same labels    | n/a                | n/a                 | n/a                  | ok: same mask; label 1|
| 10 | 2D image / 4D image                   | n/a          | 2D volume, 4D vol. | n/a                | n/a                 | n/a                  | elsewhere             |
| 11 | unknown organ / label name            | --preset     | label map names    | --preset           | label_sets          | eval.organs (+str)   | elsewhere; label 0    |
| 12 | out-of-range value                    | size/gold/seed| size/n-val/many/max| meta intensity/size| n_grid 0, lr<0, ... | batch 0, shots 0,... | input-size, min-vox,  |
|    |                                       |              | /window            | index not an object| input 8, 1 val vol  | support id           | n-chunks/batch 0, out |

Counted: 90 cases in this file (a parametrized test id, or a case inside a driver test, each with its
own assertions): make_phantom 8, prepare_visceral 19 (2 of them 'ok'), check_dataset 11,
segment_volume 16 (1 'ok'), train.py 17 (fold=1.0, n_steps=4.0, fold='0', n_steps='abc', the key typo
model.n_gird among them), test.py 16 (1 'ok': snapshots on the command line; fold=1.0; the key typos
eval.prest and eval.snapshot), real processes 3 (check_dataset, its --debug traceback, test.py).
No case leaves a FAILED Sacred record, Sacred's "Failed after" banner or the pkg_resources warning.
Issue 16's classes (data loss, wrong organ, output/filesystem errors, implausible inputs, config types,
snapshot input size, silent gaps, truncated resume, demo reproducibility) continue in
tests/test_reliability.py (44 cases) and tests/test_demo_numerics.py (3): 137 cases over 8 entry points.
Existing tests that cover the other cells: tests/test_readers.py (NIfTI reader: missing, corrupt,
truncated, NaN/inf, 2D/4D, mask grid), tests/test_segment_volume.py (BAD_CASES), tests/test_check_dataset.py
(damaged prepared folders), tests/test_training.py (config ranges), tests/test_evaluate.py (snapshots,
absent organs).
"""  # noqa: E501  (the matrix is a table)
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import load_script

from util.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers
def run_script(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run scripts/<name>.py's main through run_cli in-process; (exit code, stderr)."""
    module = load_script(name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, [str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code, err: str, *words: str) -> None:
    """Exit code 2, exactly one non-empty stderr line starting 'error:', naming `words`, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def tree(folder: Path) -> list[str]:
    """Every path under `folder` (relative), sorted; [] when it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def rewrite_nifti(path: Path, change) -> None:
    """Replace the NIfTI at `path` (possibly a symlink) by change(array, affine) -> (array, affine)."""
    image = nib.load(str(path))
    array, affine = change(np.asarray(image.dataobj), image.affine.copy())
    path.unlink()
    nib.save(nib.Nifti1Image(array, affine), str(path))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


# -------------------------------------------------------------------------- make_phantom
PHANTOM_ARGS = ["--size", "32", "--slices", "8", "--n-silver", "1", "--n-gold", "2", "--workers", "1"]


@pytest.mark.parametrize("extra, words", [
    (["--size", "0"], ["--size >= 32"]), (["--n-gold", "1"], ["n_gold 1"]),
    (["--slices", "0"], ["--slices >= 8"]),
    (["--n-silver", "-1"], ["n_silver -1"]), (["--seed", "-1"], ["seed -1"]),
    (["--preset", "bogus"], ["preset 'bogus'", "inclusive"]),
])
def test_make_phantom_out_of_range_or_unknown_leaves_nothing(tmp_path, capsys, extra, words):
    code, err = run_script("make_phantom", ["--out", tmp_path / "ph", *PHANTOM_ARGS, *extra], capsys)
    assert_one_line_error(code, err, *words)
    assert tree(tmp_path) == []


@pytest.mark.parametrize("existing", ["empty folder", "file"])
def test_make_phantom_refuses_an_existing_out(tmp_path, capsys, existing):
    out = tmp_path / "ph"
    out.mkdir() if existing == "empty folder" else out.write_text("keep me")
    code, err = run_script("make_phantom", ["--out", out, *PHANTOM_ARGS], capsys)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert tree(tmp_path) == ["ph"]


# ---------------------------------------------------------------------- prepare_visceral
def mini_source(tiny_phantom: Path, root: Path, n_silver: int = 2) -> Path:
    """A VISCERAL tree of symlinks to `n_silver` silver and 2 gold cases of the tiny phantom."""
    for corpus, count in (("SilverCorpus", n_silver), ("GoldCorpus", 2)):
        volumes = sorted((tiny_phantom / corpus / "Volumes").iterdir())[:count]
        for sub in ("Volumes", "Segmentations"):
            (root / corpus / sub).mkdir(parents=True)
        for volume in volumes:
            (root / corpus / "Volumes" / volume.name).symlink_to(volume)
            pid = volume.name.split("_")[0]
            for mask in (tiny_phantom / corpus / "Segmentations").glob(f"{pid}_*"):
                (root / corpus / "Segmentations" / mask.name).symlink_to(mask)
    return root


def first_volume(root: Path) -> Path:
    return sorted((root / "SilverCorpus" / "Volumes").iterdir())[0]


def liver_mask(root: Path) -> Path:
    pid = first_volume(root).name.split("_")[0]
    return root / "SilverCorpus" / "Segmentations" / f"{pid}_1_CTce_ThAb_58_1.nii.gz"


def _shift(array, affine):
    affine[0, 3] += 7.5
    return array, affine


def _nan(array, affine):
    array = array.astype(np.float32)
    array[2, 3, 4] = np.nan
    return array, affine


PREPARE_DAMAGE = {
    "truncated volume": (lambda r: truncate(first_volume(r)),
                         ["corrupt or truncated", "_1_CTce_ThAb.nii.gz"]),
    "truncated mask": (lambda r: truncate(liver_mask(r)), ["corrupt or truncated", "_58_1.nii.gz"]),
    "mask shape": (lambda r: rewrite_nifti(liver_mask(r), lambda a, f: (a[:-3], f)),
                   ["mask shape", "resample"]),
    "mask affine": (lambda r: rewrite_nifti(liver_mask(r), _shift), ["mask affine", "resample"]),
    "NaN volume": (lambda r: rewrite_nifti(first_volume(r), _nan), ["1 NaN/inf voxels"]),
    "2D volume": (lambda r: rewrite_nifti(first_volume(r), lambda a, f: (a[:, :, 0], f)), ["2 dimensions"]),
    "4D volume": (lambda r: rewrite_nifti(first_volume(r), lambda a, f: (np.stack([a, a], -1), f)),
                  ["4 dimensions"]),
}


@pytest.mark.parametrize("case", sorted(PREPARE_DAMAGE))
def test_prepare_damaged_source_is_one_line_and_leaves_nothing(tiny_phantom, tmp_path, capsys, case):
    damage, words = PREPARE_DAMAGE[case]
    source = mini_source(tiny_phantom, tmp_path / "src")
    damage(source)
    out = tmp_path / "out" / "prep"
    out.parent.mkdir()
    code, err = run_script("prepare_visceral", ["--visceral-dir", source, "--out", out, "--size", "32",
                                                "--n-val", "0", "--workers", "1"], capsys)
    assert_one_line_error(code, err, *words)
    assert tree(out.parent) == []


@pytest.mark.parametrize("extra, words", [
    ([], ["data folder not found"]),
    (["--size", "0"], ["--size 0"]), (["--n-val", "-1"], ["--n-val -1"]), (["--many", "-1"], ["--many -1"]),
    (["--max-per-volume", "0"], ["--max-per-volume 0"]), (["--min-voxels", "-1"], ["--min-voxels -1"]),
    (["--window", "5", "5"], ["window [5.0, 5.0]"]), (["--layout", "multilabel"], ["--label-map"]),
])
def test_prepare_missing_source_and_out_of_range_options(tiny_phantom, tmp_path, capsys, extra, words):
    source = tmp_path / "absent" if not extra else tiny_phantom
    code, err = run_script("prepare_visceral", ["--visceral-dir", source, "--out", tmp_path / "prep",
                                                "--workers", "1", *extra], capsys)
    assert_one_line_error(code, err, *words)
    assert tree(tmp_path) == []


def test_prepare_empty_source_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_script("prepare_visceral", ["--visceral-dir", tmp_path / "empty", "--out",
                                                tmp_path / "p"], capsys)
    assert_one_line_error(code, err, "SilverCorpus/Volumes: folder missing")
    assert tree(tmp_path) == ["empty"]


def test_prepare_label_map_without_known_organ_names(tiny_phantom, tmp_path, capsys):
    root = tmp_path / "ml"
    for split in ("train", "test"):
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True)
        corpus = "SilverCorpus" if split == "train" else "GoldCorpus"
        for volume in sorted((tiny_phantom / corpus / "Volumes").iterdir())[:2]:
            (root / split / "images" / volume.name).symlink_to(volume)
            pid = volume.name.split("_")[0]
            (root / split / "labels" / volume.name).symlink_to(
                tiny_phantom / corpus / "Segmentations" / f"{pid}_1_CTce_ThAb_58_1.nii.gz")
    (tmp_path / "map.json").write_text(json.dumps({"hepar": 1}))
    code, err = run_script("prepare_visceral", ["--visceral-dir", root, "--out", tmp_path / "p", "--layout",
                                                "multilabel", "--label-map", tmp_path / "map.json", "--n-val",
                                                "0",
                                                "--workers", "1"], capsys)
    assert_one_line_error(code, err, "names none of the 20 structures")
    assert not (tmp_path / "p").exists()


def test_prepare_accepts_empty_masks_and_0_255_float_masks_with_the_right_labels(tiny_phantom, tmp_path,
                                                                                 capsys):
    """An all-empty mask means 'structure absent'; a float 0/255 mask is binary: same labels as 0/1."""
    args = ["--size", "32", "--n-val", "0", "--workers", "1", "--min-voxels", "5"]
    reference = mini_source(tiny_phantom, tmp_path / "ref", n_silver=1)
    assert run_script("prepare_visceral", ["--visceral-dir", reference, "--out", tmp_path / "p_ref", *args],
                      capsys)[0] == 0
    changed = mini_source(tiny_phantom, tmp_path / "changed", n_silver=1)
    rewrite_nifti(liver_mask(changed), lambda a, f: (a.astype(np.float32) * 255, f))
    spleen = liver_mask(changed).with_name(liver_mask(changed).name.replace("_58_", "_86_"))
    rewrite_nifti(spleen, lambda a, f: (np.zeros_like(a), f))
    assert run_script("prepare_visceral", ["--visceral-dir", changed, "--out", tmp_path / "p_new", *args],
                      capsys)[0] == 0
    pid = first_volume(changed).name.split("_")[0]
    meta = json.loads((tmp_path / "p_new" / "meta.json").read_text())
    assert 2 not in meta["volumes"][pid]["structures"] and 1 in meta["volumes"][pid]["structures"]
    old = np.load(tmp_path / "p_ref" / "train" / f"{pid}_label.npy")
    new = np.load(tmp_path / "p_new" / "train" / f"{pid}_label.npy")
    ref_index = json.loads((tmp_path / "p_ref" / "index.json").read_text())["slices"]
    new_index = json.loads((tmp_path / "p_new" / "index.json").read_text())["slices"]
    assert new_index["1"] == ref_index["1"]                  # liver: same slices from the 0/255 float mask
    liver_rows = [row for _, row, _ in ref_index["1"]]
    assert np.array_equal(old[liver_rows] == 1, new[liver_rows] == 1)
    assert "2" not in new_index and not (new == 2).any()


# ------------------------------------------------------------------------- check_dataset
def _npz_label_shape(prep: Path) -> None:
    path = sorted((prep / "volumes" / "gold").glob("*.npz"))[0]
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["label"] = arrays["label"][:-1]
    np.savez(path, **arrays)


def _nan_train(prep: Path) -> None:
    path = sorted((prep / "train").glob("*_image.npy"))[0]
    array = np.load(path)
    array[0, 1, 1] = np.nan
    np.save(path, array)


def _meta(prep: Path, **changes) -> None:
    meta = json.loads((prep / "meta.json").read_text())
    (prep / "meta.json").write_text(json.dumps({**meta, **changes}))


CHECK_DAMAGE = {
    "truncated npy": (lambda p: truncate(sorted((p / "train").glob("*_image.npy"))[0]),
                      "_image.npy: unreadable"),
    "truncated npz": (lambda p: truncate(sorted((p / "volumes" / "gold").glob("*.npz"))[0]),
                      ".npz: unreadable"),
    "gold label shape": (_npz_label_shape, "expected int16 and uint8 volumes of one shape"),
    "NaN in training image": (_nan_train, "not finite"),
    "unknown intensity mode": (lambda p: _meta(p, intensity={"mode": "bogus"}), "intensity"),
    "prep_size 0": (lambda p: _meta(p, prep_size=0), "prep_size 0"),
    "index.json a list": (lambda p: (p / "index.json").write_text("[1, 2]"), "index.json: not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(CHECK_DAMAGE))
def test_check_dataset_damage_is_one_line(tiny_prepared, tmp_path, capsys, case):
    damage, words = CHECK_DAMAGE[case]
    prep = tmp_path / "prep"
    shutil.copytree(tiny_prepared, prep)
    damage(prep)
    before = tree(prep)
    code, err = run_script("check_dataset", [prep, "--mask-copy"], capsys)
    assert_one_line_error(code, err, words, "re-run")
    assert tree(prep) == before                              # the checker never writes


@pytest.mark.parametrize("target, words", [("absent", "folder not found"), ("empty", "meta.json: missing"),
                                           ("file", "folder not found"), ("preset", "preset 'bogus'")])
def test_check_dataset_missing_empty_file_and_unknown_preset(tiny_prepared, tmp_path, capsys, target, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    argv = [tiny_prepared, "--mask-copy", "--preset", "bogus"] if target == "preset" else [tmp_path / target]
    code, err = run_script("check_dataset", argv, capsys)
    assert_one_line_error(code, err, words)


# ------------------------------------------------------------------------ segment_volume
@pytest.fixture(scope="module")
def seg(tiny_phantom, tmp_path_factory):
    """Files for segment_volume: a gold volume + its liver mask, a random cnn_small checkpoint, bad files."""
    from models.checkpoint import save_checkpoint
    from models.fewshot import FewShotSegNet
    root = tmp_path_factory.mktemp("seg_bad")
    volume = sorted((tiny_phantom / "GoldCorpus" / "Volumes").iterdir())[0]
    pid = volume.name.split("_")[0]
    mask = tiny_phantom / "GoldCorpus" / "Segmentations" / f"{pid}_1_CTce_ThAb_58_1.nii.gz"
    torch.manual_seed(0)
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=2)
    checkpoint = root / "model.pth"
    save_checkpoint(str(checkpoint), {"model": model.state_dict(), "model_config": model.config,
                                      "input_size": 32})
    image = nib.load(str(volume))
    array, affine = np.asarray(image.dataobj), image.affine
    liver = np.asarray(nib.load(str(mask)).dataobj)
    files = {"volume": volume, "mask": mask, "checkpoint": checkpoint, "folder": root / "folder.nii.gz",
             "absent": root / "absent.nii.gz"}
    files["folder"].mkdir()
    for name, data in {"empty_mask": np.zeros_like(liver), "mask_255": liver.astype(np.float32) * 255,
                       "nan_image": np.where(np.arange(array.size).reshape(array.shape) == 5, np.nan,
                                             array.astype(np.float32)),
                       "inf_image": np.where(np.arange(array.size).reshape(array.shape) == 9, np.inf,
                                             array.astype(np.float32))}.items():
        files[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(files[name]))
    files["truncated_image"] = root / "truncated.nii.gz"
    files["truncated_image"].write_bytes(volume.read_bytes()[:3000])
    files["truncated_checkpoint"] = root / "truncated.pth"
    files["truncated_checkpoint"].write_bytes(checkpoint.read_bytes()[:5000])
    return files


def segment_argv(seg: dict, out: Path, **changes) -> list[str]:
    args = {"--checkpoint": seg["checkpoint"], "--support-image": seg["volume"],
            "--support-mask": seg["mask"],
            "--query": seg["volume"], "--out": out, "--input-size": 32}
    args.update({key: seg.get(value, value) if isinstance(value, str) else value
                 for key, value in changes.items()})
    return [str(item) for pair in args.items() for item in pair if item is not None] + \
        ["--device", "cpu", "--no-progress", "--n-chunks", "3"]


SEGMENT_CASES = {
    "query does not exist": ({"--query": "absent"}, ["absent.nii.gz: file not found"]),
    "query is a folder": ({"--query": "folder"}, ["folder.nii.gz: file not found"]),
    "truncated query": ({"--query": "truncated_image"}, ["corrupt or truncated"]),
    "truncated checkpoint": ({"--checkpoint": "truncated_checkpoint"}, ["truncated.pth", "unreadable"]),
    "all-empty support mask": ({"--support-mask": "empty_mask"}, ["mask is empty"]),
    "NaN support image": ({"--support-image": "nan_image", "--support-mask": "mask"}, ["1 NaN/inf voxels"]),
    "inf query": ({"--query": "inf_image"}, ["inf_image.nii.gz: 1 NaN/inf voxels"]),
    "0/255 mask, label 1": ({"--support-mask": "mask_255", "--support-label": "1"}, ["labels present: 255"]),
    "label 0 (background)": ({"--support-label": "0"}, ["0 is background"]),
    "input size 0": ({"--input-size": 0}, ["--input-size 0"]),
    "input size 7": ({"--input-size": 7}, ["--input-size 7"]),
    "min-voxels -1": ({"--min-voxels": -1}, ["--min-voxels -1"]),
    "n-chunks 0": ({"--n-chunks": 0}, ["--n-chunks 0"]),
    "batch size 0": ({"--batch-size": 0}, ["--batch-size 0"]),
    "out is a folder": ({"--out": "folder"}, ["is a folder"]),
}


@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
def test_segment_volume_bad_input_is_one_line_without_output(seg, tmp_path, capsys, case):
    changes, words = SEGMENT_CASES[case]
    argv = segment_argv(seg, tmp_path / "pred.nii.gz", **changes)
    if "--n-chunks" in changes:                                 # the later flag wins in argparse
        argv = argv[:-2] + ["--n-chunks", str(changes["--n-chunks"])]
    code, err = run_script("segment_volume", argv, capsys)
    assert_one_line_error(code, err, *words)
    assert tree(tmp_path) == []


def test_segment_volume_0_255_float_mask_gives_the_same_prediction_as_0_1(seg, tmp_path, capsys):
    for name, mask in (("a", "mask"), ("b", "mask_255")):
        code, _ = run_script("segment_volume", segment_argv(seg, tmp_path / f"{name}.nii.gz",
                                                            **{"--support-mask": mask}),
                             capsys)
        assert code == 0
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()


# --------------------------------------------------------------------- train.py / test.py
SACRED_DRIVER = textwrap.dedent("""
    import contextlib, importlib, io, json, logging, sys, traceback, warnings
    warnings.filterwarnings("ignore")
    entry, cases = sys.argv[1], json.loads(sys.argv[2])
    module = importlib.import_module(entry)
    from config import run_sacred
    results = []
    for case in cases:
        if isinstance(case, dict):                 # {"python": code}: a step between commands, no result
            exec(case["python"], {})
            continue
        err, out, code = io.StringIO(), io.StringIO(), None
        # Sacred's log lines: the root logger's handler (made by the first run) writes to this err too
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setStream(err)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                run_sacred(module.ex, [entry + ".py", "with", *case])
                code = 0
            except SystemExit as stop:
                code = stop.code
            except BaseException:
                traceback.print_exc()
                code = "exception"
        results.append({"code": code, "err": err.getvalue(), "out": out.getvalue()[-20000:]})
    print("RESULTS" + json.dumps(results))
""")


def run_sacred_cases(entry: str, cases: list[list[str] | dict]) -> list[dict]:
    """{code, out, err} of each command (the words after `with`) of `entry`.py, run one after the other in
    one process; a {"python": code} entry instead runs that code there (e.g. damages a file a later command
    reads) and gives no result.

    Each err holds what that command's own process would print on stderr, Sacred's log lines included:
    the root logger's stream handler (made by the process's first run, so it would write to the first
    command's err) is pointed at each command's own err before it runs."""
    done = subprocess.run([sys.executable, "-c", SACRED_DRIVER, entry, json.dumps(cases)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert "RESULTS" in done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1])


def progress_free(err: str) -> str:
    """stderr without tqdm bars (they end with a carriage return or the bar characters)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in err.splitlines() if "it/s]" not in line
                     or "error:" in line).replace("\r", "")


def only_error_line(err: str) -> str:
    lines = [line[line.index("error: "):] if "error: " in line else line
             for line in progress_free(err).splitlines() if line.strip()]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def broken_preps(tiny_prepared, tmp_path_factory):
    """Copies of the tiny prepared folder: truncated meta.json, truncated train .npy, truncated gold .npz."""
    root = tmp_path_factory.mktemp("broken_preps")
    preps = {}
    for name in ("bad_meta", "bad_npy", "bad_npz"):
        preps[name] = root / name
        shutil.copytree(tiny_prepared, preps[name])
    truncate(preps["bad_meta"] / "meta.json")
    for path in (preps["bad_npy"] / "train").glob("*_image.npy"):
        truncate(path)
    truncate(sorted((preps["bad_npz"] / "volumes" / "gold").glob("*.npz"))[0])
    (root / "empty").mkdir()
    preps["empty"], preps["absent"] = root / "empty", root / "absent"
    return preps


def test_train_py_bad_input_matrix(tiny_prepared, broken_preps, tmp_path):
    log = tmp_path / "runs"
    base = ["tiny", "device=cpu", f"path.log_dir={log}", "val_every=0"]
    good = f"path.data_dir={tiny_prepared}"
    cases = [  # (updates, words in the error line, a FAILED run record allowed)
        ([f"path.data_dir={broken_preps['absent']}"], ["does not exist", "prepare_visceral.py"], False),
        ([f"path.data_dir={broken_preps['empty']}"], ["not a prepared folder"], False),
        ([f"path.data_dir={broken_preps['bad_meta']}"], ["meta.json is unreadable"], False),
        ([f"path.data_dir={broken_preps['bad_npy']}"], ["_image.npy", "truncated or corrupt"], True),
        ([good, "model.n_grid=0"], ["model.n_grid = 0"], False),
        ([good, "lr=-0.1"], ["lr = -0.1"], False),
        ([good, "batch_size=0"], ["batch_size = 0"], False),
        ([good, "input_size=8"], ["input_size = 8"], False),
        ([good, "lr=nan"], ["lr = 'nan': must be a number, not a string"], False),
        ([good, 'label_sets=[["liver"], ["spleen"], ["kidney_left"], ["pancreas_tail"]]'],
         ["unknown organ 'pancreas_tail'"], False),
        # tiny_prepared: n_val 1
        ([good, "val_every=3"], ["1 held-out validation volumes", "val_every=0"], False),
        ([good, "model.nonsense=1"], ["model.nonsense"], False),
        ([good, "model.n_gird=4"], ["model.n_gird = 4: unknown key", "did you mean model.n_grid?"], False),
        ([good, "fold=1.0"], ["fold = 1.0: must be an integer", "write 1"], False),  # reliability class 5
        ([good, "n_steps=4.0"], ["n_steps = 4.0: must be an integer"], False),
        ([good, "n_steps='abc'"], ["n_steps = 'abc': must be an integer, not a string"], False),
        ([good, "fold='0'"], ["fold = '0': must be an integer, not a string", "fold=0"], False),
    ]
    results = run_sacred_cases("train", [base + updates for updates, _, _ in cases])
    for (updates, words, allowed), result in zip(cases, results):
        assert_one_line_error(result["code"], only_error_line(result["err"]), *words)
        assert "Failed after" not in result["err"] and "pkg_resources" not in result["err"]
    # config and data errors stop before the run folder exists; an error found once the run started but
    # before it wrote anything (the truncated .npy) leaves no FAILED record either (config.run_sacred)
    runs = list(log.glob("*/[0-9]*")) if log.exists() else []
    assert runs == []
    assert not list(log.rglob("*.pth"))


def test_test_py_bad_input_matrix_and_snapshots_on_the_command_line(tiny_prepared, broken_preps, seg,
                                                                    tmp_path):
    log = tmp_path / "runs"
    base = ["tiny", "device=cpu", f"path.log_dir={log}", "eval.save_predictions=False"]
    good = f"path.data_dir={tiny_prepared}"
    truncated = f"eval.snapshots={{'LSLPN': '{seg['truncated_checkpoint']}'}}"
    cases = [
        ([f"path.data_dir={broken_preps['absent']}"], ["does not exist"], False),
        ([f"path.data_dir={broken_preps['empty']}"], ["not a prepared folder"], False),
        ([f"path.data_dir={broken_preps['bad_meta']}"], ["meta.json is unreadable"], False),
        ([f"path.data_dir={broken_preps['bad_npz']}"], [".npz cannot be read", "BadZipFile"], True),
        ([good, truncated], ["truncated.pth", "unreadable"], True),
        ([good, 'eval.organs=["pancreas_tail"]'], ["unknown organ 'pancreas_tail'"], False),
        ([good, 'eval.organs="liver"'], ["eval.organs = 'liver'", "list"], False),
        ([good, "eval.support=99999999"], ["eval.support", "99999999"], False),
        ([good, "eval.batch_size=0"], ["eval.batch_size = 0"], False),
        ([good, "eval.n_shots=0"], ["eval.n_shots = 0"], False),
        ([good, "eval.preset=bogus"], ["eval.preset = 'bogus'"], False),
        ([good, "eval.prest=official"], ["eval.prest = 'official': unknown key", "did you mean eval.preset?"],
         False),
        ([good, f"eval.snapshot={{'LSLPN': '{seg['checkpoint']}'}}"],
         ["eval.snapshot = ", "did you mean eval.snapshots?"],
         False),
        ([good, "model.n_grid=0"], ["model.n_grid = 0"], False),
        ([good, "fold=1.0"], ["fold = 1.0: must be an integer"], False),                 # reliability class 5
    ]
    ok = [good, f"eval.snapshots={{'LSLPN': '{seg['checkpoint']}'}}", 'eval.organs=["liver"]',
          "input_size=32"]
    results = run_sacred_cases("test", [base + updates for updates, _, _ in cases] + [base + ok])
    for (updates, words, allowed), result in zip(cases, results):
        assert_one_line_error(result["code"], only_error_line(result["err"]), *words)
    for result in results[:-1]:
        assert "Failed after" not in result["err"]
    runs = sorted((log / "test").glob("[0-9]*")) if (log / "test").exists() else []
    # errors found mid-run (unreadable .npz, truncated snapshot) before anything was written leave no
    # FAILED record (config.run_sacred): only the good run's folder
    assert [json.loads((r / "run.json").read_text())["status"] for r in runs] == ["COMPLETED"]
    # the documented command line `'eval.snapshots={"LSLPN": "..."}'` works (was a Sacred ConfigAddedError)
    assert results[-1]["code"] == 0, results[-1]["err"][-2000:]
    # no Sacred "Added new config entry: eval.snapshots.LSLPN"
    assert "config entry" not in results[-1]["err"]
    # Sacred logs warnings only (config.install_log_filters): the run says where its outputs are itself
    assert "Started run with ID" not in results[-1]["err"] and "outputs: " in results[-1]["out"]
    stored = json.loads((runs[0] / "results.json").read_text())
    assert list(stored["results"]) == ["mask copy", "LSLPN"]


# ------------------------------------------------------------------------ real processes
def test_real_processes_one_line_without_traceback_and_debug_shows_it(tmp_path):
    """The process contract: exit 2, one 'error:' line, no traceback; --debug gives the traceback."""
    done = subprocess.run([sys.executable, "scripts/check_dataset.py", str(tmp_path / "absent")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(done.returncode, done.stderr, "folder not found")
    debug = subprocess.run([sys.executable, "scripts/check_dataset.py", str(tmp_path / "absent"), "--debug"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr
    # no PYTHONWARNINGS: the process itself keeps library warnings off stderr (config.py's filter)
    done = subprocess.run([sys.executable, "test.py", "with", "tiny", f"path.data_dir={tmp_path}",
                           f"path.log_dir={tmp_path / 'runs'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(done.returncode, done.stderr, "not a prepared folder")
    assert not (tmp_path / "runs").exists()
