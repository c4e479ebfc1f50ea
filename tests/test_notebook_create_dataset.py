"""notebooks/create_Visceral_dataset.ipynb runs end to end on a tiny phantom."""
from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize("work_dir, allowed", [(None, True), ("data", True), ("notebooks/x", False),
                                               ("", False)])
def test_create_dataset_notebook_writes_outside_the_repository_unless_data_is_chosen(tmp_path, monkeypatch,
                                                                                      work_dir, allowed):
    """The settings cell alone, run here as the notebook runs it (from notebooks/): default WORK_DIR outside
    the repository; under data/ only when chosen; anywhere else inside it refused before anything is
    written."""
    import tempfile

    from util.errors import UserError
    notebook = json.loads((ROOT / "notebooks" / "create_Visceral_dataset.ipynb").read_text())
    cell = "".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"])
    for key in [key for key in os.environ if key.startswith("LSLPN_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    if work_dir is not None:
        monkeypatch.setenv("LSLPN_WORK_DIR", str(ROOT / work_dir))
    monkeypatch.chdir(ROOT / "notebooks")
    names = {}
    if not allowed:
        with pytest.raises(UserError, match="inside the repository"):
            exec(cell, names)
        assert not (ROOT / "notebooks" / "x").exists()
        return
    exec(cell, names)
    for path in (names["SOURCE"].resolve(), names["PREP"].resolve()):
        assert (ROOT.resolve() in path.parents) == (work_dir == "data"), path
        assert (Path(tmp_path).resolve() if work_dir is None else (ROOT / "data").resolve()) in path.parents
