"""Training: config checks, checkpoints, the loop's bookkeeping (best snapshot, learning rate, resume), and
train.py's run folder and one-line errors.

The loop runs in-process (conftest.train_in_process); train.py's commands run in one subprocess
(conftest.run_sacred_cases), so its Sacred config hook never touches other tests' in-process experiment.
The real kill -9 at a random moment is tests/test_errors.py's; train_cli and train_then_resume serve it.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import resolve_config, train_in_process

from config import default_config
from models.checkpoint import check_compatible, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.config_check import check_config
from training.loop import config_hash, run_name
from util.device import Distributed
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

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


def train_then_resume(reference_log_dir, resumed_log_dir, prep_dir, *overrides) -> tuple[dict, dict]:
    """An uninterrupted reference run and the resume (resume=True) of a killed run, both `train.py with
    tiny device=cpu ...`, in one process one after the other (conftest.run_sacred_cases); their results
    {code, out, err}."""
    from conftest import run_sacred_cases
    common = ["tiny", "device=cpu", f"path.data_dir={prep_dir}", *overrides]
    return run_sacred_cases("train", [common + [f"path.log_dir={reference_log_dir}"],
                                      common + ["resume=True", f"path.log_dir={resumed_log_dir}"]])


# ------------------------------------------------------------------------------- config checks
# (named configs, updates, regex of the one line); checked against the training prep (conftest.train_prep)
# (tests/test_config_schema.py holds the exact lines of more keys)
BAD_CONFIGS = [
    ((), {"batch_size": 0}, "batch_size"), ((), {"n_steps": 0}, "n_steps"),
    ((), {"class_setting": "some"}, "class_setting"), ((), {"augment": {"p": 2.0}}, "augment.p"),
    ((), {"lr_milestones": [5, 2]}, "lr_milestones"), ((), {"n_shots": 0}, "n_shots"),
    ((), {"label_sets": [["liver"]]}, "label_sets"),
    ((), {"path": {"init_path": "/nonexistent/vgg16.pth"}}, "path.init_path"),
    ((), {"device": "tpu"}, "device"),
    ((), {"name": "a/b"}, "name"), ((), {"val_split": "test"}, "val_split = 'test'"),
    ((), {"model": {"n_grid": 0}}, "model.n_grid = 0: out of range"),
    ((), {"model": {"vote": "median"}}, "model.vote = 'median'"),
    ((), {"model": {"vote": "none"}}, "model.vote = 'none'"),
    ((), {"model": {"resolution": "pixel"}}, "model.resolution = 'pixel'"),
    ((), {"model": {"encoder": "alexnet"}}, "model.encoder = 'alexnet'"),
    ((), {"model": {"head": "global"}}, "model.head = 'global'"),
    ((), {"model": {"head": "panet"}}, "model.n_grid = 8: the 'panet' head"),
    ((), {"amp": "on"}, "^amp = 'on': unknown: use False, True"), ((), {"amp": 1}, "^amp = 1: unknown"),
    ((), {"boundary_weight": -0.5}, r"^boundary_weight = -0\.5: out of range: use a number >= 0$"),
    ((), {"boundary_weight": "0.5"},
     r"^boundary_weight = '0\.5': must be a number, not a string: e\.g\. boundary_weight=0\.5$"),
    ((), {"boundary_weight": float("inf")},
     r"^boundary_weight = inf: not a finite number: use a number >= 0$"),
    (("senet",), {"senet": {"epochs": 0}}, "senet.epochs = 0"),
    (("senet",), {"senet": {"official_bug": "yes"}}, "senet.official_bug = 'yes'"),
    (("senet",), {"model": {"method": "unet"}}, "model.method = 'unet'"),
]


@pytest.mark.parametrize("named, updates, expected", BAD_CONFIGS,
                         ids=[f"{' '.join(n)} {u}"[:60] for n, u, _ in BAD_CONFIGS])
def test_a_bad_option_is_one_clear_line(train_prep, named, updates, expected):
    path = {"data_dir": str(train_prep), **updates.get("path", {})}
    with pytest.raises(UserError, match=expected) as error:
        check_config(resolve_config(("tiny", *named), **{**updates, "path": path}), "train")
    assert "\n" not in str(error.value)


def test_data_checks_name_the_prepare_command_the_fold_and_val_every(tmp_path, train_prep):
    from test_episodes import make_train_prep
    check_config(resolve_config(path={"data_dir": str(train_prep)}), "train")
    for data_dir in (tmp_path / "absent", tmp_path):
        with pytest.raises(UserError, match=r"scripts/prepare_visceral\.py"):
            check_config(resolve_config(path={"data_dir": str(data_dir)}), "train")
    only_liver = make_train_prep(tmp_path / "liver", classes=(1,))
    with pytest.raises(UserError, match="fold 0 .*training classes"):
        check_config(resolve_config(class_setting="six_organs", fold=0, path={"data_dir": str(only_liver)}),
                     "train")
    check_config(resolve_config(class_setting="six_organs", fold=1, path={"data_dir": str(only_liver)}),
                 "train")
    no_val = make_train_prep(tmp_path / "noval", val_pids=())
    with pytest.raises(UserError, match="val_every=0"):
        check_config(resolve_config(path={"data_dir": str(no_val)}), "train")
    check_config(resolve_config(val_every=0, path={"data_dir": str(no_val)}), "train")


def test_config_hash_ignores_bookkeeping_keys_only():
    base = resolve_config()

    def digest(config):
        return config_hash(config, default_config())
    assert digest(base) == digest(resolve_config(n_steps=99, resume=True, save_every=7, val_every=0,
                                                 path={"log_dir": "elsewhere"}, eval={"batch_size": 3}))
    assert digest(base) != digest(resolve_config(lr=0.5))
    assert digest(base) != digest(resolve_config(model={"n_grid": 4}))
    assert run_name(base) == "lslpn_all_structures_fold0"
    assert run_name(resolve_config(named=("tiny", "panet"), fold=2)) == "panet_all_structures_fold2"


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


def test_resume_continues_across_harmless_keys_only_and_says_which_keys_differ(tmp_path, train_prep, capsys):
    """Keys outside the config hash (n_steps, frequencies, device, eval.*, ...) may change on resume; any
    other key (lr, seed, model.*, data) means another run, and the line says which keys."""
    from training.loop import config_mismatch, find_resume_checkpoint, train
    paths = {"data_dir": str(train_prep), "log_dir": str(tmp_path)}
    base, defaults = resolve_config(path=paths), default_config()
    name = run_name(base)
    run_dir = tmp_path / name / "1"                       # a run folder as train.py leaves it
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(base, default=str))
    (run_dir / "last.pth").write_bytes(b"not read")
    extended = resolve_config(n_steps=60, val_every=5, print_every=1, device="cpu", eval={"batch_size": 2},
                              path=paths)
    assert find_resume_checkpoint(str(tmp_path), name, config_hash(extended, defaults), defaults) == \
        str(run_dir / "last.pth")
    changed = resolve_config(lr=0.5, seed=3, model={"n_grid": 4}, path=paths)
    assert find_resume_checkpoint(str(tmp_path), name, config_hash(changed, defaults), defaults) is None
    line = config_mismatch(changed, str(tmp_path), name, defaults)
    assert "\n" not in line and str(run_dir) in line and "starting a new run at step 0" in line
    assert "lr: 0.01 -> 0.5" in line and "model.n_grid: 8 -> 4" in line and "seed: " in line
    assert "n_steps" not in line
    (run_dir / "config.json").write_text(json.dumps(resolve_config(lr=0.5, path=paths), default=str))
    summary = train(resolve_config(resume=True, n_steps=1, val_every=0, path=paths), None, defaults=defaults)
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


def test_a_snapshot_of_another_model_is_refused(tmp_path):   # (missing, truncated: tests/test_errors.py)
    from models.fewshot import FewShotSegNet
    small = FewShotSegNet.from_config({"encoder": "cnn_small", "n_grid": 8}, None)
    save_checkpoint(str(tmp_path / "s.pth"), {"model": small.state_dict(), "model_config": small.config})
    other = FewShotSegNet.from_config({"encoder": "cnn_small", "n_grid": 4}, None)
    loaded, state = model_from_checkpoint(str(tmp_path / "s.pth"))
    with pytest.raises(UserError, match="n_grid: 8 in the snapshot vs 4 requested"):
        check_compatible(state["model_config"], other.config, str(tmp_path / "s.pth"))
    other.load_state_dict(loaded.state_dict())                                   # same weights: loads
    with pytest.raises(UserError, match="encoder"):
        check_compatible(state["model_config"], dict(small.config, encoder="vgg16"), "x.pth")


# ------------------------------------------------------------------- bookkeeping of the loop, step by step
def scripted_validation(monkeypatch, dices):
    """The loop's validate() replaced by one returning these mean Dice values in turn."""
    import training.loop as loop
    values = iter(dices)
    monkeypatch.setattr(loop, "validate", lambda *args, **kwargs: {"mean_dice": next(values),
                                                                    "per_organ": {}})


def test_best_snapshot_is_the_step_of_the_highest_validation_dice(tmp_path, train_prep, monkeypatch):
    dices = [0.2, 0.5, float("nan"), 0.5, 0.3, 0.4]                   # steps 1..6 (val_every=1)
    best = max(d for d in dices if d == d)
    best_step = 1 + dices.index(best)                                  # the first of equal values stays
    scripted_validation(monkeypatch, dices)
    paths = {"data_dir": str(train_prep), "log_dir": str(tmp_path)}
    summary, _ = train_in_process(tmp_path / "a", n_steps=6, val_every=1, save_every=6, path=paths)
    snapshot = load_checkpoint(str(tmp_path / "a" / "best.pth"))
    assert (snapshot["step"], snapshot["best_dice"], summary["best_dice"]) == (best_step, best, best)
    assert load_checkpoint(str(tmp_path / "a" / "last.pth"))["best_dice"] == best
    scripted_validation(monkeypatch, [0.6, 0.1, 0.7])                  # a lower value never replaces best
    summary, _ = train_in_process(tmp_path / "b", n_steps=3, val_every=1, save_every=3, path=paths)
    assert load_checkpoint(str(tmp_path / "b" / "best.pth"))["step"] == 3 and summary["best_dice"] == 0.7


class Died(Exception):
    """Stands in for kill -9 right after a checkpoint write."""


def test_a_run_dying_after_a_checkpoint_resumes_to_the_uninterrupted_weights_and_learning_rates(
        tmp_path, train_prep, monkeypatch):
    """A run that dies right after its step-4 last.pth, resumed (resume=True): the weights, momentum, best
    Dice, best.pth (step 3's, carried into the new run folder) and the learning rate of every step of an
    uninterrupted run. MultiStepLR stepped once per step: step t (0-based) uses lr * gamma ** #(milestones
    <= t); a fresh schedule after the resume would not."""
    import training.loop as loop
    lr, gamma, milestones, n_steps = 0.01, 0.1, [1, 4], 6
    expected = [lr * gamma ** sum(m <= t for m in milestones) for t in range(n_steps)]
    common = dict(lr=lr, lr_gamma=gamma, lr_milestones=milestones, val_every=3, save_every=1, n_steps=n_steps)
    scripted_validation(monkeypatch, [0.4, 0.3])
    _, reference = train_in_process(tmp_path / "ref" / "run", **common,
                                    path={"data_dir": str(train_prep), "log_dir": str(tmp_path / "ref")})
    paths = {"data_dir": str(train_prep), "log_dir": str(tmp_path)}
    name = run_name(resolve_config(path=paths))
    real_save = loop.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if path.endswith("last.pth") and state["step"] == 4:
            raise Died
    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    scripted_validation(monkeypatch, [0.4])                      # step 3: best.pth in run 1
    with pytest.raises(Died):
        train_in_process(tmp_path / name / "1", **common, path=paths)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    scripted_validation(monkeypatch, [0.3])                      # step 6 does not beat step 3's 0.4
    _, resumed = train_in_process(tmp_path / name / "2", **common, resume=True, path=paths)
    assert resumed.info["resumed_from"] == str(tmp_path / name / "1" / "last.pth")
    died = load_checkpoint(str(tmp_path / name / "1" / "last.pth"))
    assert died["step"] == 4 and died["best_dice"] == 0.4
    assert resumed.logged("lr") == pytest.approx(expected[4:], rel=1e-12)
    assert reference.logged("lr") == pytest.approx(expected, rel=1e-12)
    assert died["scheduler"]["last_epoch"] == 4
    best, ref_best = (load_checkpoint(str(tmp_path / run / "best.pth")) for run in (f"{name}/2", "ref/run"))
    assert best["step"] == ref_best["step"] == 3
    assert all(torch.equal(best["model"][k], ref_best["model"][k]) for k in ref_best["model"])
    final = load_checkpoint(str(tmp_path / name / "2" / "last.pth"))
    ref = load_checkpoint(str(tmp_path / "ref" / "run" / "last.pth"))
    assert final["step"] == ref["step"] == n_steps and final["best_dice"] == ref["best_dice"] == 0.4
    assert final["model"].keys() == ref["model"].keys()
    assert all(torch.equal(final["model"][k], ref["model"][k]) for k in ref["model"])
    momentum = [s["momentum_buffer"] for s in final["optimizer"]["state"].values()]
    ref_momentum = [s["momentum_buffer"] for s in ref["optimizer"]["state"].values()]
    assert len(momentum) == len(ref_momentum) > 0
    assert all(torch.equal(a, b) for a, b in zip(momentum, ref_momentum))
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr * gamma ** 2)   # after step 6


def test_non_finite_loss_names_its_step(tmp_path, train_prep, monkeypatch):
    import training.loop as loop
    real_loss, calls = loop.episode_loss, []

    def loss_nan_at_step_2(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "episode_loss", loss_nan_at_step_2)
    with pytest.raises(UserError) as error:
        train_in_process(n_steps=4, val_every=0, path={"data_dir": str(train_prep), "log_dir": str(tmp_path)})
    assert str(error.value) == ("training diverged at step 2 (loss nan): lower lr (now 0.01) or set "
                                "grad_clip (e.g. 1.0); no checkpoint of this run was written")
    state = SimpleNamespace(cfg=dict(resolve_config(), amp="fp16", grad_clip=1.0), dist=Distributed(), step=5,
                            last_saved=("run/last.pth", 4))
    message = str(loop._divergence_error(state, "loss inf"))
    assert message == ("training diverged at step 5 (loss inf): lower lr (now 0.01) or turn amp off; "
                       "run/last.pth (step 4) stays the last good checkpoint")


def test_training_reports_organs_that_vanish_at_input_size(tmp_path, capsys):
    from test_episodes import make_tiny_structure_prep
    prep = make_tiny_structure_prep(tmp_path)          # psoas_right vanishes from 6 of 8 slices at 64 px
    summary, _ = train_in_process(n_steps=6, val_every=0, input_size=64, class_setting="all_structures",
                                  path={"data_dir": str(prep), "log_dir": str(tmp_path / "logs")})
    assert summary["steps"] == 6
    out = capsys.readouterr().out
    assert re.search(r"ways redrawn: \d+ \(their organ vanished at input_size 64 .*psoas_right 6 slices", out)


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
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.amp_dtype(torch.device("cpu"), True) is None
    assert not dev.make_grad_scaler(torch.device("cpu"), True).is_enabled()
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


# ------------------------------------------------------------------------------- train.py runs
@pytest.fixture(scope="module")
def cli_runs(train_prep, tiny_prepared, tmp_path_factory) -> dict:
    """train.py's commands in one process, one after the other (conftest.run_sacred_cases; the real
    `python train.py` process contract is test_errors.test_real_processes_*): {name: ({code, out, err},
    its log_dir)}."""
    from conftest import run_sacred_cases
    roots = {name: tmp_path_factory.mktemp(name) for name in ("diverging", "recorded")}
    commands = {
        "diverging": [f"path.data_dir={train_prep}", f"path.log_dir={roots['diverging']}", "lr=1e6",
                      "n_steps=8", "save_every=1", "val_every=0", "print_every=1"],
        "recorded": [f"path.data_dir={tiny_prepared}", f"path.log_dir={roots['recorded']}", "n_steps=2",
                     "val_every=2", "save_every=2", "print_every=1", "val_split=gold", "model.vote=mean"]}
    results = run_sacred_cases("train", [["tiny", "device=cpu", *words] for words in commands.values()])
    return {name: (result, roots[name]) for name, result in zip(commands, results)}


def test_a_run_folder_records_config_code_metrics_and_differences_and_test_set_selection_warns(cli_runs):
    result, log_dir = cli_runs["recorded"]
    assert result["code"] == 0, result["err"][-2000:]
    warnings = [line for line in (result["out"] + result["err"]).splitlines() if "TEST volumes" in line]
    assert len(warnings) == 1 and "test-set model selection" in warnings[0]
    run_dir = log_dir / "lslpn_all_structures_fold0" / "1"
    for name in ("config.json", "run.json", "metrics.json", "last.pth", "best.pth"):
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "info.json").read_text())
    assert info["config_hash"] and "git_commit" in info
    differs = info["differs_from_default"]
    assert differs["val_split"] == ["val", "gold"] and differs["model.vote"] == ["max", "mean"]
    assert differs["model.encoder"] == ["vgg16", "cnn_small"] and "model.n_grid" not in differs
    assert any(dep.startswith("torch==") for dep in json.loads((run_dir / "run.json").read_text())
               ["experiment"]["dependencies"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["loss"]["steps"] == [1, 2] and metrics["val_dice"]["steps"] == [2]


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
