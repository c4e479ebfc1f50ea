"""The CHAOS-T2 benchmark's steps (scripts/bench_chaos.py): prepare, train, evaluate, under SSL-ALPNet's
protocol.

  1. per fold k and setting: a prepared folder (dataloaders/alpnet_prepare.py); Setting 1 one per fold
     (no slice dropped), Setting 2 one per label set (every training slice holding a test organ dropped,
     OR rule of SSL-ALPNet; `--rule and` for the Q-Net lineage's AND rule)      OUT/prepared/<tag>
  2. per method, the same training loop (train.py, a subprocess as a user would run it): self-supervised
     on SSL-ALPNet's own superpixels (LSLPN, PANet's head, the ALPNet head when this checkout has it), and
     LSLPN supervised on the other organs' labels (the paper's regime)          OUT/train/<name>/<id>/
  3. SSL-ALPNet's evaluation (evaluation/alpnet_protocol.py) of every method and mask copy on the fold's
     query scans against its support scan                                      OUT/results.json
Finished steps are reused: a prepared folder whose meta.json says the same fold/setting/rule, a run whose
last.pth reached n_steps with the same config (training.loop.config_hash, as resume uses).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from config import default_config, ex  # before sacred: config.py silences its import warning

# isort: split
from sacred.arg_parser import get_config_updates
from sacred.initialize import create_run

from dataloaders import alpnet_layout as layout
from dataloaders.alpnet_prepare import normalised_volume, prepare_alpnet
from dataloaders.organs import NAME_TO_INDEX
from dataloaders.prepared import load_volume, read_meta
from evaluation.alpnet_protocol import evaluate_query, mask_copy_predictor, model_predictor
from evaluation.evaluate import load_snapshot
from models.checkpoint import load_checkpoint
from training.loop import config_hash
from util.atomic import write_text_atomic
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MASK_COPY = "mask copy"


def head_available(head: str) -> bool:
    """Does this checkout's model have model.head=`head` (the ALPNet head is another change's)?"""
    from models import fewshot  # the model's head registry
    try:
        from util import config_schema  # the one place that validates config options
    except ImportError:
        return head in getattr(fewshot, "HEADS", ())
    return head in getattr(fewshot, "HEADS", ()) and head in getattr(config_schema, "HEADS", ())


def alpnet_episodes_available() -> bool:
    """Does this checkout's config have selfsup.episodes (SSL-ALPNet's own episode recipe, 'alpnet')?"""
    config = create_run(ex, "print_config", config_updates={}, named_configs=["selfsup"]).config
    return "episodes" in (config.get("selfsup") or {})


def methods(include_alpnet: bool = True) -> dict[str, dict]:
    """Table row -> how it trains: named configs and overrides on top of the budget's base.

    Self-supervised rows use SSL-ALPNet's episode recipe (selfsup.episodes=alpnet) where the checkout has it,
    else this project's ('selfsup' config); the report names which.
    """
    recipe = ["selfsup.episodes=alpnet"] if alpnet_episodes_available() else []
    rows = {"LSLPN": {"named": ["selfsup"], "overrides": [*recipe]},
            "PANet head": {"named": ["selfsup", "panet"], "overrides": [*recipe]}}
    if include_alpnet and head_available("alpnet"):
        rows["ALPNet head"] = {"named": ["selfsup"],
                               "overrides": ["model.head=alpnet", "model.align=True", *recipe]}
    rows["LSLPN, untrained"] = {"untrained_of": "LSLPN"}      # the LSLPN run's initial weights (step 0)
    rows["LSLPN, supervised"] = {"named": [], "overrides": ["class_setting=all_structures", "val_every=0"],
                                 "supervised": True}
    return rows


def budget_overrides(steps: int, input_size: int, batch_size: int, full: bool) -> tuple[list[str], list[str]]:
    """(named configs, overrides) of the run budget: the CPU budget on `demo`, or the published settings."""
    # SSL-ALPNet's schedule (docs/method.md, "The SSL-ALPNet protocol": 100k iterations, batch 1,
    # 256 x 256, lr 1e-3 x0.95/1k)
    if full:
        milestones = list(range(1000, 100000, 1000))
        return [], [f"n_steps={steps or 100000}", "input_size=256", "batch_size=1", "lr=1e-3",
                    f"lr_milestones={milestones}", "lr_gamma=0.95", "save_every=25000", "val_every=0",
                    "augment.p=0.0"]
    n = steps
    return ["demo"], [f"n_steps={n}", f"input_size={input_size}", f"batch_size={batch_size}",
                      f"lr_milestones=[{max(1, (3 * n) // 4)}]", f"save_every={n}",
                      f"print_every={max(1, n // 4)}",
                      "val_every=0", "augment.p=0.0"]


def tag(fold: int, setting: int, label_set: int | None, rule: str, validation: bool = False) -> str:
    """Prepared-folder name of one fold / setting / label set (validation: its validation scan held out)."""
    held = "_validation" if validation else ""
    if setting == 1:
        return f"fold{fold}_setting1{held}"
    return f"fold{fold}_setting2_labels{label_set}" + ("" if rule == "or" else f"_{rule}") + held


def prepared(data_dir: Path, out: Path, fold: int, setting: int, label_set: int | None, rule: str,
             log: list, validation: bool = False) -> Path:
    """The prepared folder of (fold, setting, label set), made unless one with the same meta exists.

    validation: the fold's validation scan is held out of training (dataloaders/alpnet_prepare.py)."""
    folder = out / "prepared" / tag(fold, setting, label_set, rule, validation)
    try:
        meta = read_meta(folder)["alpnet"]
        held = bool(meta.get("validation"))
        if (meta["fold"], meta["setting"], meta["rule"], meta.get("gold_image"), held) \
                == (fold, setting, rule, "as stored", validation) \
                and (setting == 1 or meta["label_set"] == label_set) and \
                read_meta(folder)["source"]["dir"] == str(data_dir.resolve()):
            return folder
    except (UserError, KeyError, TypeError):
        pass
    start = time.perf_counter()
    prepare_alpnet(data_dir, folder, fold, setting, label_set or 0, rule, overwrite=True,
                   validation=validation)
    log.append({"step": f"prepare {folder.name}", "seconds": round(time.perf_counter() - start, 1)})
    print(f"==> prepared {folder} ({log[-1]['seconds']} s)", flush=True)
    return folder


def supervised_fold(dataset: layout.AlpnetDataset, label_set: int) -> list[str]:
    """fold / label_sets overrides that make config's fold_training_classes the label set's training
    organs."""
    test = dataset.test_organs(label_set)
    sets = [["liver"], ["spleen"], ["kidney_right", "kidney_left"], ["psoas_right", "psoas_left"]]
    fold = 2 if set(test) == {"kidney_right", "kidney_left"} else 0
    sets[fold] = test
    return [f"fold={fold}", f"label_sets={json.dumps(sets)}"]


def resolved_hash(named: list[str], overrides: list[str]) -> tuple[str, int]:
    """(config_hash, n_steps) of the config `train.py with <named> <overrides>` resolves."""
    updates, more = get_config_updates(list(overrides))
    config = create_run(ex, "print_config", config_updates=updates, named_configs=[*named, *more]).config
    return config_hash(config, default_config()), int(config["n_steps"])


def finished(log_dir: Path, name: str, wanted: str, n_steps: int) -> Path | None:
    """last.pth of the latest run under log_dir/name that reached n_steps with config hash `wanted`."""
    runs = sorted((p for p in (log_dir / name).glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    for run in reversed(runs):
        if (run / "last.pth").exists():
            state = load_checkpoint(str(run / "last.pth"))
            if state.get("config_hash") == wanted and int(state["step"]) >= n_steps:
                return run / "last.pth"
    return None


def run_seconds(run_dir: Path) -> float | None:
    """Wall time of a finished Sacred run (run.json start_time .. stop_time), None when not recorded."""
    from datetime import datetime
    try:
        record = json.loads((run_dir / "run.json").read_text())
        start, stop = (datetime.fromisoformat(record[key]) for key in ("start_time", "stop_time"))
        return round((stop - start).total_seconds(), 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def train(name: str, named: list[str], overrides: list[str], log_dir: Path, log: list, device: str) -> Path:
    """Train one run through train.py (reused when finished); returns its last.pth."""
    overrides = [*overrides, f"name={name}", f"path.log_dir={log_dir}", f"device={device}"]
    wanted, n_steps = resolved_hash(named, overrides)
    snapshot = finished(log_dir, name, wanted, n_steps)
    if snapshot is not None:
        print(f"==> train {name}: reusing {snapshot}", flush=True)
        log.append({"step": f"train {name} (reused: its Sacred run time)",
                    "seconds": run_seconds(snapshot.parent),
                    "n_steps": n_steps, "reused": True})
        return snapshot
    command = [sys.executable, str(ROOT / "train.py"), "with", *named, *overrides, "resume=True"]
    print(f"\n==> train {name}\n$ python train.py with {' '.join(named + overrides)} resume=True", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=Path.cwd())
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise UserError(f"benchmark training '{name}' failed (exit {result.returncode}): "
                        "fix the message above and run again; finished runs are reused")
    snapshot = finished(log_dir, name, wanted, n_steps)
    if snapshot is None:
        raise UserError(f"training {name} ended without last.pth at step {n_steps} under {log_dir / name}")
    log.append({"step": f"train {name}", "seconds": round(seconds, 1), "n_steps": n_steps})
    return snapshot


_VOLUMES: dict[tuple[str, str], dict] = {}


def gold_volume(folder: Path, pid: str) -> dict:
    """A prepared evaluation volume, read once per process (every method and organ reuses it)."""
    key = (str(folder), str(pid))
    if key not in _VOLUMES:
        volume = load_volume(folder, "gold", pid)
        # as SSL-ALPNet's loader
        volume["image"] = normalised_volume(volume["image"], read_meta(folder)["intensity"])
        _VOLUMES[key] = volume
    return _VOLUMES[key]


def initial_model(snapshot: Path, device: str):
    """The model a run started from: its config built under its seed (as training.loop builds it)."""
    from models.factory import build_model
    from util.device import seed_everything
    state = load_checkpoint(str(snapshot))
    seed_everything(int(state["seed"]))
    return build_model(dict(state["config"])).to(device).eval(), int(state["input_size"])


def evaluate_method(snapshot: Path | None, folder: Path, organs: list[str], device: str,
                    untrained: bool = False) -> tuple[dict, dict, float]:
    """({organ: {query id: Dice}}, {organ: {query id: prediction}}, seconds) of one method on one fold.

    untrained: the snapshot's run at step 0 (its initial weights), a control for what training added."""
    start = time.perf_counter()
    meta = read_meta(folder)["alpnet"]
    if snapshot is None:
        predict = mask_copy_predictor
    elif untrained:
        model, size = initial_model(snapshot, device)
        predict = model_predictor(model, size, device)
    else:
        model, info = load_snapshot(snapshot, device)
        predict = model_predictor(model, int(info["input"]["input_size"]), device)
    dice, predictions = evaluate_predictor(predict, folder, organs, meta["test"])
    return dice, predictions, time.perf_counter() - start


def evaluate_predictor(predict, folder: Path, organs: list[str], queries: list[str]) -> tuple[dict, dict]:
    """({organ: {query id: Dice}}, {organ: {query id: prediction}}) of a Predictor on the given query
    scans of a prepared folder, against its support scan (SSL-ALPNet's protocol)."""
    support = gold_volume(folder, read_meta(folder)["alpnet"]["support"])
    dice, predictions = {}, {}
    for organ in organs:
        index = NAME_TO_INDEX[organ]
        dice[organ], predictions[organ] = {}, {}
        for qid in queries:
            query = gold_volume(folder, qid)
            value, prediction = evaluate_query(predict, support["image"], support["label"] == index,
                                               query["image"], query["label"] == index)
            dice[organ][qid], predictions[organ][qid] = value, prediction
    return dice, predictions


def run_bench(data_dir: Path, out: Path, folds: list[int], settings: list[int], rule: str, budget: dict,
              device: str, include_alpnet: bool = True, figure_hook=None, progress=None,
              label_sets: list[int] = (0, 1), only: list[str] | None = None) -> dict:
    """Every fold x setting x label set x method; returns (and writes OUT/results.json) the results.

    Order (what a short budget finishes first): Setting 2 before Setting 1, fold by fold; each method is
    evaluated right after its training; `progress(results)` runs after every evaluated cell.
    """
    dataset = layout.detect_dataset(data_dir)
    named_base, base = budget_overrides(budget["steps"], budget["input_size"], budget["batch_size"],
                                        budget["full"])
    rows = methods(include_alpnet)
    if only is not None:
        unknown = [name for name in only if name not in rows]
        if unknown:
            raise UserError(f"--methods {unknown[0]!r} is not a row of this benchmark: use {', '.join(rows)}")
        rows = {name: how for name, how in rows.items() if name in only
                or how.get("untrained_of") in only}
    log: list[dict] = []
    results = {"dataset": dataset.name, "data": str(data_dir), "rule": rule, "budget": budget,
               "methods": [MASK_COPY, *rows], "cells": [], "log": log,
               "episodes": "alpnet" if alpnet_episodes_available() else "project"}
    for setting in sorted(settings, reverse=True):
        for fold in folds:
            shared = prepared(data_dir, out, fold, setting, None, rule, log) if setting == 1 else None
            selfsup_snapshots: dict[str, Path] = {}
            for label_set in label_sets:
                folder = shared or prepared(data_dir, out, fold, setting, label_set, rule, log)
                organs = dataset.test_organs(label_set)
                kept = read_meta(folder)["alpnet"]["kept"]
                done: dict[str, Path | None] = {}
                for row in [MASK_COPY, *rows]:
                    how = rows.get(row, {})
                    key = row.lower().replace(", ", "_").replace(" ", "_")
                    if row == MASK_COPY:
                        snapshot = None
                    elif "untrained_of" in how:
                        snapshot = done.get(how["untrained_of"])
                        if snapshot is None:
                            continue
                    # no label read: one run serves both sets
                    elif setting == 1 and row in selfsup_snapshots:
                        snapshot = selfsup_snapshots[row]
                    else:
                        supervised = how.get("supervised", False)
                        name = f"{key}_fold{fold}_setting{setting}" + (
                            f"_labels{label_set}" if setting == 2 or supervised else "")
                        extra = supervised_fold(dataset, label_set) if supervised else []
                        snapshot = train(name, [*named_base, *how["named"]],
                                         [*base, *how["overrides"], *extra, f"path.data_dir={folder}"],
                                         out / "train", log, device)
                        if setting == 1 and not supervised:
                            selfsup_snapshots[row] = snapshot
                    done[row] = snapshot
                    dice, predictions, seconds = evaluate_method(snapshot, folder, organs, device,
                                                                 untrained="untrained_of" in how)
                    log.append({"step": f"evaluate {row} fold {fold} setting {setting} labels {label_set}",
                                "seconds": round(seconds, 1)})
                    results["cells"].append({"method": row, "fold": fold, "setting": setting,
                                             "label_set": label_set,
                                             "snapshot": str(snapshot) if snapshot else None, "dice": dice,
                                             "kept_slices": sum(v["kept"] for v in kept.values()),
                                             "all_slices": sum(v["slices"] for v in kept.values())})
                    if figure_hook is not None:
                        figure_hook(row, fold, setting, label_set, folder, predictions)
                    print(f"    {row:18s} fold {fold} setting {setting} labels {label_set}: " + ", ".join(
                        f"{o} {100 * np.nanmean(list(d.values())):.1f}" for o, d in dice.items()), flush=True)
                    write_text_atomic(json.dumps(results, indent=1), out / "results.json")
                    if progress is not None:
                        progress(results)
    return results


def exclusion_counts(data_dir: Path, folds: list[int]) -> dict:
    """Training slices kept under Setting 2 with the OR and the AND rule, per fold and label set."""
    dataset = layout.detect_dataset(data_dir)
    ids = layout.scan_ids(data_dir)
    labels = {}
    out = {}
    for fold in folds:
        _, _, training = layout.fold_scans(ids, fold, dataset)
        for sid in training:
            if sid not in labels:
                labels[sid] = layout.load_scan(data_dir, sid, dataset).label
        for label_set in (0, 1):
            excluded = dataset.test_values(label_set)
            out[f"{fold}/{label_set}"] = {
                "all": int(sum(labels[s].shape[2] for s in training)),
                **{rule: int(sum(layout.kept_slices(labels[s], excluded, rule).sum() for s in training))
                   for rule in ("or", "and")}}
    return out


def environment_note() -> str:
    """One line on the machine the benchmark ran on."""
    import platform

    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
            f"torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")
