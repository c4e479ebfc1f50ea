"""Training: config checks, checkpoints, the train.py entry point, and bitwise resume after kill -9.

train.py runs in subprocesses (the `tiny` named config on a tiny prepared folder), so its Sacred
config hook never touches other tests' in-process experiment.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_episodes import make_train_prep

from config import default_config
from models.checkpoint import check_compatible, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.config_check import check_config
from training.loop import config_hash, run_name
from util.device import Distributed
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def resolve(named=("tiny",), **updates) -> dict:
    """The resolved Sacred config of config.py, without running anything."""
    from sacred.initialize import create_run

    from config import ex
    return dict(create_run(ex, "print_config", config_updates=updates, named_configs=list(named)).config)


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_train_prep(tmp_path_factory.mktemp("training"))


# train.py with models.checkpoint.save_checkpoint patched (before anything imports it) to sleep after
# each last.pth write, so a test can kill the process at a known step.
PAUSED_SAVE_DRIVER = textwrap.dedent("""
    import runpy, sys, time
    import models.checkpoint as checkpoint
    pause, original = float(sys.argv.pop(1)), checkpoint.save_checkpoint
    def save_then_pause(path, state):
        original(path, state)
        if str(path).endswith("last.pth"):
            time.sleep(pause)
    checkpoint.save_checkpoint = save_then_pause
    sys.argv[0] = "train.py"
    runpy.run_path("train.py", run_name="__main__")
""")


def train_cli(*overrides, log_dir, prep_dir, env=None, popen=False, pause_after_save: float | None = None):
    """Run `python train.py with tiny device=cpu ...` in a subprocess (pausing `pause_after_save`
    seconds after every last.pth write when given)."""
    launcher = [sys.executable, "train.py"] if pause_after_save is None else \
        [sys.executable, "-c", PAUSED_SAVE_DRIVER, str(pause_after_save)]
    cmd = [*launcher, "with", "tiny", "device=cpu", f"path.data_dir={prep_dir}", f"path.log_dir={log_dir}",
           *overrides]
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
    ({"augment": {"p": 0.5, "gamma": [2.0, 0.5]}}, "augment.gamma"), ({"lr_milestones": [5, 2]},
                                                                      "lr_milestones"),
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
    def digest(config):
        return config_hash(config, default_config())
    assert digest(base) == digest(resolve(n_steps=99, resume=True, save_every=7, val_every=0,
                                          path={"log_dir": "elsewhere"}, eval={"batch_size": 3}))
    assert digest(base) != digest(resolve(lr=0.5))
    assert digest(base) != digest(resolve(model={"n_grid": 4}))
    assert run_name(base) == "lslpn_all_structures_fold0"
    assert run_name(resolve(named=("tiny", "panet"), fold=2)) == "panet_all_structures_fold2"


def test_run_folder_walker(tmp_path):
    from training.loop import finished_snapshot, iter_runs, latest_run
    for name, run_id in (("b", "10"), ("b", "2"), ("b", "1"), ("a", "3")):
        (tmp_path / name / run_id).mkdir(parents=True)
    (tmp_path / "b" / "_sources").mkdir()                     # Sacred's own folder: not a run
    (tmp_path / "b" / "7").write_text("a file, not a run")
    assert [p.name for p in iter_runs(tmp_path, "b")] == ["1", "2", "10"]   # numeric, not text order
    assert list(iter_runs(tmp_path, "absent")) == [] and latest_run(tmp_path / "none", "b") is None
    assert latest_run(tmp_path, "b").name == "10"
    assert latest_run(tmp_path, "b", accept=lambda run: run.name != "10").name == "2"
    for run_id, step, digest in (("1", 6, "old"), ("2", 6, "new"), ("10", 3, "new")):   # 10: unfinished
        for file in ("last.pth", "best.pth"):
            save_checkpoint(str(tmp_path / "b" / run_id / file), {"model": {}, "model_config": {},
                                                                   "step": step, "config_hash": digest})
    assert finished_snapshot(tmp_path, "b", 6, "best.pth", "new") == tmp_path / "b" / "2" / "best.pth"
    oldest = finished_snapshot(tmp_path, "b", 6, "last.pth", wanted_hash="old")
    assert oldest == tmp_path / "b" / "1" / "last.pth"
    assert finished_snapshot(tmp_path, "b", 7, "best.pth", "new") is None


def write_run(log_dir: Path, name: str, run_id: int, config: dict) -> Path:
    """A run folder as train.py leaves it: config.json and a last.pth (content unread here)."""
    run_dir = log_dir / name / str(run_id)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config, default=str))
    (run_dir / "last.pth").write_bytes(b"not read")
    return run_dir


def test_resume_continues_across_harmless_keys_only(tmp_path, prep):
    """Decision: keys outside the config hash (n_steps, frequencies, device, eval.*, ...) may change on
    resume; any other key (lr, seed, model.*, data) means another run, and the line says which keys."""
    from training.loop import config_mismatch, find_resume_checkpoint
    base = resolve(path={"data_dir": str(prep), "log_dir": str(tmp_path)})
    name = run_name(base)
    run_dir = write_run(tmp_path, name, 1, base)
    extended = resolve(n_steps=60, val_every=5, print_every=1, device="cpu", eval={"batch_size": 2},
                       path={"data_dir": str(prep), "log_dir": str(tmp_path)})
    defaults = default_config()
    assert find_resume_checkpoint(str(tmp_path), name, config_hash(extended, defaults), defaults) == \
        str(run_dir / "last.pth")
    changed = resolve(lr=0.5, seed=3, model={"n_grid": 4},
                      path={"data_dir": str(prep), "log_dir": str(tmp_path)})
    assert find_resume_checkpoint(str(tmp_path), name, config_hash(changed, defaults), defaults) is None
    line = config_mismatch(changed, str(tmp_path), name, defaults)
    assert "\n" not in line and str(run_dir) in line and "starting a new run at step 0" in line
    assert "lr: 0.01 -> 0.5" in line and "model.n_grid: 8 -> 4" in line and "seed: " in line
    assert "n_steps" not in line


def test_resume_after_a_config_change_says_so_and_starts_a_new_run(tmp_path, prep, capsys):
    from training.loop import train
    paths = {"data_dir": str(prep), "log_dir": str(tmp_path)}
    write_run(tmp_path, "lslpn_all_structures_fold0", 1, resolve(lr=0.5, path=paths))
    summary = train(resolve(resume=True, n_steps=1, val_every=0, path=paths), None, defaults=default_config())
    out = capsys.readouterr().out
    assert "resume: the config differs from the latest run" in out and "lr: 0.5 -> 0.01" in out
    assert "continuing" not in out and summary["steps"] == 1


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_save_is_atomic_and_loads_back(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    save_checkpoint(str(path), {"model": {"w": torch.arange(3.0)}, "model_config": {"encoder": "cnn_small"},
                                "step": 4})
    assert load_checkpoint(str(path))["step"] == 4
    assert os.listdir(path.parent) == ["last.pth"]
    with pytest.raises(Exception):
        save_checkpoint(str(path), {"model": {}, "model_config": {}, "bad": lambda: 0})  # unpicklable
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
    with pytest.raises(UserError, match="encoder"):
        check_compatible(stored, dict(stored, encoder="vgg16"), "x.pth")


def test_snapshot_of_another_encoder_is_refused(tmp_path):
    from models.fewshot import FewShotSegNet
    small = FewShotSegNet.from_config({"encoder": "cnn_small", "n_grid": 2}, None)
    save_checkpoint(str(tmp_path / "s.pth"), {"model": small.state_dict(), "model_config": small.config})
    other = FewShotSegNet.from_config({"encoder": "cnn_small", "n_grid": 4}, None)
    loaded, state = model_from_checkpoint(str(tmp_path / "s.pth"))
    with pytest.raises(UserError, match="n_grid"):
        check_compatible(state["model_config"], other.config, str(tmp_path / "s.pth"))
    other.load_state_dict(loaded.state_dict())                                   # same weights: loads


# ------------------------------------------------------------------------------- train.py runs
@pytest.fixture(scope="module")
def cli_runs(prep, tmp_path_factory) -> dict:
    """The train.py commands of the two tests below, in one process one after the other
    (conftest.run_sacred_cases: train.py's run_sacred once per command, stdout/stderr captured; the
    real `python train.py` process contract is test_errors.test_real_processes_*):
    {name: ({code, out, err}, its log_dir)}."""
    from conftest import run_sacred_cases
    roots = {name: tmp_path_factory.mktemp(name) for name in ("bad_grid", "no_data", "diverging")}
    commands = {
        "bad_grid": [f"path.data_dir={prep}", "model.n_grid=0", f"path.log_dir={roots['bad_grid'] / 'runs'}"],
        "no_data": [f"path.data_dir={roots['no_data'] / 'nothing'}",
                    f"path.log_dir={roots['no_data'] / 'runs'}"],
        "diverging": [f"path.data_dir={prep}", f"path.log_dir={roots['diverging']}", "lr=1e6", "n_steps=8",
                      "save_every=1", "val_every=0", "print_every=1"]}
    results = run_sacred_cases("train", [["tiny", "device=cpu", *words] for words in commands.values()])
    return {name: (result, roots[name]) for name, result in zip(commands, results)}


def test_bad_config_on_the_command_line_fails_before_any_run(cli_runs):
    result, root = cli_runs["bad_grid"]
    assert result["code"] == 2
    lines = [line for line in result["err"].splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.n_grid" in lines[0]
    assert "Traceback" not in result["err"] and not (root / "runs").exists()
    no_data, root = cli_runs["no_data"]
    assert no_data["code"] == 2 and "prepare_visceral.py" in no_data["err"] and not (root / "runs").exists()


def _state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_then_resume(reference_log_dir, resumed_log_dir, prep_dir, *overrides) -> tuple[dict, dict]:
    """An uninterrupted reference run and the resume (resume=True) of a killed run, both `train.py with
    tiny device=cpu ...`, in one process one after the other (conftest.run_sacred_cases:
    train.py's run_sacred once per command); their results {code, out, err}."""
    from conftest import run_sacred_cases
    common = ["tiny", "device=cpu", f"path.data_dir={prep_dir}", *overrides]
    return run_sacred_cases("train", [common + [f"path.log_dir={reference_log_dir}"],
                                      common + ["resume=True", f"path.log_dir={resumed_log_dir}"]])


def test_killed_run_resumes_to_bitwise_identical_weights(tmp_path, prep):
    # The run, killed with SIGKILL right after its step-2 checkpoint.
    log_dir = tmp_path / "killed"
    proc = train_cli(log_dir=log_dir, prep_dir=prep, pause_after_save=120, popen=True)
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

    # An uninterrupted reference run, and the killed run resumed.
    ref, resumed = train_then_resume(tmp_path / "ref", log_dir, prep)
    assert ref["code"] == 0, ref["err"][-2000:]
    ref_dir = tmp_path / "ref" / "lslpn_all_structures_fold0" / "1"
    for name in ("config.json", "run.json", "metrics.json", "last.pth", "best.pth"):
        assert (ref_dir / name).is_file(), name
    info = json.loads((ref_dir / "info.json").read_text())
    assert info["config_hash"] and "git_commit" in info
    assert any(dep.startswith("torch==") for dep in json.loads((ref_dir / "run.json").read_text())
               ["experiment"]["dependencies"])
    metrics = json.loads((ref_dir / "metrics.json").read_text())
    assert metrics["loss"]["steps"] == [1, 2, 3, 4, 5, 6] and metrics["val_dice"]["steps"] == [3, 6]

    assert resumed["code"] == 0, resumed["err"][-2000:]
    assert "continuing" in resumed["out"] and "at step 2" in resumed["out"]
    final = load_checkpoint(str(log_dir / "lslpn_all_structures_fold0" / "2" / "last.pth"))
    reference = load_checkpoint(str(ref_dir / "last.pth"))
    assert final["step"] == reference["step"] == 6
    assert _state_dicts_equal(final["model"], reference["model"])
    assert final["best_dice"] == reference["best_dice"]
    momentum = [s["momentum_buffer"] for s in final["optimizer"]["state"].values()]
    ref_momentum = [s["momentum_buffer"] for s in reference["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, ref_momentum))


def test_diverging_training_stops_with_one_line_and_keeps_the_last_good_checkpoint(cli_runs):
    result, log_dir = cli_runs["diverging"]
    assert result["code"] == 2, result["out"] + result["err"][-2000:]
    errors = [line for line in result["err"].replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result["err"], result["err"][-2000:]
    match = re.match(r"error: training diverged at step (\d+) \((loss nan|loss inf|non-finite weights)\): "
                     r"lower lr \(now 1e\+06\)", errors[0])
    assert match, errors[0]
    assert "done:" not in result["out"] and "final weights" not in result["out"]
    last = log_dir / "lslpn_all_structures_fold0" / "1" / "last.pth"
    state = load_checkpoint(str(last))
    assert state["step"] == int(match[1]) - 1 and f"{last} (step {state['step']})" in errors[0]
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


def test_best_pth_holds_the_highest_validation_dice_and_each_step_uses_the_milestones_rate(tmp_path, prep,
                                                                                          monkeypatch):
    """Loop bookkeeping: best.pth is the snapshot of the highest validation Dice (not the first, not the
    last), and the rate of step t follows lr_milestones (the scheduler steps once after every step)."""
    import types

    import training.loop as loop
    dice = iter([0.5, 0.7, 0.6])                                           # validations at steps 2, 4, 6
    monkeypatch.setattr(loop, "validate", lambda *args, **kwargs: {"mean_dice": next(dice), "per_organ": {}})
    rates = {}
    run = types.SimpleNamespace(observers=[types.SimpleNamespace(dir=str(tmp_path / "run"))], info={},
                                log_scalar=lambda key, value, step: rates.update({step: value}) if key == "lr"
                                else None)
    config = resolve(n_steps=6, val_every=2, save_every=6, lr_milestones=[2, 5],
                     path={"data_dir": str(prep), "log_dir": str(tmp_path)})
    summary = loop.train(config, run, defaults=default_config())
    best = load_checkpoint(str(tmp_path / "run" / "best.pth"))
    assert (best["step"], best["best_dice"], summary["best_dice"]) == (4, 0.7, 0.7)
    assert [rates[step] for step in range(1, 7)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-3, 1e-4])


def test_non_finite_loss_names_its_step(tmp_path, prep, monkeypatch):
    import training.loop as loop
    real_loss, calls = loop.episode_loss, []

    def loss_nan_at_step_2(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "episode_loss", loss_nan_at_step_2)
    config = resolve(n_steps=4, val_every=0, path={"data_dir": str(prep), "log_dir": str(tmp_path)})
    with pytest.raises(UserError) as error:
        loop.train(config, None, defaults=default_config())
    assert str(error.value) == ("training diverged at step 2 (loss nan): lower lr (now 0.01) or set "
                                "grad_clip (e.g. 1.0); no checkpoint of this run was written")
    message = str(loop._divergence_error(dict(config, amp="fp16", grad_clip=1.0), Distributed(), 5,
                                         "loss inf", ("run/last.pth", 4)))
    assert message == ("training diverged at step 5 (loss inf): lower lr (now 0.01) or turn amp off; "
                       "run/last.pth (step 4) stays the last good checkpoint")


def test_step_meter_against_hand_computed_times():
    from training.loop import StepMeter
    clock = iter([0.0,              # created
                  1.0, 3.0, 3.5,    # step 1: data after 1 s, done at 3 s; restart at 3.5
                  3.6, 4.5, 5.0,    # step 2: wait 0.1, step 1.0
                  5.3, 6.0])        # step 3: wait 0.3, step 1.0
    meter = StepMeter(clock=lambda: next(clock))
    for loss in (0.9, 0.6, 0.3):
        meter.batch_arrived()
        meter.step_finished(loss)
        if loss == 0.6:   # the window of steps 1-2: waits 1.0 + 0.1 s of 3.0 + 1.0 s
            assert meter.window() == pytest.approx((0.75, 2.0, 1.1 / 4.0))
        if loss != 0.3:
            meter.restart()
    assert meter.window() == pytest.approx((0.3, 1.0, 0.3))
    summary = meter.summary(batch_size=4)                      # steps 2..3 (the first is warm-up)
    assert summary == pytest.approx({"sec_per_step": 1.0, "episodes_per_s": 4.0, "data_wait_fraction": 0.2})
    assert StepMeter().summary(4) == {"sec_per_step": None, "episodes_per_s": None,
                                      "data_wait_fraction": None}


# --------------------------------------------------------------------------------------- devices
def test_device_resolution_and_amp(monkeypatch):
    from util import device as dev
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU"):
        dev.resolve_device("cuda")
    with pytest.raises(UserError, match="unknown"):
        dev.resolve_device("gpu")
    assert dev.amp_dtype(torch.device("cpu"), True) is None and dev.make_grad_scaler(torch.device("cpu"),
                                                                                     True) is None
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


# ------------------------------------------------------------------- bookkeeping of the loop, step by step
class RecordingRun:
    """The parts of a Sacred Run the loop uses: one observer's folder (with config.json as Sacred writes
    it), info and the logged scalars."""

    def __init__(self, run_dir: Path, config: dict):
        from types import SimpleNamespace
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(config, default=str))
        self.observers, self.info, self.scalars = [SimpleNamespace(dir=str(run_dir))], {}, []

    def log_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def logged(self, name: str) -> list:
        return [value for key, value, _ in self.scalars if key == name]


def scripted_validation(monkeypatch, dices):
    """The loop's validate() replaced by one returning these mean Dice values in turn."""
    import training.loop as loop
    values = iter(dices)
    monkeypatch.setattr(loop, "validate", lambda *args, **kwargs: {"mean_dice": next(values),
                                                                    "per_organ": {}})


def test_best_snapshot_is_the_step_of_the_highest_validation_dice(tmp_path, prep, monkeypatch):
    from training.loop import train
    dices = [0.2, 0.5, float("nan"), 0.5, 0.3, 0.4]                   # steps 1..6 (val_every=1)
    finite = [d for d in dices if d == d]
    best = max(finite)
    best_step = 1 + dices.index(best)                                  # the first of equal values stays
    scripted_validation(monkeypatch, dices)
    run_dir = tmp_path / "run"
    paths = {"data_dir": str(prep), "log_dir": str(tmp_path)}
    config = resolve(n_steps=6, val_every=1, save_every=6, path=paths)
    summary = train(config, RecordingRun(run_dir, config), defaults=default_config())
    snapshot = load_checkpoint(str(run_dir / "best.pth"))
    assert (snapshot["step"], snapshot["best_dice"], summary["best_dice"]) == (best_step, best, best)
    assert load_checkpoint(str(run_dir / "last.pth"))["best_dice"] == best

    scripted_validation(monkeypatch, [0.6, 0.1, 0.7])                  # a lower value never replaces best
    config = resolve(n_steps=3, val_every=1, save_every=3, path=paths)
    summary = train(config, RecordingRun(tmp_path / "b", config), defaults=default_config())
    assert load_checkpoint(str(tmp_path / "b" / "best.pth"))["step"] == 3 and summary["best_dice"] == 0.7


def test_learning_rate_of_every_step_follows_lr_milestones_across_a_resume(tmp_path, prep, monkeypatch):
    """MultiStepLR stepped once per step: step t (0-based) uses lr * gamma ** #(milestones <= t); a resumed
    run continues the schedule where the killed one stopped."""
    from training.loop import train
    lr, gamma, milestones, n_steps = 0.01, 0.1, [2, 6], 8   # resumed at 3: a fresh schedule would drop at 5
    expected = [lr * gamma ** sum(m <= t for m in milestones) for t in range(n_steps)]
    scripted_validation(monkeypatch, [0.1] * n_steps)
    paths = {"data_dir": str(prep), "log_dir": str(tmp_path)}
    name = run_name(resolve(path=paths))
    common = dict(lr=lr, lr_gamma=gamma, lr_milestones=milestones, val_every=0, save_every=1, path=paths)
    configs = resolve(n_steps=3, **common), resolve(n_steps=n_steps, resume=True, **common)
    first, resumed = (RecordingRun(tmp_path / name / str(i + 1), c) for i, c in enumerate(configs))
    train(configs[0], first, defaults=default_config())
    train(configs[1], resumed, defaults=default_config())
    assert resumed.info["resumed_from"] == str(tmp_path / name / "1" / "last.pth")
    assert first.logged("lr") + resumed.logged("lr") == pytest.approx(expected, rel=1e-12)
    state = load_checkpoint(str(tmp_path / name / "2" / "last.pth"))
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr * gamma ** 2)   # after step 8


def test_training_reports_organs_that_vanish_at_input_size(tmp_path, capsys):
    from test_episodes import make_tiny_structure_prep

    from training.loop import train
    prep = make_tiny_structure_prep(tmp_path)          # psoas_right vanishes from 6 of 8 slices at 64 px
    paths = {"data_dir": str(prep), "log_dir": str(tmp_path / "logs")}
    config = resolve(n_steps=6, val_every=0, input_size=64, class_setting="all_structures", path=paths)
    summary = train(config, None, defaults=default_config())
    out = capsys.readouterr().out
    assert summary["steps"] == 6
    assert re.search(r"ways redrawn: \d+ \(their organ vanished at input_size 64 .*psoas_right 6 slices", out)
