"""Self-supervised training end to end: the `tiny selfsup` config on a tiny unlabeled phantom."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import resolve_config, train_in_process

from models.checkpoint import load_checkpoint
from training.config_check import check_config
from training.loop import run_name
from util.errors import UserError


def test_one_selfsup_step_then_fine_tuning(unlabeled_prep, tiny_prepared, tmp_path, capsys):
    """`train.py with tiny selfsup` (the loop in-process), then fine-tuning on labeled slices from its
    last.pth (path.init_from)."""
    last = tmp_path / "lslpn_selfsup" / "1" / "last.pth"
    train_in_process(last.parent, named=("tiny", "selfsup"), n_steps=1, selfsup={"min_pixels": 40},
                     path={"data_dir": str(unlabeled_prep), "log_dir": str(tmp_path)})
    out = capsys.readouterr().out
    assert "validation off" in out
    assert re.search(r"episodes redrawn: \d+ \(no support view kept its superpixel: its id is empty in that "
                     r"slice \d+, lost when resized to input_size \d+, lost under the warp \d+", out), out
    assert not (last.parent / "best.pth").exists()
    state = load_checkpoint(str(last))
    assert state["step"] == 1 and state["run_config"]["episodes"] == "superpixels"
    train_in_process(tmp_path / "finetune" / "1", n_steps=1, val_every=0, name="finetune",
                     path={"data_dir": str(tiny_prepared), "log_dir": str(tmp_path), "init_from": str(last)})
    assert f"initial weights from {last}" in capsys.readouterr().out
    before, after = state["model"], load_checkpoint(str(tmp_path / "finetune" / "1" / "last.pth"))["model"]
    changed = [k for k in before
               if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert changed   # one SGD step moved the weights it started from


def test_selfsup_config_errors(unlabeled_prep, tiny_prepared):
    config = resolve_config(("tiny", "selfsup"), path={"data_dir": str(tiny_prepared)})
    with pytest.raises(UserError, match="has no superpixels.*make_superpixels.py --images"):
        check_config(config, "train")
    unlabeled = {"data_dir": str(unlabeled_prep)}
    for updates, message in (({"n_ways": 2}, "n_ways=1"),
                             ({"selfsup": {"min_pixels": 0}}, "selfsup.min_pixels")):
        with pytest.raises(UserError, match=message):
            check_config(resolve_config(("tiny", "selfsup"), **updates, path=unlabeled), "train")
    with pytest.raises(UserError, match="path.init_from"):
        check_config(resolve_config(path={"data_dir": str(tiny_prepared), "init_from": "missing.pth"}),
                     "train")
    config = resolve_config(("tiny", "selfsup"), path={"data_dir": str(unlabeled_prep)})
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
