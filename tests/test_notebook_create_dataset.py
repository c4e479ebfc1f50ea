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


def _settings_cell() -> str:
    notebook = json.loads((ROOT / "notebooks" / "create_Visceral_dataset.ipynb").read_text())
    return "".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("work_dir, allowed", [(None, True), ("data", True), ("notebooks/x", False),
                                               ("", False)])
def test_create_dataset_notebook_writes_outside_the_repository_unless_data_is_chosen(tmp_path, work_dir,
                                                                                      allowed):
    """The settings cell alone: default WORK_DIR outside the repository; under data/ only when chosen;
    anywhere else inside the repository refused before anything is written."""
    import os
    import subprocess
    import sys
    env = {key: value for key, value in os.environ.items() if not key.startswith("LSLPN_")}
    env["TMPDIR"] = str(tmp_path)
    if work_dir is not None:
        env["LSLPN_WORK_DIR"] = str(ROOT / work_dir)
    code = _settings_cell() + "\nprint('PATHS', SOURCE.resolve(), PREP.resolve())\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "notebooks", env=env, capture_output=True,
                          text=True, timeout=60)
    if not allowed:
        assert done.returncode != 0 and "inside the repository" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    source, prep = (Path(p) for p in done.stdout.split("PATHS")[1].split())
    for path in (source, prep):
        inside_repo = ROOT.resolve() in path.parents
        assert inside_repo == (work_dir == "data"), path
        if work_dir is None:
            assert Path(tmp_path).resolve() in path.parents
        else:
            assert (ROOT / "data").resolve() in path.parents
    assert not (ROOT / "notebooks" / "x").exists()
