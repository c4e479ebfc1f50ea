"""A snapshot describes itself (models/checkpoint.py): with which input size and intensity it runs.

The caller's value wins, then what the snapshot records, then the caller's fallback intensity, then
the defaults 512 and per-slice min-max.
"""
from __future__ import annotations

import torch

from models.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    model_input,
    save_checkpoint,
    trained_input,
)
from models.fewshot import FewShotSegNet

WINDOW = {"mode": "window", "window": [-125.0, 275.0]}


def test_requested_values_win_over_recorded_then_the_fallback_then_defaults():
    state = {"input_size": 128, "intensity": WINDOW}
    assert trained_input(state) == (128, WINDOW)
    assert model_input(state) == (128, WINDOW)
    requested = model_input(state, input_size=96, intensity={"mode": "minmax"}, name="s.pth")   # own warning
    assert requested == (96, {"mode": "minmax"})
    assert model_input(state, fallback_intensity={"mode": "minmax"}) == (128, WINDOW)  # a record wins
    assert trained_input({}) == (None, None)
    assert model_input({}, fallback_intensity=WINDOW) == (512, WINDOW)
    assert model_input({}) == (512, {"mode": "minmax"})


def test_a_checkpoint_loads_and_describes_itself(tmp_path):
    torch.manual_seed(0)
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=2)
    path = tmp_path / "snapshot.pth"
    save_checkpoint(str(path), {"model": model.state_dict(), "model_config": model.config, "step": 6,
                                "fold": 0, "input_size": 32})
    rebuilt, state = model_from_checkpoint(str(path))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    assert state["model_config"] == model.config and model_input(state) == (32, {"mode": "minmax"})
    assert load_checkpoint(str(path))["step"] == 6
    assert not list(tmp_path.glob("*.tmp-*"))                    # written atomically, nothing left behind
