"""scripts/bench_chaos.py end to end on a synthetic 6-scan folder in SSL-ALPNet's layout (a few training
steps)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_alpnet_layout import write_alpnet_folder

from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("bench_chaos", ROOT / "scripts" / "bench_chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_trains_evaluates_reports_and_reuses(tmp_path, capsys, monkeypatch):
    bench = load_bench()
    # the pins would leak into later tests' subprocesses
    monkeypatch.setattr(bench, "PINNED_NUMERICS", {})
    data = write_alpnet_folder(tmp_path / "chaos", [1, 2, 3, 5, 8, 10], size=48, depth=10, cell=24)
    out, doc = tmp_path / "out", tmp_path / "docs" / "bench.md"
    argv = ["--data", str(data), "--folds", "0", "--settings", "2", "--label-sets", "0", "--methods", "LSLPN",
            "--steps", "2", "--input-size", "32", "--batch-size", "1", "--out", str(out), "--doc", str(doc)]
    assert bench.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and {c["method"] for c in results["cells"]} \
        == {"mask copy", "LSLPN", "LSLPN, untrained"}
    cell = next(c for c in results["cells"] if c["method"] == "LSLPN")
    assert set(cell["dice"]) == {"kidney_right", "kidney_left"} \
        and set(cell["dice"]["kidney_left"]) == {"1", "2", "3", "5"}
    # Setting 2 dropped the kidney slices of scan 10
    assert cell["kept_slices"] < cell["all_slices"]
    text = doc.read_text()
    assert "## Setting 2" in text and "| LSLPN |" in text and "published SSL-ALPNet" in text
    assert "kept, OR" in text and doc.with_suffix(".png").is_file()
    trained = [e for e in results["log"] if e["step"].startswith("train")]
    assert len(trained) == 1 and not trained[0].get("reused")
    untrained = next(c for c in results["cells"] if c["method"] == "LSLPN, untrained")
    assert untrained["snapshot"] == cell["snapshot"]              # the same run, at its initial weights
    assert bench.main(argv) == 0                                  # second run: the finished run is reused
    again = json.loads((out / "results.json").read_text())
    assert not [e for e in again["log"] if e["step"].startswith("prepare")]
    assert [e["reused"] for e in again["log"] if e["step"].startswith("train")] == [True]
    assert "reusing" in capsys.readouterr().out


def test_bench_refuses_bad_arguments_in_one_line(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench, "PINNED_NUMERICS", {})
    with pytest.raises(UserError, match="folds 7"):
        bench.main(["--folds", "7"])
    with pytest.raises(UserError, match="not one"):
        bench.main(["--data", str(tmp_path)])
    data = write_alpnet_folder(tmp_path / "chaos", [1, 2, 3, 5, 8, 10], size=24, depth=8)
    with pytest.raises(UserError, match="--methods 'SENet'"):
        bench.main(["--data", str(data), "--folds", "0", "--methods", "SENet", "--out", str(tmp_path / "o"),
                    "--doc", str(tmp_path / "d.md")])
    with pytest.raises(UserError, match="no results yet"):
        bench.main(["--report-only", "--out", str(tmp_path / "none")])


def test_partial_report_and_fold_statistics(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_chaos_report as report
    cells = [{"method": "mask copy", "fold": f, "setting": 2, "label_set": 0,
              "dice": {"kidney_left": {"1": 0.4 + 0.1 * f, "2": 0.6 + 0.1 * f}}} for f in (0, 1)]
    cells.append({"method": "LSLPN", "fold": 0, "setting": 2, "label_set": 0,
                  "dice": {"kidney_left": {"1": 0.9}}})
    results = {"methods": ["mask copy", "LSLPN"], "cells": cells, "rule": "or", "complete": False, "log": [],
               "budget": {"full": False, "steps": 2, "batch_size": 1, "input_size": 32}}
    text = report.write_report(results, tmp_path / "r.md", None, 60.0, "python x", None, "cpu").read_text()
    assert "**Partial**" in text
    assert "| mask copy | - | - | 55.0 (5.0) | - |" in text      # fold means 50 and 60: mean 55, std 5
    assert "| LSLPN | - | - | 90.0 | - |" in text                 # one fold so far: no std


def test_test_py_alpnet_preset_scores_as_the_benchmark(tmp_path):
    """test.py's preset 'alpnet' on an SSL-ALPNet-prepared folder: the folder's own support scan, test scans
    and test organs, and the benchmark's Dice to the last digit (mask copy and a snapshot)."""
    import torch
    from test_bad_inputs import run_sacred_cases

    from dataloaders.prepare import prepare_alpnet
    from models.checkpoint import save_checkpoint
    from models.fewshot import FewShotSegNet
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_chaos_steps as steps
    data = write_alpnet_folder(tmp_path / "chaos", [1, 2, 3, 5, 8, 10], size=32, depth=12)
    folder = tmp_path / "prep"
    prepare_alpnet(data, folder, fold=0, setting=2, label_set=0)       # support 8, test 1 2 3 5, kidneys
    torch.manual_seed(0)
    model = FewShotSegNet.from_config({"encoder": "cnn_small", "n_grid": 2, "resolution": "feature"})
    snapshot = tmp_path / "best.pth"
    save_checkpoint(str(snapshot), {"model": model.state_dict(), "config": model.config, "fold": None,
                                    "step": 0, "input_size": 32})
    organs = ["kidney_right", "kidney_left"]
    done, = run_sacred_cases("test", [["tiny", f"path.data_dir={folder}", f"path.log_dir={tmp_path / 'runs'}",
                                       "eval.preset=alpnet", "eval.batch_size=16", "input_size=32",
                                       "device=cpu", f"eval.snapshots={{'LSLPN': '{snapshot}'}}"]])
    assert done["code"] == 0, done["err"][-2000:]
    stored = json.loads((tmp_path / "runs" / "test" / "1" / "results.json").read_text())
    assert stored["supports"] == ["8"] and stored["organs"] == organs
    for method, spec in (("mask copy", None), ("LSLPN", snapshot)):
        bench, _, _ = steps.evaluate_method(spec, folder, organs, "cpu")
        for organ in organs:
            cases = stored["results"][method][organ]["per_volume"]
            assert {c["query"]: c["dice_range"] for c in cases} == bench[organ]
