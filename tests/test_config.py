"""config.py loads, its defaults reproduce the paper's settings, and packages import."""
import importlib
import pkgutil
import shlex
from pathlib import Path

import pytest
from conftest import resolve_config


# Each module of each library package imports without side effects (docs/DESIGN.md draws the map).
@pytest.mark.parametrize("package", ["util", "dataloaders", "models", "evaluation", "training"])
def test_every_module_imports(package):
    module = importlib.import_module(package)
    names = {info.name for info in pkgutil.iter_modules(module.__path__)}
    assert names, package
    imported = [importlib.import_module(f"{package}.{name}") for name in sorted(names)]
    assert all(m.__name__.startswith(package + ".") for m in imported)


def test_defaults_grid_and_folds():
    config = resolve_config(())
    expected = {"input_size": 512, "n_ways": 1, "n_shots": 1, "n_queries": 1, "batch_size": 4, "lr": 1e-3,
                "momentum": 0.9, "weight_decay": 5e-4, "n_steps": 10000, "lr_milestones": [2500, 5000, 7500],
                "lr_gamma": 0.1, "augment": {"p": 0.5, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0],
                                             "gamma": [0.5, 2.0]},
                "label_sets": [["liver"], ["spleen"], ["kidney_right", "kidney_left"],
                               ["psoas_right", "psoas_left"]]}
    assert {key: config[key] for key in expected} == expected
    model = config["model"]
    assert (model["n_grid"], model["overlap"], model["vote"], model["min_pixels"], model["scale"]) == \
        (8, True, "max", 10, 20.0)
    assert config["path"]["log_dir"] == "runs" and config["path"]["init_path"] is None


def test_named_configs_override_only_what_they_say():
    from config import differences_from_default
    official, paper = resolve_config(["official"]), resolve_config(["paper"])
    # 'paper' is the authors' code with the paper's text where they differ: the milestones only
    assert differences_from_default(paper) == {k: v for k, v in differences_from_default(official).items()
                                               if k != "lr_milestones"}
    assert official["lr_milestones"] == [800, 1600, 2400] and paper["lr_milestones"] == [2500, 5000, 7500]
    model = official["model"]
    assert (model["encoder"], model["vote"], model["align"], model["pretrained"]) == \
        ("resnet50_lslpn", "max", False, True)
    assert official["eval"]["preset"] == "official" and official["val_split"] == "val"
    assert set(differences_from_default(official)) <= {"model.encoder", "lr_milestones",
                                                       "eval.preset"}
    panet = resolve_config(["panet"])
    assert panet["model"]["n_grid"] == 1 and panet["model"]["align"] is True
    assert panet["model"]["head"] == "panet"
    assert panet["model"]["vote"] == "max"  # untouched keys keep their defaults
    demo = resolve_config(["demo"])
    assert demo["input_size"] < 512 and demo["n_steps"] < 10000


@pytest.mark.parametrize("layout, episodes, command", [
    ("visceral", "labels", "prepare_visceral.py --visceral-dir"),
    ("nifti", "superpixels", "make_superpixels.py --images"),
    ("other", "labels", "prepare_visceral.py --visceral-dir <VISCERAL dir>"),
])
def test_a_raw_data_dir_gets_a_prepare_command_that_writes_beside_it(tmp_path, layout, episodes, command):
    """path.data_dir = a folder that is not prepared: the suggested --out is a new folder beside it."""
    from training.config_check import check_config
    from util.errors import UserError
    raw = tmp_path / "raw data"
    if layout == "visceral":
        (raw / "SilverCorpus" / "Volumes").mkdir(parents=True)
    elif layout == "nifti":
        raw.mkdir()
        (raw / "case1.nii.gz").write_bytes(b"")
    else:
        raw.mkdir()
        (raw / "notes.txt").write_text("keep")
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))
    config = resolve_config(["tiny"], **{"episodes": episodes, "device": "cpu",
                                 "path": {"data_dir": str(raw), "log_dir": str(tmp_path / "runs")}})
    with pytest.raises(UserError) as caught:
        check_config(config, "train")
    message = str(caught.value)
    beside = str(tmp_path / "raw data_prepared")
    assert message.startswith(f"path.data_dir = '{raw}': not a prepared folder") and "\n" not in message
    assert command in message and f"--out {shlex.quote(beside)}`" in message
    assert f"path.data_dir={shlex.quote(beside)}" in message
    assert (f"--out {shlex.quote(str(raw))}`" not in message
            and f"--out {shlex.quote(str(raw))} " not in message)
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before and not Path(beside).exists()
