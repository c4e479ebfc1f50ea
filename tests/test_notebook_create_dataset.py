"""notebooks/create_Visceral_dataset.ipynb runs end to end on a tiny phantom."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_create_dataset_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    settings = {"LSLPN_VISCERAL": tmp_path / "phantom", "LSLPN_PREP": tmp_path / "prep", "LSLPN_N_SILVER": 3,
                "LSLPN_N_GOLD": 2, "LSLPN_SIZE": 48, "LSLPN_SLICES": 16, "LSLPN_PREP_SIZE": 32,
                "LSLPN_MIN_VOXELS": 3, "LSLPN_SEED": 5}
    for key, value in settings.items():
        monkeypatch.setenv(key, str(value))
    notebook = nbformat.read(ROOT / "notebooks" / "create_Visceral_dataset.ipynb", as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = json.dumps(outputs)
    assert "mask-copy Dice" in text and "kidney_left" in text and "image/png" in text
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert len(meta["splits"]["gold"]) == 2 and meta["prep_size"] == 32
