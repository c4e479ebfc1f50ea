"""notebooks/eval_dice.ipynb runs end to end on a tiny phantom with a tiny random model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluate import make_prepared

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_snapshot(path: Path, fold: int = 0) -> Path:
    """A train.py-style checkpoint of a random cnn_small FewShotSegNet (seeded)."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.fewshot import FewShotSegNet
    torch.manual_seed(0)
    model = FewShotSegNet.from_config({"encoder": "cnn_small", "n_grid": 2, "resolution": "feature"})
    save_checkpoint(str(path), {"model": model.state_dict(), "model_config": model.config, "fold": fold,
                                "step": 0})
    return path


def test_eval_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    prep = make_prepared(tmp_path)
    snapshot = make_tiny_snapshot(tmp_path / "best.pth")
    out = tmp_path / "nb_out"
    for key, value in {"LSLPN_PREP": prep, "LSLPN_SNAPSHOT": snapshot, "LSLPN_FOLD": 0,
                       "LSLPN_PRESET": "thirds",
                       "LSLPN_INPUT_SIZE": 32, "LSLPN_OUT": out, "LSLPN_DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, str(value))
    notebook = nbformat.read(ROOT / "notebooks" / "eval_dice.ipynb", as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"mask copy", "LSLPN"}
    assert results["methods"]["LSLPN"]["liver"]["snapshot"] == str(snapshot)
    assert (out / "results.png").is_file() and (out / "misalignment.png").is_file()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    shown = json.dumps([o.get("data", {}) for o in outputs])
    assert "| Method | liver |" in shown and "image/png" in shown
