"""Reliability: the classes of failure found by a new user's ~170 unusual inputs, each fixed
at one root check and tested here for every entry-point family it touches. Successor of the
bad-input matrix in tests/test_bad_inputs.py (same helpers, same contract: one `error:` line, exit
code 2, no traceback, nothing written; warnings are one `warning:` line and the run goes on).

| class (root check)                                  | scripts (argparse)                               | Sacred (train.py / test.py)                  |
|-----------------------------------------------------|--------------------------------------------------|----------------------------------------------|
| 1 never write over an input                          | segment_volume --out = query / symlink / hard    | path.log_dir = a file (train, test)          |
|   (util.io.check_output_file/_folder)               | link / mask / checkpoint; make_phantom --out a   |                                              |
|                                                     | file + --overwrite; prepare --out = / holds the  |                                              |
|                                                     | source; make_figures --table = results.json      |                                              |
| 2 the wrong organ, silently                          | segment: organ name without known labels (liver, | evaluation (test.py, validation): a model    |
|   (dataloaders.label_map, output/size warnings)     | kidney_right), --label-map both forms, sidecar,  | that predicts nothing warns (prepared data   |
|                                                     | JSON list; empty output and tiny organ warnings; | use the 1-20 indices: no names to resolve)   |
|                                                     | prepare --label-map a JSON list                  |                                              |
| 3 output and filesystem errors                       | segment: unwritable --out checked before the     | path.log_dir unwritable (train, test)        |
|   (util.io checks before compute; run_cli /         | checkpoint is read; disk full mid-write (segment,|                                              |
|   run_sacred turn write OSErrors into one line)     | make_phantom: no partial file/folder, no .tmp);  | disk full while train.py writes a checkpoint |
|                                                     | make_figures: corrupt or foreign results.json    |                                              |
| 4 implausible inputs (dataloaders.plausibility,     | segment: image/mask swapped, constant query,     | n/a                                          |
|   nifti.check_same_grid on the world grid)          | all-air query, soft 0/0.5 mask, mask stored LPS, |                                              |
|                                                     | small query field of view; prepare: LPS mask     |                                              |
| 5 config types; no FAILED folder, no banners        | n/a                                              | fold=1.0, n_steps=4.0 (train, test: matrix in |
|   (training.config_check, config.run_sacred)        |                                                  | test_bad_inputs), real train.py process       |
| 6 the snapshot decides input size / intensity       | segment --input-size differing: warning          | test.py without / with input_size            |
|   (models.checkpoint.model_input)                   |                                                  |                                              |
| 7 silent gaps (evaluation.results.unscored_notes)   | segment prints its query range (given/transfer.) | test.py table: an organ no volume can score  |
| 8 resume from a truncated last.pth                  | n/a                                              | train.py resume=True: the way out named      |
| 9 demo reproducibility                              | tests/test_demo_numerics.py (pinned numerics)    |                                              |

Counted: 44 cases here (a parametrized id or a case inside a test, each with its own assertions) over
7 entry points (segment_volume as a script and through its Python API, make_phantom, prepare_visceral,
make_figures, train.py, test.py, evaluation.evaluate), plus 3 in tests/test_demo_numerics.py
(demo/__main__.py). With tests/test_bad_inputs.py (90 cases, 6 entry points): 137 cases over 8 entry
points (make_phantom, prepare_visceral, check_dataset, segment_volume, make_figures, train.py, test.py,
demo.py). Unit tests of the root checks: tests/test_output_paths.py (util/io.py), tests/test_label_map.py (label maps,
plausibility). benchmark's before-measuring output check: tests/test_benchmark.py.
"""  # noqa: E501  (the class table above)
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_bad_inputs import (  # noqa: F401
    assert_one_line_error,
    first_volume,
    liver_mask,
    mini_source,
    only_error_line,
    rewrite_nifti,
    run_sacred_cases,
    run_script,
    seg,
    segment_argv,
    tree,
)
from test_output_paths import unwritable_folder
from test_training import train_cli

ROOT = Path(__file__).resolve().parents[1]


def assert_error_line(code, err: str, *words: str) -> None:
    """A run that had started (Sacred's INFO lines are fine): exit 2, one `error:` line with `words`,
    no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    for word in words:
        assert word in errors[0], (word, errors[0])


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def work(seg, tmp_path_factory):  # noqa: F811  (the fixture `seg` imported above)
    """Private copies of the query volume and liver mask (data-loss tests must not risk shared files),
    a TotalSegmentator-style multi-label mask (spleen 1, kidney_right 2, liver 5) and variants."""
    root = tmp_path_factory.mktemp("reliability")
    files = {"checkpoint": seg["checkpoint"], "truncated_checkpoint": seg["truncated_checkpoint"]}
    files["ct"] = root / "ct.nii.gz"
    shutil.copyfile(seg["volume"], files["ct"])
    files["liver_mask"] = root / "liver.nii.gz"
    shutil.copyfile(seg["mask"], files["liver_mask"])
    image = nib.load(str(files["ct"]))
    ct, affine = np.asarray(image.dataobj), image.affine
    segmentations = Path(seg["mask"]).parent
    pid = Path(seg["mask"]).name.split("_")[0]
    labels = np.zeros(ct.shape, np.uint8)
    for radlex, value in ((86, 1), (29662, 2), (58, 5)):
        organ = np.asarray(nib.load(str(segmentations / f"{pid}_1_CTce_ThAb_{radlex}_1.nii.gz")).dataobj) > 0
        labels[organ] = value
    liver = labels == 5

    def save(name, array, affine=affine):
        files[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), str(files[name]))

    save("ts_labels", labels)
    save("soft", liver.astype(np.float32) * 0.5)
    save("constant", np.full(ct.shape, 40, np.int16))
    air = np.full(ct.shape, -1000, np.int16)
    air[0, 0, 0] = -990
    save("air", air)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])                              # the same grid stored LPS
    flip[:3, 3] = [ct.shape[0] - 1, ct.shape[1] - 1, 0]              # new index i -> stored index n-1-i
    save("liver_lps", liver[::-1, ::-1].astype(np.uint8), affine @ flip)
    save("narrow", ct[: ct.shape[0] // 2], affine)                      # half the in-plane field of view
    few = np.zeros(ct.shape, np.uint8)
    few[30, 30, 10:14] = 1                                               # a 'liver' of one voxel per slice
    files["few_liver"] = root / f"{pid}_1_CTce_ThAb_58_1.nii.gz"         # VISCERAL name: the organ is known
    nib.save(nib.Nifti1Image(few, affine), str(files["few_liver"]))
    files["ts_map"] = root / "ts_map.json"
    files["ts_map"].write_text(json.dumps({"labels": {"1": "spleen", "2": "kidney_right", "5": "liver"}}))
    files["name_map"] = root / "name_map.json"
    files["name_map"].write_text(json.dumps({"spleen": 1, "kidney_right": 2, "liver": 5}))
    files["list_map"] = root / "list_map.json"
    files["list_map"].write_text(json.dumps(["spleen", "kidney_right", "liver"]))
    return files


def seg_args(work, out, **changes) -> list[str]:
    """segment_volume argv on the private copies (query = support image = ct, liver mask)."""
    args = {"--checkpoint": work["checkpoint"], "--support-image": work["ct"],
            "--support-mask": work["liver_mask"],
            "--query": work["ct"], "--out": out, "--input-size": 32}
    args.update({key: work.get(value, value) if isinstance(value, str) else value
                 for key, value in changes.items()})
    return [str(i) for pair in args.items() for i in pair if i is not None] + ["--device", "cpu",
                                                                               "--no-progress",
                                                                              "--n-chunks", "3"]


def run_segment(work, out, capsys, **changes) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of scripts/segment_volume.py in-process."""
    from conftest import load_script

    from util.cli import run_cli
    module = load_script("segment_volume")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, seg_args(work, out, **changes))
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


# ------------------------------------------------------------------------------ 1. data loss
@pytest.mark.parametrize("target", ["query", "symlink to the query", "hard link to the mask", "checkpoint"])
def test_segment_never_writes_over_an_input(work, tmp_path, capsys, target):
    out = {"query": work["ct"], "symlink to the query": tmp_path / "link.nii.gz",
           "hard link to the mask": tmp_path / "hard.nii.gz", "checkpoint": work["checkpoint"]}[target]
    if target.startswith("symlink"):
        out.symlink_to(work["ct"])
    if target.startswith("hard"):
        os.link(work["liver_mask"], out)
    before = {name: Path(work[name]).read_bytes() for name in ("ct", "liver_mask", "checkpoint")}
    code, _, err = run_segment(work, out, capsys)
    assert_one_line_error(code, err, "is the input", "destroy the input")
    assert {name: Path(work[name]).read_bytes() for name in before} == before


def test_make_phantom_does_not_replace_a_file_by_a_folder(tmp_path, capsys):
    (tmp_path / "out").write_text("keep me")
    code, err = run_script("make_phantom", ["--out", tmp_path / "out", "--overwrite", "--size", "32",
                                            "--slices", "8",
                                            "--n-silver", "1", "--n-gold", "2", "--workers", "1"], capsys)
    assert_one_line_error(code, err, "is a file, not a folder", "--overwrite replaces only a folder")
    assert tree(tmp_path) == ["out"] and (tmp_path / "out").read_text() == "keep me"      # no out.old-<pid>


@pytest.mark.parametrize("out", ["the source", "its parent"])
def test_prepare_never_replaces_its_source(tiny_phantom, tmp_path, capsys, out):
    source = mini_source(tiny_phantom, tmp_path / "data" / "src", n_silver=1)
    before = tree(tmp_path)
    target = source if out == "the source" else source.parent
    code, err = run_script("prepare_visceral", ["--visceral-dir", source, "--out", target, "--overwrite",
                                                "--size", "32", "--n-val", "0", "--workers", "1"], capsys)
    assert_one_line_error(code, err, "input")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------- 2. the wrong organ
@pytest.mark.parametrize("label", ["liver", "kidney_right"])
def test_an_organ_name_without_known_labels_is_an_error(work, tmp_path, capsys, label):
    code, _, err = run_segment(work, tmp_path / "p.nii.gz", capsys, **{"--support-mask": "ts_labels",
                                                                       "--support-label": label})
    assert_one_line_error(code, err, "ts_labels.nii.gz are unknown", "--label-map", "--vocabulary visceral")
    assert tree(tmp_path) == []


@pytest.mark.parametrize("how", ["--label-map {value: name}", "--label-map {name: value}", "sidecar json"])
def test_the_organ_name_is_looked_up_in_the_mask_s_own_labels(work, tmp_path, capsys, how):
    # the binary liver mask
    code, _, _ = run_segment(work, tmp_path / "binary.nii.gz", capsys)
    assert code == 0
    changes = {"--support-mask": "ts_labels", "--support-label": "liver"}
    if how.startswith("--label-map"):
        changes["--label-map"] = "ts_map" if "value: name" in how else "name_map"
        code, out, err = run_segment(work, tmp_path / "named.nii.gz", capsys, **changes)
    else:
        sidecar = Path(work["ts_labels"]).with_name("ts_labels.json")
        shutil.copyfile(work["ts_map"], sidecar)
        try:
            code, out, err = run_segment(work, tmp_path / "named.nii.gz", capsys, **changes)
        finally:
            sidecar.unlink()
        assert "sidecar ts_labels.json" in out
    assert code == 0 and "label 5 (liver" in out, err
    assert (tmp_path / "named.nii.gz").read_bytes() == (tmp_path / "binary.nii.gz").read_bytes()


def test_a_label_map_list_is_a_one_line_error_in_segment_and_prepare(work, tiny_phantom, tmp_path, capsys):
    code, _, err = run_segment(work, tmp_path / "p.nii.gz", capsys, **{"--support-mask": "ts_labels",
                                                                       "--support-label": "liver",
                                                                       "--label-map": "list_map"})
    assert_one_line_error(code, err, "list_map.json", "JSON list")
    code, err = run_script("prepare_visceral", ["--visceral-dir", tiny_phantom, "--out", tmp_path / "prep",
                                                "--layout", "multilabel", "--label-map", work["list_map"]],
                           capsys)
    assert_one_line_error(code, err, "list_map.json", "JSON list")
    assert tree(tmp_path) == []


class Background(torch.nn.Module):
    """A model that never finds the organ."""

    def encode_support(self, images, fg, bg):
        return None

    def segment(self, prototypes, queries):             # 1 x Q x 1 x S x S -> 1 x Q x 2 x S x S
        logits = torch.zeros(*queries.shape[:2], 2, *queries.shape[-2:])
        logits[:, :, 0] = 1.0
        return logits


def test_evaluation_warns_when_a_model_predicts_nothing(tiny_prepared, capsys):
    from evaluation.evaluate import evaluate
    capsys.readouterr()
    evaluate({"mask copy": None, "LSLPN": Background()}, ["liver"], tiny_prepared, input_size=32,
             device="cpu",
             progress=False, figures=False)
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and "LSLPN predicted no liver voxel in 2 of 2 query volumes" in lines[0], lines


def test_empty_output_and_tiny_support_organ_end_with_a_warning(work, tmp_path, capsys):
    from evaluation.segment import segment_volume
    capsys.readouterr()
    array, _ = segment_volume(Background(), [(work["ct"], work["liver_mask"])], work["ct"],
                              out=tmp_path / "e.nii.gz",
                              input_size=32, n_chunks=3, device="cpu", progress=False)
    err = capsys.readouterr().err
    assert not array.any() and (tmp_path / "e.nii.gz").exists()
    assert any("the output mask is empty" in line for line in warnings_in(err)), err
    code, _, err = run_segment(work, tmp_path / "f.nii.gz", capsys, **{"--support-mask": "few_liver"})
    assert code == 0
    assert any("far fewer than expected for a liver" in line for line in warnings_in(err)), err


# ----------------------------------------------------------------- 3. outputs and filesystem errors
def test_an_unwritable_out_is_refused_before_the_checkpoint_is_read(work, tmp_path, capsys):
    locked = unwritable_folder(tmp_path)
    code, _, err = run_segment(work, locked / "p.nii.gz", capsys, **{"--checkpoint": "truncated_checkpoint"})
    assert_one_line_error(code, err, "cannot write in")                 # not the truncated checkpoint


def _limit_file_size(limit: int):
    """preexec_fn: any file beyond `limit` bytes fails with EFBIG, as a full disk fails with ENOSPC."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("entry", ["segment_volume", "make_phantom", "train.py"])
def test_disk_full_mid_write_is_one_line_and_leaves_no_partial_output(work, tiny_prepared, tmp_path, entry):
    limit = 600
    if entry == "segment_volume":
        argv = ["scripts/segment_volume.py", *seg_args(work, tmp_path / "p.nii.gz")]
    elif entry == "make_phantom":
        argv = ["scripts/make_phantom.py", "--out", str(tmp_path / "ph"), "--size", "32", "--slices", "8",
                "--n-silver", "1", "--n-gold", "2", "--workers", "1"]
    else:                                  # Sacred's small records fit, the checkpoint does not
        limit = 60_000
        argv = ["train.py", "with", "tiny", "device=cpu", f"path.data_dir={tiny_prepared}",
                f"path.log_dir={tmp_path}",
                "n_steps=2", "save_every=2", "val_every=0", "name=full"]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(limit),
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    # after tqdm
    errors = [line[line.index("error: "):] for line in done.stderr.splitlines() if "error: " in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and "writing failed (the file size limit was reached)" in errors[0], errors
    left = [name for name in tree(tmp_path) if "_sources" not in name]
    assert left in ([], ["full"])          # no partial file, no .tmp-<pid>, no .partial, no FAILED run record


def test_make_figures_corrupt_results_and_a_folder_as_table(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"results": {"LSLPN"')
    code, err = run_script("make_figures", [run], capsys)
    assert_one_line_error(code, err, "results.json: unreadable", "corrupt or truncated")
    (run / "results.json").write_text("[1, 2]")
    code, err = run_script("make_figures", [run], capsys)
    assert_one_line_error(code, err, "not a results.json written by test.py")
    code, err = run_script("make_figures", [run, "--table", run / "results.json"], capsys)
    assert_one_line_error(code, err)
    assert tree(run) == ["results.json"]


# -------------------------------------------------------------------------- 4. implausible inputs
@pytest.mark.parametrize("case, changes, words", [
    ("image and mask swapped", {"--support-image": "liver_mask", "--support-mask": "ct"},
     ["check the order"]),
    ("constant query", {"--query": "constant"}, ["constant", "nothing to segment"]),
])
def test_meaningless_inputs_are_errors(work, tmp_path, capsys, case, changes, words):
    code, _, err = run_segment(work, tmp_path / "p.nii.gz", capsys, **changes)
    assert_one_line_error(code, err, *words)
    assert tree(tmp_path) == []


def test_doubtful_inputs_warn_and_go_on(work, tmp_path, capsys):
    code, _, err = run_segment(work, tmp_path / "air.nii.gz", capsys,
                               **{"--query": "air", "--query-range": "2:6"})
    assert code == 0 and any("all air" in line for line in warnings_in(err)), err
    code, _, err = run_segment(work, tmp_path / "narrow.nii.gz", capsys, **{"--query": "narrow"})
    assert code == 0 and any("field of view" in line for line in warnings_in(err)), err


def test_soft_mask_and_mask_stored_in_another_orientation_give_the_binary_result(work, tmp_path, capsys):
    assert run_segment(work, tmp_path / "ref.nii.gz", capsys)[0] == 0
    code, _, err = run_segment(work, tmp_path / "soft.nii.gz", capsys, **{"--support-mask": "soft"})
    assert code == 0 and any("foreground = values >= 0.5" in line for line in warnings_in(err)), err
    code, _, err = run_segment(work, tmp_path / "lps.nii.gz", capsys, **{"--support-mask": "liver_lps"})
    assert code == 0, err
    reference = (tmp_path / "ref.nii.gz").read_bytes()
    assert (tmp_path / "soft.nii.gz").read_bytes() == reference == (tmp_path / "lps.nii.gz").read_bytes()


def test_prepare_accepts_a_mask_stored_in_another_orientation(tiny_phantom, tmp_path, capsys):
    args = ["--size", "32", "--n-val", "0", "--workers", "1", "--min-voxels", "5"]
    reference = mini_source(tiny_phantom, tmp_path / "ref", n_silver=1)
    assert run_script("prepare_visceral", ["--visceral-dir", reference, "--out", tmp_path / "p_ref", *args],
                      capsys)[0] == 0
    changed = mini_source(tiny_phantom, tmp_path / "changed", n_silver=1)

    def to_lps(array, affine):
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:3, 3] = np.array([array.shape[0] - 1, array.shape[1] - 1, 0])
        return array[::-1, ::-1].copy(), affine @ flip
    rewrite_nifti(liver_mask(changed), to_lps)
    code, err = run_script("prepare_visceral", ["--visceral-dir", changed, "--out", tmp_path / "p_new",
                                                *args], capsys)
    assert code == 0, err
    pid = first_volume(changed).name.split("_")[0]
    assert np.array_equal(np.load(tmp_path / "p_ref" / "train" / f"{pid}_label.npy"),
                          np.load(tmp_path / "p_new" / "train" / f"{pid}_label.npy"))


# ----------------------------------------------------------- 5. config types, real process
def test_real_train_process_float_fold_is_one_clean_line(tiny_prepared, tmp_path):
    done = train_cli("fold=1.0", log_dir=tmp_path / "runs", prep_dir=tiny_prepared)
    # no pkg_resources warning
    assert_one_line_error(done.returncode, done.stderr, "fold = 1.0: must be an integer")
    assert not (tmp_path / "runs").exists()


# ------------------------------ Sacred: 3. log_dir, 6. the snapshot decides, 7. silent gaps, 8. resume
def log_dir_cases(tmp_path) -> tuple[list[list[str]], Path]:
    """path.log_dir = an existing file, and (when this machine has one) an unwritable location."""
    afile = tmp_path / "a_file"
    afile.write_text("keep")
    cases = [[f"path.log_dir={afile}"]]
    try:
        cases.append([f"path.log_dir={unwritable_folder(tmp_path) / 'runs'}"])
    except pytest.skip.Exception:
        pass
    return cases, afile


def assert_log_dir_errors(results: list[dict], afile: Path) -> None:
    assert_one_line_error(results[0]["code"], only_error_line(results[0]["err"]), "path.log_dir", "is a file")
    for result in results[1:]:
        assert_one_line_error(result["code"], only_error_line(result["err"]), "path.log_dir", "cannot write")
    assert afile.read_text() == "keep"


def test_test_py_log_dir_snapshot_input_size_and_unscored_organs(tiny_prepared, seg, tmp_path):  # noqa: F811
    bad, afile = log_dir_cases(tmp_path)
    common = [f"path.data_dir={tiny_prepared}", "device=cpu", "eval.save_predictions=False",
              f"eval.snapshots={{'LSLPN': '{seg['checkpoint']}'}}", 'eval.organs=["liver", "psoas_left"]',
              "eval.batch_size=8"]
    runs = [tmp_path / "a", tmp_path / "b"]
    results = run_sacred_cases("test", [["tiny", *common, *case] for case in bad] + [
        [*common, f"path.log_dir={runs[0]}"], ["tiny", *common, f"path.log_dir={runs[1]}"]])
    assert_log_dir_errors(results[:len(bad)], afile)
    default, tiny = results[len(bad):]
    assert [default["code"], tiny["code"]] == [0, 0], default["err"][-2000:] + tiny["err"][-2000:]
    stored = json.loads(next((runs[0] / "test").glob("*/results.json")).read_text())
    assert stored["methods"]["LSLPN"]["liver"]["input"]["input_size"] == 32          # the snapshot's, not 512
    assert not warnings_in(default["err"])
    overridden = [line for line in warnings_in(tiny["err"]) if "input size" in line]  # `tiny` sets 64
    assert len(overridden) == 1 and "trained at input size 32, run at 64" in overridden[0]
    assert "psoas_left: not scored" in default["out"]                    # console (test.py prints table.md)
    table = next((runs[0] / "test").glob("*/table.md")).read_text()
    assert "psoas_left: not scored" in table and "no slice with > 200 voxels" in table


def test_train_py_log_dir_and_resume_from_a_truncated_last_pth(tiny_prepared, tmp_path):
    bad, afile = log_dir_cases(tmp_path)
    log = tmp_path / "runs"
    base = ["tiny", "device=cpu", f"path.data_dir={tiny_prepared}", "n_steps=2", "save_every=2",
            "val_every=0"]
    # between the two runs and their resumes (same process): a second run of r, a copy of the first, and
    # the newest last.pth of each truncated
    damage = (f"import pathlib, shutil\nlog = pathlib.Path({str(log)!r})\n"
              "shutil.copytree(log / 'r' / '1', log / 'r' / '2')\n"
              "for last in (log / 'r' / '2' / 'last.pth', log / 'fresh' / '1' / 'last.pth'):\n"
              "    last.write_bytes(last.read_bytes()[:2000])\n")
    results = run_sacred_cases("train", [base + case for case in bad] + [
        base + [f"path.log_dir={log}", "name=r"], base + [f"path.log_dir={log}", "name=fresh"],
        {"python": damage},
        base + [f"path.log_dir={log}", "name=r", "resume=True"],
        base + [f"path.log_dir={log}", "name=fresh", "resume=True"]])
    assert_log_dir_errors(results[:len(bad)], afile)
    assert [r["code"] for r in results[len(bad):len(bad) + 2]] == [0, 0]
    assert (log / "r" / "2" / "last.pth").stat().st_size == 2000                     # the step ran
    results = results[len(bad) + 2:]
    assert_error_line(results[0]["code"], results[0]["err"], f"{log / 'r' / '2' / 'last.pth'} is unreadable",
                      "move it aside", str(log / "r" / "1" / "last.pth"), "at step 2", "resume=True")
    assert_error_line(results[1]["code"], results[1]["err"], "no earlier readable last.pth",
                      "resume=False to start fresh")
    # no FAILED record
    assert sorted(p.name for p in (log / "r").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_segment_warns_on_an_input_size_override_and_prints_its_query_range(work, tmp_path, capsys):
    code, out, err = run_segment(work, tmp_path / "a.nii.gz", capsys, **{"--input-size": 48})
    assert code == 0 and any("trained at input size 32, run at 48" in line for line in warnings_in(err)), err
    assert "query range" in out and "transferred from the support" in out
    code, out, _ = run_segment(work, tmp_path / "b.nii.gz", capsys, **{"--query-range": "3:9"})
    assert code == 0 and "query range 3:9" in out and "given by --query-range" in out
