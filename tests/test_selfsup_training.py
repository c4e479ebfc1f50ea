"""Self-supervised training end to end: `train.py with tiny selfsup` on a tiny unlabeled phantom."""
from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from training.config_check import check_config
from training.loop import run_name
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def resolve(named, **updates) -> dict:
    from sacred.initialize import create_run

    from config import ex
    return dict(create_run(ex, "print_config", config_updates=updates, named_configs=list(named)).config)


def test_one_selfsup_step_then_fine_tuning(unlabeled_prep, tiny_prepared, tmp_path):
    """Both train.py commands in one process, one after the other (conftest.run_sacred_cases:
    train.py's run_sacred once per command); the second starts from the first one's last.pth."""
    from conftest import run_sacred_cases
    last = str(tmp_path / "lslpn_selfsup" / "1" / "last.pth")            # where the first run writes it
    common = ["tiny", "device=cpu", f"path.log_dir={tmp_path}"]
    selfsup_run, finetune_run = run_sacred_cases("train", [
        common + ["selfsup", "n_steps=1", "selfsup.min_pixels=40", f"path.data_dir={unlabeled_prep}"],
        # fine-tuning on labeled slices starts from those weights
        common + ["n_steps=1", "val_every=0", f"path.init_from={last}", f"path.data_dir={tiny_prepared}",
                  "name=finetune"]])
    assert selfsup_run["code"] == 0, selfsup_run["out"] + selfsup_run["err"][-3000:]
    assert "validation off" in selfsup_run["out"]
    assert glob.glob(str(tmp_path / "lslpn_selfsup" / "*" / "last.pth")) == [last]
    assert not os.path.exists(os.path.join(os.path.dirname(last), "best.pth"))
    state = load_checkpoint(last)
    assert state["step"] == 1 and state["run_config"]["episodes"] == "superpixels"
    assert finetune_run["code"] == 0, finetune_run["out"] + finetune_run["err"][-3000:]
    assert f"initial weights from {last}" in finetune_run["out"]
    (tuned,) = glob.glob(str(tmp_path / "finetune" / "*" / "last.pth"))
    before, after = state["model"], load_checkpoint(tuned)["model"]
    changed = [k for k in before
               if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert changed   # one SGD step moved the weights it started from


def test_selfsup_config_errors(unlabeled_prep, tiny_prepared):
    config = resolve(["tiny", "selfsup"], path={"data_dir": str(tiny_prepared)})
    with pytest.raises(UserError, match="has no superpixels.*make_superpixels.py --images"):
        check_config(config, "train")
    with pytest.raises(UserError, match="n_ways=1"):
        check_config(resolve(["tiny", "selfsup"], n_ways=2, path={"data_dir": str(unlabeled_prep)}), "train")
    with pytest.raises(UserError, match="selfsup.min_pixels"):
        check_config(resolve(["tiny", "selfsup"], selfsup={"min_pixels": 0},
                             path={"data_dir": str(unlabeled_prep)}),
                     "train")
    with pytest.raises(UserError, match="path.init_from"):
        check_config(resolve(["tiny"], path={"data_dir": str(tiny_prepared), "init_from": "missing.pth"}),
                     "train")
    config = resolve(["tiny", "selfsup"], path={"data_dir": str(unlabeled_prep)})
    check_config(config, "train")   # no labeled validation volumes: allowed (validation goes off)
    assert run_name(config) == "lslpn_selfsup"


def test_real_scan_support_and_mask_copy():
    """tools/phantom_studies.py selfsup: 3 annotated slices at the chunk middles; mask copy fills each chunk
    from its slice."""
    import numpy as np
    from conftest import load_script

    from evaluation.protocols import dice
    demo = load_script("phantom_studies")
    labels = np.zeros((4, 4, 12), dtype=np.int64)
    labels[1:3, 1:3, 2:11] = 5                     # organ on slices 2..10 (range 2:11, 9 slices)
    # slice-specific pixel values (other labels) to trace copies
    labels[1, 1, 2:11] = np.arange(9) + 10
    labels[0, 0, 2:11] = 5
    support, organ_range, copy = demo.sparse_support(labels, 5, 3)
    assert organ_range == (2, 11)
    annotated = np.flatnonzero(support.sum(axis=(0, 1)))
    assert annotated.tolist() == [3, 6, 9]           # middles of chunks 2-4, 5-7, 8-10
    for z in range(12):
        expected = labels[:, :, [3, 6, 9][(z - 2) // 3]] == 5 if 2 <= z < 11 else np.zeros((4, 4), bool)
        assert np.array_equal(copy[:, :, z], expected)
    assert dice(copy, labels == 5) == 1.0
