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
from test_episodes import make_train_prep

from models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# vgg16 has no BatchNorm, so DDP's gradient average equals the single process's batch gradient.
OVERRIDES = ["tiny", "device=cpu", "n_steps=2", "batch_size=2", "save_every=2", "lr_milestones=[1]",
             "input_size=32", "model.encoder=vgg16", "model.n_grid=2"]


def run(launcher, log_dir, prep, *extra):
    cmd = [*launcher, "train.py", "with", *OVERRIDES, *extra, f"path.data_dir={prep}",
           f"path.log_dir={log_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_cpu_ranks_end_with_identical_weights(tmp_path):
    prep = make_train_prep(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = run(torchrun, tmp_path / "ddp", prep, "val_every=2")  # rank 0 validates, rank 1 waits
    digests = dict(re.findall(r"rank (\d+): final weights sha256 ([0-9a-f]+)", out))
    assert set(digests) == {"0", "1"}, out[-3000:]
    assert digests["0"] == digests["1"]

    run_dirs = glob.glob(str(tmp_path / "ddp" / "*" / "[0-9]*"))
    assert len(run_dirs) == 1                                   # rank 0 alone records the run
    info = json.loads(Path(run_dirs[0], "info.json").read_text())              # Sacred's run.info
    assert info["world_size"] == 2 and info["distributed_backend"] == "gloo"
    ddp = load_checkpoint(os.path.join(run_dirs[0], "last.pth"))
    assert ddp["step"] == 2 and len(ddp["rng"]) == 2           # every rank's RNG state is kept

    single = run([sys.executable], tmp_path / "single", prep, "val_every=0")
    assert "rank 1" not in single
    reference = load_checkpoint(glob.glob(str(tmp_path / "single" / "*" / "1" / "last.pth"))[0])
    for key, value in reference["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
