"""Figures: display orientation, qualitative figure, misalignment pairs, make_figures.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_script
from test_evaluate import IntensityModel, make_prepared

from evaluation.figures import display, misalignment_pairs
from util.errors import UserError


def test_display_puts_anterior_up_and_patient_right_on_the_left():
    # canonical slice X x Y: x grows to the patient's right, y grows to anterior
    slice_xy = np.zeros((4, 3), dtype=int)
    slice_xy[3, 1] = 1      # far patient right
    slice_xy[1, 2] = 2      # most anterior
    shown = display(slice_xy)
    assert shown.shape == (3, 4)                        # rows = y, columns = x
    assert np.argwhere(shown == 1).tolist() == [[1, 0]]  # right side of the patient -> image column 0
    assert np.argwhere(shown == 2).tolist() == [[0, 2]]  # anterior -> image row 0


def test_misalignment_pairs_match_cases_by_support_and_query():
    case = lambda s, q, d: {"support": s, "query": q, "dice_range": d}  # noqa: E731
    results = {"results": {
        "mask copy": {"liver": {"per_volume": [case("a", "b", 0.3), case("a", "c", 0.5)]}},
        "LSLPN": {"liver": {"per_volume": [case("a", "c", 0.9), case("a", "b", 0.7)]},
                  "spleen": {"per_volume": [case("a", "b", 0.4)]}}}}
    assert misalignment_pairs(results, "LSLPN") == {"liver": ([0.5, 0.3], [0.9, 0.7])}


def _evaluated(tmp_path, organs, fold, name="out"):
    from evaluation.evaluate import evaluate
    prep = make_prepared(tmp_path / name)
    evaluate({"mask copy": None, "toy": IntensityModel()}, organs, prep, preset="alpnet",
             out_dir=tmp_path / name / "run", input_size=32, device="cpu", fold=fold, progress=False,
             save_predictions=False)
    return tmp_path / name / "run"


def test_figures_are_written_and_make_figures_merges_fold_runs(tmp_path, capsys):
    """scripts/make_figures.py's main in-process through run_cli, as its command line runs it."""
    import matplotlib.image
    liver, spleen = _evaluated(tmp_path, ["liver"], 0, "a"), _evaluated(tmp_path, ["spleen"], 1, "b")
    for run in (liver, spleen):
        (run / "results.png").unlink()
    code, err = run_script("make_figures", [liver, spleen, "--table", tmp_path / "table.md"], capsys)
    assert code == 0, err
    image = matplotlib.image.imread(liver / "results.png")
    assert image.shape[0] > 100 and image.std() > 0.01
    table = (tmp_path / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| mask copy |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    liver_value = json.loads((liver / "results.json").read_text())["table"]["range"]["mask copy"]["liver"]
    spleen_value = json.loads((spleen / "results.json").read_text())["table"]["range"]["mask copy"]["spleen"]
    assert cells[1:3] == [f"{liver_value:.1f}", f"{spleen_value:.1f}"]
    assert cells[5] == f"{(liver_value + spleen_value) / 2:.1f}"


def test_make_figures_on_a_missing_run_is_one_line(tmp_path, capsys):
    code, err = run_script("make_figures", [tmp_path], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "results.json is missing" in lines[0]


def test_qualitative_figure_without_scored_organs_is_a_clear_error(tmp_path):
    from evaluation.figures import qualitative_png
    with pytest.raises(UserError, match="nothing to draw"):
        qualitative_png({})
