"""The LSLPN+ sweep's ablation logic and its report (experiments/lslpn_plus.py, docs/lslpn_plus.md), on
made-up evaluations: which rows exist, which need their own training runs, what the report computes."""
from __future__ import annotations

import pytest

from experiments import lslpn_plus as tool

ADAPT = {"adapt_steps": 20, "adapt_lr": 0.01}
GRIDS = {"grids": [4, 8], "grid_fusion": "mean"}
BOUNDARY = {"boundary_weight": 0.3}


def selection(chosen: list[str]) -> dict:
    best = {"test-time adaptation": {"settings": ADAPT, "validation": 0.6},
            "multi-scale grids": {"settings": GRIDS, "validation": 0.55},
            "boundary loss": {"settings": BOUNDARY, "validation": 0.52}}
    combination = {k: v for option in chosen for k, v in best[option]["settings"].items()}
    return {"best": best, "chosen": chosen, "combination": combination}


def test_rows_are_lslpn_each_option_alone_the_combination_and_each_removal():
    rows = tool.test_rows(selection(["test-time adaptation", "multi-scale grids", "boundary loss"]))
    assert rows["LSLPN"] == {}
    assert rows["+ multi-scale grids"] == GRIDS and rows["+ boundary loss"] == BOUNDARY
    assert rows["LSLPN+"] == {**ADAPT, **GRIDS, **BOUNDARY}
    assert rows["LSLPN+ without test-time adaptation"] == {**GRIDS, **BOUNDARY}
    assert rows["LSLPN+ without boundary loss"] == {**ADAPT, **GRIDS}
    assert len(rows) == 1 + 3 + 1 + 3
    single = tool.test_rows(selection(["test-time adaptation"]))      # one option: no removal rows
    assert set(single) == {"LSLPN", "+ test-time adaptation", "+ multi-scale grids", "+ boundary loss",
                           "LSLPN+"}


def test_only_training_options_get_their_own_runs():
    assert tool.training_options({**ADAPT, **GRIDS}) == {}
    assert tool.training_options({**ADAPT, **BOUNDARY, "input_slices": 3}) == {**BOUNDARY, "input_slices": 3}
    assert tool.run_suffix({}) == ""
    assert tool.run_suffix({"input_slices": 3, "boundary_weight": 0.3}) == "_boundary_weight0.3_input_slices3"
    # every training option names a key of the config schema (what train.py is given)
    from training.config_check import SCHEMA
    assert all(key in SCHEMA for key in tool.TRAINING_KEYS.values())


def cell(fold: int, setting: int, label_set: int, organs: dict[str, list[float]]) -> dict:
    return {"fold": fold, "setting": setting, "label_set": label_set,
            "dice": {organ: {f"q{i}": v for i, v in enumerate(values)} for organ, values in organs.items()}}


def row(options: dict, shift: float) -> dict:
    cells = []
    for setting in (1, 2):
        for fold in (0, 1):
            cells.append(cell(fold, setting, 0, {"liver": [0.6 + shift, 0.62 + shift],
                                                 "spleen": [0.5 + shift, 0.5 + shift]}))
            cells.append(cell(fold, setting, 1, {"kidney_left": [0.55 + shift, 0.55 + shift],
                                                 "kidney_right": [0.58 + shift, 0.6 + shift]}))
    return {"options": options, "cells": cells}


def timing(seconds: float, adapt: float = 0.0) -> dict:
    return {"seconds": seconds, "adapt_seconds": adapt, "per_adaptation": 2 * adapt,
            "head_share": {"share": 0.5}}


def sweep_results(quiet: bool) -> dict:
    return {"command": "python scripts/bench_chaos.py --lslpn-plus", "commit": "abc", "seconds": 60.0,
               "environment": "test", "folds": [0, 1],
               "selection": {"baseline": 0.5, "candidates": [], "best": {}, "greedy": [], "chosen": []},
               "rows": {"LSLPN": row({}, 0.0), "+ test-time adaptation": row(ADAPT, 0.07),
                        "LSLPN+": row({**ADAPT, **GRIDS}, 0.071)},
               "timing": {"cell": {"fold": 0, "setting": 2, "label_set": 0}, "quiet": quiet,
                          "environment": "2 cores",
                          "rows": {"LSLPN": timing(2.0), "+ test-time adaptation": timing(1.0, 10.0),
                                   "LSLPN+": timing(5.0, 12.0)}}}


@pytest.mark.parametrize("quiet", [True, False])
def test_report_compares_each_row_with_lslpn_and_takes_timings_from_the_timing_pass(tmp_path, quiet):
    doc = tmp_path / "lslpn_plus.md"
    tool.write_report(sweep_results(quiet), doc)
    text = doc.read_text()
    # every organ up by 7 points: the +5 target is met on Dice, and the time ratios come from the timing pass
    assert "+ test-time adaptation, Setting 2, folds 0, 1: 63.3 against LSLPN 56.2 on the same folds: " \
           "+7.0 Dice points" in text
    assert "inference 0.50x LSLPN's time per query volume (target <= 2x), adaptation 10.0 s" in text
    assert "Target met." in text
    assert "inference 2.50x LSLPN's time" in text and "Target not met." in text      # LSLPN+: 5 s vs 2 s
    assert ("with nothing else running on the cores." in text) == quiet
    assert ("seconds and ratios are loose" in text) == (not quiet)
    setting1 = text.split("## Setting 1: test scans")[1]
    assert "| LSLPN+ | 0, 1 |" in setting1 and "| 5.000 | 12.00 (24.0 per support slice) | 50% |" in setting1


def test_bench_chaos_lslpn_plus_rewrites_the_report_from_its_results(tmp_path, monkeypatch):
    import json

    from conftest import load_script

    from util.errors import UserError
    bench = load_script("bench_chaos")
    monkeypatch.setattr(bench, "PINNED_NUMERICS", {})
    with pytest.raises(UserError, match="lslpn_plus_results.json: no results yet"):
        bench.main(["--lslpn-plus", "--report-only", "--out", str(tmp_path)])
    (tmp_path / "lslpn_plus_results.json").write_text(json.dumps(sweep_results(True)))
    assert bench.main(["--lslpn-plus", "--report-only", "--out", str(tmp_path)]) == 0
    tool.write_report(sweep_results(True), tmp_path / "direct.md")
    assert (tmp_path / "lslpn_plus.md").read_text() == (tmp_path / "direct.md").read_text()


def test_timing_pass_warms_up_keeps_each_rows_fastest_pass_and_caches(tmp_path, monkeypatch):
    slow_first = iter([100.0, 4.0, 8.0, 6.0, 2.0])    # warm-up, then LSLPN and LSLPN+ in pass 1, pass 2
    calls = []

    def fake_evaluate(options, cell, device):
        calls.append(dict(options))
        return {"seconds": next(slow_first), "adapt_seconds": 3.0 if options else 0.0, "adaptations": 2,
                "volumes": 2, "dice": {}}
    monkeypatch.setattr(tool, "evaluate_cell", fake_evaluate)
    monkeypatch.setattr(tool, "head_share", lambda snapshot, options, device: {"share": 0.5})
    monkeypatch.setattr(tool.steps, "environment_note", lambda: "test machine")

    class FakeBench:
        device, path, saved = "cpu", tmp_path / "lslpn_plus.json", {"evaluations": {}}

        def snapshot(self, cell, training):
            return f"run{tool.run_suffix(training)}.pth"
    bench, rows = FakeBench(), {"LSLPN": {}, "LSLPN+": {**ADAPT, **BOUNDARY}}
    cells = [{"fold": 0, "setting": 2, "label_set": 0}]
    assert tool.TIMING_PASSES == 2
    timing = tool.timing_pass(bench, rows, cells, retime=True)
    assert calls == [{}, {}, rows["LSLPN+"], {}, rows["LSLPN+"]]             # warm-up first, untimed
    assert timing["rows"]["LSLPN"]["seconds"] == 4.0 / 2                      # min(4, 6) per volume
    assert timing["rows"]["LSLPN+"]["seconds"] == 2.0 / 2                     # min(8, 2)
    assert timing["rows"]["LSLPN+"]["per_adaptation"] == 3.0 / 2 and timing["quiet"]
    assert tool.timing_pass(bench, rows, cells, retime=False) == timing       # cached: nothing evaluated
    assert len(calls) == 5 and bench.path.is_file()


def test_report_names_the_rows_that_differ_only_in_training_as_the_timing_noise():
    rows = {"LSLPN": {}, "+ boundary loss": BOUNDARY, "LSLPN+": {**ADAPT, **BOUNDARY},
            "LSLPN+ without boundary loss": ADAPT, "+ multi-scale grids": GRIDS}
    results = {"rows": {name: {"options": options} for name, options in rows.items()},
               "timing": {"rows": {name: timing(1.0 + i / 10) for i, name in enumerate(rows)}}}
    note = tool.noise_note(results)
    assert "LSLPN 1.000 s and + boundary loss 1.100 s" in note
    assert "LSLPN+ 1.200 s and LSLPN+ without boundary loss 1.300 s" in note
    assert "multi-scale" not in note
    del results["rows"]["+ boundary loss"], results["rows"]["LSLPN+ without boundary loss"]
    assert tool.noise_note(results) == ""


def test_evaluations_are_reused_until_the_snapshot_or_the_prepared_folder_changes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tool, "evaluate_cell", lambda *args: calls.append(1) or {"dice": {}})
    bench = tool.Bench.__new__(tool.Bench)          # no data: only the cache is exercised
    bench.device, bench.path = "cpu", tmp_path / "plus.json"
    bench.saved = {"evaluations": {}}
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "last.pth").write_bytes(b"weights")
    cell = {"fold": 0, "setting": 2, "label_set": 0, "folder": tmp_path, "snapshot": tmp_path / "last.pth"}
    for _ in range(2):
        bench.evaluate(ADAPT, cell, "test")
    assert len(calls) == 1
    (tmp_path / "last.pth").write_bytes(b"retrained")
    bench.evaluate(ADAPT, cell, "test")
    (tmp_path / "meta.json").write_text('{"prepared": "again"}')
    bench.evaluate(ADAPT, cell, "test")
    assert len(calls) == 3
