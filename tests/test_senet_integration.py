"""SENet through the shared paths: train.py (the one loop), checkpoints, evaluation with the 'senet'
preset, and one-line errors when a snapshot holds another method than the one expected."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.evaluate import evaluate
from evaluation.protocols import PRESETS, chunk_plan, dice, get_preset, mask_copy, preset_range
from models.checkpoint import check_compatible, load_checkpoint, model_from_checkpoint
from models.fewshot import FewShotSegNet
from models.senet import SENet
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def senet_run(tiny_prepared, tmp_path_factory) -> Path:
    """last.pth of a 3-step SENet run (tiny config) on the tiny phantom, fold 0."""
    log_dir = tmp_path_factory.mktemp("senet_runs")
    cmd = [sys.executable, "train.py", "with", "tiny", "senet", "device=cpu", "n_steps=3", "batch_size=2",
           "val_every=0", "save_every=3", "fold=0", f"path.data_dir={tiny_prepared}",
           f"path.log_dir={log_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run_dir = log_dir / "senet_all_structures_fold0" / "1"
    assert (run_dir / "last.pth").is_file()
    return run_dir


def test_train_py_trains_senet_through_the_one_loop(senet_run):
    state = load_checkpoint(str(senet_run / "last.pth"))
    assert state["model_config"] == {"method": "senet", "official_bug": False} and state["step"] == 3
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["segmenter", "conditioner"]
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.99
    metrics = json.loads((senet_run / "metrics.json").read_text())
    assert metrics["loss"]["steps"] == [1, 2, 3]
    assert all(0.0 <= v <= 1.0 for v in metrics["loss"]["values"])    # a Dice loss, not cross-entropy
    model, _ = model_from_checkpoint(str(senet_run / "last.pth"))
    assert isinstance(model, SENet) and not model.training


def test_senet_snapshot_evaluates_with_every_preset(senet_run, tiny_prepared):
    snapshot = str(senet_run / "last.pth")
    for preset in PRESETS:
        results = evaluate({"mask copy": None, "SENet": snapshot}, ["liver"], tiny_prepared, preset=preset,
                           out_dir=None, split="gold", input_size=64, device="cpu", batch_size=8,
                           progress=False)
        assert results["preset"]["rule"] == PRESETS[preset].rule
        cases = results["results"]["SENet"]["liver"]["per_volume"]
        assert len(cases) == 2 and all(0.0 <= case["dice_range"] <= 1.0 for case in cases)
        copied = results["results"]["mask copy"]["liver"]["per_volume"]
        assert [c["query_range"] for c in cases] == [c["query_range"] for c in copied]


def test_method_mismatch_is_a_one_line_error(senet_run):
    with pytest.raises(UserError, match="holds a SENet model, but a prototype"):
        check_compatible(SENet().config, FewShotSegNet(encoder="cnn_small", pretrained=False).config,
                         str(senet_run / "last.pth"))


# --------------------------------------------------------------------------- the 'senet' preset
def _volume(counts: dict[int, int], n_slices: int) -> np.ndarray:
    mask = np.zeros((10, 10, n_slices), dtype=bool)
    for z, count in counts.items():
        mask.reshape(100, n_slices)[:count, z] = True
    return mask


def test_senet_preset_is_the_official_evaluator_rule():
    preset = get_preset("senet")
    assert (preset.rule, preset.n_chunks, preset.threshold, preset.aggregate, preset.dice_eps) == \
        ("senet", 10, 10, "median", 1e-4)
    support = _volume({z: 30 + z for z in range(100, 125)}, 130)                  # Ns = 25
    query = _volume({3: 5, **{z: 20 for z in range(21, 25)}}, 40)
    support_range = preset_range(support, preset)
    query_range = preset_range(query, preset, role="query")
    assert support_range == (100, 124) and query_range == (20, 24)                # crop: 1 slice before
    plan = chunk_plan(support_range, query_range, preset.n_chunks, 1, preset.rule, support)
    # hand-worked: test_protocols
    kept = 100 + np.array([1, 3, 6, 8, 11, 13, 15, 18, 20, 23])
    assert [(int(s[0]), q.tolist()) for s, q in plan] == [
        (kept[1], [20]), (kept[3], [21]), (kept[5], [22]), (kept[7], [23]), (kept[9], [24])]
    copied = mask_copy(support, support_range, query.shape, query_range, preset.n_chunks, preset.rule)
    for (z_support,), z_query in ((s, q) for s, q in plan):
        assert (copied[..., z_query[0]] == support[..., z_support]).all()
    assert not copied[..., :20].any() and not copied[..., 25:].any()
    # Dice 2|P.G| / (|P| + |G| + 1e-4)
    p, g = np.zeros(10, bool), np.zeros(10, bool)
    p[:4], g[2:6] = True, True
    assert dice(p, g, preset.dice_smooth, preset.dice_eps) == pytest.approx(2 * 2 / (8 + 1e-4), rel=1e-12)


# ------------------------------------------------------------------------------------ config
def _resolve(*named, **updates) -> dict:
    from sacred.initialize import create_run

    from config import ex
    return dict(create_run(ex, "print_config", config_updates=updates, named_configs=list(named)).config)


def test_senet_named_configs():
    config = _resolve("senet")
    assert config["model"]["method"] == "senet"
    assert (config["batch_size"], config["n_steps"], config["lr"], config["momentum"],
            config["weight_decay"]) == \
        (2, 2020, 1e-3, 0.99, 1e-4)
    assert config["augment"]["p"] == 0.0 and config["senet"]["official_bug"] is False
    demo = _resolve("demo", "senet", "senet_demo")
    assert (demo["model"]["method"] == "senet" and demo["n_steps"] < config["n_steps"]
            and demo["input_size"] % 16 == 0)
    assert _resolve()["model"]["method"] == "prototype"


@pytest.mark.parametrize("updates, message", [
    ({"n_ways": 2}, "n_ways = 2: SENet segments one class"),
    ({"input_size": 100}, "input_size = 100: SENet needs a multiple of 16"),
    ({"senet": {"epochs": 0}}, "senet.epochs = 0"),
    ({"senet": {"official_bug": "yes"}}, "senet.official_bug = 'yes'"),
    ({"model": {"method": "unet"}}, "model.method = 'unet'"),
])
def test_bad_senet_options_are_one_line_errors(updates, message):
    from training.config_check import check_run_config
    config = _resolve("senet", **updates)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_run_config(config)
