"""tools/gpu_check.sh --dry-run --quick end to end on CPU: every step runs and the summary is complete.

The real check runs on a GPU machine (docs/gpu_check.md); this guards the script itself in CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_passes_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    log = (out / "log.txt").read_text()[-4000:] if (out / "log.txt").is_file() else ""
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:] + log
    summary = (out / "summary.md").read_text()
    results = json.loads((out / "results.json").read_text())
    statuses = {(c["step"], c["name"]): c["status"] for c in results["checks"]}
    assert "FAIL" not in statuses.values(), summary
    passed_steps = {step for (step, _), status in statuses.items() if status == "PASS"}
    assert passed_steps == {"1", "2", "3"}, summary          # 4, the benchmark: SKIP under --quick
    assert statuses[("4", "benchmark.py --device cpu")] == "SKIP"
    if not torch.cuda.is_available():                      # the CUDA tests skip, and say so
        assert " skipped" in next(c["figures"] for c in results["checks"] if c["step"] == "1")
    trained = {name for (step, name), status in statuses.items() if step == "3" and status == "PASS"}
    assert {n.split(",")[0] for n in trained} == {"train paper amp=off", "train paper amp=bf16",
                                                  "train paper amp=fp16"}
    assert "GPU-hours" in summary and "0 FAIL" in summary
