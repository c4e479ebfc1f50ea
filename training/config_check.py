"""Validate a resolved Sacred config once, before anything runs: `check_config(config, command)`: the
run's own options (declared here) and their owners' (model, selfsup, senet, eval), the rules between
keys, the facts on disk the command needs. Every error is one line.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Mapping

from dataloaders.layouts import NIFTI_SUFFIXES
from dataloaders.organs import CLASS_SETTINGS, FOLD_ORGANS, INDEX_TO_NAME, organ_index, training_classes
from dataloaders.prepared import check_training_neighbours, list_volumes, read_meta, read_slice_index
from dataloaders.selfsup_episodes import SELFSUP_OPTIONS
from dataloaders.superpixels import read_superpixel_meta
from evaluation.protocols import EVAL_OPTIONS
from models.checkpoint import MAX_INPUT_SIZE, MIN_INPUT_SIZE
from models.encoders import IMAGENET_WEIGHTS
from models.fewshot import MODEL_OPTIONS, SENET, check_model_rules, method_of
from training.objective import SENET_OPTIONS
from util.device import AMP_FIX, AMP_SETTINGS, DEVICES, distributed_from_env, resolve_device
from util.errors import UserError
from util.io import check_input_folder, check_writable_folder
from util.options import (
    BOOL,
    MILESTONES,
    NAME,
    ORGAN_SETS,
    PAIR,
    PATH,
    Option,
    check_options,
    choice,
    fail,
    integer,
    number,
)

MAX_BATCH_SIZE = 1024      # episodes per step; above: memory for nothing, and hours before the first step

# The run's own options (config.py's top level and augment / senet / path sections).
RUN_OPTIONS: dict[str, Option] = {
    "name": Option(NAME, nullable=True),
    "seed": integer(0, example="1234"),
    "device": choice(*DEVICES),
    "amp": choice(*AMP_SETTINGS, example=AMP_FIX),
    "channels_last": Option(BOOL),
    "num_workers": integer(0, 256, example="0"),
    "fold": integer(0, len(FOLD_ORGANS) - 1, example="0"),
    "label_sets": Option(ORGAN_SETS),
    "class_setting": choice(*CLASS_SETTINGS),
    "input_size": integer(MIN_INPUT_SIZE, MAX_INPUT_SIZE, example="512"),
    "n_ways": integer(1, example="1"),
    "n_shots": integer(1, example="1"),
    "n_queries": integer(1, example="1"),
    "batch_size": integer(1, MAX_BATCH_SIZE, example="4"),
    "n_steps": integer(1, example="10000"),
    "lr": number(0, low_open=True, example="1e-3"),
    "momentum": number(0, 1, example="0.9"),
    "weight_decay": number(0, example="5e-4"),
    "lr_milestones": Option(MILESTONES),
    "lr_gamma": number(0, 1, low_open=True, example="0.1"),
    "grad_clip": number(0, example="0.0"),
    "boundary_weight": number(0, example="0.5"),
    "augment.p": number(0, 1, example="0.5"),
    "augment.brightness": Option(PAIR, 0, low_open=True),
    "augment.contrast": Option(PAIR, 0, low_open=True),
    "augment.gamma": Option(PAIR, 0, low_open=True),
    "episodes": choice("labels", "superpixels"),
    "path.data_dir": Option(PATH),
    "path.init_path": Option(PATH, nullable=True),
    "path.init_from": Option(PATH, nullable=True),
    "path.log_dir": Option(PATH),
    "save_every": integer(1, example="1000"),
    "val_every": integer(0, example="1000"),
    "val_split": choice("val", "gold"),
    "print_every": integer(1, example="100"),
    "resume": Option(BOOL),
}
# Every key of config.py: the run's, then each owner's section.
OWNED = {"model": MODEL_OPTIONS, "selfsup": SELFSUP_OPTIONS, "senet": SENET_OPTIONS, "eval": EVAL_OPTIONS}
SCHEMA: dict[str, Option] = {**RUN_OPTIONS, **{f"{section}.{key}": option
                                               for section, options in OWNED.items()
                                               for key, option in options.items()}}


def check_run_config(config: Mapping) -> None:
    """The one pass over a resolved run config: known keys, types, ranges, then the rules between keys."""
    check_options(config, SCHEMA, "config.py", nullable_sections=("augment",))
    model, n_ways, size = config["model"], config["n_ways"], config["input_size"]
    check_model_rules(model, "model", size)
    init_path, senet = config["path"]["init_path"], method_of(model) == SENET
    if not senet and init_path is not None and model["encoder"] not in IMAGENET_WEIGHTS:
        raise fail("path.init_path", init_path, f"encoder {model['encoder']} has no ImageNet layout to load",
                   "set path.init_path=None, or use vgg16 / resnet50_lslpn")
    if senet and n_ways != 1:
        raise fail("n_ways", n_ways, "SENet segments one class at a time", "set n_ways=1")
    if senet and size % 16:
        raise fail("input_size", size, "SENet needs a multiple of 16 (4 poolings)",
                   f"e.g. input_size={max(16, size // 16 * 16)}")
    if config["episodes"] == "superpixels" and n_ways != 1:
        raise fail("n_ways", n_ways, "self-supervised episodes have one pseudo-class (a superpixel)",
                   "set n_ways=1")


def fold_training_classes(config: Mapping) -> list[int]:
    """Training label indices of the configured fold: never one of its test organs (label_sets)."""
    fold = config["fold"]
    held_out = {organ_index(name) for name in config["label_sets"][fold]}
    return [c for c in training_classes(fold, config["class_setting"]) if c not in held_out]


def held_out(config: Mapping, split: str) -> tuple[int, bool]:
    """(volumes of `split` in path.data_dir's meta.json, whether validation on them can run: >= 2, a support
    and a query, and volumes/<split> present)."""
    data_dir = config["path"]["data_dir"]
    count = len(read_meta(data_dir, "path.data_dir").get("splits", {}).get(split, []))
    return count, count >= 2 and os.path.isdir(os.path.join(data_dir, "volumes", split))


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
    if folder.exists():           # a file, or DICOM: the right diagnosis, never a prepare command onto it
        check_input_folder(folder, "path.data_dir = ",
                           "give a folder written by scripts/prepare_visceral.py")
    if folder.is_dir() and not (folder / "meta.json").exists():
        beside = shlex.quote(str(folder.resolve().parent / f"{folder.resolve().name}_prepared"))

        def prepare(layout: str = "", source: str = shlex.quote(data_dir)) -> str:
            return f"python scripts/prepare_visceral.py{layout} --visceral-dir {source} --out {beside}"
        if (folder / "SilverCorpus").is_dir() or (folder / "GoldCorpus").is_dir():
            what, command = "it holds raw VISCERAL data (SilverCorpus/, GoldCorpus/)", prepare()
        elif any(folder.glob("image_*.nii.gz")) and any(folder.glob("label_*.nii.gz")):
            what, command = "it holds scans in SSL-ALPNet's layout", prepare(" --layout alpnet")
        elif _holds_nifti(folder):
            what = "it holds NIfTI volumes, not prepared slices"
            command = (f"python scripts/make_superpixels.py --images {shlex.quote(data_dir)} --out {beside}"
                       if config["episodes"] == "superpixels" else prepare(" --layout multilabel"))
        else:
            what, command = "no meta.json", prepare(source="<VISCERAL dir>")
        raise fail("path.data_dir", data_dir, f"not a prepared folder ({what})",
                   f"prepare it into a new folder beside it, `{command}`, then set path.data_dir={beside}")
    read_meta(data_dir, "path.data_dir")   # missing folder, unreadable meta.json: one line naming the command


def check_files(files: Mapping[str, str | None], fix: str) -> None:
    """Every file of {key: path or None} exists (its contents are checked when it is read)."""
    for key, path in files.items():
        if path is not None and not os.path.isfile(path):
            raise fail(key, path, "is a folder" if os.path.isdir(path) else "does not exist", fix)


def check_config(config: Mapping, command: str = "train") -> None:
    """Validate the resolved config for `command` ('train' or 'test'); raise UserError on bad input."""
    check_run_config(config)
    check_organ_names(config)
    paths = config["path"]
    check_writable_folder(paths["log_dir"], "config path.log_dir")   # before any run folder or compute
    check_files({"path.init_from": paths["init_from"]},
                "give a last.pth/best.pth written by train.py, or None")
    check_files({"path.init_path": paths["init_path"]}, "give a local ImageNet checkpoint of the encoder or "
                "None (weights are never downloaded)")
    resolve_device(config["device"])  # 'cuda' without a GPU: the one resolver's one-line error
    check_data_dir(config)
    if command == "train":
        check_world_size(config)
        check_training_data(config)
    else:
        check_files({f"eval.snapshots['{name}']": path for name, path in config["eval"]["snapshots"].items()},
                    "give a best.pth/last.pth written by train.py")
        check_eval_support(config)


def check_world_size(config: Mapping) -> None:
    """Under torchrun, batch_size splits evenly over the processes (WORLD_SIZE)."""
    world_size = distributed_from_env().world_size
    if config["batch_size"] % world_size:
        raise fail("batch_size", config["batch_size"], f"not divisible by the {world_size} processes",
                   f"use a multiple of {world_size}")


def check_training_data(config: Mapping) -> None:
    """The fold has enough training classes with slices; validation volumes exist when needed; with
    model.input_slices=3 the training volumes' neighbour slices are stored."""
    data_dir = config["path"]["data_dir"]
    meta = read_meta(data_dir, "path.data_dir")
    if config["model"]["input_slices"] == 3:   # 2.5D input: the stored neighbour slices
        check_training_neighbours(data_dir, [str(pid) for pid in meta.get("splits", {}).get("train", [])],
                                  "path.data_dir")
    if config["episodes"] == "superpixels":
        read_superpixel_meta(data_dir)   # its error names make_superpixels.py; validation is optional there
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
    count, enough = held_out(config, config["val_split"])
    if config["val_every"] > 0 and not enough and config["val_split"] == "val":
        raise UserError(f"path.data_dir '{data_dir}' has {count} held-out validation volumes "
                        "(volumes/val), validation needs 2 (a support and a query): re-prepare with "
                        "scripts/prepare_visceral.py --n-val 2 or more, or set val_every=0 to train without "
                        "validation")
    if config["val_every"] > 0 and not enough:
        raise UserError(f"val_split='gold': path.data_dir '{data_dir}' has {count} gold volumes "
                        "(volumes/gold), selection on them needs 2: use val_split='val' or prepared gold "
                        "volumes")


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
