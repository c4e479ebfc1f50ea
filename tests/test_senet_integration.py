"""SENet through the shared paths: the one training loop, checkpoints, evaluation with every preset, and
one-line errors when a snapshot holds another method than the one expected (bad SENet options:
tests/test_training.py's table; the 'senet' preset's rules: tests/test_protocols.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import resolve_config, train_in_process

from evaluation.evaluate import evaluate
from evaluation.protocols import PRESETS
from models.checkpoint import check_compatible, load_checkpoint, model_from_checkpoint
from models.fewshot import FewShotSegNet
from models.senet import SENet
from util.errors import UserError


@pytest.fixture(scope="module")
def senet_run(tiny_prepared, tmp_path_factory) -> tuple[Path, object]:
    """(run folder, recorded run) of a 3-step SENet run (tiny config) on the tiny phantom, fold 0."""
    run_dir = tmp_path_factory.mktemp("senet_runs") / "senet_all_structures_fold0" / "1"
    _, run = train_in_process(run_dir, named=("tiny", "senet"), device="cpu", n_steps=3, batch_size=2,
                              val_every=0, save_every=3, fold=0,
                              path={"data_dir": str(tiny_prepared), "log_dir": str(run_dir.parents[1])})
    return run_dir, run


def test_senet_trains_through_the_one_loop(senet_run):
    run_dir, run = senet_run
    state = load_checkpoint(str(run_dir / "last.pth"))
    assert state["model_config"] == {"method": "senet", "official_bug": False} and state["step"] == 3
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["segmenter", "conditioner"]
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.99
    assert [step for name, _, step in run.scalars if name == "loss"] == [1, 2, 3]
    assert all(0.0 <= v <= 1.0 for v in run.logged("loss"))            # a Dice loss, not cross-entropy
    model, _ = model_from_checkpoint(str(run_dir / "last.pth"))
    assert isinstance(model, SENet) and not model.training


def test_senet_snapshot_evaluates_with_every_preset(senet_run, tiny_prepared):
    snapshot = str(senet_run[0] / "last.pth")
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
                         str(senet_run[0] / "last.pth"))


def test_senet_named_configs():
    config = resolve_config(("senet",))
    assert config["model"]["method"] == "senet"
    assert (config["batch_size"], config["n_steps"], config["lr"], config["momentum"],
            config["weight_decay"]) == \
        (2, 2020, 1e-3, 0.99, 1e-4)
    assert config["augment"]["p"] == 0.0 and config["senet"]["official_bug"] is False
    demo = resolve_config(("demo", "senet", "senet_demo"))
    assert (demo["model"]["method"] == "senet" and demo["n_steps"] < config["n_steps"]
            and demo["input_size"] % 16 == 0)
    assert resolve_config(())["model"]["method"] == "prototype"
