"""tools/training_curves.py on fabricated Sacred metrics.json files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_script

from util.errors import UserError


def _write_metrics(run_dir, loss_steps, val_steps, offset=0.0):
    run_dir.mkdir(parents=True)
    metrics = {"loss": {"steps": loss_steps, "values": [1.0 / s + offset for s in loss_steps],
                        "timestamps": ["t"] * len(loss_steps)},
               "val_dice": {"steps": val_steps, "values": [0.1 * s / 10 for s in val_steps],
                            "timestamps": ["t"] * len(val_steps)}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_collect_joins_resumed_runs_and_plots(tmp_path):
    curves_script = load_script("training_curves")
    root = tmp_path / "train"
    _write_metrics(root / "lslpn_fold0" / "1", [1, 2, 3], [2])
    _write_metrics(root / "lslpn_fold0" / "2", [3, 4], [4], offset=5.0)   # resumed: step 3 again, later wins
    _write_metrics(root / "senet_fold0" / "1", [1, 2], [2])
    _write_metrics(root / "panet_fold1" / "1", [1, 2], [2])
    (root / "not_a_run").mkdir()
    curves = curves_script.collect(root)
    assert sorted(curves) == [0, 1]
    assert sorted(curves[0]) == ["LSLPN", "SENet"] and list(curves[1]) == ["PANet"]
    steps, values = curves[0]["LSLPN"]["loss"]
    assert steps.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(values, [1.0, 0.5, 1 / 3 + 5, 0.25 + 5])
    assert curves[0]["LSLPN"]["val_dice"][0].tolist() == [2, 4]
    out = curves_script.plot(curves, tmp_path / "curves.png", "test")
    import matplotlib.image
    image = matplotlib.image.imread(out)
    assert image.shape[1] > image.shape[0] > 100          # two rows, two fold columns: wider than tall


def test_missing_or_empty_runs_folder_is_a_one_line_error(tmp_path):
    curves_script = load_script("training_curves")
    with pytest.raises(UserError, match="does not exist"):
        curves_script.collect(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="metrics.json"):
        curves_script.collect(tmp_path / "empty")
