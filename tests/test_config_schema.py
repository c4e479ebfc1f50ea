"""The config check (training/config_check.py over util/options.py and the options each owner declares).

The assembled options describe config.py exactly (both directions), every key's bad value is a one-line
"<key> = <value>: ..." error, unknown keys name the nearest known key, the cross-key rules hold for
their methods only, and the train.py / test.py command lines of README.md and docs/usage.md resolve
without Sacred "Added new config entry" / "Changed type of config entry" warnings. (train.py checks its
config once: tests/test_errors.py.)
"""
import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from config import ex
from models.fewshot import check_model_config
from training.config_check import SCHEMA, check_run_config
from util.errors import UserError
from util.options import flatten, nearest_key, sections_of

ROOT = Path(__file__).resolve().parent.parent
NAMED = [(), ("official",), ("paper",), ("panet",), ("senet",), ("demo",), ("tiny",), ("demo", "panet"),
         ("demo", "senet", "senet_demo"), ("demo", "selfsup"), ("tiny", "selfsup"), ("tiny", "panet")]


def resolve(named=(), **updates):
    from sacred.initialize import create_run
    return create_run(ex, "print_config", config_updates=updates, named_configs=list(named)).config


def with_value(config, key, value):
    """A deep copy of `config` with the dotted `key` set to `value`."""
    changed = copy.deepcopy(dict(config))
    node = changed
    *sections, leaf = key.split(".")
    for section in sections:
        node[section] = dict(node[section])
        node = node[section]
    node[leaf] = value
    return changed


def one_line_error(config):
    with pytest.raises(UserError) as caught:
        check_run_config(config)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ the schema is config.py's
def test_schema_describes_every_key_of_config_py_and_nothing_else():
    assert sorted(flatten(resolve())) == sorted(SCHEMA)
    for named in NAMED:
        assert set(flatten(resolve(named))) <= set(SCHEMA), named


@pytest.mark.parametrize("named", NAMED, ids=lambda n: "+".join(n) or "default")
def test_every_named_config_passes(named):
    check_run_config(resolve(named))


# ------------------------------------------------------------------ one value
@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_every_key_refuses_a_wrong_value_in_one_line_naming_it(key):
    message = one_line_error(with_value(resolve(), key, {"x": object()}))
    assert message.startswith(f"{key} = "), message


@pytest.mark.parametrize("updates, expected", [
    ({"fold": "0"}, "fold = '0': must be an integer, not a string: write fold=0 (no quotes)"),
    ({"n_steps": "abc"}, "n_steps = 'abc': must be an integer, not a string: e.g. n_steps=10000"),
    ({"fold": 1.0}, "fold = 1.0: must be an integer: write 1 (no decimal point)"),
    ({"fold": 1.5}, "fold = 1.5: must be an integer: use an integer in 0..3"),
    ({"fold": 4}, "fold = 4: out of range: use an integer in 0..3"),
    ({"fold": True}, "fold = True: must be an integer, not True/False"),
    ({"lr": -0.1}, "lr = -0.1: out of range: use a number > 0"),
    ({"lr": float("nan")}, "lr = nan: not a finite number: use a number > 0"),
    ({"lr": "1e-3"}, "lr = '1e-3': must be a number, not a string"),
    ({"momentum": 1.5}, "momentum = 1.5: out of range: use a number in [0, 1]"),
    ({"lr_gamma": 0}, "lr_gamma = 0: out of range: use a number in (0, 1]"),
    ({"model": {"vote": "maxx"}}, "model.vote = 'maxx': unknown: use one of 'max', 'mean', 'cover' "
                                  "(did you mean 'max'?)"),
    ({"model": {"align": "yes"}}, "model.align = 'yes': must be True or False"),
    ({"selfsup": {"warp": {"rotate": 90}}},
     "selfsup.warp.rotate = 90: out of range: use a number in [0, 90)"),
    ({"augment": {"gamma": [2.0, 0.5]}}, "augment.gamma = [2.0, 0.5]: not a range [low, high]"),
    ({"eval": {"organs": "liver"}}, "eval.organs = 'liver': must be a non-empty list of organ names"),
    ({"amp": "fp8"}, "amp = 'fp8': unknown: use False, True"),
])
def test_wrong_type_and_out_of_range_are_told_apart(updates, expected):
    assert one_line_error(resolve(**updates)).startswith(expected)


# ------------------------------------------------------------------ unknown keys
@pytest.mark.parametrize("key, nearest", [
    ("eval.snapshot", "eval.snapshots"), ("eval.prest", "eval.preset"), ("model.n_gird", "model.n_grid"),
    ("n_gird", "model.n_grid"), ("path.data", "path.data_dir"), ("senet.epoch", "senet.epochs"),
    ("selfsup.min_pixel", "selfsup.min_pixels"), ("selfsup.warp.rotation", "selfsup.warp.rotate"),
    ("augment.gama", "augment.gamma"), ("lr_milestone", "lr_milestones"), ("modle", "model"),
])
def test_unknown_key_in_any_section_names_the_nearest_known_key(key, nearest):
    message = one_line_error(with_value(resolve(), key, "x"))
    assert message.startswith(f"{key} = 'x': unknown key: did you mean {nearest}?"), message
    assert nearest_key(key, sorted(SCHEMA) + sections_of(SCHEMA)) == nearest


def test_unknown_key_without_a_near_one_lists_its_section():
    message = one_line_error(with_value(resolve(), "selfsup.warp.flip", True))
    assert "unknown key: the known selfsup.warp keys are elastic_alpha, elastic_sigma, rotate" in message


def test_snapshot_names_are_free_but_their_paths_are_checked():
    check_run_config(with_value(resolve(), "eval.snapshots", {"any name": "a.pth", "LSLPN": "b.pth"}))
    message = one_line_error(with_value(resolve(), "eval.snapshots", {"LSLPN": 3}))
    assert message.startswith("eval.snapshots = {'LSLPN': 3}: must map method names to checkpoint paths")


# ------------------------------------------------------------------ cross-key rules, per method
@pytest.mark.parametrize("named, updates, expected", [
    (["panet"], {"model": {"n_grid": 4}}, "model.n_grid = 4: the 'panet' head has global prototypes"),
    (["senet"], {"n_ways": 2}, "n_ways = 2: SENet segments one class at a time: set n_ways=1"),
    (["senet"], {"input_size": 100}, "input_size = 100: SENet needs a multiple of 16"),
    (["tiny", "selfsup"], {"n_ways": 2}, "n_ways = 2: self-supervised episodes have one pseudo-class"),
    (["tiny"], {"model": {"pretrained": True}}, "model.pretrained = True: encoder cnn_small has no ImageNet"),
    (["tiny"], {"model": {"n_grid": 17}}, "model.n_grid = 17: larger than the 16 x 16 feature map"),
])
def test_cross_key_rules(named, updates, expected):
    assert one_line_error(resolve(named, **updates)).startswith(expected)


def test_rules_hold_only_for_their_method():
    check_run_config(resolve(["senet"], model={"encoder": "cnn_small", "pretrained": True}))  # no encoder
    check_run_config(resolve(["tiny"], n_ways=2))                                  # LSLPN: 2-way is fine


def test_the_largest_n_grid_the_schema_accepts_runs_through_the_model():
    """The n_grid rule (input_size // output stride) never refuses a grid the head can run."""
    import torch

    from models.fewshot import build_model
    config = resolve(["tiny"], model={"n_grid": 16})
    check_run_config(config)
    model = build_model(dict(config["model"])).eval()
    size = config["input_size"]
    fg = torch.zeros(1, 1, 1, size, size)
    fg[..., 8:40, 8:40] = 1
    with torch.no_grad():
        logits, _ = model(torch.rand(1, 1, 1, 1, size, size), fg, 1 - fg, torch.rand(1, 1, 1, size, size))
    assert logits.shape == (1, 1, 2, size, size) and torch.isfinite(logits).all()


# ------------------------------------------------------------------ a model section alone (snapshots)
def test_snapshot_model_configs():
    from models.fewshot import FewShotSegNet
    check_model_config(FewShotSegNet(encoder="cnn_small", n_grid=4).config)
    check_model_config({"method": "senet", "official_bug": True})
    check_model_config({"encoder": "vgg16"})                       # older snapshots: keys missing
    with pytest.raises(UserError, match=r"^snapshot a\.pth: model\.vote = 'median': unknown"):
        check_model_config({"vote": "median"}, source="snapshot a.pth")
    with pytest.raises(UserError, match=r"^eval\.model\.vote = 0: "):
        check_model_config({"vote": 0}, prefix="eval.model")
    with pytest.raises(UserError, match=r"model\.n_grid = 20: larger than the 16 x 16"):
        check_model_config({"encoder": "cnn_small", "n_grid": 20}, input_size=64)


def test_a_snapshot_is_checked_through_the_schema_when_it_is_loaded(tmp_path):
    from models.checkpoint import model_from_checkpoint, save_checkpoint
    from models.fewshot import FewShotSegNet
    config = {**FewShotSegNet(encoder="cnn_small", n_grid=4).config, "vote": "median"}
    save_checkpoint(str(tmp_path / "best.pth"), {"model": {}, "model_config": config})
    with pytest.raises(UserError) as caught:
        model_from_checkpoint(str(tmp_path / "best.pth"))
    message = str(caught.value)
    assert message.startswith(f"snapshot {tmp_path / 'best.pth'}: model.vote = 'median': unknown: use one")


# ------------------------------------------------------------------ the README's commands
README_DRIVER = r"""
import importlib, json, logging, shlex, sys, warnings
warnings.filterwarnings("ignore")
from sacred.arg_parser import get_config_updates
from sacred.initialize import create_run
from config import install_log_filters
from training.config_check import check_run_config
records, results = [], {}
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Keep())
for entry, commands in json.loads(sys.argv[1]).items():
    module = importlib.import_module(entry)
    module.check_config = lambda config, command: check_run_config(config)   # the options, not the disk
    install_log_filters(module.ex)
    results[entry] = []
    for words in commands:
        del records[:]
        updates, named = get_config_updates(words)
        try:
            create_run(module.ex, module.ex.default_command, config_updates=updates, named_configs=named)
            error = None
        except Exception as caught:
            error = f"{type(caught).__name__}: {caught}"
        results[entry].append({"error": error, "warnings": [r for r in records if "config entry" in r]})
print("RESULTS" + json.dumps(results))
"""
# controls: a type change is seen by the capture; a typo stops with the schema's line
CONTROLS = [["eval.support=99999999"], ["eval.snapshot={'LSLPN': 'a.pth'}"]]


def readme_commands(entry: str) -> list[list[str]]:
    """The words after `with` of every `<entry>.py with ...` command line in README.md and docs/usage.md."""
    commands = []
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "usage.md").read_text()
    for line in text.splitlines():
        match = re.search(rf"\b{entry}\.py with (.*)", line)
        if match:
            commands.append(shlex.split(match.group(1), comments=True))
    return commands


@pytest.fixture(scope="module")
def readme_results() -> dict:
    """{entry: result of each README command, then of CONTROLS}, train.py's and test.py's in one process."""
    commands = {entry: readme_commands(entry) + CONTROLS for entry in ("train", "test")}
    done = subprocess.run([sys.executable, "-c", README_DRIVER, json.dumps(commands)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert "RESULTS" in done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1])


@pytest.mark.parametrize("entry", ["train", "test"])
def test_readme_commands_resolve_without_sacred_config_warnings(entry, readme_results):
    commands, results = readme_commands(entry), readme_results[entry]
    assert len(commands) >= 3 and len(results) == len(commands) + len(CONTROLS)
    for words, result in zip(commands, results):
        assert result == {"error": None, "warnings": []}, (words, result)
    type_change, typo = results[len(commands):]
    assert any("Changed type of config entry" in w for w in type_change["warnings"])
    assert "eval.snapshot = {'LSLPN': 'a.pth'}: unknown key: did you mean eval.snapshots?" in typo["error"]
