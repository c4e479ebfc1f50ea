"""Hostile inputs, fourth round (issue 30): one row per class, the command's message and exit status.

Each row runs an entry point in-process on tiny files made here (an untrained cnn_small checkpoint is
enough: the rows check the doors, not the segmentation). Errors: exit 2, one line, no traceback, the
inputs unchanged and nothing written. Warnings: exit 0 and the warning line. Ctrl-C during the
start-up imports of every entry point: one subprocess.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_line_error, script_output

SHAPE, SPACING = (40, 36, 14), (2.0, 2.0, 4.0)


def ct(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, organ mask uint8) X x Y x Z: air, a body ellipse, one organ blob."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    body = ((x - 20) / 18) ** 2 + ((y - 18) / 16) ** 2 < 1
    organ = body & (((x - 12) / 6) ** 2 + ((y - 17) / 7) ** 2 + ((z - 7) / 4) ** 2 < 1)
    image = np.where(body, -60.0, -1000.0) + np.where(organ, 190.0, 0.0) + rng.normal(0, 10, SHAPE)
    return np.rint(image).astype(np.int16), organ.astype(np.uint8)


def save(path: Path, array: np.ndarray, affine=None, codes=(1, 1)) -> str:
    image = nib.Nifti1Image(array, np.diag([*SPACING, 1.0]) if affine is None else affine)
    image.header.set_qform(image.affine, code=codes[0])
    image.header.set_sform(image.affine, code=codes[1])
    nib.save(image, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    from models.fewshot import FewShotSegNet
    root = tmp_path_factory.mktemp("hostile")
    image, mask = ct(1)
    query, _ = ct(2)
    rotate = np.eye(4)
    rotate[1:3, 1:3] = [[np.sqrt(0.5), -np.sqrt(0.5)], [np.sqrt(0.5), np.sqrt(0.5)]]
    outlier = query.astype(np.float32)
    outlier[5, 5, :] = 1e6
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=4)
    torch.save({"model": model.state_dict(), "model_config": model.config, "step": 0, "fold": 0,
                "input_size": 48}, root / "tiny.pth")
    (root / "dicom").mkdir()
    (root / "dicom" / "1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (root / "alpnet").mkdir()
    save(root / "alpnet" / "image_1.nii.gz", image)
    save(root / "alpnet" / "label_1.nii.gz", mask)
    (root / "empty").mkdir()
    f = {"root": root, "ckpt": str(root / "tiny.pth"), "s": save(root / "s.nii.gz", image),
         "m": save(root / "m.nii.gz", mask), "q": save(root / "q.nii.gz", query, codes=(1, 4)),
         "m_body": save(root / "m_body.nii.gz", (image > -500).astype(np.uint8)),
         "m_pm1": save(root / "m_pm1.nii.gz", np.where(mask > 0, 1, -1).astype(np.int16)),
         "m_float": save(root / "m_float.nii.gz", mask.astype(np.float32)),
         "q_mr": save(root / "q_mr.nii.gz", (query.astype(np.float32) + 1000) / 2.5),
         "q_outlier": save(root / "q_outlier.nii.gz", outlier),
         "q_oblique": save(root / "q_oblique.nii.gz", query, rotate @ np.diag([*SPACING, 1.0])),
         "q_gz": str(root / "q_gz.nii"), "dcm": str(root / "dicom" / "1.dcm"), "dicom": str(root / "dicom")}
    Path(f["q_gz"]).write_bytes(Path(f["q"]).read_bytes())
    return f


def segment(f, *extra, support=("s", "m"), query="q"):
    out = f["root"] / "out" / "p.nii.gz"
    return ["segment_volume", "--checkpoint", f["ckpt"], "--support-image", f[support[0]], "--support-mask",
            f[support[1]], "--query", f[query], "--out", out, "--device", "cpu", "--no-progress",
            "--n-chunks", "3", *extra]


# (class, argv from the files, expected code, words of the error / warning line[, words it must not hold])
ROWS = [
    ("modality", lambda f: segment(f, "--query-range", "3:9", query="q_mr"), 0,
     ["query is MR", "supports are CT", "means nothing"]),
    ("body label", lambda f: segment(f, support=("s", "m_body")), 0, ["% of the body", "--support-label"]),
    ("outliers", lambda f: segment(f, "--intensity", "minmax", query="q_outlier"), 0,
     ["extreme intensity outliers", "minmax", "window"]),
    ("oblique range", lambda f: segment(f, "--query-range", "3:9", query="q_oblique"), 2,
     ["oblique", "stored axis", "reslice"]),
    ("oblique", lambda f: segment(f, query="q_oblique"), 0, ["oblique", "stored axis 2"]),
    ("dcm file", lambda f: segment(f, support=("s", "dcm")), 2, ["DICOM file, not NIfTI", "dcm2niix"]),
    ("dicom folder", lambda f: segment(f, support=("s", "dicom")), 2, ["is a folder", "dcm2niix"]),
    ("gzip named .nii", lambda f: segment(f, query="q_gz"), 0, ["gzip-compressed but named .nii"]),
    ("file as folder", lambda f: ["check_dataset", f["q"]], 2, ["is a file, not a folder"], ["--out /"]),
    ("folder as file", lambda f: segment(f, "--out", f["root"] / "empty"), 2, ["is a folder"]),
    ("layout fit", lambda f: ["prepare_visceral", "--visceral-dir", f["root"] / "alpnet", "--out",
                              f["root"] / "new"], 2, ["--layout alpnet"]),
    ("own options", lambda f: ["make_superpixels", "--images", f["root"] / "empty", "--out",
                               f["root"] / "new"], 2, ["give a folder of NIfTI"], ["--visceral-dir"]),
    ("raw data to check", lambda f: ["check_dataset", f["root"] / "alpnet"], 2,
     ["--out NEW_FOLDER --layout alpnet"]),
    ("output first", lambda f: ["bench_chaos", "--data", f["root"] / "alpnet", "--out",
                                f["root"] / "alpnet" / "runs", "--folds", "0"], 2, ["inside the data"]),
    ("n-chunks", lambda f: segment(f, "--n-chunks", "1000000000000"), 2, ["--n-chunks", "at most 1000"]),
    ("size", lambda f: ["prepare_visceral", "--visceral-dir", f["root"] / "empty", "--out", f["root"] / "new",
                        "--layout", "images-only", "--size", "1000000000"], 2, ["--size", "2048"]),
    ("batch", lambda f: ["bench_chaos", "--batch-size", "1000000000", "--out", f["root"] / "b"], 2,
     ["--batch-size 1000000000"]),
    ("label 1.0", lambda f: segment(f, "--support-label", "1.0", support=("s", "m_float")), 0, ["label 1"]),
    ("-1/1 mask", lambda f: segment(f, support=("s", "m_pm1")), 0, ["-1/1 mask", "value 1"]),
]


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "out" not in p.parts}


@pytest.mark.parametrize("name, make, code, words, absent", [row + ((),) * (5 - len(row)) for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_hostile_input(files, capsys, name, make, code, words, absent):
    shutil.rmtree(files["root"] / "out", ignore_errors=True)
    (files["root"] / "out").mkdir()
    before = digest(files["root"])
    script, *argv = make(files)
    got, out, err = script_output(script, argv, capsys)
    assert digest(files["root"]) == before                            # inputs untouched, nothing written
    if code:
        line = assert_one_line_error(got, err, *words)
        assert not any((files["root"] / "out").iterdir()) and not any(w in line for w in absent), line
        return
    assert got == 0 and "Traceback" not in err, err
    assert any(all(w in line for w in words) for line in (err + out).splitlines()), (err, out)


def test_output_keeps_the_query_codes(files, capsys):
    (files["root"] / "out").mkdir(exist_ok=True)
    script, *argv = segment(files)
    got, _, err = script_output(script, argv, capsys)
    header = nib.load(str(files["root"] / "out" / "p.nii.gz")).header
    assert got == 0 and (int(header["qform_code"]), int(header["sform_code"])) == (1, 4), err


def test_data_dir_of_train_and_test(files):
    from training.config_check import check_data_dir
    from util.errors import UserError
    for folder, words in ((files["q"], ["is a file, not a folder"]), (files["dicom"], ["DICOM", "dcm2niix"]),
                          (files["root"] / "alpnet", ["--layout alpnet"])):
        with pytest.raises(UserError) as error:
            check_data_dir({"path": {"data_dir": str(folder)}, "episodes": "labels"})
        assert all(w in str(error.value) for w in words) and f"--out {folder} " not in str(error.value)


ENTRY_POINTS = ["train.py", "test.py"] + [f"scripts/{n}.py" for n in (
    "segment_volume", "check_dataset", "prepare_visceral", "make_superpixels", "bench_chaos")]
# bench_chaos imports torch in main, under run_cli: its Ctrl-C comes at `experiments`
DRIVER = """
import contextlib, io, json, os, runpy, signal, sys
class CtrlC:                                   # a Ctrl-C at the first import after util/interrupt.py
    def find_spec(self, name, path=None, target=None):
        if "util.interrupt" in sys.modules or name == "experiments":
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, CtrlC())
results, (scripts, out) = [], sys.argv[1:]
for script in json.loads(scripts):
    sys.modules.pop("util.interrupt", None)
    signal.signal(signal.SIGINT, signal.default_int_handler)        # as in a fresh process
    err, code = io.StringIO(), None
    with contextlib.redirect_stderr(err):
        try:
            sys.argv = [script, "--out", out, "--folds", "0"] if "bench" in script else [script, "-h"]
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = stop.code
    results.append([script, code, err.getvalue()])
print(json.dumps(results))
"""


def test_ctrl_c_during_start_up_imports(tmp_path):
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(ENTRY_POINTS), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    for script, code, err in json.loads(done.stdout.strip().splitlines()[-1]):
        assert (code, err) == (130, "error: interrupted by the user\n"), (script, code, err)
