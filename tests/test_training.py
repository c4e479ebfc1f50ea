"""Training: config checks, checkpoints, the train.py entry point, and bitwise resume after kill -9.

train.py runs in subprocesses (the `tiny` named config on a tiny prepared folder), so its Sacred
config hook never touches other tests' in-process experiment.
"""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_episodes import make_train_prep
from models.checkpoint import check_compatible, load_checkpoint, load_model_state, save_checkpoint
from training.config_check import check_config
from util.errors import UserError
from training.loop import PAUSE_ENV, config_hash, run_name

ROOT = Path(__file__).resolve().parents[1]


def resolve(named=("tiny",), **updates) -> dict:
    """The resolved Sacred config of config.py, without running anything."""
    from sacred.initialize import create_run

    from config import ex
    return dict(create_run(ex, "print_config", config_updates=updates, named_configs=list(named)).config)


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_train_prep(tmp_path_factory.mktemp("training"))


def train_cli(*overrides, log_dir, prep_dir, env=None, popen=False):
    """Run `python train.py with tiny device=cpu ...` in a subprocess."""
    cmd = [sys.executable, "train.py", "with", "tiny", "device=cpu", f"path.data_dir={prep_dir}",
           f"path.log_dir={log_dir}", *overrides]
    full_env = dict(os.environ, **(env or {}))
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------- config checks
@pytest.mark.parametrize("updates, key", [
    ({"model": {"n_grid": 0}}, "model.n_grid"), ({"lr": -0.1}, "lr"), ({"batch_size": 0}, "batch_size"),
    ({"n_steps": 0}, "n_steps"), ({"fold": 4}, "fold"), ({"model": {"encoder": "resnet18"}}, "model.encoder"),
    ({"model": {"vote": "median"}}, "model.vote"), ({"model": {"resolution": "half"}}, "model.resolution"),
    ({"class_setting": "some"}, "class_setting"), ({"augment": {"p": 2.0}}, "augment.p"),
    ({"augment": {"p": 0.5, "gamma": [2.0, 0.5]}}, "augment.gamma"), ({"lr_milestones": [5, 2]}, "lr_milestones"),
    ({"momentum": 1.5}, "momentum"), ({"n_shots": 0}, "n_shots"), ({"label_sets": [["liver"]]}, "label_sets"),
    ({"path": {"init_path": "/nonexistent/vgg16.pth"}}, "path.init_path"), ({"device": "tpu"}, "device"),
    ({"name": "a/b"}, "name"),
])
def test_config_out_of_range_is_one_clear_line(prep, updates, key):
    path = {"data_dir": str(prep), **updates.pop("path", {})}
    config = resolve(**updates, path=path)
    with pytest.raises(UserError) as error:
        check_config(config, "train")
    message = str(error.value)
    assert key in message and "\n" not in message


def test_tiny_config_on_prepared_data_passes(prep):
    check_config(resolve(path={"data_dir": str(prep)}), "train")


def test_missing_or_unprepared_data_names_the_prepare_command(tmp_path):
    for data_dir in (tmp_path / "absent", tmp_path):
        with pytest.raises(UserError, match=r"scripts/prepare_visceral\.py"):
            check_config(resolve(path={"data_dir": str(data_dir)}), "train")


def test_fold_without_training_slices_and_missing_val_volumes(tmp_path):
    only_liver = make_train_prep(tmp_path / "liver", classes=(1,))
    with pytest.raises(UserError, match="fold 0 .*training classes"):
        check_config(resolve(class_setting="six_organs", fold=0, path={"data_dir": str(only_liver)}), "train")
    check_config(resolve(class_setting="six_organs", fold=1, path={"data_dir": str(only_liver)}), "train")
    no_val = make_train_prep(tmp_path / "noval", val_pids=())
    with pytest.raises(UserError, match="val_every=0"):
        check_config(resolve(path={"data_dir": str(no_val)}), "train")
    check_config(resolve(val_every=0, path={"data_dir": str(no_val)}), "train")


def test_config_hash_ignores_bookkeeping_keys_only():
    base = resolve()
    assert config_hash(base) == config_hash(resolve(n_steps=99, resume=True, save_every=7, val_every=0,
                                                    path={"log_dir": "elsewhere"}, eval={"batch_size": 3}))
    assert config_hash(base) != config_hash(resolve(lr=0.5))
    assert config_hash(base) != config_hash(resolve(model={"n_grid": 4}))
    assert run_name(base) == "lslpn_all_structures_fold0"
    assert run_name(resolve(named=("tiny", "panet"), fold=2)) == "panet_all_structures_fold2"


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_save_is_atomic_and_loads_back(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    save_checkpoint(str(path), {"model": {"w": torch.arange(3.0)}, "config": {"encoder": "cnn_small"}, "step": 4})
    assert load_checkpoint(str(path))["step"] == 4
    assert os.listdir(path.parent) == ["last.pth"]
    with pytest.raises(Exception):
        save_checkpoint(str(path), {"model": {}, "config": {}, "bad": lambda: 0})  # unpicklable
    assert os.listdir(path.parent) == ["last.pth"] and load_checkpoint(str(path))["step"] == 4


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "none.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(str(tmp_path / "bad.pth"))
    stored = {"encoder": "cnn_small", "n_grid": 8, "vote": "max"}
    with pytest.raises(UserError, match="n_grid: 8 in the snapshot vs 4 requested"):
        check_compatible(stored, dict(stored, n_grid=4), "x.pth")
    check_compatible(stored, dict(stored, vote="mean"), "x.pth", strict=False)
    with pytest.raises(UserError, match="encoder"):
        check_compatible(stored, dict(stored, encoder="vgg16"), "x.pth", strict=False)


def test_snapshot_of_another_encoder_is_refused(tmp_path):
    from models.fewshot import FewShotSegNet
    small = FewShotSegNet.from_config({"encoder": "cnn_small", "n_grid": 2}, None)
    save_checkpoint(str(tmp_path / "s.pth"), {"model": small.state_dict(), "config": small.config})
    other = FewShotSegNet.from_config({"encoder": "cnn_small", "n_grid": 4}, None)
    with pytest.raises(UserError, match="n_grid"):
        load_model_state(other, str(tmp_path / "s.pth"), other.config)
    load_model_state(other, str(tmp_path / "s.pth"), other.config, strict=False)  # same weights: loads


# ------------------------------------------------------------------------------- train.py runs
def test_bad_config_on_the_command_line_fails_before_any_run(tmp_path, prep):
    result = train_cli("model.n_grid=0", log_dir=tmp_path / "runs", prep_dir=prep)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.n_grid" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()
    result = train_cli(log_dir=tmp_path / "runs", prep_dir=tmp_path / "nothing")
    assert result.returncode == 2 and "prepare_visceral.py" in result.stderr


def _state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_to_bitwise_identical_weights(tmp_path, prep):
    # Uninterrupted reference run.
    ref = train_cli(log_dir=tmp_path / "ref", prep_dir=prep)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_dir = tmp_path / "ref" / "lslpn_all_structures_fold0" / "1"
    for name in ("config.json", "run.json", "metrics.json", "last.pth", "best.pth"):
        assert (ref_dir / name).is_file(), name
    info = json.loads((ref_dir / "info.json").read_text())
    assert info["config_hash"] and "git_commit" in info
    assert any(dep.startswith("torch==") for dep in json.loads((ref_dir / "run.json").read_text())
               ["experiment"]["dependencies"])
    metrics = json.loads((ref_dir / "metrics.json").read_text())
    assert metrics["loss"]["steps"] == [1, 2, 3, 4, 5, 6] and metrics["val_dice"]["steps"] == [3, 6]

    # The same run, killed with SIGKILL right after its step-2 checkpoint, then resumed.
    log_dir = tmp_path / "killed"
    proc = train_cli(log_dir=log_dir, prep_dir=prep, env={PAUSE_ENV: "120"}, popen=True)
    deadline = time.time() + 120
    pattern = str(log_dir / "*" / "*" / "last.pth")
    while not glob.glob(pattern) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_dir = log_dir / "lslpn_all_structures_fold0" / "1"
    assert load_checkpoint(str(killed_dir / "last.pth"))["step"] == 2
    assert not glob.glob(str(killed_dir / "*.tmp-*"))

    resumed = train_cli("resume=True", log_dir=log_dir, prep_dir=prep)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing" in resumed.stdout and "at step 2" in resumed.stdout
    final = load_checkpoint(str(log_dir / "lslpn_all_structures_fold0" / "2" / "last.pth"))
    reference = load_checkpoint(str(ref_dir / "last.pth"))
    assert final["step"] == reference["step"] == 6
    assert _state_dicts_equal(final["model"], reference["model"])
    assert final["best_dice"] == reference["best_dice"]
    momentum = [s["momentum_buffer"] for s in final["optimizer"]["state"].values()]
    ref_momentum = [s["momentum_buffer"] for s in reference["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, ref_momentum))


# --------------------------------------------------------------------------------------- devices
def test_device_resolution_and_amp(monkeypatch):
    from util import device as dev
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU"):
        dev.resolve_device("cuda")
    with pytest.raises(UserError, match="unknown"):
        dev.resolve_device("gpu")
    assert dev.amp_dtype(torch.device("cpu"), True) is None and dev.make_grad_scaler(torch.device("cpu"), True) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("auto", local_rank=3) == torch.device("cuda", 1)   # rank -> its GPU
    assert dev.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.amp_dtype(torch.device("cuda", 0), True) == torch.bfloat16
    assert dev.amp_dtype(torch.device("cuda", 0), False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.amp_dtype(torch.device("cuda", 0), True) == torch.float16


def test_rng_state_round_trip():
    from util.device import get_rng_state, seed_everything, set_rng_state
    seed_everything(5)
    state = get_rng_state()
    first = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
