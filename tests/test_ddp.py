"""DistributedDataParallel: `torchrun --nproc_per_node=2 train.py` on CPU (gloo).

Both ranks must end with identical weights (each prints its weights' SHA-256), only rank 0 writes a
run folder (its run.info: world size 2, backend gloo), and the result matches a single process that sees
the same episodes (rank r takes episodes r, r + W, ... of each step's batch; DDP averages the gradients).
This is also the CPU proxy of tests/test_gpu_proxies.py's torchrun test (CUDA only there).
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_in_process

from models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# vgg16 has no BatchNorm, so DDP's gradient average equals the single process's batch gradient.
SETTINGS = {"device": "cpu", "n_steps": 2, "batch_size": 2, "save_every": 2, "lr_milestones": [1],
            "input_size": 32, "model": {"encoder": "vgg16", "n_grid": 2}}


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_cpu_ranks_end_with_identical_weights(train_prep, tmp_path, capsys):
    words = [f"{key}={value}" for key, value in SETTINGS.items() if key != "model"]
    words += [f"model.{key}={value}" for key, value in SETTINGS["model"].items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "with", "tiny", *words, "val_every=2", f"path.data_dir={train_prep}",   # rank 0 validates, 1 waits
           f"path.log_dir={tmp_path / 'ddp'}"]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    digests = dict(re.findall(r"rank (\d+): final weights sha256 ([0-9a-f]+)", out))
    assert set(digests) == {"0", "1"}, out[-3000:]
    assert digests["0"] == digests["1"]

    run_dirs = glob.glob(str(tmp_path / "ddp" / "*" / "[0-9]*"))
    assert len(run_dirs) == 1                                   # rank 0 alone records the run
    info = json.loads(Path(run_dirs[0], "info.json").read_text())              # Sacred's run.info
    assert info["world_size"] == 2 and info["distributed_backend"] == "gloo"
    ddp = load_checkpoint(os.path.join(run_dirs[0], "last.pth"))
    assert ddp["step"] == 2 and len(ddp["rng"]) == 2           # every rank's RNG state is kept

    capsys.readouterr()
    train_in_process(tmp_path / "single", **SETTINGS, val_every=0,
                     path={"data_dir": str(train_prep), "log_dir": str(tmp_path)})
    assert "rank 1" not in capsys.readouterr().out
    reference = load_checkpoint(str(tmp_path / "single" / "last.pth"))
    for key, value in reference["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
