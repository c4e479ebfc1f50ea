"""Bad input at every door, as tables of (command, input, expected line) rows; then crash safety.

A row's command (a script run in-process through util.cli.run_cli, train.py / test.py through
config.run_sacred, all in one process, or a library door) fed its bad input must end with ONE `error:`
line holding the expected words, exit code 2, no traceback, and nothing written or changed. Doubtful
input warns and goes on (WARNING_ROWS); legitimate unusual input (a 0/255 or LPS mask, a float CT, MR
volumes, ...) gives the right answer: the tests after the tables. Last: SIGKILL, a full disk or Ctrl-C
never leaves a partial output, and training resumes to the same weights.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    TINY_PHANTOM,
    assert_one_line_error,
    load_script,
    run_sacred_cases,
    run_script,
    script_output,
)
from test_training import train_cli, train_then_resume

from dataloaders.layouts import find_cases, load_case
from dataloaders.nifti import load_nifti, to_original
from dataloaders.superpixels import read_superpixel_meta
from dataloaders.transforms import validate_intensity, volume_intensity
from models.checkpoint import load_checkpoint
from training.config_check import check_data_dir
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WINDOW = {"mode": "window", "window": [-125.0, 275.0]}
SPACING = (2.0, 2.0, 5.0)
PREP_ARGS = ["--size", str(TINY_PHANTOM["size"]), "--n-val", "0", "--min-voxels", "5", "--workers", "1"]
PHANTOM_ARGS = ["--size", "32", "--slices", "8", "--n-silver", "1", "--n-gold", "2", "--workers", "1"]
SEED = int(os.environ.get("LSLPN_CRASH_SEED", time.time_ns() % 100_000))
HOSTILE_SHAPE = (40, 36, 14)


# ------------------------------------------------------------------------------------ helpers
def tree(folder: Path) -> dict:
    """Every path under `folder` (relative) with its bytes (None for a folder); {} when absent."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def truncate(path: Path, keep: int | None = None) -> Path:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])
    return path


def save(path: Path, array, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*SPACING, 1.0]) if affine is None else affine),
             str(path))
    return path


def rewrite_nifti(path: Path, change) -> None:
    """Replace the NIfTI at `path` (possibly a symlink) by change(array, affine) -> (array, affine)."""
    image = nib.load(str(path))
    array, affine = change(np.asarray(image.dataobj), image.affine.copy())
    path.unlink()
    nib.save(nib.Nifti1Image(array, affine), str(path))


def to_lps(array, affine):
    """The same voxels stored with x and y flipped (LPS)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [array.shape[0] - 1, array.shape[1] - 1, 0]
    return array[::-1, ::-1].copy(), affine @ flip


def mini_source(tiny_phantom: Path, root: Path, n_silver: int = 2) -> Path:
    """A VISCERAL tree of symlinks to `n_silver` silver and 2 gold cases of the tiny phantom."""
    for corpus, count in (("SilverCorpus", n_silver), ("GoldCorpus", 2)):
        for sub in ("Volumes", "Segmentations"):
            (root / corpus / sub).mkdir(parents=True)
        for volume in sorted((tiny_phantom / corpus / "Volumes").iterdir())[:count]:
            (root / corpus / "Volumes" / volume.name).symlink_to(volume)
            for mask in (tiny_phantom / corpus / "Segmentations").glob(f"{volume.name.split('_')[0]}_*"):
                (root / corpus / "Segmentations" / mask.name).symlink_to(mask)
    return root


def first_volume(root: Path) -> Path:
    return sorted((root / "SilverCorpus" / "Volumes").iterdir())[0]


def liver_mask(root: Path, radlex: int = 58) -> Path:
    pid = first_volume(root).name.split("_")[0]
    return root / "SilverCorpus" / "Segmentations" / f"{pid}_1_CTce_ThAb_{radlex}_1.nii.gz"


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (chmod 555; /sys as root); skip when there is none."""
    folder = tmp_path / "readonly"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel"), Path("/proc")):
        try:
            probe = candidate / f".t-{os.getpid()}"
            open(probe, "wb").close()
            probe.unlink()
        except OSError:
            return candidate
    pytest.skip("no unwritable folder on this machine")


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def only_error_line(err: str) -> str:
    """stderr without tqdm bars, each line from its 'error: ' on."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines() if "it/s]" not in line or "error:" in line]
    return "\n".join(line[line.index("error: "):] if "error: " in line else line
                     for line in lines if line.strip())


class Payload:
    """Pickles as a call that creates `marker` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path, system: bool = False):
        self.marker, self.system = str(marker), system

    def __reduce__(self):
        if self.system:
            return (os.system, (f"touch {self.marker}",))
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class Threshold(torch.nn.Module):
    """Foreground where the model input exceeds `level` (inf: a model that never finds the organ); records
    its query batches."""

    def __init__(self, level: float = 0.5):
        super().__init__()
        self.level, self.seen = level, []

    def encode_support(self, images, fg, bg):
        return None

    def segment(self, prototypes, queries):              # 1 x Q x 1 x S x S -> 1 x Q x 2 x S x S
        self.seen.append(queries[0, :, 0].clone())
        fg = (queries[:, :, 0] > self.level).float()
        return torch.stack([1 - fg, fg], dim=2)


def ct_subject(seed: int, n_slices: int = 20, organ_z=(6, 14)) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (CT int16 HU, organ mask uint8) 24 x 24 x n_slices: air, a body, one organ of 130 HU."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    body = ((x - 12) / 10.5) ** 2 + ((y - 12) / 9.5) ** 2 < 1
    organ2d = ((x - 9) / 4.0) ** 2 + ((y - 12) / 4.0) ** 2 < 1
    image = np.full((24, 24, n_slices), -1000.0)
    image[body] = -90.0
    mask = np.zeros(image.shape, np.uint8)
    mask[:, :, organ_z[0]:organ_z[1]][organ2d] = 1
    image[mask.astype(bool)] = 130.0
    image += rng.normal(0, 8, image.shape)
    return np.rint(image).astype(np.int16), mask


def small_model(path: Path, encoder: str | None = None, **records) -> Path:
    """A random cnn_small FewShotSegNet checkpoint with `records` (its config naming `encoder` if given)."""
    from models.checkpoint import save_checkpoint
    from models.fewshot import FewShotSegNet
    torch.manual_seed(0)
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=2)
    config = {**model.config, "encoder": encoder} if encoder else model.config
    save_checkpoint(str(path), {"model": model.state_dict(), "model_config": config, **records})
    return path


@pytest.fixture(scope="module")
def files(tiny_phantom, tmp_path_factory) -> dict:
    """Private input files: a phantom CT + liver mask with a cnn_small checkpoint (input 32), damaged and
    unusual variants of them, label maps; a synthetic CT pair with window / min-max checkpoints (input 16)
    and non-HU variants of its query."""
    root = tmp_path_factory.mktemp("inputs")
    f = {"root": root}
    volume = sorted((tiny_phantom / "GoldCorpus" / "Volumes").iterdir())[0]
    pid, segmentations = volume.name.split("_")[0], tiny_phantom / "GoldCorpus" / "Segmentations"
    f["ct"], f["mask"] = root / "ct.nii.gz", root / "liver.nii.gz"
    shutil.copyfile(volume, f["ct"])
    shutil.copyfile(segmentations / f"{pid}_1_CTce_ThAb_58_1.nii.gz", f["mask"])
    f["checkpoint"] = small_model(root / "model.pth", input_size=32, intensity={"mode": "minmax"})
    f["vgg_checkpoint"] = small_model(root / "vgg.pth", input_size=32, encoder="vgg16")
    f["truncated_checkpoint"] = truncate(shutil.copyfile(f["checkpoint"], root / "truncated.pth"), 5000)
    f["truncated_image"] = truncate(shutil.copyfile(f["ct"], root / "truncated.nii.gz"), 3000)
    f["folder"], f["absent"] = root / "folder.nii.gz", root / "absent.nii.gz"
    f["folder"].mkdir()
    image = nib.load(str(f["ct"]))
    ct, affine = np.asarray(image.dataobj), image.affine
    liver = np.asarray(nib.load(str(f["mask"])).dataobj) > 0
    labels = np.zeros(ct.shape, np.uint8)  # TotalSegmentator style: spleen 1, right kidney 2
    for radlex, value in ((86, 1), (29662, 2), (58, 5)):
        organ = nib.load(str(segmentations / f"{pid}_1_CTce_ThAb_{radlex}_1.nii.gz"))
        labels[np.asarray(organ.dataobj) > 0] = value
    numbered = np.arange(ct.size).reshape(ct.shape)
    few = np.zeros(ct.shape, np.uint8)
    few[30, 30, 10:14] = 1                                    # a 'liver' of one voxel per slice
    air = np.full(ct.shape, -1000, np.int16)
    air[0, 0, 0] = -990
    moved = affine.copy()
    moved[0, 3] += 15.0
    for name, array, where in (
            ("empty_mask", np.zeros(ct.shape, np.uint8), affine), ("mask_255", liver * np.float32(255),
                                                                   affine),
            ("nan_image", np.where(numbered == 5, np.nan, ct.astype(np.float32)), affine),
            ("inf_image", np.where(numbered == 9, np.inf, ct.astype(np.float32)), affine),
            ("ts_labels", labels, affine), ("soft", liver * np.float32(0.5), affine),
            ("constant", np.full(ct.shape, 40, np.int16), affine), ("air", air, affine),
            ("liver_lps", *to_lps(liver.astype(np.uint8), affine)), ("narrow", ct[: len(ct) // 2], affine),
            ("small_mask", liver[:-2].astype(np.uint8), affine),
            ("shifted_mask", liver.astype(np.uint8), moved),
            ("image_2d", ct[:, :, 0], affine), ("image_4d", np.stack([ct, ct], -1), affine)):
        f[name] = save(root / f"{name}.nii.gz", array, where)
    f["few_liver"] = save(root / f"{pid}_1_CTce_ThAb_58_1.nii.gz", few, affine)  # VISCERAL name: organ known
    for name, content in (("ts_map", {"labels": {"1": "spleen", "2": "kidney_right", "5": "liver"}}),
                          ("name_map", {"spleen": 1, "kidney_right": 2, "liver": 5}),
                          ("list_map", ["spleen", "kidney_right", "liver"])):
        f[name] = root / f"{name}.json"
        f[name].write_text(json.dumps(content))
    # the synthetic CT pair (subject 1 support, subject 2 query) and its non-HU variants
    f["support_array"], f["support_mask_array"] = ct_subject(1)
    f["query_array"], _ = ct_subject(2, organ_z=(7, 15))
    f["support"] = save(root / "support.nii.gz", f["support_array"])
    f["support_mask"] = save(root / "support_mask.nii.gz", f["support_mask_array"])
    f["query"] = save(root / "query.nii.gz", f["query_array"])
    f["window_ckpt"] = small_model(root / "window.pth", input_size=16, intensity=WINDOW, step=1, fold=0)
    query = f["query_array"].astype(np.float64)
    for name, array in (("float01", (query + 1024) / 4095.0),
                        ("uint16_raw", (query + 1024).astype(np.uint16)),
                        ("int8", np.clip(query / 16, -128, 127).astype(np.int8)),
                        ("mr_like", np.where(query > -500, query + 400.0, 0.0))):
        f[name] = save(root / f"{name}.nii.gz", array)
    f["evil"] = root / "evil.pth"
    torch.save({"model": {}, "model_config": {}, "step": Payload(root / "payload_ran")}, f["evil"])
    return f


def segment_argv(c, synthetic: bool = False, **changes) -> list[str]:
    """segment_volume's argv: the phantom CT as support and query (or the synthetic pair with the window
    checkpoint), out <tmp>/p.nii.gz, 3 chunks on the CPU; a change's string value names a file of `files`,
    None drops the option."""
    f = c.files
    args = {"--checkpoint": f["window_ckpt"], "--support-image": f["support"],
            "--support-mask": f["support_mask"], "--query": f["query"]} if synthetic else \
        {"--checkpoint": f["checkpoint"], "--support-image": f["ct"], "--support-mask": f["mask"],
         "--query": f["ct"], "--input-size": 32}
    args.update({"--out": c.tmp / "p.nii.gz", "--device": "cpu", "--n-chunks": 3})
    args.update({key: f.get(value, value) if isinstance(value, str) else value
                 for key, value in changes.items()})
    return [str(item) for key, value in args.items() if value is not None for item in (key, value)] + \
        ["--no-progress"]


def hostile_ct(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, organ mask uint8) 40 x 36 x 14: air, a body ellipse, one organ blob."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in HOSTILE_SHAPE), indexing="ij")
    body = ((x - 20) / 18) ** 2 + ((y - 18) / 16) ** 2 < 1
    organ = body & (((x - 12) / 6) ** 2 + ((y - 17) / 7) ** 2 + ((z - 7) / 4) ** 2 < 1)
    image = np.where(body, -60.0, -1000.0) + np.where(organ, 190.0, 0.0) + rng.normal(0, 10, HOSTILE_SHAPE)
    return np.rint(image).astype(np.int16), organ.astype(np.uint8)


def save_coded(path: Path, array: np.ndarray, affine=None, codes=(1, 1)) -> Path:
    """A NIfTI of 2 x 2 x 4 mm voxels (or `affine`) with these qform and sform codes."""
    image = nib.Nifti1Image(array, np.diag([2.0, 2.0, 4.0, 1.0]) if affine is None else affine)
    image.header.set_qform(image.affine, code=codes[0])
    image.header.set_sform(image.affine, code=codes[1])
    nib.save(image, str(path))
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """Hostile inputs: a CT pair and query with damaged, unusual or misnamed variants, DICOM where NIfTI is
    expected, an SSL-ALPNet folder, an empty folder and an untrained cnn_small checkpoint (input 48)."""
    from models.fewshot import FewShotSegNet
    root = tmp_path_factory.mktemp("hostile")
    image, mask = hostile_ct(1)
    query, _ = hostile_ct(2)
    rotate = np.eye(4)
    rotate[1:3, 1:3] = [[np.sqrt(0.5), -np.sqrt(0.5)], [np.sqrt(0.5), np.sqrt(0.5)]]
    outlier = query.astype(np.float32)
    outlier[5, 5, :] = 1e6
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=4)
    torch.save({"model": model.state_dict(), "model_config": model.config, "step": 0, "fold": 0,
                "input_size": 48}, root / "tiny.pth")
    (made(root / "dicom") / "1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    save_coded(made(root / "alpnet") / "image_1.nii.gz", image)
    save_coded(root / "alpnet" / "label_1.nii.gz", mask)
    f = {"root": root, "ckpt": root / "tiny.pth", "s": save_coded(root / "s.nii.gz", image),
         "m": save_coded(root / "m.nii.gz", mask), "q": save_coded(root / "q.nii.gz", query, codes=(1, 4)),
         "m_body": save_coded(root / "m_body.nii.gz", (image > -500).astype(np.uint8)),
         "m_pm1": save_coded(root / "m_pm1.nii.gz", np.where(mask > 0, 1, -1).astype(np.int16)),
         "m_float": save_coded(root / "m_float.nii.gz", mask.astype(np.float32)),
         "q_mr": save_coded(root / "q_mr.nii.gz", (query.astype(np.float32) + 1000) / 2.5),
         "q_outlier": save_coded(root / "q_outlier.nii.gz", outlier),
         "q_oblique": save_coded(root / "q_oblique.nii.gz", query, rotate @ np.diag([2.0, 2.0, 4.0, 1.0])),
         "q_gz": root / "q_gz.nii", "dcm": root / "dicom" / "1.dcm", "dicom": root / "dicom",
         "alpnet": root / "alpnet", "empty": made(root / "empty")}
    f["q_gz"].write_bytes(f["q"].read_bytes())
    return f


def hostile_argv(c, *extra, support=("s", "m"), query="q") -> list:
    """segment_volume's argv on the hostile files, out <tmp>/p.nii.gz."""
    f = c.hostile
    return ["--checkpoint", f["ckpt"], "--support-image", f[support[0]], "--support-mask", f[support[1]],
            "--query", f[query], "--out", c.tmp / "p.nii.gz", "--device", "cpu", "--no-progress",
            "--n-chunks", "3", *extra]


class Context:
    """A row's view of the fixtures (requested lazily, by name) and its own tmp folder."""

    def __init__(self, request, tmp: Path):
        self.request, self.tmp, self.used = request, tmp, set()

    def __getattr__(self, name):
        self.used.add(name)
        return self.request.getfixturevalue(name)

    @classmethod
    def of(cls, tmp: Path, **fixtures) -> "Context":
        """A Context outside a row: the given fixtures as attributes."""
        c = cls(None, tmp)
        c.__dict__.update(fixtures)
        return c

    def inputs(self) -> dict:
        """The shared input files (when the row used them) as `tree` gives them."""
        return {name: tree(getattr(self, name)["root"]) for name in ("files", "hostile") if name in self.used}


def linked(path: Path, target: Path, hard: bool = False) -> Path:
    os.link(target, path) if hard else path.symlink_to(target)
    return path


def made(path: Path, kind: str = "folder") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(exist_ok=True) if kind == "folder" else path.write_text(kind)
    return path


# ----------------------------------------------------------------- prepared-folder and source damage
def prepared_copy(c, damage=None) -> Path:
    prep = Path(shutil.copytree(c.tiny_prepared, c.tmp / "prep"))
    if damage is not None:
        damage(prep)
    return prep


def edit_meta(prep: Path, **changes) -> None:
    edit_json(prep / "meta.json", lambda meta: meta.update(changes))


def first(prep: Path, pattern: str) -> Path:
    return sorted(prep.glob(pattern))[0]


def edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def edit_arrays(path: Path, change) -> None:
    """Rewrite the .npy or .npz at `path`: change(array) returns the new array, change(arrays) edits the
    dict of an .npz in place."""
    if path.suffix == ".npy":
        np.save(path, change(np.load(path)))
        return
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    change(arrays)
    np.savez(path, **arrays)


def with_voxel(index, value):
    """change(array) for edit_arrays: a copy with array[index] = value."""
    def change(array):
        array = array.copy()
        array[index] = value
        return array
    return change


def index_row_without_class(prep: Path) -> None:
    index = json.loads((prep / "index.json").read_text())
    pid = index["slices"]["1"][0][0]
    label = np.load(prep / "train" / f"{pid}_label.npy")
    index["slices"]["1"][0][1] = int(next(r for r in range(label.shape[0]) if not (label[r] == 1).any()))
    (prep / "index.json").write_text(json.dumps(index))


def as_zscore_folder(prep: Path, mode: str) -> None:
    """Training slices and gold images stored normalised, not in [0, 1], as the SSL-ALPNet writer stores
    them (dataloaders/alpnet_prepare.py), under meta intensity `mode`."""
    edit_meta(prep, intensity={"mode": mode})
    for path in (prep / "train").glob("*_image.npy"):
        np.save(path, (np.load(path) * 4 - 2).astype(np.float32))              # z-like values in [-2, 2]
    for path in (prep / "volumes" / "gold").glob("*.npz"):
        edit_arrays(path, lambda a: a.update(image=(a["image"] / 500.0).astype(np.float32),
                                             original_axcodes=np.asarray("as stored"),
                                             original_shape=np.asarray(a["image"].shape) + [1, 1, 0]))  # crop


def damaged_source(c, damage, n_silver: int = 2) -> Path:
    source = mini_source(c.tiny_phantom, c.tmp / "src", n_silver)
    damage(source)
    return source


def prepare_argv(c, source, *extra, out=None) -> list:
    out = c.tmp / "out" / "prep" if out is None else out
    out.parent.mkdir(parents=True, exist_ok=True)
    return ["--visceral-dir", source, "--out", out, *extra]


def rewrite_volumes(root: Path, change, paths=None) -> list[Path]:
    """Replace every CT volume under root/*Corpus/Volumes (or `paths`) by change(array, affine) (a NIfTI)."""
    paths = sorted(root.glob("*Corpus/Volumes/*.nii.gz")) if paths is None else paths
    for path in paths:
        source = nib.load(str(path))
        image = change(np.asarray(source.dataobj), source.affine)
        path.unlink()
        nib.save(image, str(path))
    return paths


def to_unit(array, affine):
    """A float32 CT in [0, 1] (the phantom's -1024..3071 HU rescaled): int16 rounding would make it 0/1."""
    return nib.Nifti1Image(((array.astype(np.float32) + 1024) / 4095).astype(np.float32), affine)


def with_nan(array, affine):
    array = array.astype(np.float32)
    array[2, 3, 4] = np.nan
    return array, affine


def shifted(array, affine):
    affine[0, 3] += 7.5
    return array, affine


def multilabel_tree(tiny_phantom: Path, root: Path, names: dict, per_case_folder: bool) -> Path:
    """A multi-label data set: names = {'train': [case names], 'test': [...]} made from phantom cases."""
    cases = find_cases(tiny_phantom / "SilverCorpus") + find_cases(tiny_phantom / "GoldCorpus")
    for split, case_names in names.items():
        for name, case in zip(case_names, cases if split == "train" else cases[::-1]):
            stored = nib.load(str(case.volume_path))
            label = to_original(load_case(case).label, load_nifti(case.volume_path).original_axcodes)
            folder = root / split / name if per_case_folder else root / split
            image_path, label_path = (folder / "ct.nii.gz",
                                      folder / "labels.nii.gz") if per_case_folder else \
                (folder / "images" / f"{name}.nii.gz", folder / "labels" / f"{name}.nii.gz")
            for path in (image_path, label_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            image_path.symlink_to(case.volume_path)
            nib.save(nib.Nifti1Image(label, stored.affine), str(label_path))
    (root / "map.json").write_text(json.dumps({"liver": 1, "spleen": 2}))
    return root


def multilabel_argv(c, names, per_case_folder) -> list:
    root = multilabel_tree(c.tiny_phantom, c.tmp / "src", names, per_case_folder)
    return ["--visceral-dir", root, "--out", c.tmp / "prep", "--layout", "multilabel", "--label-map",
            root / "map.json", *PREP_ARGS]


def one_liver_multilabel(c) -> Path:
    root = c.tmp / "ml"
    for split, corpus in (("train", "SilverCorpus"), ("test", "GoldCorpus")):
        for volume in sorted((c.tiny_phantom / corpus / "Volumes").iterdir())[:2]:
            for sub, target in (("images", volume), ("labels", c.tiny_phantom / corpus / "Segmentations" /
                                                     f"{volume.name.split('_')[0]}_1_CTce_ThAb_58_1.nii.gz")):
                linked(made(root / split / sub) / volume.name, target)
    (c.tmp / "map.json").write_text(json.dumps({"hepar": 1}))
    return root


def images_dir(c) -> Path:
    root = c.tmp / "ct"
    root.mkdir(exist_ok=True)
    if not (root / "image_1.nii.gz").exists():
        volumes = c.tiny_phantom / "SilverCorpus" / "Volumes"
        (root / "image_1.nii.gz").symlink_to(sorted(volumes.iterdir())[0])
    return root


def superpixels_argv(c, *extra) -> list:
    made(c.tmp / "FOLDER")
    return ["--images", images_dir(c), "--out", c.tmp / "prep", "--size", "32", "--workers", "1",
            *[c.tmp / x if x in ("FOLDER", "overlay.txt", "missing/overlay.png", "overlay.png") else x
              for x in extra]]


@pytest.fixture(scope="module")
def evaluated_runs(tmp_path_factory):
    """Two evaluation run folders (liver fold 0, spleen fold 1) written by evaluation.evaluate."""
    from test_figures import _evaluated
    root = tmp_path_factory.mktemp("figure_runs")
    return _evaluated(root, ["liver"], 0, "a"), _evaluated(root, ["spleen"], 1, "b")


def figure_runs(c, damage=None) -> tuple[Path, Path]:
    """Copies A, B of the evaluated runs whose figures say 'an earlier run'; `damage`(B)."""
    runs = tuple(Path(shutil.copytree(run, c.tmp / name)) for run, name in zip(c.evaluated_runs, "AB"))
    for run in runs:
        for name in ("results.png", "misalignment.png"):
            (run / name).write_bytes(b"the figure of an earlier run")
    if damage is not None:
        damage(runs[1])
    return runs


def edit_results(run: Path, change) -> None:
    results = json.loads((run / "results.json").read_text())
    change(results)
    (run / "results.json").write_text(json.dumps(results))


def other_preset(results):
    results["preset"]["n_chunks"] = 3 if results["preset"]["n_chunks"] != 3 else 5


def malformed(results):
    for organs in results["results"].values():
        for entry in organs.values():
            entry.pop("per_volume", None)
            entry.pop("range", None)


def results_run(c, text: str) -> list:
    (made(c.tmp / "run") / "results.json").write_text(text)
    return [c.tmp / "run"]


# ======================================================================== the table of script rows
# id: (script, argv(c), words of the one error line). Each row runs in a fresh tmp folder; nothing in
# it (nor in the shared input files) may change.
SCRIPT_ROWS = {
    **{f"phantom {' '.join(extra)}": ("make_phantom", lambda c, extra=extra: [
        "--out", c.tmp / "ph", *PHANTOM_ARGS, *extra], words) for extra, words in [
        (["--size", "0"], ["--size >= 32"]), (["--n-gold", "1"], ["n_gold 1", "and 2 gold"]),
        (["--slices", "0"], ["--slices >= 8"]),
        (["--n-silver", "-1"], ["n_silver -1"]), (["--seed", "-1"], ["seed -1"]),
        (["--preset", "bogus"], ["preset 'bogus'", "inclusive"])]},
    **{f"phantom {name}": ("make_phantom", lambda c, out=out: ["--out", *out(c), *PHANTOM_ARGS], words)
       for name, out, words in [
        ("out an empty folder", lambda c: [made(c.tmp / "ph")], ["ph", "already exists", "--overwrite"]),
        ("out a file", lambda c: [made(c.tmp / "ph", "keep me")], ["ph", "--overwrite"]),
        ("--overwrite a file", lambda c: [made(c.tmp / "out", "keep me"), "--overwrite"],
         ["is a file, not a folder", "--overwrite replaces only a folder"])]},
    # prepare_visceral: damaged sources
    **{f"prepare {name}": ("prepare_visceral", lambda c, damage=damage, extra=extra: prepare_argv(
        c, damaged_source(c, damage), *PREP_ARGS, *extra), words) for name, damage, extra, words in [
        ("truncated volume", lambda r: truncate(first_volume(r)), [],
         ["corrupt or truncated", "_1_CTce_ThAb.nii.gz"]),
        ("truncated mask", lambda r: truncate(liver_mask(r)), [], ["corrupt or truncated", "_58_1.nii.gz"]),
        ("mask shape", lambda r: rewrite_nifti(liver_mask(r), lambda a, f: (a[:-3], f)), [],
         ["mask shape", "resample"]),
        ("mask affine", lambda r: rewrite_nifti(liver_mask(r), shifted), [], ["mask affine", "resample"]),
        ("NaN volume", lambda r: rewrite_nifti(first_volume(r), with_nan), [], ["1 NaN/inf voxels"]),
        ("2D volume", lambda r: rewrite_nifti(first_volume(r), lambda a, f: (a[:, :, 0], f)), [],
         ["2 dimensions"]),
        ("4D volume", lambda r: rewrite_nifti(first_volume(r), lambda a, f: (np.stack([a, a], -1), f)), [],
         ["4 dimensions"]),
        ("HU window on a [0, 1] image", lambda r: rewrite_volumes(r, to_unit), ["--window", "-125", "275"],
         ["not Hounsfield units", "leave --window out"]),
        ("HU window on a mask image", lambda r: rewrite_volumes(r, lambda a, f: nib.Nifti1Image(
            (a > 0).astype(np.uint8), f)), ["--window", "-125", "275"],
         ["not Hounsfield units", "convert the volume"])]},
    # prepare_visceral: missing source, options, outputs, case ids
    **{f"prepare {name}": ("prepare_visceral", argv, words) for name, argv, words in [
        ("source absent", lambda c: prepare_argv(c, c.tmp / "absent", "--workers", "1"),
         ["data folder not found"]),
        ("source empty", lambda c: prepare_argv(c, made(c.tmp / "empty")),
         ["SilverCorpus/Volumes: folder missing"]),
        ("label map without organ names", lambda c: prepare_argv(
            c, one_liver_multilabel(c), "--layout", "multilabel", "--label-map", c.tmp / "map.json",
            "--n-val", "0", "--workers", "1", out=c.tmp / "p"), ["names none of the 20 structures"]),
        ("label map a JSON list", lambda c: prepare_argv(
            c, c.tiny_phantom, "--layout", "multilabel", "--label-map", c.files["list_map"]),
         ["list_map.json", "JSON list"]),
        ("--out is the source", lambda c: prepare_argv(
            c, mini_source(c.tiny_phantom, c.tmp / "data" / "src", 1), "--overwrite", *PREP_ARGS,
            out=c.tmp / "data" / "src"), ["input"]),
        ("--out holds the source", lambda c: prepare_argv(
            c, mini_source(c.tiny_phantom, c.tmp / "data" / "src", 1), "--overwrite", *PREP_ARGS,
            out=c.tmp / "data"), ["input"]),
        ("--overwrite a foreign folder", lambda c: prepare_argv(
            c, mini_source(c.tiny_phantom, c.tmp / "src"), "--overwrite", *PREP_ARGS,
            out=made(made(c.tmp / "my_documents") / "thesis.txt", "keep me").parent),
         ["--overwrite replaces only a prepared folder"]),
        ("--out exists", lambda c: prepare_argv(c, c.tiny_phantom, "--workers", "1", out=made(c.tmp / "p")),
         ["already exists", "--overwrite"]),
        ("--n-val 6", lambda c: prepare_argv(c, c.tiny_phantom, "--n-val", "6", "--workers", "1"),
         ["--n-val 6 leaves no training volume"]),
        ("case id in both splits", lambda c: multilabel_argv(
            c, {"train": ["c1", "c2"], "test": ["c2", "c3"]}, False), ["case id c2 names two volumes"]),
        ("two names one case id", lambda c: multilabel_argv(
            c, {"train": ["case 1", "case_1"], "test": ["c3"]}, True),
         ["case id case_1 names two volumes"])]},
    **{f"prepare {' '.join(extra)}": ("prepare_visceral", lambda c, extra=extra: prepare_argv(
        c, c.tiny_phantom, "--workers", "1", *extra), words) for extra, words in [
        (["--size", "0"], ["--size 0"]), (["--n-val", "-1"], ["--n-val -1"]),
        (["--many", "-1"], ["--many -1"]), (["--max-per-volume", "0"], ["--max-per-volume 0"]),
        (["--min-voxels", "-1"], ["--min-voxels -1"]), (["--window", "5", "5"], ["window [5.0, 5.0]"]),
        (["--layout", "multilabel"], ["--label-map"])]},
    **{f"prepare --out inside the input ({where})": ("prepare_visceral", lambda c, where=where: inside_input(
        c, where), ["lies inside the input folder", "give an --out outside"])
       for where in ("root", "SilverCorpus/Volumes", "symlink", "images-only")},
    # check_dataset
    **{f"check {name}": ("check_dataset", lambda c, damage=damage: [prepared_copy(c, damage), "--mask-copy"],
                         [words, "re-run"]) for name, (damage, words) in {
        "truncated npy": (lambda p: truncate(first(p, "train/*_image.npy")), "_image.npy: unreadable"),
        "truncated npz": (lambda p: truncate(first(p, "volumes/gold/*.npz")), ".npz: unreadable"),
        "gold label shape": (lambda p: edit_arrays(first(p, "volumes/gold/*.npz"), lambda a: a.update(
            label=a["label"][:-1])), "expected int16 and uint8 volumes of one shape"),
        "NaN in training image": (lambda p: edit_arrays(first(p, "train/*_image.npy"), with_voxel(
            (0, 1, 1), np.nan)), "not finite"),
        "unknown intensity mode": (lambda p: edit_meta(p, intensity={"mode": "bogus"}), "intensity"),
        "prep_size 0": (lambda p: edit_meta(p, prep_size=0), "prep_size 0"),
        "index.json a list": (lambda p: (p / "index.json").write_text("[1, 2]"),
                              "index.json: not a JSON object"),
        "stray train file": (lambda p: np.save(p / "train" / "notes.npy", np.zeros(3)), "not <id>_image.npy"),
        "unusable id in meta": (lambda p: edit_json(p / "meta.json", lambda m: m["splits"]["val"].append(
            "../evil")), "case id '../evil'"),
        "normalised slices under minmax": (lambda p: as_zscore_folder(p, "minmax"),
                                           "image values outside [0, 1]"),
        "meta.json missing": (lambda p: (p / "meta.json").unlink(), "meta.json: missing"),
        "a volume in train and val": (lambda p: edit_json(p / "meta.json", lambda m: m["splits"][
            "val"].append(m["splits"]["train"][0])), "is in both train and val"),
        "index.json not JSON": (lambda p: (p / "index.json").write_text("{"), "index.json: not valid JSON"),
        "index row out of range": (lambda p: edit_json(p / "index.json", lambda i: i["slices"]["1"][
            0].__setitem__(1, 999)), "row out of range"),
        "index row without its class": (index_row_without_class, "has no voxel of class 1"),
        "label value 42": (lambda p: edit_arrays(first(p, "train/*_label.npy"), with_voxel((0, 0, 0), 42)),
                           "label value 42 > 20"),
        "image shape": (lambda p: edit_arrays(first(p, "train/*_image.npy"), lambda a: a[:, :10]),
                        "_image.npy: float32"),
        "training label missing": (lambda p: first(p, "train/*_label.npy").unlink(),
                                   "_label.npy: missing training file"),
        "gold volume missing": (lambda p: first(p, "volumes/gold/*.npz").unlink(),
                                ".npz: missing evaluation volume"),
        "gold key missing": (lambda p: edit_arrays(first(p, "volumes/gold/*.npz"), lambda a: a.pop(
            "original_affine")), "keys original_affine missing"),
        "training file of no split": (lambda p: shutil.copy(first(p, "train/*_image.npy"),
                                                            p / "train" / "99999999_image.npy"),
                                      "99999999 which is not in splits.train")}.items()},
    "check absent": ("check_dataset", lambda c: [c.tmp / "absent"],
                     ["folder not found: run scripts/prepare_visceral.py"]),
    "check empty": ("check_dataset", lambda c: [made(c.tmp / "empty")], ["meta.json: missing"]),
    "check a file": ("check_dataset", lambda c: [made(c.tmp / "file", "x")], ["is a file, not a folder"]),
    "check preset": ("check_dataset", lambda c: [c.tiny_prepared, "--mask-copy", "--preset", "bogus"],
                     ["preset 'bogus'"]),
    # segment_volume
    **{f"segment {name}": ("segment_volume", lambda c, changes=changes: segment_argv(c, **changes), words)
       for name, (changes, words) in {
        "query absent": ({"--query": "absent"}, ["absent.nii.gz: file not found"]),
        "query a folder": ({"--query": "folder"}, ["folder.nii.gz: a folder without DICOM files"]),
        "truncated query": ({"--query": "truncated_image"}, ["corrupt or truncated"]),
        "truncated checkpoint": ({"--checkpoint": "truncated_checkpoint"}, ["truncated.pth", "unreadable"]),
        "empty support mask": ({"--support-mask": "empty_mask"}, ["mask is empty"]),
        "NaN support image": ({"--support-image": "nan_image"}, ["1 NaN/inf voxels"]),
        "inf query": ({"--query": "inf_image"}, ["inf_image.nii.gz: 1 NaN/inf voxels"]),
        "0/255 mask, label 1": ({"--support-mask": "mask_255", "--support-label": "1"},
                                ["labels present: 255"]),
        "label 0": ({"--support-label": "0"}, ["0 is background"]),
        "input size 0": ({"--input-size": 0}, ["--input-size 0"]),
        "input size 7": ({"--input-size": 7}, ["--input-size 7"]),
        "input size 2049": ({"--input-size": 2049}, ["--input-size 2049", "16..2048"]),
        "input size 100000": ({"--input-size": 100000}, ["--input-size 100000", "16..2048"]),
        "min-voxels -1": ({"--min-voxels": -1}, ["--min-voxels -1"]),
        "n-chunks 0": ({"--n-chunks": 0}, ["--n-chunks 0"]),
        "batch size 0": ({"--batch-size": 0}, ["--batch-size 0"]),
        "out a folder": ({"--out": "folder"}, ["is a folder"]),
        "out is the query": ({"--out": "ct"}, ["is the input", "destroy the input"]),
        "out is the checkpoint": ({"--out": "checkpoint"}, ["is the input", "destroy the input"]),
        "liver without known labels": ({"--support-mask": "ts_labels", "--support-label": "liver"},
                                       ["ts_labels.nii.gz are unknown", "--label-map",
                                        "--vocabulary visceral"]),
        "kidney_right without known labels": ({"--support-mask": "ts_labels",
                                               "--support-label": "kidney_right"},
                                              ["ts_labels.nii.gz are unknown", "--label-map"]),
        "label map a JSON list": ({"--support-mask": "ts_labels", "--support-label": "liver",
                                   "--label-map": "list_map"}, ["list_map.json", "JSON list"]),
        "image and mask swapped": ({"--support-image": "mask", "--support-mask": "ct"}, ["check the order"]),
        "constant query": ({"--query": "constant"}, ["constant", "nothing to segment"]),
        "absent label": ({"--support-mask": "ts_labels", "--support-label": "12"}, ["label 12", "no slice"]),
        "unknown organ name": ({"--support-label": "pancreas_tail"}, ["support-label"]),
        "mask shape": ({"--support-mask": "small_mask"}, ["mask shape"]),
        "mask affine": ({"--support-mask": "shifted_mask"}, ["affine"]),
        "range outside": ({"--query-range": "10:99"}, ["outside the query"]),
        "range malformed": ({"--query-range": "ten"}, ["Z0:Z1"]),
        "2D query": ({"--query": "image_2d"}, ["2 dimensions"]),
        "4D support": ({"--support-image": "image_4d"}, ["4 dimensions"]),
        "other encoder": ({"--checkpoint": "vgg_checkpoint"}, ["encoder"]),
        "missing checkpoint": ({"--checkpoint": "nothing.pth"}, ["does not exist"]),
        "bad intensity": ({"--intensity": "window:5"}, ["intensity"]),
        "unpaired support files": ({"--support-mask": None}, ["pairs"])}.items()},
    "segment out not .nii.gz": ("segment_volume", lambda c: segment_argv(c, **{"--out": c.tmp / "p.nii"}),
                                [".nii.gz"]),
    "segment out a symlink to the query": ("segment_volume", lambda c: segment_argv(
        c, **{"--out": linked(c.tmp / "link.nii.gz", c.files["ct"])}), ["is the input", "destroy the input"]),
    "segment out a hard link to the mask": ("segment_volume", lambda c: segment_argv(
        c, **{"--out": linked(c.tmp / "hard.nii.gz", c.files["mask"], hard=True)}),
        ["is the input", "destroy the input"]),
    "segment unwritable out, checked before the checkpoint": ("segment_volume", lambda c: segment_argv(
        c, **{"--out": unwritable_folder(c.tmp) / "p.nii.gz", "--checkpoint": "truncated_checkpoint"}),
        ["cannot write in"]),
    "segment pickled code in the checkpoint": ("segment_volume", lambda c: segment_argv(
        c, True, **{"--checkpoint": "evil"}), ["pickled code, which was not run"]),
    **{f"segment {name} as {role} under a CT window": (
        "segment_volume", lambda c, name=name, role=role: segment_argv(c, True, **{role: name}),
        [f"{name}.nii.gz", "not CT in Hounsfield units", "--intensity minmax"])
       for name in ("float01", "uint16_raw", "int8", "mr_like") for role in ("--query", "--support-image")},
    # make_superpixels
    "superpixels --out inside --images": ("make_superpixels", lambda c: [
        "--images", images_dir(c), "--out", images_dir(c) / "prep", "--size", "32", "--workers", "1"],
        ["lies inside the input folder"]),
    **{f"superpixels {name}": ("make_superpixels", argv, words) for name, argv, words in [
        ("no volumes", lambda c: ["--images", made(c.tmp / "e"), "--out", c.tmp / "p", "--workers", "1"],
         ["no CT volumes"]),
        ("no --out", lambda c: ["--images", made(c.tmp / "empty")], ["--out PREP"]),
        ("over a prepared folder", lambda c: ["--images", c.unlabeled_prep, "--workers", "1"],
         ["already exists"])]},
    "superpixels scale -1": ("make_superpixels", lambda c: superpixels_argv(c, "--scale", "-1"),
                             ["superpixel parameters", "scale > 0"]),
    "superpixels figure a folder": ("make_superpixels", lambda c: superpixels_argv(c, "--figure", "FOLDER"),
                                    ["--figure", "is a folder", ".png"]),
    "superpixels figure not png": ("make_superpixels", lambda c: superpixels_argv(c, "--figure",
                                                                                  "overlay.txt"),
                                   ["--figure", "ending in .png"]),
    "superpixels figure folder missing": ("make_superpixels", lambda c: superpixels_argv(
        c, "--figure", "missing/overlay.png"), ["--figure", "does not exist"]),
    "superpixels figure slices 0": ("make_superpixels", lambda c: superpixels_argv(
        c, "--figure", "overlay.png", "--figure-slices", "0"), ["--figure-slices 0"]),
    # make_figures: every input checked before any figure is replaced
    "figures truncated results.json": ("make_figures", lambda c: results_run(c, '{"results": {"LSLPN"'),
                                       ["results.json: unreadable", "corrupt or truncated"]),
    "figures foreign results.json": ("make_figures", lambda c: results_run(c, "[1, 2]"),
                                     ["not a results.json written by test.py"]),
    "figures --table is results.json": ("make_figures", lambda c: [
        *results_run(c, "[1, 2]"), "--table", c.tmp / "run" / "results.json"], []),
    "figures second run's figure data truncated": ("make_figures", lambda c: [*figure_runs(
        c, lambda run: truncate(run / "figure_data.npz", len((run / "figure_data.npz").read_bytes()) // 3))],
        ["figure_data.npz", "corrupt or truncated"]),
    "figures runs of two presets": ("make_figures", lambda c: [*figure_runs(
        c, lambda run: edit_results(run, other_preset)), "--table", c.tmp / "table.md"],
        ["different protocol presets"]),
    "figures malformed results.json": ("make_figures", lambda c: [*figure_runs(
        c, lambda run: edit_results(run, malformed))], ["unexpected form", "run test.py again"]),
    "figures --table is a figure": ("make_figures", lambda c: [
        *figure_runs(c), "--table", c.tmp / "A" / "results.png"], ["is the figure", "results.png"]),
    "figures the same run twice": ("make_figures", lambda c: [
        *figure_runs(c), c.tmp / "A", "--table", c.tmp / "table.md"], ["appears in two runs"]),
    # hostile input (issue 30); a 4th item: words the line must not hold
    "hostile oblique range": ("segment_volume", lambda c: hostile_argv(c, "--query-range", "3:9",
                                                                     query="q_oblique"),
                              ["oblique", "stored axis", "reslice"]),
    "hostile dcm file": ("segment_volume", lambda c: hostile_argv(c, support=("s", "dcm")),
                         ["DICOM file, not NIfTI", "dcm2niix"]),
    "hostile dicom folder": ("segment_volume", lambda c: hostile_argv(c, support=("s", "dicom")),
                             ["is a folder", "dcm2niix"]),
    "hostile file as folder": ("check_dataset", lambda c: [c.hostile["q"]], ["is a file, not a folder"],
                               ["--out /"]),
    "hostile folder as file": ("segment_volume", lambda c: [*hostile_argv(c), "--out", c.hostile["empty"]],
                               ["is a folder"]),
    "hostile layout fit": ("prepare_visceral", lambda c: ["--visceral-dir", c.hostile["alpnet"], "--out",
                                                          c.tmp / "new"], ["--layout alpnet"]),
    "hostile own options": ("make_superpixels", lambda c: ["--images", c.hostile["empty"], "--out",
                                                           c.tmp / "new"], ["give a folder of NIfTI"],
                            ["--visceral-dir"]),
    "hostile raw data to check": ("check_dataset", lambda c: [c.hostile["alpnet"]],
                                  ["--out NEW_FOLDER --layout alpnet"]),
    "hostile output first": ("bench_chaos", lambda c: ["--data", c.hostile["alpnet"], "--out",
                                                       c.hostile["alpnet"] / "runs", "--folds", "0"],
                             ["inside the data"]),
    "hostile n-chunks": ("segment_volume", lambda c: hostile_argv(c, "--n-chunks", "1000000000000"),
                         ["--n-chunks", "at most 1000"]),
    "hostile size": ("prepare_visceral", lambda c: ["--visceral-dir", c.hostile["empty"], "--out",
                                                    c.tmp / "new", "--layout", "images-only", "--size",
                                                    "1000000000"], ["--size", "2048"]),
    "hostile batch": ("bench_chaos", lambda c: ["--batch-size", "1000000000", "--out", c.tmp / "b"],
                      ["--batch-size 1000000000"]),
}


def inside_input(c, where: str) -> list:
    """prepare_visceral's argv with an --out inside its input ('root', a sub-folder, through a symlink)."""
    source = mini_source(c.tiny_phantom, c.tmp / "src")
    if where == "images-only":
        volumes = source / "SilverCorpus" / "Volumes"
        return prepare_argv(c, volumes, "--layout", "images-only", *PREP_ARGS, out=volumes / "prep")
    if where == "symlink":
        return prepare_argv(c, source, *PREP_ARGS, out=linked(c.tmp / "link", source / "GoldCorpus") / "prep")
    return prepare_argv(c, source, *PREP_ARGS,
                        out=source / where / "prep" if where != "root" else source / "prep")


@pytest.mark.parametrize("row", sorted(SCRIPT_ROWS))
def test_script_row(row, request, tmp_path, capsys):
    script, argv, words, *absent = SCRIPT_ROWS[row]
    c = Context(request, tmp_path)
    argv = argv(c)
    before = (tree(tmp_path), c.inputs())
    code, err = run_script(script, argv, capsys)
    line = assert_one_line_error(code, err, *words)
    assert (tree(tmp_path), c.inputs()) == before
    assert not any(word in line for word in (absent or [[]])[0]), line


# id: (argv of segment_volume, words of one warning or output line); exit 0
WARNING_ROWS = {
    "modality": (lambda c: hostile_argv(c, "--query-range", "3:9", query="q_mr"),
                 ["query is MR", "supports are CT", "means nothing"]),
    "body label": (lambda c: hostile_argv(c, support=("s", "m_body")), ["% of the body", "--support-label"]),
    "outliers": (lambda c: hostile_argv(c, "--intensity", "minmax", query="q_outlier"),
                 ["extreme intensity outliers", "minmax", "window"]),
    "oblique": (lambda c: hostile_argv(c, query="q_oblique"), ["oblique", "stored axis 2"]),
    "gzip named .nii": (lambda c: hostile_argv(c, query="q_gz"), ["gzip-compressed but named .nii"]),
    "label 1.0": (lambda c: hostile_argv(c, "--support-label", "1.0", support=("s", "m_float")), ["label 1"]),
    "-1/1 mask": (lambda c: hostile_argv(c, support=("s", "m_pm1")), ["-1/1 mask", "value 1"]),
    "all-air query range": (lambda c: segment_argv(c, **{"--query": "air", "--query-range": "2:6"}),
                            ["warning: ", "all air"]),
    "narrow query": (lambda c: segment_argv(c, **{"--query": "narrow"}), ["warning: ", "field of view"]),
    "few liver voxels": (lambda c: segment_argv(c, **{"--support-mask": "few_liver"}),
                         ["warning: ", "far fewer than expected for a liver"]),
    "other input size": (lambda c: segment_argv(c, **{"--input-size": 48}),
                         ["warning: ", "trained at input size 32, run at 48"]),
    "query range transferred": (lambda c: segment_argv(c), ["query range", "transferred from the support"]),
    "query range given": (lambda c: segment_argv(c, **{"--query-range": "3:9"}),
                          ["query range 3:9", "given by --query-range"]),
}


@pytest.mark.parametrize("row", sorted(WARNING_ROWS))
def test_warning_row(row, request, tmp_path, capsys):
    argv, words = WARNING_ROWS[row]
    c = Context(request, tmp_path)
    argv = argv(c)
    before = c.inputs()
    code, out, err = script_output("segment_volume", argv, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert any(all(w in line for w in words) for line in (err + out).splitlines()), (err, out)
    assert c.inputs() == before
    if row == "body label":                                 # the output keeps the query's qform/sform codes
        header = nib.load(str(tmp_path / "p.nii.gz")).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 4)


# ====================================================================== the tables of train.py / test.py
# id: (the words after `with` (p: paths of the fixture below), words of the one error line). All rows of
# an entry run in ONE process (conftest.run_sacred_cases); none may leave a run folder or Sacred banner.
COMMON_SACRED_ROWS = {
    "data_dir absent": (lambda p: [f"path.data_dir={p['absent']}"], ["does not exist",
                                                                     "prepare_visceral.py"]),
    "data_dir empty": (lambda p: [f"path.data_dir={p['empty']}"], ["not a prepared folder"]),
    "meta.json truncated": (lambda p: [f"path.data_dir={p['bad_meta']}"], ["meta.json is unreadable"]),
    "model.n_grid 0": (lambda p: ["model.n_grid=0"], ["model.n_grid = 0"]),
    "fold 1.0": (lambda p: ["fold=1.0"], ["fold = 1.0: must be an integer", "write 1"]),
    "log_dir a file": (lambda p: [f"path.log_dir={p['a_file']}"], ["path.log_dir", "is a file"]),
    "log_dir unwritable": (lambda p: [f"path.log_dir={p['locked']}"], ["path.log_dir", "cannot write"]),
}
TRAIN_ROWS = {
    **COMMON_SACRED_ROWS,
    "train .npy truncated": (lambda p: [f"path.data_dir={p['bad_npy']}"], ["_image.npy",
                                                                           "truncated or corrupt"]),
    "lr -0.1": (lambda p: ["lr=-0.1"], ["lr = -0.1"]),
    "batch_size 0": (lambda p: ["batch_size=0"], ["batch_size = 0"]),
    "input_size 8": (lambda p: ["input_size=8"], ["input_size = 8"]),
    "lr nan": (lambda p: ["lr=nan"], ["lr = 'nan': must be a number, not a string"]),
    "unknown organ in label_sets": (lambda p: ['label_sets=[["liver"], ["spleen"], ["kidney_left"], '
                                               '["pancreas_tail"]]'], ["unknown organ 'pancreas_tail'"]),
    "val_every with 1 validation volume": (lambda p: ["val_every=3"],
                                           ["1 held-out validation volumes", "val_every=0"]),
    "unknown model key": (lambda p: ["model.nonsense=1"], ["model.nonsense"]),
    "model key typo": (lambda p: ["model.n_gird=4"], ["model.n_gird = 4: unknown key",
                                                      "did you mean model.n_grid?"]),
    "n_steps 4.0": (lambda p: ["n_steps=4.0"], ["n_steps = 4.0: must be an integer"]),
    "n_steps text": (lambda p: ["n_steps='abc'"], ["n_steps = 'abc': must be an integer, not a string"]),
    "fold text": (lambda p: ["fold='0'"], ["fold = '0': must be an integer, not a string", "fold=0"]),
    "init_from pickled code": (lambda p: [f"path.init_from='{p['evil']}'", "n_steps=1"],
                               ["pickled code, which was not run"]),
    "unknown episode recipe": (lambda p: ["selfsup", "selfsup.episodes=ssl"], ["selfsup.episodes = 'ssl'"]),
    "init_path pickled code": (lambda p: ["model.encoder=vgg16", "model.pretrained=False",
                                          f"path.init_path='{p['evil']}'", "n_steps=1"],
                               ["pickled code, which was not run"]),
}
TEST_ROWS = {
    **COMMON_SACRED_ROWS,
    "gold .npz truncated": (lambda p: [f"path.data_dir={p['bad_npz']}"], [".npz cannot be read",
                                                                          "BadZipFile"]),
    "snapshot truncated": (lambda p: [f"eval.snapshots={{'LSLPN': '{p['truncated_checkpoint']}'}}"],
                           ["truncated.pth", "unreadable"]),
    "snapshot pickled code": (lambda p: [f"eval.snapshots={{'LSLPN': '{p['evil']}'}}"],
                              ["pickled code, which was not run"]),
    "unknown organ": (lambda p: ['eval.organs=["pancreas_tail"]'], ["unknown organ 'pancreas_tail'"]),
    "organs a string": (lambda p: ['eval.organs="liver"'], ["eval.organs = 'liver'", "list"]),
    "unknown support": (lambda p: ["eval.support=99999999"], ["eval.support", "99999999"]),
    "eval.batch_size 0": (lambda p: ["eval.batch_size=0"], ["eval.batch_size = 0"]),
    "eval.n_shots 0": (lambda p: ["eval.n_shots=0"], ["eval.n_shots = 0"]),
    "unknown preset": (lambda p: ["eval.preset=bogus"], ["eval.preset = 'bogus'"]),
    "eval key typo": (lambda p: ["eval.prest=official"], ["eval.prest = 'official': unknown key",
                                                         "did you mean eval.preset?"]),
    "eval.snapshot typo": (lambda p: [f"eval.snapshot={{'LSLPN': '{p['checkpoint']}'}}"],
                           ["eval.snapshot = ", "did you mean eval.snapshots?"]),
}


@pytest.fixture(scope="module")
def sacred_paths(tiny_prepared, files, tmp_path_factory) -> dict:
    """Broken copies of the tiny prepared folder (truncated meta.json, train .npy, gold .npz), an empty and
    an absent folder, a file and an unwritable folder as log_dir, and the files of `files`."""
    root = tmp_path_factory.mktemp("sacred")
    p = {**files, "root": root, "empty": made(root / "empty"), "absent": root / "absent",
         "a_file": made(root / "a_file", "keep"), "locked": root / "readonly" / "runs"}
    try:
        p["locked"] = unwritable_folder(root) / "runs"
    except pytest.skip.Exception:
        p["locked"] = None
    for name in ("bad_meta", "bad_npy", "bad_npz"):
        p[name] = Path(shutil.copytree(tiny_prepared, root / name))
    truncate(p["bad_meta"] / "meta.json")
    for path in (p["bad_npy"] / "train").glob("*_image.npy"):
        truncate(path)
    truncate(first(p["bad_npz"], "volumes/gold/*.npz"))
    return p


@pytest.fixture(scope="module")
def sacred_runs(sacred_paths, tiny_prepared, unlabeled_prep) -> dict:
    """test.py's, then train.py's commands in one process: {"test": TEST_ROWS, 'default' / 'tiny' (the
    checkpoint on the default config / `tiny`)}, {"train": TRAIN_ROWS, 'resume r' / 'resume fresh' (newest
    last.pth truncated; r has an earlier one), 'once' (counts config checks), 'alpnet' (SSL-ALPNet head)}."""
    p, log = sacred_paths, sacred_paths["root"] / "resumes"
    errors_log = {entry: p["root"] / f"{entry}_runs" for entry in ("train", "test")}
    ids = {entry: [row for row in sorted(rows) if p["locked"] or row != "log_dir unwritable"]
           for entry, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS))}
    common = ["tiny", "device=cpu", f"path.data_dir={tiny_prepared}"]
    good = [f"path.data_dir={tiny_prepared}", "device=cpu", "eval.save_predictions=False",
            f"eval.snapshots={{'LSLPN': '{p['checkpoint']}'}}", 'eval.organs=["liver", "psoas_left"]',
            "eval.batch_size=8"]
    test_cases = [[*common, f"path.log_dir={errors_log['test']}", "eval.save_predictions=False",
                   *TEST_ROWS[row][0](p)] for row in ids["test"]] + [
        [*good, f"path.log_dir={p['root'] / 'default'}"],
        ["tiny", *good, f"path.log_dir={p['root'] / 'tiny'}"]]
    run = [*common, "n_steps=2", "save_every=2", "val_every=0", f"path.log_dir={log}"]
    damage = (f"import pathlib, shutil\nlog = pathlib.Path({str(log)!r})\n"
              "shutil.copytree(log / 'r' / '1', log / 'r' / '2')\n"
              "for last in (log / 'r' / '2' / 'last.pth', log / 'fresh' / '1' / 'last.pth'):\n"
              "    last.write_bytes(last.read_bytes()[:2000])\n")
    count = textwrap.dedent(f"""
        import train, training.loop
        from training import config_check
        original = config_check.check_config
        def counting(config, command="train"):
            with open({str(log / 'calls')!r}, "a") as calls:
                calls.write(command + " ")
            return original(config, command)
        train.check_config = config_check.check_config = training.loop.check_config = counting
    """)
    alpnet = ["tiny", "selfsup", "device=cpu", f"path.log_dir={log}", f"path.data_dir={unlabeled_prep}",
              "n_steps=2", "model.head=alpnet", "model.align=True", "selfsup.episodes=alpnet"]
    train_cases = [[*common, f"path.log_dir={errors_log['train']}", "val_every=0", *TRAIN_ROWS[row][0](p)]
                   for row in ids["train"]] + [
        run + ["name=r"], run + ["name=fresh"], {"python": damage}, run + ["name=r", "resume=True"],
        run + ["name=fresh", "resume=True"], alpnet, {"python": count}, run + ["name=once"]]
    results = run_sacred_cases("test", [*test_cases, {"entry": "train"}, *train_cases])
    names = {"test": ids["test"] + ["default", "tiny"],
             "train": ids["train"] + ["r", "fresh", "resume r", "resume fresh", "alpnet", "once"]}
    return {"test": {**dict(zip(names["test"], results)), "errors_log": errors_log["test"]},
            "train": {**dict(zip(names["train"], results[len(names["test"]):])), "log": log,
                      "errors_log": errors_log["train"]}}


def assert_sacred_row(result: dict, words: list) -> None:
    assert_one_line_error(result["code"], only_error_line(result["err"]), *words)
    assert "Failed after" not in result["err"] and "pkg_resources" not in result["err"]


@pytest.mark.parametrize("row", sorted(TRAIN_ROWS))
def test_train_py_row(sacred_runs, sacred_paths, row):
    train_runs = sacred_runs["train"]
    if row not in train_runs:
        pytest.skip("no unwritable folder on this machine")
    assert_sacred_row(train_runs[row], TRAIN_ROWS[row][1])
    assert sacred_paths["a_file"].read_text() == "keep"


@pytest.mark.parametrize("row", sorted(TEST_ROWS))
def test_test_py_row(sacred_runs, row):
    test_runs = sacred_runs["test"]
    if row not in test_runs:
        pytest.skip("no unwritable folder on this machine")
    assert_sacred_row(test_runs[row], TEST_ROWS[row][1])


def test_sacred_errors_leave_no_run_and_a_truncated_last_pth_names_the_way_out(sacred_runs, files):
    train_runs, test_runs = sacred_runs["train"], sacred_runs["test"]
    # config and data errors stop before the run folder exists; an error found once the run started but
    # before it wrote anything (a truncated .npy, .npz or snapshot) leaves no FAILED record either
    for log in (train_runs["errors_log"], test_runs["errors_log"]):
        assert not list(log.glob("*/[0-9]*")) and not list(log.rglob("*.pth"))
    assert not (files["root"] / "payload_ran").exists()
    log = train_runs["log"]
    assert [train_runs[name]["code"] for name in ("r", "fresh")] == [0, 0]
    assert (log / "r" / "2" / "last.pth").stat().st_size == 2000                     # the damage step ran
    resumed = train_runs["resume r"]
    errors = [line for line in resumed["err"].splitlines() if line.startswith("error: ")]
    assert resumed["code"] == 2 and len(errors) == 1 and "Traceback" not in resumed["err"]
    for word in (f"{log / 'r' / '2' / 'last.pth'} is unreadable", "move it aside", "at step 2", "resume=True",
                 str(log / "r" / "1" / "last.pth")):
        assert word in errors[0], (word, errors[0])
    errors = [line for line in train_runs["resume fresh"]["err"].splitlines() if line.startswith("error: ")]
    assert train_runs["resume fresh"]["code"] == 2 and len(errors) == 1
    assert "no earlier readable last.pth" in errors[0] and "resume=False to start fresh" in errors[0]
    assert sorted(p.name for p in (log / "r").iterdir() if p.name.isdigit()) == ["1", "2"]  # no FAILED record
    assert train_runs["once"]["code"] == 0 and list((log / "once").rglob("last.pth"))
    assert (log / "calls").read_text() == "train "                       # train.py checks its config once
    alpnet = train_runs["alpnet"]              # SSL-ALPNet's episodes and head: two steps, redraws reported
    assert alpnet["code"] == 0 and "episodes redrawn: " in alpnet["out"], alpnet["err"][-3000:]


def test_test_py_snapshot_decides_input_size_and_unscored_organs_are_named(sacred_runs, sacred_paths):
    default, tiny = sacred_runs["test"]["default"], sacred_runs["test"]["tiny"]
    assert [default["code"], tiny["code"]] == [0, 0], default["err"][-2000:] + tiny["err"][-2000:]
    run = next((sacred_paths["root"] / "default" / "test").glob("[0-9]*"))
    stored = json.loads((run / "results.json").read_text())
    assert stored["methods"]["LSLPN"]["liver"]["input"]["input_size"] == 32          # the snapshot's, not 512
    assert list(stored["results"]) == ["mask copy", "LSLPN"]
    assert json.loads((run / "run.json").read_text())["status"] == "COMPLETED"
    assert not warnings_in(default["err"])
    overridden = [line for line in warnings_in(tiny["err"]) if "input size" in line]    # `tiny` sets 64
    assert len(overridden) == 1 and "trained at input size 32, run at 64" in overridden[0]
    assert "psoas_left: not scored" in default["out"]                    # console (test.py prints table.md)
    table = (run / "table.md").read_text()
    assert "psoas_left: not scored" in table and "no slice with > 200 voxels" in table
    # `eval.snapshots={...}` on the command line adds no Sacred "Added new config entry" line; Sacred logs
    # warnings only (config.install_log_filters): the run says where its outputs are itself
    err = tiny["err"]
    assert "config entry" not in err
    assert "Started run with ID" not in err and "outputs: " in tiny["out"]


# ========================================================================= the table of library doors
def segment_api(c, **changes):
    """evaluation.segment.segment_volume on the synthetic pair with a Threshold model; `changes` override."""
    from evaluation.segment import segment_volume
    f = c.files
    arguments = dict(checkpoint=Threshold(), supports=[(f["support"], f["support_mask"])], query=f["query"],
                     device="cpu", progress=False, input_size=24, n_chunks=3)
    return segment_volume(**{**arguments, **changes})


def mr_files(c) -> dict:
    """Label volumes and MR-like images without Hounsfield units (24 x 24 x 20)."""
    labels = np.zeros((24, 24, 20), np.float64)                          # MR-style float64 labels 0..4
    labels[4:10, 4:10, 3:12], labels[12:18, 4:10, 5:9] = 1, 2
    labels[4:10, 12:18, 5:9], labels[12:18, 12:18, 8:14] = 3, 4
    mr = np.where(c.files["query_array"] > -500, c.files["query_array"] + 400.0, 0.0)
    return {name: save(c.tmp / f"{name}.nii.gz", array) for name, array in {
        "mr_labels": labels, "ct_labels": labels.astype(np.uint8) * 5, "body_mask": (mr > 0).astype(np.uint8),
        "mr": mr, "mr8": np.clip(mr / 4, 0, 255).round()}.items()}


SWAPPED = dict(query_range="5:15", intensity="minmax")


def saved(c, name: str, content) -> str:
    torch.save(content, c.tmp / name)
    return str(c.tmp / name)


def weights(damage: str | None = None) -> tuple[dict, dict]:
    """(state dict, config) of a cnn_small model; damage 'nan' / 'inf' puts one in the first float tensor."""
    from models.fewshot import FewShotSegNet
    torch.manual_seed(0)
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if damage:
        next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float(damage)
    return state, model.config


def official_partial(c) -> str:
    from models.checkpoint import _official_encoder_keys
    return saved(c, "partial.pth",
                 {f"module.{key}": torch.zeros(1) for key in sorted(_official_encoder_keys())[:10]})


def checkpoint_row(damage=None, **records):
    def load(c):
        from models.checkpoint import model_from_checkpoint
        state, config = weights(damage)
        content = state if records.pop("bare", False) else {"model": state, "model_config": config, **records}
        return model_from_checkpoint(saved(c, "c.pth", content))
    return load


def paths_row(function: str, out, **kwargs):
    def call(c):
        import util.io
        (made(c.tmp / "dir.nii.gz"), made(c.tmp / "plain", "x"), made(c.tmp / "data" / "visceral"))
        target = out(c)
        extra = {key: value(c) if callable(value) else value for key, value in kwargs.items()}
        return getattr(util.io, function)(target, **extra)
    return call


# id: (call(c), regular expression the one-line UserError matches)
PAYLOAD = r"^.* is unreadable or refused \(UnpicklingError\): .*pickled code, which was not run"
API_ROWS = {
    # pickled code in a checkpoint: refused before any of it runs (the payload would create a file)
    **{f"pickled code: {name}": (lambda c, name=name, content=content: loader(name)(
        saved(c, name, content(c))), PAYLOAD) for name, content in {
        "top.pth": lambda c: Payload(c.tmp / "payload_ran"),
        "system.pth": lambda c: Payload(c.tmp / "payload_ran", system=True),
        "in_state.pth": lambda c: {"model": {"w": Payload(c.tmp / "payload_ran")}, "model_config": {}},
        "init_path.pth": lambda c: {"encoder.w": torch.ones(1), "x": Payload(c.tmp / "payload_ran")},
    }.items()},
    # checkpoint records
    "weights hold NaN": (checkpoint_row("nan"), "hold NaN/inf"),
    "weights hold inf": (checkpoint_row("inf"), "hold NaN/inf"),
    "bare state dict": (checkpoint_row(bare=True), "bare state dict.*not an official-code snapshot \\(every"),
    "input_size text": (checkpoint_row(input_size="512px"), "input_size"),
    "input_size float": (checkpoint_row(input_size=12.5), "input_size"),
    "input_size huge": (checkpoint_row(input_size=100000), "16..2048"),
    "no model config": (lambda c: loader("in_state.pth")(saved(c, "n.pth", {"model": weights()[0]})),
                        "not a train.py checkpoint"),
    "part of the official layout": (lambda c: load_checkpoint(official_partial(c)),
                                    r"bare state dict of 10 tensor\(s\)"),
    # the Python API of segment_volume: wrong types and sizes, each naming its argument
    **{f"segment_volume {name}": (lambda c, change=change: segment_api(c, **change),
                                  r"^(query|supports|support_label|label_map|query_range|n_chunks|batch_size|"
                                  r"input_size|min_voxels|out|checkpoint|intensity|vocabulary|"
                                  r"--input-size 100000 is not a whole number in 16..2048)\b")
       for name, change in {
        "query as int": {"query": 5}, "query as array": {"query": np.zeros((4, 4, 4))},
        "supports as one path": {"supports": "s.nii.gz"},
        "supports flat list": {"supports": ["s.nii.gz", "m.nii.gz"]},
        "support pair of arrays": {"supports": [(np.zeros(3), np.zeros(3))]},
        "support triple": {"supports": [("a", "b", "c")]},
        "label as float": {"support_label": 1.5}, "label as bool": {"support_label": True},
        "label map as int": {"label_map": 3}, "query range int": {"query_range": 5},
        "query range floats": {"query_range": (1.5, 3)}, "n_chunks float": {"n_chunks": 2.5},
        "batch size None": {"batch_size": None}, "input size text": {"input_size": "x"},
        "input size huge": {"input_size": 100000}, "min voxels text": {"min_voxels": "x"},
        "out as int": {"out": 5}, "checkpoint as int": {"checkpoint": 5},
        "checkpoint as array": {"checkpoint": np.zeros(3)},
        "intensity as int": {"intensity": 3}, "vocabulary as int": {"vocabulary": 1}}.items()},
    # swapped inputs without Hounsfield units
    **{f"segment_volume {name} as the query": (lambda c, name=name: segment_api(
        c, query=mr_files(c)[name], **SWAPPED), "looks like a mask") for name in ("mr_labels", "ct_labels",
                                                                                  "body_mask")},
    **{f"segment_volume {name} as the support image": (lambda c, name=name: segment_api(
        c, supports=[(mr_files(c)[name], c.files["support_mask"])], **SWAPPED), "looks like a mask")
       for name in ("mr_labels", "ct_labels", "body_mask")},
    **{f"segment_volume {name} as the mask": (lambda c, name=name: segment_api(
        c, supports=[(c.files["support"], mr_files(c)[name])], support_label=1, **SWAPPED),
        "looks like an image") for name in ("mr", "mr8")},
    "no superpixels": (lambda c: read_superpixel_meta(c.tmp), "has no superpixels.*make_superpixels.py"),
    # train.py / test.py's data_dir: a file, DICOM, raw data (a prepare command never --out the folder)
    **{f"data_dir {name}": (lambda c, name=name: check_data_dir(
        {"path": {"data_dir": str(c.hostile[name])}, "episodes": "labels"}),
        rf"^(?!.*--out \S*/{file} ).*{words}") for name, file, words in (
        ("q", r"q\.nii\.gz", "is a file, not a folder"), ("dicom", "dicom", "DICOM.*dcm2niix"),
        ("alpnet", "alpnet", "--layout alpnet"))},
    # axial coverage
    "another subject's crop": (lambda c: segment_api(c, query=save(
        c.tmp / "other.nii.gz", c.files["query_array"][:, :, 4:18], crop_affine())),
        "different body regions.*--query-range"),
    "MR without --query-range": (lambda c: segment_api(c, query=mr_files(c)["mr"], intensity="zscore"),
                                 "not CT in Hounsfield units.*give --query-range"),
    # intensity records
    **{f"zscore {name}": (lambda c, record=record: validate_intensity({"mode": "zscore", **record}),
                          "zscore") for name, record in {
        "with a mean only": {"mean": 1.0}, "with std 0": {"mean": 0, "std": 0},
        "with a text mean": {"mean": "a", "std": 1}}.items()},
    "zscore of a constant volume": (lambda c: volume_intensity(np.ones((3, 3, 3)), {"mode": "zscore"},
                                                               "flat.nii.gz"), "constant"),
    # the one output check (util/io.py)
    **{f"output is the input ({out})": (paths_row("check_output_file", lambda c, out=out: c.tmp / out,
                                                  inputs=lambda c: [Path("elsewhere.nii.gz"),
                                                                    input_files(c)]),
                                        "is the input .*destroy the input")
       for out in ("q.nii.gz", "link.nii.gz", "hard.nii.gz", "sub/../q.nii.gz")},
    **{f"output file {case}": (paths_row("check_output_file", out, suffixes=(".nii.gz",)), words)
       for case, (out, words) in {
        "a folder": (lambda c: c.tmp / "dir.nii.gz", "is a folder"),
        "in a missing folder": (lambda c: c.tmp / "no" / "m.nii.gz", "does not exist"),
        "in a file": (lambda c: c.tmp / "plain" / "m.nii.gz", "is a file, not a folder"),
        "suffix": (lambda c: c.tmp / "m.nrrd", "ending in .nii.gz")}.items()},
    **{f"{case} unwritable": (paths_row(function, lambda c, out=out: unwritable_folder(c.tmp) / out, **kw),
                              "cannot write in") for case, function, out, kw in [
        ("output file", "check_output_file", "m.nii.gz", {}),
        ("output folder", "check_output_folder", "phantom", {}),
        ("log_dir", "check_writable_folder", "runs/deeper", {"what": "path.log_dir"})]},
    "log_dir a file": (paths_row("check_writable_folder", lambda c: c.tmp / "plain", what="path.log_dir"),
                       "path.log_dir .*is a file"),
    "output folder a file, --overwrite": (paths_row("check_output_folder", lambda c: c.tmp / "plain",
                                                    overwrite=True), "is a file, not a folder"),
    "output folder is the input": (paths_row("check_output_folder", lambda c: c.tmp / "data" / "visceral",
                                             inputs=lambda c: [c.tmp / "data" / "visceral"], overwrite=True),
                                   "input"),
    "output folder holds the input": (paths_row("check_output_folder", lambda c: c.tmp / "data",
                                                inputs=lambda c: [c.tmp / "data" / "visceral"],
                                                overwrite=True), "input"),
    "output folder exists": (paths_row("check_output_folder", lambda c: c.tmp / "data" / "visceral"),
                             "--overwrite"),
}


def loader(name: str):
    from models.checkpoint import model_from_checkpoint
    from models.encoders import read_state_file
    return {"in_state.pth": model_from_checkpoint, "init_path.pth": read_state_file}.get(name,
                                                                                         load_checkpoint)


def crop_affine() -> np.ndarray:
    """Slices 4.. of a SPACING volume: its origin 4 slices up."""
    affine = np.diag([*SPACING, 1.0])
    affine[2, 3] = 4 * SPACING[2]
    return affine


def input_files(c) -> Path:
    """q.nii.gz with a symlink and a hard link to it, and a folder sub/ (the output-is-input rows)."""
    ct = made(c.tmp / "q.nii.gz", "ct")
    linked(c.tmp / "link.nii.gz", ct)
    linked(c.tmp / "hard.nii.gz", ct, hard=True)
    made(c.tmp / "sub")
    return ct


@pytest.mark.parametrize("row", sorted(API_ROWS))
def test_library_row(row, request, tmp_path):
    call, pattern = API_ROWS[row]
    with pytest.raises(UserError) as error:
        call(Context(request, tmp_path))
    assert "\n" not in str(error.value) and re.search(pattern, str(error.value)), str(error.value)
    assert not (tmp_path / "payload_ran").exists()
    if (tmp_path / "q.nii.gz").exists():
        assert (tmp_path / "q.nii.gz").read_text() == "ct"


# ============================================================ unusual but legitimate input: the right answer
def reference_minmax(slice_xy: np.ndarray) -> np.ndarray:
    """Slow, obviously correct per-slice min-max scaling of one slice (constant slice -> zeros)."""
    values = slice_xy.astype(np.float64)
    out = np.zeros(values.shape)
    low, high = values.min(), values.max()
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[i, j] = (values[i, j] - low) / (high - low) if high > low else 0.0
    return out


def large_uint16(array, affine):
    return nib.Nifti1Image((array.astype(np.int32) - int(array.min()) + 32000).astype(np.uint16), affine)


def int16_half_slope(array, affine):
    image = nib.Nifti1Image(array.astype(np.int16), affine)
    image.header.set_slope_inter(0.5, 0.0)                                   # voxels = stored / 2
    return image


STORED = {  # name: (change, expected stored dtype)
    "float32 CT in [0, 1]": (to_unit, np.float32),
    "float64 non-integer HU": (lambda a, f: nib.Nifti1Image(
        a.astype(np.float64) + np.random.default_rng(0).uniform(-0.45, 0.45, a.shape), f), np.float32),
    "float64 holding integers": (lambda a, f: nib.Nifti1Image(a.astype(np.float64), f), np.int16),
    "uint16 above 32767": (large_uint16, np.float32),
    "int16 with scl_slope 0.5": (int16_half_slope, np.float32),
}


@pytest.mark.parametrize("case", sorted(STORED))
def test_prepare_stores_every_image_exactly(tiny_phantom, tmp_path, capsys, case):
    change, dtype = STORED[case]
    paths = rewrite_volumes(mini_source(tiny_phantom, tmp_path / "src"), change)
    out = tmp_path / "prep"
    code, err = run_script("prepare_visceral", ["--visceral-dir", tmp_path / "src", "--out", out, *PREP_ARGS],
                           capsys)
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    index = json.loads((out / "index.json").read_text())["slices"]
    for path in paths:
        pid, expected = path.name.split("_")[0], load_nifti(path).array   # canonical voxels as in the file
        assert meta["volumes"][pid]["image_dtype"] == np.dtype(dtype).name
        if pid in meta["splits"]["gold"]:
            with np.load(out / "volumes" / "gold" / f"{pid}.npz") as data:
                assert data["image"].dtype == dtype and np.array_equal(data["image"], expected.astype(dtype))
                assert np.allclose(data["image"], expected, rtol=1e-6, atol=0)
        else:
            images = np.load(out / "train" / f"{pid}_image.npy")
            rows = sorted({(row, z) for entries in index.values() for p, row, z in entries if p == pid})
            for row, z in rows[:4]:                              # prep size = source size: no resize
                assert np.allclose(images[row], reference_minmax(expected[:, :, z]), atol=1e-6)
            assert rows and len(np.unique(images[rows[0][0]])) > 20   # grey levels, not a truncation's 0/1
    assert run_script("check_dataset", [out], capsys)[0] == 0   # the checker accepts what prepare wrote


@pytest.mark.parametrize("layout", ["multilabel", "images-only"])
def test_a_unit_float_ct_is_kept_exact_in_the_other_layouts(tiny_phantom, tmp_path, capsys, layout):
    c, out = Context.of(tmp_path, tiny_phantom=tiny_phantom), tmp_path / "prep"
    names = {"train": ["case 1", "case 2"], "test": ["case 3", "case 4"]}      # ids case_1, ...
    argv = multilabel_argv(c, names, True) if layout == "multilabel" \
        else ["--visceral-dir", images_dir(c), "--out", out, "--layout", layout, *PREP_ARGS]
    sources = {path.parent.name.replace(" ", "_") if layout == "multilabel" else path.name[: -len(".nii.gz")]:
               path for path in [*tmp_path.glob("src/*/*/ct.nii.gz"), *tmp_path.glob("ct/image_*.nii.gz")]}
    rewrite_volumes(tmp_path, to_unit, sorted(sources.values()))
    if layout == "images-only":                                   # an AppleDouble file: skipped
        (tmp_path / "ct" / "._image_1.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    code, err = run_script("prepare_visceral", argv, capsys)
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    assert len(sources) in (1, 4) and sorted(sources) == sorted(meta["splits"]["train"] +
                                                                meta["splits"]["gold"])
    for pid, path in sources.items():
        expected = load_nifti(path).array
        if pid in meta["splits"]["gold"]:
            with np.load(out / "volumes" / "gold" / f"{pid}.npz") as data:
                assert data["image"].dtype == np.float32 and np.array_equal(data["image"], expected)
        elif layout == "images-only":                            # every axial slice, row = z
            images = np.load(out / "train" / f"{pid}_image.npy")
            for z in (0, images.shape[0] // 2, images.shape[0] - 1):
                assert np.allclose(images[z], reference_minmax(expected[:, :, z]), atol=1e-6)
        else:
            assert (out / "train" / f"{pid}_image.npy").is_file()
    code, text, err = script_output("check_dataset", [out], capsys)
    assert code == 0 and "OK" in text, err
    assert ("images only (no labels)" in text) == (layout == "images-only")


def test_prepare_reads_empty_0_255_and_lps_masks_as_the_plain_ones(tiny_phantom, tmp_path, capsys):
    """An all-empty mask means 'structure absent'; a float 0/255 mask and a mask stored LPS give the same
    labels as the plain 0/1 RAS mask."""
    outputs = {}
    for name in ("reference", "changed", "lps"):
        source = mini_source(tiny_phantom, tmp_path / name, n_silver=1)
        if name == "changed":
            rewrite_nifti(liver_mask(source), lambda a, f: (a.astype(np.float32) * 255, f))
            rewrite_nifti(liver_mask(source, 86), lambda a, f: (np.zeros_like(a), f))      # spleen absent
        if name == "lps":
            rewrite_nifti(liver_mask(source), to_lps)
        code, err = run_script("prepare_visceral", ["--visceral-dir", source, "--out", tmp_path / f"p_{name}",
                                                    *PREP_ARGS], capsys)
        assert code == 0, err
        pid = first_volume(source).name.split("_")[0]
        outputs[name] = (np.load(tmp_path / f"p_{name}" / "train" / f"{pid}_label.npy"),
                         json.loads((tmp_path / f"p_{name}" / "index.json").read_text())["slices"],
                         json.loads((tmp_path / f"p_{name}" / "meta.json").read_text())["volumes"][pid])
    (ref, ref_index, _), (new, new_index, new_meta) = outputs["reference"], outputs["changed"]
    assert np.array_equal(ref, outputs["lps"][0])
    assert 2 not in new_meta["structures"] and 1 in new_meta["structures"]
    assert new_index["1"] == ref_index["1"]                  # liver: the same slices from the 0/255 mask
    rows = [row for _, row, _ in ref_index["1"]]
    assert np.array_equal(ref[rows] == 1, new[rows] == 1) and "2" not in new_index and not (new == 2).any()


def test_check_dataset_accepts_what_prepare_wrote_with_underscore_ids(tiny_phantom, tmp_path, capsys):
    names = {"train": ["image_1", "image_2"], "test": ["image_3", "image_4"]}   # ("case 1": the test above)
    argv = multilabel_argv(Context.of(tmp_path, tiny_phantom=tiny_phantom), names, False)
    code, err = run_script("prepare_visceral", argv, capsys)
    assert code == 0, err
    assert (tmp_path / "prep" / "train" / "image_1_image.npy").is_file()
    assert (tmp_path / "prep" / "volumes" / "gold" / "image_3.npz").is_file()
    assert run_script("check_dataset", [tmp_path / "prep"], capsys)[0] == 0


def test_the_readme_superpixels_example(tiny_phantom, tmp_path, capsys):
    """README's `--figure data/my_unlabeled/overlay.png --out data/my_unlabeled` (a figure inside the folder
    the run makes) works; check_dataset accepts the folder."""
    images = images_dir(Context.of(tmp_path, tiny_phantom=tiny_phantom))
    out = tmp_path / "unlabeled"
    code, err = run_script("make_superpixels", ["--images", images, "--out", out, "--size", "32",
                                                "--workers", "1",
                                                "--min-size", "20", "--figure", out / "overlay.png",
                                                "--figure-slices", "2"], capsys)
    assert code == 0, err
    assert (out / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "superpixels" / "image_1.npy").is_file()
    assert run_script("check_dataset", [out], capsys)[0] == 0


def test_check_dataset_accepts_zscored_slices_and_means_the_four_table_organs(tiny_prepared, tmp_path,
                                                                           capsys):
    from dataloaders.prepared import check_folder as check_prepared
    from evaluation.dataset_check import format_mask_copy, mask_copy_dice
    format_table = load_script("check_dataset").format_table
    code, out, err = script_output("check_dataset", [tiny_prepared], capsys)       # a per-class table
    assert code == 0 and err == "" and "liver" in out and "kidney_left" in out and "OK" in out
    report, index = check_prepared(tiny_prepared), json.loads((tiny_prepared / "index.json").read_text())
    rows = {row["index"]: row for row in report["rows"]}
    assert rows[1]["slices"] == len(index["slices"]["1"]) and "gold vol" in format_table(report)
    assert rows[1]["volumes"] == len({entry[0] for entry in index["slices"]["1"]})
    prep = Path(shutil.copytree(tiny_prepared, tmp_path / "prep"))
    as_zscore_folder(prep, "zscore")
    code, _, err = script_output("check_dataset", [prep], capsys)
    assert code == 0, err
    code, out, err = script_output("check_dataset", [tiny_prepared, "--mask-copy", "--preset", "alpnet"],
                                   capsys)
    assert code == 0, err
    labels = {}
    for path in sorted((tiny_prepared / "volumes" / "gold").glob("*.npz")):
        with np.load(path) as data:
            labels[path.stem] = data["label"]
    side = {organ: result["mean"] for organ, result in mask_copy_dice(labels, preset="alpnet").items()}
    four = [side["liver"], side["spleen"], (side["kidney_right"] + side["kidney_left"]) / 2,
            (side["psoas_right"] + side["psoas_left"]) / 2]
    mean_line = next(line for line in out.splitlines() if line.strip().startswith("mean "))
    assert all(np.isfinite(four)) and float(mean_line.split()[1]) == pytest.approx(np.mean(four), abs=5e-4)
    assert "preset alpnet" in out and "kidney, psoas: mean of right and left" in out
    assert "mean of the 4 organs liver, spleen, kidney, psoas" in out
    results = {"liver": {"mean": 0.5, "median": 0.5, "n": 2}, "spleen": {"mean": float("nan"), "median": 0,
                                                                         "n": 0},
               "kidney_right": {"mean": float("nan"), "median": 0, "n": 0},
               "kidney_left": {"mean": 0.3, "median": 0.3, "n": 2}}      # a table organ with one side scored
    text = format_mask_copy(results, "s", "inclusive")
    assert "liver 0.500, kidney 0.300" in text and "spleen 0" not in text.split("README table")[1]
    assert "0.400  (mean of the 2 organs liver, kidney" in text


def test_segment_masks_in_other_forms_give_the_binary_result(files, tmp_path, capsys):
    """A 0/255 float, soft 0/0.5 or LPS-stored mask, or a labelled mask with its label map (two forms) or a
    sidecar JSON: the same output bytes as the plain liver mask (doubtful input: WARNING_ROWS)."""
    c = Context.of(tmp_path, files=files)

    def run(name, **changes):
        argv = segment_argv(c, **{"--out": tmp_path / f"{name}.nii.gz", **changes})
        code, out, err = script_output("segment_volume", argv, capsys)
        assert code == 0, err
        return out, err, (tmp_path / f"{name}.nii.gz").read_bytes()

    reference = run("binary")[2]
    labelled = {"--support-mask": "ts_labels", "--support-label": "liver"}
    for name, changes in {"mask_255": {"--support-mask": "mask_255"}, "soft": {"--support-mask": "soft"},
                          "lps": {"--support-mask": "liver_lps"}, "ts_map": {**labelled,
                                                                             "--label-map": "ts_map"},
                          "name_map": {**labelled, "--label-map": "name_map"}}.items():
        out, err, written = run(name, **changes)
        assert written == reference, name
        if name == "soft":
            assert any("foreground = values >= 0.5" in line for line in warnings_in(err)), err
        if name.endswith("map"):
            assert "label 5 (liver" in out
    sidecar = files["ts_labels"].with_name("ts_labels.json")
    shutil.copyfile(files["ts_map"], sidecar)
    try:
        out, _, written = run("sidecar", **labelled)
    finally:
        sidecar.unlink()
    assert written == reference and "sidecar ts_labels.json" in out and "label 5 (liver" in out


def test_a_model_that_predicts_nothing_ends_with_a_warning(files, tiny_prepared, tmp_path, capsys):
    from evaluation.evaluate import evaluate
    from evaluation.segment import segment_volume
    capsys.readouterr()
    evaluate({"mask copy": None, "LSLPN": Threshold(float("inf"))}, ["liver"], tiny_prepared, input_size=32,
             device="cpu", progress=False, figures=False)
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and "LSLPN predicted no liver voxel in 2 of 2 query volumes" in lines[0], lines
    array, _ = segment_volume(Threshold(float("inf")), [(files["ct"], files["mask"])], files["ct"],
                              out=tmp_path / "e.nii.gz",
                              input_size=32, n_chunks=3, device="cpu", progress=False)
    err = capsys.readouterr().err
    assert not array.any() and (tmp_path / "e.nii.gz").exists()
    assert any("the output mask is empty" in line for line in warnings_in(err)), err


def test_non_hu_volumes_run_with_minmax_and_new_checkpoints_store_plain_data(files, tmp_path, capsys):
    """--intensity minmax handles a volume without HU explicitly (a warning names the override); a saved
    checkpoint holds plain data only (the RNG state as lists) and restores the RNG and the weights."""
    from models.checkpoint import model_from_checkpoint, save_checkpoint
    from util.device import get_rng_state, set_rng_state
    c = Context.of(tmp_path, files=files)
    argv = segment_argv(c, True, **{"--query": "uint16_raw", "--intensity": "minmax", "--query-range": "5:16",
                                    "--out": tmp_path / "ok.nii.gz"})
    code, _, err = script_output("segment_volume", argv, capsys)
    assert code == 0 and (tmp_path / "ok.nii.gz").exists(), err
    assert "run with {'mode': 'minmax'} as requested" in err
    state, config = weights()
    np.random.seed(5)
    snapshot = get_rng_state()
    expected = np.random.rand()
    save_checkpoint(str(tmp_path / "new.pth"), {"model": state, "model_config": config, "rng": [snapshot],
                                                "step": 3})
    raw = torch.load(tmp_path / "new.pth", weights_only=True)                    # plain data, no numpy needed
    assert isinstance(raw["rng"][0]["numpy"][1], list)
    set_rng_state(load_checkpoint(str(tmp_path / "new.pth"))["rng"][0])
    assert np.random.rand() == expected
    rebuilt, _ = model_from_checkpoint(str(tmp_path / "new.pth"))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), state.values()))


def test_query_range_transfer_by_physical_z_and_coverage(files, tmp_path, capsys):
    c = Context.of(tmp_path, files=files)
    common = dict(supports=[(files["support"], files["support_mask"])], device="cpu", progress=False,
                  input_size=24, n_chunks=3)
    from evaluation.segment import segment_volume
    crop = save(tmp_path / "crop.nii.gz", files["support_array"][:, :, 4:18], crop_affine())
    capsys.readouterr()
    segment_volume(Threshold(), query=crop, **common)                  # a crop of the support's own scan
    out = capsys.readouterr().out
    assert "query range 2:10" in out and "physical z position" in out          # organ 6..13 -> 2..9
    longer = np.concatenate([files["query_array"], files["query_array"][:, :, -3:]], axis=2)   # 23 slices
    segment_volume(Threshold(), query=save(tmp_path / "longer.nii.gz", longer), **common)
    err = capsys.readouterr().err
    assert "115 mm axially" in err and "may be shifted" in err          # 10-25% apart: a warning
    segment_volume(Threshold(), query=files["query"], **common)        # same coverage: silently
    captured = capsys.readouterr()
    assert "relative body position" in captured.out and "warning" not in captured.err
    array, _ = segment_volume(Threshold(), query=mr_files(c)["mr"], intensity="zscore", query_range="7:15",
                              **common)
    assert not array[..., :7].any() and not array[..., 15:].any()


def test_a_query_range_shorter_than_n_chunks_pairs_each_slice_with_the_chunk_covering_it(files):
    from evaluation.protocols import chunk_plan
    from evaluation.segment import Support, segment_plan, segment_volume

    def support(first, last):
        return Support(image=np.zeros((2, 2, 30), np.float32), mask=np.zeros((2, 2, 30), bool),
                       annotated=np.arange(first, last + 1), name=f"s{first}")
    # support 0..23, 12 chunks: chunk i's support slice is floor((i + 0.5) * 2) = 2i + 1. Query 10..12:
    # slice j covers [j/3, (j+1)/3) of the range, its centre lies in chunk floor((j + 0.5) * 4) = 2, 6,
    # 10 -> support slices 5, 13, 21
    plan = segment_plan([support(0, 23)], (10, 12), 12)
    assert [(int(s[0]), z.tolist()) for s, z in plan] == [(5, [10]), (13, [11]), (21, [12])]
    assert [(int(s[0]), z.tolist()) for s, z in segment_plan([support(0, 23)], (7, 7), 12)] == [(13, [7])]
    plan = segment_plan([support(0, 23), support(10, 21)], (0, 2), 12)   # the second: 10 + i -> 12, 16, 20
    assert [s.tolist() for s, _ in plan] == [[5, 12], [13, 16], [21, 20]]
    long = segment_plan([support(0, 23)], (0, 12), 12)                  # >= n_chunks slices: the protocol's
    assert [(s.tolist(), z.tolist()) for s, z in long] == [(s.tolist(), z.tolist())
                                                           for s, z in chunk_plan([(0, 23)], (0, 12), 12)]
    model = Threshold()
    array, _ = segment_volume(model, [(files["support"], files["support_mask"])], files["query"],
                              query_range="8:10",
                              n_chunks=12, device="cpu", progress=False, input_size=24,
                              intensity="window:-125,275")
    assert not array[..., :8].any() and not array[..., 10:].any() and array[..., 8:10].any()
    assert sum(len(batch) for batch in model.seen) == 2                          # one chunk per query slice


def test_zscore_uses_whole_volume_statistics_whatever_the_batches():
    from dataloaders.transforms import scale_intensity
    from evaluation.inference import run_chunks
    volume = np.random.default_rng(0).uniform(0, 1300, size=(8, 8, 6))        # X x Y x Z
    mean = sum(volume.flat) / volume.size
    std = (sum((v - mean) ** 2 for v in volume.flat) / volume.size) ** 0.5
    slow = np.empty_like(volume)
    for index in np.ndindex(volume.shape):
        slow[index] = (volume[index] - mean) / std
    stacked = scale_intensity(np.moveaxis(volume, 2, 0), {"mode": "zscore"})              # Z x X x Y
    assert np.allclose(stacked, np.moveaxis(slow, 2, 0), atol=1e-5)
    resolved = volume_intensity(volume, {"mode": "zscore"})
    assert np.allclose(scale_intensity(volume[:, :, 2], resolved), slow[:, :, 2], atol=1e-5)   # one slice
    for batch in (1, 4):
        model = Threshold()
        run_chunks(model, [(volume, volume > 650)], [(np.array([2]), np.arange(6))], volume, 8,
                   {"mode": "zscore"}, "cpu", batch)
        assert np.allclose(torch.cat(model.seen).numpy(), np.moveaxis(slow, 2, 0), atol=1e-4), batch


def test_synthetic_mr_las_float64_thick_slices_round_trip(tmp_path):
    from evaluation.segment import segment_volume
    rng = np.random.default_rng(3)
    canonical = np.zeros((32, 32, 12))                                          # R A S
    canonical[4:28, 4:28] = 300 + rng.normal(0, 10, (24, 24, 12))
    labels = np.zeros(canonical.shape, np.float64)
    labels[6:12, 8:20, 3:9] = 3                                                 # organ on the patient's right
    canonical[labels == 3] = 900
    affine = np.diag([-1.25, 1.25, 7.7, 1.0])                                   # stored LAS: x flipped
    affine[0, 3] = 31 * 1.25
    stored, stored_labels = canonical[::-1].copy(), labels[::-1].copy()
    image, mask = save(tmp_path / "mr.nii.gz", stored, affine), save(tmp_path / "labels.nii.gz",
                                                                     stored_labels, affine)
    array, written = segment_volume(Threshold(1.5), [(image, mask)], image, support_label=3,
                                    query_range="2:10",
                                    intensity="zscore", device="cpu", progress=False, input_size=32,
                                    n_chunks=3)
    assert nib.aff2axcodes(written.affine) == ("L", "A", "S") and array.shape == stored.shape
    expected = stored_labels == 3                                        # z-score of 900: far above 1.5
    expected[..., :2] = expected[..., 10:] = False
    assert np.array_equal(array.astype(bool), expected)


def test_test_py_evaluation_of_mr_volumes_in_the_ssl_alpnet_layout(tmp_path):
    """evaluate() on z-scored MR volumes held in SSL-ALPNet's Y x X x Z order ('as stored'): the per-volume
    statistics reach the model, and predictions are written on the file's grid."""
    from dataloaders.prepare import save_npz_deterministic
    from evaluation.evaluate import evaluate
    prep = tmp_path / "prep"
    (prep / "volumes" / "gold").mkdir(parents=True)
    (prep / "meta.json").write_text('{"format_version": 1, "intensity": {"mode": "zscore"}, "prep_size": 32}')
    affine = np.diag([-1.25, 1.25, 7.7, 1.0])                                  # LAS, 7.7 mm slices
    file_labels = {}
    for pid, shift in (("1", 0), ("2", 3)):
        label = np.zeros((32, 28, 10), np.uint8)                               # X x Y x Z of the file
        label[4 + shift:20 + shift, 6:22, 2:8] = 1                             # liver, 256 voxels a slice
        noise = np.random.default_rng(int(pid)).normal(0, 10, label.shape)
        image = np.where(label == 1, 900.0, 300.0) + noise
        file_labels[pid] = label.astype(bool)
        save_npz_deterministic(prep / "volumes" / "gold" / f"{pid}.npz", {
            "image": image.transpose(1, 0, 2).astype(np.float32), "label": label.transpose(1, 0, 2),
            "affine": affine, "original_affine": affine, "original_shape": np.asarray(label.shape),
            "original_axcodes": np.asarray("as stored"), "spacing": np.array([1.25, 1.25, 7.7])})
    model = Threshold(1.5)                                                     # z-score of 900 among 300s: ~2
    results = evaluate({"mask copy": None, "LSLPN": model}, ["liver"], prep, preset="inclusive",
                       out_dir=tmp_path / "out", support="1", input_size=32, device="cpu", progress=False,
                       figures=False)
    assert results["table"]["range"]["LSLPN"]["liver"] == pytest.approx(100.0)
    seen = torch.cat(model.seen)
    assert seen.max() > 1.5 and seen.min() < 0                                 # z-scored, not [0, 1]
    written = nib.load(str(tmp_path / "out" / "predictions" / "lslpn" / "2_liver.nii.gz"))
    assert written.shape == (32, 28, 10) and np.allclose(written.affine, affine)
    assert np.array_equal(np.asarray(written.dataobj).astype(bool), file_labels["2"])


def test_output_checks_accept_new_outputs_and_name_write_failures(tmp_path):
    from util.io import check_output_file, check_output_folder, check_writable_folder, output_error_message
    ct = made(tmp_path / "q.nii.gz", "ct")
    before = sorted(os.listdir(tmp_path))
    assert check_output_file(tmp_path / "mask.nii.gz", inputs=[ct],
                             suffixes=(".nii.gz",)) == tmp_path / "mask.nii.gz"
    assert sorted(os.listdir(tmp_path)) == before                         # the write probe is removed
    assert check_output_folder(tmp_path / "new" / "prep", inputs=[ct]) == tmp_path / "new" / "prep"
    assert check_writable_folder(tmp_path / "new" / "runs", "path.log_dir") == tmp_path / "new" / "runs"
    assert not (tmp_path / "new").exists()                                 # checking creates nothing
    for code, words in ((errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"), (errno.EFBIG,
                                                                                     "size limit")):
        message = output_error_message(OSError(code, os.strerror(code), "out.nii.gz"))
        assert words in message and "out.nii.gz" in message and "\n" not in message
    assert output_error_message(OSError(errno.ENOENT, "x")) is None          # not a write failure: a bug


# ====================================================================== real processes, full disks, kills
def test_real_processes_one_line_without_traceback_and_debug_shows_it(tiny_prepared, tmp_path):
    """The process contract: exit 2, one 'error:' line, no traceback and no library warning (test.py and the
    scripts end the same way: config.run_sacred, util.cli.run_cli); --debug lets the UserError through."""
    from util.cli import run_cli
    with pytest.raises(UserError, match="folder not found"):
        run_cli(load_script("check_dataset").main, [str(tmp_path / "absent"), "--debug"])
    done = train_cli("fold=1.0", log_dir=tmp_path / "runs", prep_dir=tiny_prepared)
    assert_one_line_error(done.returncode, done.stderr, "fold = 1.0: must be an integer")
    assert not (tmp_path / "runs").exists()


# Each (entry, argv, file size limit) in one process: beyond the limit a write fails with EFBIG, as a full
# disk fails with ENOSPC (Python ignores SIGXFSZ); the limit is lifted again between entries.
DISK_FULL_DRIVER = textwrap.dedent("""
    import contextlib, importlib.util, io, json, resource, sys, traceback
    import train
    from config import run_sacred
    from util.cli import run_cli
    hard, results = resource.getrlimit(resource.RLIMIT_FSIZE)[1], []
    for entry, argv, limit in json.loads(sys.argv[1]):
        if entry != "train.py":
            spec = importlib.util.spec_from_file_location(entry, f"scripts/{entry}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        err, code = io.StringIO(), None
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                run_sacred(train.ex, argv) if entry == "train.py" else run_cli(module.main, argv)
            except SystemExit as stop:
                code = stop.code
            except BaseException:
                traceback.print_exc()
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        results.append({"code": code, "err": err.getvalue()})
    print("RESULTS" + json.dumps(results))
""")


def test_disk_full_mid_write_is_one_line_and_leaves_no_partial_output(files, tiny_prepared, tmp_path):
    c = Context.of(tmp_path / "segment_volume", files=files)
    train = ["train.py", "with", "tiny", "device=cpu", f"path.data_dir={tiny_prepared}", "n_steps=2",
             f"path.log_dir={tmp_path / 'train.py'}", "save_every=2", "val_every=0", "name=full"]
    cases = [("segment_volume", segment_argv(c), 600),
             ("make_phantom", ["--out", str(tmp_path / "make_phantom" / "ph"), *PHANTOM_ARGS], 600),
             ("train.py", train, 60_000)]             # Sacred's small records fit, the checkpoint does not
    for entry, _, _ in cases:
        (tmp_path / entry).mkdir()
    done = subprocess.run([sys.executable, "-c", DISK_FULL_DRIVER, json.dumps(cases)], cwd=ROOT, timeout=600,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert "RESULTS" in done.stdout, done.stderr[-3000:]
    for (entry, _, _), result in zip(cases, json.loads(done.stdout.split("RESULTS", 1)[1])):
        err = result["err"]
        errors = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
        assert result["code"] == 2 and "Traceback" not in err, (entry, err[-2000:])
        assert len(errors) == 1 and "writing failed (the file size limit was reached)" in errors[0], errors
        left = [name for name in tree(tmp_path / entry) if "_sources" not in name]
        assert left in ([], ["full"]), entry   # no partial file, no .tmp-<pid>, .partial, FAILED run record


def wait_for(predicate, proc, timeout: float = 240.0) -> bool:
    """Poll `predicate` until true, `proc` exits or `timeout`; returns predicate()."""
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return predicate()


def kill(proc) -> bool:
    """SIGKILL `proc`; True when it was still running (the kill interrupted it)."""
    running = proc.poll() is None
    if running:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return running


def test_training_killed_at_a_random_moment_resumes_to_identical_weights(tmp_path, tiny_prepared):
    """Killed anywhere (possibly inside a checkpoint write), resumed with resume=True: the weights of an
    uninterrupted run. The random moment comes from a seed printed in the messages."""
    rng = random.Random(SEED)
    settings = ["n_steps=6", "save_every=1", "val_every=0", "print_every=1"]
    log_dir = tmp_path / "killed"
    # each step pauses 0.3 s after its checkpoint, so the 5 later steps outlast the random delay below
    proc = train_cli(*settings, log_dir=log_dir, prep_dir=tiny_prepared, popen=True, pause_after_save=0.3)
    pattern = str(log_dir / "*" / "1" / "last.pth")
    assert wait_for(lambda: glob.glob(pattern), proc), f"seed {SEED}: no checkpoint before the run ended"
    time.sleep(rng.uniform(0.0, 1.2))
    interrupted = kill(proc)
    killed = load_checkpoint(glob.glob(pattern)[0])           # never truncated: atomic replace
    assert 1 <= killed["step"] <= 6, SEED
    ref, resumed = train_then_resume(tmp_path / "ref", log_dir, tiny_prepared, *settings)
    assert ref["code"] == 0 and resumed["code"] == 0, ref["err"][-2000:] + resumed["err"][-2000:]
    reference = load_checkpoint(glob.glob(str(tmp_path / "ref" / "*" / "1" / "last.pth"))[0])
    runs = sorted(glob.glob(str(log_dir / "*" / "*" / "last.pth")),
                  key=lambda path: int(Path(path).parent.name))
    final = load_checkpoint(runs[-1])                         # the resumed run (or run 1 if it had finished)
    message = f"seed {SEED}: killed at step {killed['step']} (interrupted: {interrupted})"
    assert final["step"] == reference["step"] == 6, message
    assert final["model"].keys() == reference["model"].keys(), message
    assert all(torch.equal(final["model"][k], reference["model"][k]) for k in reference["model"]), message


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_prepare_leaves_the_old_output_or_none_never_a_partial_one(tiny_phantom, tmp_path):
    """prepare_visceral killed at a random moment over an old output (--overwrite) and with none: PREP is
    the old folder, absent, or complete; the next run cleans the dead run's .partial-<pid> folder."""
    from dataloaders.prepare import Selection, prepare_dataset
    from dataloaders.prepared import check_folder as check_prepared
    rng = random.Random(SEED + 1)
    old_out, new_out = tmp_path / "old" / "prep", tmp_path / "new" / "prep"
    prepare_dataset(tiny_phantom, old_out, size=32, n_val=1, rule=Selection(min_voxels=5), workers=1)
    old = snapshot(old_out)
    for out, extra in ((old_out, ["--overwrite"]), (new_out, [])):
        out.parent.mkdir(exist_ok=True)
        proc = subprocess.Popen([sys.executable, "scripts/prepare_visceral.py", "--visceral-dir",
                                 str(tiny_phantom),
                                 "--out", str(out), "--size", "48", "--n-val", "1", "--min-voxels", "5",
                                 "--workers", "1", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        wait_for(lambda: any(p.name.startswith("prep.partial-") for p in out.parent.iterdir()), proc)
        time.sleep(rng.uniform(0.0, 0.8))
        message = f"seed {SEED}: {out} (interrupted: {kill(proc)})"
        if out.exists() and snapshot(out) != old:
            assert check_prepared(out)["prep_size"] == 48, message      # complete new folder
        elif not out.exists() and out == old_out:   # killed between the two renames: restored next run
            assert any(p.name.startswith("prep.old-") for p in out.parent.iterdir()), message
        prepare_dataset(tiny_phantom, out, size=48, n_val=1, rule=Selection(min_voxels=5), workers=1,
                        overwrite=True)
        assert sorted(p.name for p in out.parent.iterdir()) == ["prep"], message
        assert check_prepared(out)["prep_size"] == 48


SLOW_WRITE_DRIVER = textwrap.dedent("""
    import pathlib, runpy, time
    original = pathlib.Path.write_bytes
    def slow_write_bytes(self, data):
        if ".tmp-" not in self.name:
            return original(self, data)
        with open(self, "wb") as handle:                 # half the file, then a long pause
            handle.write(data[: len(data) // 2])
            handle.flush()
            print("HALF-WRITTEN", flush=True)
            time.sleep(120)
            handle.write(data[len(data) // 2:])
        return len(data)
    pathlib.Path.write_bytes = slow_write_bytes
    runpy.run_path("scripts/segment_volume.py", run_name="__main__")
""")


def test_segment_killed_while_writing_keeps_the_old_output(files, tmp_path):
    c = Context.of(tmp_path, files=files)
    out = made(tmp_path / "out") / "pred.nii.gz"
    out.write_bytes(b"old prediction")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE_DRIVER, *segment_argv(c, **{"--out": out})],
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()                          # blocks until the write is half done
    while line.startswith("support organ:"):               # segment_volume's line on the label and range used
        line = proc.stdout.readline()
    assert line.strip() == "HALF-WRITTEN", proc.stderr.read()[-2000:]
    temporaries = [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0
    assert kill(proc)
    assert out.read_bytes() == b"old prediction"            # the output path never held a partial file


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
