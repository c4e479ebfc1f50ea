"""Validate a resolved Sacred config before anything runs (train.py and test.py).

`check_config(config, command)` raises `UserError` with one line naming the key, the bad value and
the fix. It checks ranges and vocabularies, that `path.data_dir` is a prepared folder, that the
fold has training classes with slices (command 'train') and that validation volumes exist when
validation is on (self-supervised episodes: that PREP/superpixels exists; validation is optional). Nothing is loaded beyond small JSON files.
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Mapping

from dataloaders.organs import INDEX_TO_NAME, organ_index, training_classes
from dataloaders.prepared import list_volumes, read_meta, read_slice_index
from dataloaders.superpixels import read_superpixel_meta
from dataloaders.warp import WarpParams
from models.fewshot import check_model_options
from training.objective import check_senet_config
from util.device import resolve_device
from util.errors import UserError
from util.paths import check_writable_folder
from evaluation.protocol import PRESETS

CLASS_SETTINGS = ("six_organs", "all_structures")
DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("gold", "val")
EPISODES = ("labels", "superpixels")


def _number(config: Mapping, key: str, value: Any, low=None, high=None, integer=False,
            low_open=False) -> None:
    """`value` is a number (an int when `integer`) in [low, high] ((low, high] when low_open)."""
    if integer and isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        # 1.0 where an integer is wanted passed here once and failed later as a traceback (list index,
        # range()): refuse every non-int here, before the run starts
        raise UserError(f"config {key}={value!r} must be an integer: write {int(value) if float(value).is_integer() else 'an integer'}"
                        f"{'' if not float(value).is_integer() else ' (no decimal point)'}")
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = []
        if low is not None:
            bound.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bound.append(f"<= {high}")
        raise UserError(f"config {key}={value!r} is out of range: use {kind} {' and '.join(bound)}".strip())


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"config {key}={value!r} is unknown: use one of {', '.join(map(repr, choices))}")


def _flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(f"config {key}={value!r} must be True or False")


def _range(key: str, value: Any, positive: bool = True) -> None:
    """A [low, high] pair with low <= high (and low > 0 when positive)."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
          and value[0] <= value[1] and (value[0] > 0 or not positive))
    if not ok:
        raise UserError(f"config {key}={value!r} is not a range [low, high] with 0 < low <= high")


def check_label_sets(label_sets: Any) -> None:
    """Four folds, each a non-empty list of known organ names."""
    if not isinstance(label_sets, (list, tuple)) or len(label_sets) != 4 or not all(
            isinstance(s, (list, tuple)) and s for s in label_sets):
        raise UserError(f"config label_sets={label_sets!r} must be four non-empty lists of organ names "
                        "(fold 0-3)")
    for organs in label_sets:
        for name in organs:
            organ_index(name)  # raises a clear error for an unknown name


def fold_training_classes(config: Mapping) -> list[int]:
    """Training label indices of the configured fold: never one of its test organs (label_sets)."""
    fold = config["fold"]
    held_out = {organ_index(name) for name in config["label_sets"][fold]}
    return [c for c in training_classes(fold, config["class_setting"]) if c not in held_out]


def labeled_validation(config: Mapping) -> bool:
    """path.data_dir has the >= 2 labeled held-out volumes that validation needs (a support and a query)."""
    data_dir = config["path"]["data_dir"]
    val = read_meta(data_dir, "path.data_dir").get("splits", {}).get("val", [])
    return len(val) >= 2 and os.path.isdir(os.path.join(data_dir, "volumes", "val"))


def check_selfsup_data(config: Mapping) -> None:
    """Self-supervised episodes: 1-way, PREP/superpixels present, and the episode options in range."""
    if config["n_ways"] != 1:
        raise UserError(f"config n_ways={config['n_ways']}: self-supervised episodes have one pseudo-class "
                        "(a superpixel): set n_ways=1")
    selfsup = config.get("selfsup") or {}
    _number(config, "selfsup.min_pixels", selfsup.get("min_pixels"), low=1, integer=True)
    WarpParams.from_mapping(selfsup.get("warp") or {})
    read_meta(config["path"]["data_dir"], "path.data_dir")
    read_superpixel_meta(config["path"]["data_dir"])   # the one-line error names make_superpixels.py


def check_training_data(config: Mapping) -> None:
    """The fold has enough training classes with slices; validation volumes exist when needed."""
    data_dir = config["path"]["data_dir"]
    meta = read_meta(data_dir, "path.data_dir")
    if config.get("episodes", "labels") == "superpixels":
        check_selfsup_data(config)   # validation is optional there (off without labeled volumes)
        return
    index = read_slice_index(data_dir, "path.data_dir")
    classes = fold_training_classes(config)
    need = config["n_shots"] + -(-config["n_queries"] // config["n_ways"])
    usable = [c for c in classes if len(index.get(c, ())) >= need]
    if len(usable) < config["n_ways"]:
        names = ", ".join(INDEX_TO_NAME[c] for c in classes)
        raise UserError(
            f"fold {config['fold']} ({config['class_setting']}): {len(usable)} of its training classes "
            f"({names}) have >= {need} slices in {data_dir}/index.json, {config['n_ways']}-way episodes "
            "need that many: use class_setting='all_structures', another fold, or data with these organs")
    if config.get("val_every", 0) > 0 and config.get("val_split", "val") == "val":
        val = meta.get("splits", {}).get("val", [])
        folder = os.path.join(data_dir, "volumes", "val")
        if len(val) < 2 or not os.path.isdir(folder):
            raise UserError(f"path.data_dir '{data_dir}' has {len(val)} held-out validation volumes (volumes/val), "
                            "validation needs 2 (a support and a query): re-prepare with --n-val 2 or more, or "
                            "set val_every=0 to train without validation")
    if config.get("val_every", 0) > 0 and config.get("val_split", "val") == "gold":
        gold = meta.get("splits", {}).get("gold", [])
        if len(gold) < 2 or not os.path.isdir(os.path.join(data_dir, "volumes", "gold")):
            raise UserError(f"val_split='gold': path.data_dir '{data_dir}' has {len(gold)} gold volumes "
                            "(volumes/gold), selection on them needs 2: use val_split='val' or prepared gold volumes")


def check_config(config: Mapping, command: str = "train") -> None:
    """Validate the resolved config for `command` ('train' or 'test'); raise UserError on bad input."""
    _number(config, "fold", config.get("fold"), low=0, high=3, integer=True)
    check_label_sets(config.get("label_sets"))
    _choice("class_setting", config.get("class_setting"), CLASS_SETTINGS)
    _choice("device", config.get("device"), DEVICES)
    amp = config.get("amp", False)
    if not (isinstance(amp, bool) or amp in ("bf16", "fp16")):
        raise UserError(f"config amp={amp!r} is unknown: use False, True (bf16 on GPUs that support it, else "
                        "fp16; off on CPU), 'bf16' or 'fp16' (these two on CPU too)")
    _flag("channels_last", config.get("channels_last", False))
    _number(config, "num_workers", config.get("num_workers", 0), low=0, integer=True)
    _number(config, "input_size", config.get("input_size"), low=16, integer=True)
    _number(config, "seed", config.get("seed"), low=0, integer=True)
    check_model_options(config.get("model", {}))  # the model's own rules (models/fewshot.py)
    check_senet_config(config)                    # model.method and the SENet options
    name = config.get("name")
    if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
        raise UserError(f"config name={name!r} must be None or a folder name (no '/')")
    paths = config.get("path", {})
    if not isinstance(paths.get("data_dir"), str) or not paths["data_dir"]:
        raise UserError(f"config path.data_dir={paths.get('data_dir')!r} must name the prepared data folder")
    if not isinstance(paths.get("log_dir"), str) or not paths["log_dir"]:
        raise UserError(f"config path.log_dir={paths.get('log_dir')!r} must name the folder for run records")
    check_writable_folder(paths["log_dir"], "config path.log_dir")   # before any run folder or compute
    init_from = paths.get("init_from")
    if init_from is not None and not os.path.isfile(str(init_from)):
        raise UserError(f"config path.init_from='{init_from}' does not exist: give a last.pth/best.pth written "
                        "by train.py, or None")
    init_path = paths.get("init_path")
    if init_path is not None and not os.path.isfile(str(init_path)):
        raise UserError(f"config path.init_path='{init_path}' does not exist: give a local ImageNet "
                        "checkpoint of the encoder or None (weights are never downloaded)")
    resolve_device(config["device"])  # 'cuda' without a GPU: the one resolver's one-line error
    if command == "train":
        check_training_config(config)
        check_training_data(config)
    else:
        check_eval_config(config)
        read_meta(paths["data_dir"], "path.data_dir")
        check_eval_support(config)


def check_training_config(config: Mapping) -> None:
    """Episode, optimisation, augmentation and logging keys."""
    for key in ("n_ways", "n_shots", "n_queries", "batch_size", "n_steps", "save_every", "print_every"):
        _number(config, key, config.get(key), low=1, integer=True)
    _number(config, "val_every", config.get("val_every", 0), low=0, integer=True)
    _choice("val_split", config.get("val_split", "val"), SPLITS)
    _choice("episodes", config.get("episodes", "labels"), EPISODES)
    _number(config, "lr", config.get("lr"), low=0, low_open=True)
    _number(config, "momentum", config.get("momentum"), low=0, high=1)
    _number(config, "weight_decay", config.get("weight_decay"), low=0)
    _number(config, "lr_gamma", config.get("lr_gamma"), low=0, high=1, low_open=True)
    _number(config, "grad_clip", config.get("grad_clip", 0.0), low=0)
    _flag("resume", config.get("resume", False))
    milestones = config.get("lr_milestones")
    if not isinstance(milestones, (list, tuple)) or any(
            isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) \
            or list(milestones) != sorted(set(milestones)):
        raise UserError(f"config lr_milestones={milestones!r} must be increasing positive step numbers")
    augment = config.get("augment")
    if augment:
        if not isinstance(augment, dict):
            raise UserError(f"config augment={augment!r} must be a dict (or {{}} for none)")
        unknown = set(augment) - {"p", "brightness", "contrast", "gamma"}
        if unknown:
            raise UserError(f"config augment has unknown keys {sorted(unknown)}: use p, brightness, "
                            "contrast, gamma")
        _number(config, "augment.p", augment.get("p", 0.0), low=0, high=1)
        for name in ("brightness", "contrast", "gamma"):
            if name in augment:
                _range(f"augment.{name}", augment[name])


def check_eval_support(config: Mapping) -> None:
    """eval.support names volumes of the evaluated split (or is 'default' / 'all')."""
    evaluation = config.get("eval", {})
    support, split = evaluation.get("support"), evaluation.get("split")
    chosen = [str(s) for s in support] if isinstance(support, (list, tuple)) else [str(support)]
    if chosen in (["default"], ["all"]):
        return
    try:
        pids = list_volumes(config["path"]["data_dir"], str(split))
    except UserError:  # no volumes: every named support is missing, said below
        pids = []
    missing = [pid for pid in chosen if pid not in pids]
    if missing:
        raise UserError(f"config eval.support={support!r}: volume {', '.join(missing)} is not among the "
                        f"prepared {split} volumes ({', '.join(pids) or 'none'}): use one of them, 'default' or 'all'")


def check_eval_config(config: Mapping) -> None:
    """The eval.* keys used by test.py."""
    evaluation = config.get("eval", {})
    _choice("eval.preset", evaluation.get("preset"), tuple(PRESETS))
    _choice("eval.split", evaluation.get("split"), SPLITS)
    _number(config, "eval.n_shots", evaluation.get("n_shots"), low=1, integer=True)
    _number(config, "eval.batch_size", evaluation.get("batch_size"), low=1, integer=True)
    organs = evaluation.get("organs")
    if organs is not None:
        if not isinstance(organs, (list, tuple)) or not organs:
            raise UserError(f"config eval.organs={organs!r} must be None or a non-empty list of organ names, "
                            "e.g. eval.organs='[\"liver\"]'")
        for name in organs:
            organ_index(str(name))  # raises a clear error for an unknown name
    snapshots = evaluation.get("snapshots", {})
    if not isinstance(snapshots, dict):
        raise UserError(f"config eval.snapshots={snapshots!r} must map method names to checkpoint paths")
    for name, path in snapshots.items():
        if not isinstance(path, str) or not os.path.isfile(path):
            raise UserError(f"eval.snapshots['{name}']='{path}' does not exist: give a best.pth/last.pth "
                            "written by train.py")
