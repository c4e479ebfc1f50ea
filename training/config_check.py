"""Validate a resolved Sacred config before anything runs: `check_config(config, command)`, once per
command (train.py, test.py).

One pass: the declarative schema (util/config_schema.py: every key known, its type, range or choices,
the cross-key rules of the run's method), the organ names, then the facts on disk that the command
needs: `path.data_dir` is a prepared folder (a raw data folder gets a prepare command that writes
beside it, never into it), the log folder is writable, files named by the config exist, the fold has
training classes with slices and validation volumes exist when validation is on, the neighbour slices
of 2.5D input are stored (command 'train'; self-supervised episodes: PREP/superpixels, validation
optional), and eval.support names prepared volumes (command 'test'). Nothing is loaded beyond small
JSON files. Every error is one line, `util.errors.UserError`; the models and loaders trust what
passed here.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Mapping

from dataloaders.organs import INDEX_TO_NAME, organ_index, training_classes
from dataloaders.prepared import check_training_neighbours, list_volumes, read_meta, read_slice_index
from dataloaders.superpixels import read_superpixel_meta
from util.config_schema import check_run_config, fail
from util.device import resolve_device
from util.errors import UserError
from util.paths import check_writable_folder

NIFTI_SUFFIXES = (".nii", ".nii.gz")


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


def check_organ_names(config: Mapping) -> None:
    """label_sets and eval.organs name organs of the vocabulary (dataloaders/organs.py; aliases too)."""
    for organs in config.get("label_sets") or ():
        for name in organs:
            organ_index(name)  # raises a clear error for an unknown name
    for name in (config.get("eval") or {}).get("organs") or ():
        organ_index(str(name))


def _holds_nifti(folder: Path) -> bool:
    """`folder` or folder/Volumes holds NIfTI files (a raw data set, not a prepared folder)."""
    return any(path.name.endswith(NIFTI_SUFFIXES) for where in (folder, folder / "Volumes") if where.is_dir()
               for path in where.iterdir())


def check_data_dir(config: Mapping) -> None:
    """path.data_dir is a prepared folder. An existing folder without meta.json (raw VISCERAL data, NIfTI
    volumes, anything else) gets a prepare command whose --out lies beside it, never the folder itself."""
    data_dir = config["path"]["data_dir"]
    folder = Path(data_dir)
    if folder.is_dir() and not (folder / "meta.json").exists():
        beside = shlex.quote(str(folder.resolve().parent / f"{folder.resolve().name}_prepared"))
        source = shlex.quote(data_dir)
        if (folder / "SilverCorpus").is_dir() or (folder / "GoldCorpus").is_dir():
            what = "it holds raw VISCERAL data (SilverCorpus/, GoldCorpus/)"
            command = f"python scripts/prepare_visceral.py --visceral-dir {source} --out {beside}"
        elif _holds_nifti(folder):
            what = "it holds NIfTI volumes, not prepared slices"
            command = (f"python scripts/make_superpixels.py --images {source} --out {beside}"
                       if config.get("episodes") == "superpixels" else
                       f"python scripts/prepare_visceral.py --layout multilabel --visceral-dir {source} "
                       f"--out {beside}")
        else:
            what = "no meta.json"
            command = f"python scripts/prepare_visceral.py --visceral-dir <VISCERAL dir> --out {beside}"
        raise fail("path.data_dir", data_dir, f"not a prepared folder ({what})",
                   f"prepare it into a new folder beside it, `{command}`, then set path.data_dir={beside}")
    read_meta(data_dir, "path.data_dir")   # missing folder, unreadable meta.json: one line naming the command


def check_files(config: Mapping) -> None:
    """The log folder is writable and the files the config names exist."""
    paths = config["path"]
    check_writable_folder(paths["log_dir"], "config path.log_dir")   # before any run folder or compute
    if paths.get("init_from") is not None and not os.path.isfile(paths["init_from"]):
        raise fail("path.init_from", paths["init_from"], "does not exist",
                   "give a last.pth/best.pth written by train.py, or None")
    if paths.get("init_path") is not None and not os.path.isfile(paths["init_path"]):
        raise fail("path.init_path", paths["init_path"], "does not exist", "give a local ImageNet checkpoint "
                   "of the encoder or None (weights are never downloaded)")


def check_config(config: Mapping, command: str = "train") -> None:
    """Validate the resolved config for `command` ('train' or 'test'); raise UserError on bad input."""
    check_run_config(config)
    check_organ_names(config)
    check_files(config)
    resolve_device(config["device"])  # 'cuda' without a GPU: the one resolver's one-line error
    check_data_dir(config)
    if command == "train":
        check_world_size(config)
        check_training_data(config)
    else:
        check_snapshot_files(config)
        check_eval_support(config)


def check_world_size(config: Mapping) -> None:
    """Under torchrun, batch_size splits evenly over the processes (WORLD_SIZE)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1) or 1)
    if config["batch_size"] % world_size:
        raise fail("batch_size", config["batch_size"], f"not divisible by the {world_size} processes",
                   f"use a multiple of {world_size}")


def check_selfsup_data(config: Mapping) -> None:
    """Self-supervised episodes: PREP/superpixels present (the one-line error names make_superpixels.py)."""
    read_superpixel_meta(config["path"]["data_dir"])


def check_training_data(config: Mapping) -> None:
    """The fold has enough training classes with slices; validation volumes exist when needed; with
    model.input_slices=3 the training volumes' neighbour slices are stored."""
    data_dir = config["path"]["data_dir"]
    meta = read_meta(data_dir, "path.data_dir")
    if int(config["model"].get("input_slices", 1)) == 3:   # 2.5D input: the stored neighbour slices
        check_training_neighbours(data_dir, [str(pid) for pid in meta.get("splits", {}).get("train", [])],
                                  "path.data_dir")
    if config["episodes"] == "superpixels":
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
    if config["val_every"] > 0 and config["val_split"] == "val":
        val = meta.get("splits", {}).get("val", [])
        if len(val) < 2 or not os.path.isdir(os.path.join(data_dir, "volumes", "val")):
            raise UserError(f"path.data_dir '{data_dir}' has {len(val)} held-out validation volumes "
                            "(volumes/val), validation needs 2 (a support and a query): re-prepare with "
                            "--n-val 2 or more, or set val_every=0 to train without validation")
    if config["val_every"] > 0 and config["val_split"] == "gold":
        gold = meta.get("splits", {}).get("gold", [])
        if len(gold) < 2 or not os.path.isdir(os.path.join(data_dir, "volumes", "gold")):
            raise UserError(f"val_split='gold': path.data_dir '{data_dir}' has {len(gold)} gold volumes "
                            "(volumes/gold), selection on them needs 2: use val_split='val' or prepared gold "
                            "volumes")


def check_snapshot_files(config: Mapping) -> None:
    """Every eval.snapshots entry names an existing file (its contents are checked when it is loaded)."""
    for name, path in config["eval"]["snapshots"].items():
        if not os.path.isfile(path):
            raise fail(f"eval.snapshots['{name}']", path, "does not exist",
                       "give a best.pth/last.pth written by train.py")


def check_eval_support(config: Mapping) -> None:
    """eval.support names volumes of the evaluated split (or is 'default' / 'all')."""
    evaluation = config["eval"]
    support, split = evaluation["support"], evaluation["split"]
    chosen = [str(s) for s in support] if isinstance(support, (list, tuple)) else [str(support)]
    if chosen in (["default"], ["all"]):
        return
    try:
        pids = list_volumes(config["path"]["data_dir"], str(split))
    except UserError:  # no volumes: every named support is missing, said below
        pids = []
    missing = [pid for pid in chosen if pid not in pids]
    if missing:
        raise fail("eval.support", support, f"volume {', '.join(missing)} is not among the prepared {split} "
                   f"volumes ({', '.join(pids) or 'none'})", "use one of them, 'default' or 'all'")
