"""Fidelity options of a training run: test-set model selection (val_split) warns, the run folder
records the options that differ from the default, bad values are one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.config_check import check_config
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def resolve(**updates) -> dict:
    from sacred.initialize import create_run

    from config import ex
    return dict(create_run(ex, "print_config", config_updates=updates, named_configs=["tiny"]).config)


@pytest.mark.parametrize("updates, message", [
    ({"val_split": "test"}, "val_split = 'test'"),
    ({"model": {"vote": "none"}}, "model.vote = 'none'"),
    ({"model": {"head": "panet"}}, "model.n_grid = 8: the 'panet' head"),
    ({"model": {"encoder": "cnn_small", "pretrained": True}}, "model.pretrained = True"),
])
def test_bad_fidelity_options_are_one_line_errors(tiny_prepared, updates, message):
    config = resolve(**updates, path={"data_dir": str(tiny_prepared)})
    with pytest.raises(UserError, match=message):
        check_config(config, "train")


def test_test_set_selection_warns_and_the_run_records_its_differences(tiny_prepared, tmp_path):
    cmd = [sys.executable, "train.py", "with", "tiny", "device=cpu", "n_steps=1", "val_every=1",
           "save_every=1",
           "val_split=gold", "model.vote=mean", f"path.data_dir={tiny_prepared}",
           f"path.log_dir={tmp_path / 'runs'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in (done.stdout + done.stderr).splitlines() if "TEST volumes" in line]
    assert len(warnings) == 1 and "test-set model selection" in warnings[0]
    info = json.loads(next((tmp_path / "runs").glob("*/1/info.json")).read_text())
    differs = info["differs_from_default"]
    assert differs["val_split"] == ["val", "gold"] and differs["model.vote"] == ["max", "mean"]
    assert differs["model.encoder"] == ["vgg16", "cnn_small"] and "model.n_grid" not in differs
