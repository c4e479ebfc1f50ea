"""tools/phantom_studies.py ablation: trains each variant through train.py (a stand-in here), reuses a
finished run only when it records the config digest it would train with (experiments/runner.py), and turns a
config typo, a missing interpreter or a failed training into one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script
from test_evaluate import make_prepared
from test_notebook_eval import make_tiny_snapshot

from util.errors import UserError

studies = load_script("phantom_studies")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """make_tiny_snapshot's fold-0 snapshot, made once: the stand-in training copies it."""
    return make_tiny_snapshot(tmp_path_factory.mktemp("ablation_templates") / "fold0.pth", fold=0)


@pytest.fixture
def stub(tmp_path, template, monkeypatch) -> Path:
    """An executable --python whose `train.py with ...` runs in this process (experiments/runner.py's
    subprocess.run patched): it writes the run's config.json as Sacred would (the config resolved from the
    same overrides), the argv it saw and, as last.pth and best.pth, the template with the step and config
    digest train.py would record."""
    import subprocess

    from config import default_config
    from experiments import runner
    from models.checkpoint import load_checkpoint, save_checkpoint
    from training.loop import config_hash, run_name
    path = tmp_path / "fake_python"
    path.write_text("#!/bin/sh\nexit 9\n")
    path.chmod(0o755)
    real_run = subprocess.run

    def train_here(command, *args, **kwargs):
        if command[0] != str(path):
            return real_run(command, *args, **kwargs)
        config = runner.resolved_config(command[3:])
        runs = Path(config["path"]["log_dir"]) / run_name(config)
        run = runs / str(len(list(runs.glob("*"))) + 1 if runs.is_dir() else 1)
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(config, default=str))
        (run / "argv.txt").write_text(" ".join(command[1:]))
        state = load_checkpoint(str(template))
        state.update(step=config["n_steps"], config_hash=config_hash(config, default_config()))
        for name in ("last.pth", "best.pth"):
            save_checkpoint(str(run / name), state)
        return subprocess.CompletedProcess(command, 0)
    monkeypatch.setattr(runner.subprocess, "run", train_here)
    return path


def argv(tmp_path, stub, *overrides) -> list[str]:
    return ["ablation", "--folds", "0", "--variants", "n_grid 8 mean vote", "--out",
            str(tmp_path / "ablation"), "--python", str(stub), "--", "tiny",
            f"path.data_dir={make_prepared(tmp_path)}", "device=cpu", "eval.preset=thirds",
            "input_size=32", *overrides]


def test_trains_each_variant_writes_the_table_and_reuses_a_run_of_the_same_config(tmp_path, stub, capsys):
    assert studies.main(argv(tmp_path, stub)) == 0
    fold_dir = tmp_path / "ablation" / "n_grid_8_mean_vote" / "fold0"
    (argv_file,) = fold_dir.glob("*/1/argv.txt")
    argv_seen = argv_file.read_text()
    assert "model.vote=mean" in argv_seen and "model.n_grid=8" in argv_seen and "fold=0" in argv_seen
    table = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "| n_grid 8 mean vote | 8 | True | mean |" in table and "| mask copy |" in table
    capsys.readouterr()
    assert studies.main(argv(tmp_path, stub, "device=cpu")) == 0      # same config (device does not count)
    assert "reusing" in capsys.readouterr().out
    assert sorted(p.name for p in argv_file.parents[1].iterdir()) == ["1"]  # nothing retrained


def train(tmp_path, stub, *overrides) -> Path:
    """Only the training part of the ablation (no evaluation): the snapshot of n_grid 8 mean vote, fold 0."""
    base = ["tiny", f"path.data_dir={tmp_path / 'prep'}", "device=cpu", "input_size=32"]
    return studies.train_variant("n_grid 8 mean vote", 0, [*base, *overrides], tmp_path / "ablation",
                                  str(stub))


def test_a_run_of_other_settings_is_not_reused(tmp_path, stub):
    first = train(tmp_path, stub)
    # neither changes the weights
    assert train(tmp_path, stub, "eval.batch_size=3", "num_workers=1") == first
    other = train(tmp_path, stub, "lr=0.5")
    assert other != first and other.parent.name == "2"
    assert train(tmp_path, stub) == first                              # the run of that config again
    assert train(tmp_path, stub, "n_steps=7").parent.name == "3"        # more steps: another snapshot


@pytest.mark.parametrize("typo, message", [("n_stesp=5", r"n_stesp"), ("tinny", r"tinny")])
def test_a_config_typo_is_one_line(tmp_path, stub, typo, message):
    with pytest.raises(UserError, match=rf"^overrides after --: .*{message}.*check the spelling") as error:
        studies.main(argv(tmp_path, stub, typo))
    assert "\n" not in str(error.value)


def test_a_missing_interpreter_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^--python .*nope: no such executable"):
        studies.main(argv(tmp_path, tmp_path / "nope"))


def test_a_failed_training_is_one_line(tmp_path):
    failing = tmp_path / "failing_python"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    expected = (r"^step 'train n_grid 8 mean vote, fold 0' failed \(exit 3\): fix the message above and "
                r"run it again; finished steps are reused$")
    with pytest.raises(UserError, match=expected):
        train(tmp_path, failing)
