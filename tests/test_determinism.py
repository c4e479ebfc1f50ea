"""Determinism across processes: the same pipeline (prepare the tiny phantom, draw episodes, evaluate a
fixed cnn_small snapshot and the mask copy on CPU) in two processes at once, with different PYTHONHASHSEED
and preparation workers, gives byte-identical prepared files, episode tensors and results.json / .csv /
table.md. (In-process repeatability: tests/test_prepare.py, tests/test_episodes.py, tests/test_ddp.py.)
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

PIPELINE = textwrap.dedent("""
    import hashlib, json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from dataloaders.episodes import EpisodeDataset
    from dataloaders.prepare import Selection, prepare_dataset
    from evaluation.evaluate import evaluate
    phantom, snapshot, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    prepare_dataset(phantom, "prep", size=48, n_val=1, seed=11, rule=Selection(min_voxels=5), workers=workers)
    dataset = EpisodeDataset("prep", [2, 3, 11, 12, 13, 14], n_ways=2, n_shots=1, n_queries=2, input_size=48,
                             augment={"p": 0.5, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0],
                                      "gamma": [0.5, 2.0]}, seed=5)
    digest = hashlib.sha256()
    for i in range(6):
        for key, value in sorted(dataset[i].items()):
            digest.update(key.encode() + value.numpy().tobytes())
    evaluate({"mask copy": None, "LSLPN": snapshot}, ["liver", "spleen"], "prep", out_dir="eval", input_size=48,
             device="cpu", batch_size=8, save_predictions=True, progress=False, figures=False)
    print("EPISODES " + digest.hexdigest())
""")  # noqa: E501  (the driver script's own lines)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_give_identical_prepared_data_episodes_and_results(tiny_phantom, tmp_path):
    from models.checkpoint import save_checkpoint
    from models.fewshot import FewShotSegNet
    torch.manual_seed(3)
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=2)
    snapshot = tmp_path / "model.pth"
    save_checkpoint(str(snapshot), {"model": model.state_dict(), "model_config": model.config})
    procs = []
    for run, (hash_seed, workers) in enumerate((("1", 1), ("987", 2))):
        cwd = tmp_path / f"run{run}"
        cwd.mkdir()
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
        procs.append((cwd, subprocess.Popen([sys.executable, "-c", PIPELINE, str(tiny_phantom),
                                             str(snapshot), str(workers)], cwd=cwd, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    outputs = []
    for cwd, proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outputs.append((cwd, out))
    (a, out_a), (b, out_b) = outputs
    assert tree_digest(a / "prep") == tree_digest(b / "prep")
    assert out_a.split("EPISODES ")[1] == out_b.split("EPISODES ")[1]
    results_a, results_b = tree_digest(a / "eval"), tree_digest(b / "eval")
    assert {"results.json", "results.csv", "table.md"} <= set(results_a)
    assert any(name.endswith(".nii.gz") for name in results_a)
    assert results_a == results_b
    stored = json.loads((a / "eval" / "results.json").read_text())
    assert list(stored["results"]) == ["mask copy", "LSLPN"]
