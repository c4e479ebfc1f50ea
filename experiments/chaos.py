"""The steps of SSL-ALPNet's protocol benchmark (scripts/bench_chaos.py, its --lslpn-plus sweep), each reused
when finished with the same inputs (docs/bench_chaos.md says what each row is):
  prepare   one folder per fold and Setting (and label set in Setting 2)     OUT/prepared/<tag>
  train     every method through experiments.runner.train_or_reuse           OUT/train/<name>/<id>/
  evaluate  test.py's `evaluate` (preset 'alpnet') on the fold's query scans  OUT/evaluations/<digest>.json
Results per cell in OUT/results.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from dataloaders import layouts as layout
from dataloaders.nifti import _clean_stale, _pid_alive
from dataloaders.prepare import normalised_volume, prepare_alpnet
from dataloaders.prepared import load_volume, read_meta
from evaluation.evaluate import evaluate
from experiments.runner import ROOT, train_or_reuse
from models.checkpoint import load_checkpoint
from util.atomic import atomic_path, write_text_atomic
from util.errors import UserError

MASK_COPY = "mask copy"
DATA_ENV = "CHAOS_T2_DIR"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "chaos_mr_t2"   # a checkout next to the shared data folder


def default_data() -> Path:
    """$CHAOS_T2_DIR, else ../shared/data/chaos_mr_t2 beside the repository."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def describe_data(data_dir: Path, folds: list[int]) -> dict:
    """What the report says the benchmark ran on: data set, modality, scan count, query scans per fold,
    the folder, and whether it is the whole data set of the published figures (all its scans)."""
    dataset = layout.detect_dataset(data_dir)
    ids = layout.scan_ids(data_dir)
    return {"name": dataset.name, "modality": dataset.modality, "scans": len(ids),
            "queries_per_fold": sorted({len(layout.fold_scans(ids, fold, dataset)[0]) for fold in folds}),
            "folder": str(Path(data_dir).resolve()), "published": len(ids) == dataset.separators[-1]}


def clean_leftovers(out: Path) -> None:
    """What a stopped benchmark left half-written: prepared folders (`<tag>.partial-<pid>`, `.old-<pid>`,
    atomic_folder's rule) and temporary files (`<file>.tmp-<pid>`) of ended processes are removed (or put
    back); those of a live process are named."""
    found = [*(out / "prepared").glob("*.*-*"), *out.glob("*.tmp-*"), *(out / "evaluations").glob("*.tmp-*")]
    for path in sorted(found):
        tag, _, suffix = path.name.rpartition(".")
        kind, _, pid = suffix.partition("-")
        if kind not in ("partial", "old", "tmp") or not pid.isdigit():
            continue
        if kind != "tmp":
            _clean_stale(path.with_name(tag))
        elif not _pid_alive(int(pid)):
            path.unlink()
        if path.exists():
            print(f"==> {path}: still being written by process {pid} (another benchmark on this --out?): "
                  "left alone", flush=True)
        else:
            print(f"==> {path}: left by a stopped run: cleaned up", flush=True)


def methods() -> dict[str, dict]:
    """Table row -> how it trains: named configs and overrides on top of the budget's base.
    Self-supervised rows use SSL-ALPNet's episode recipe (selfsup.episodes=alpnet)."""
    recipe = ["selfsup.episodes=alpnet"]
    return {"LSLPN": {"named": ["selfsup"], "overrides": recipe},
            "PANet head": {"named": ["selfsup", "panet"], "overrides": recipe},
            "ALPNet head": {"named": ["selfsup"],
                            "overrides": ["model.head=alpnet", "model.align=True", *recipe]},
            "LSLPN, untrained": {"untrained_of": "LSLPN"},      # the LSLPN run's initial weights (step 0)
            "LSLPN, supervised": {"named": [], "overrides": ["class_setting=all_structures", "val_every=0"],
                                  "supervised": True}}


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

    validation: the fold's validation scan is held out of training (dataloaders/prepare.py)."""
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
    """last.pth of the run `train.py with <named> <overrides>` (experiments.runner.train_or_reuse); a
    reused run enters the log with its Sacred run time."""
    logged = len(log)
    snapshot = train_or_reuse([*named, *overrides, f"name={name}", f"path.log_dir={log_dir}",
                               f"device={device}"], snapshot="last.pth", title=f"train {name}", log=log)
    if len(log) == logged:
        log.append({"step": f"train {name} (reused: its Sacred run time)",
                    "seconds": run_seconds(snapshot.parent), "reused": True})
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
    return build_model(dict(state["model_config"])).to(device).eval(), int(state["input_size"])


def evaluate_method(snapshot: Path | None, folder: Path, organs: list[str], device: str,
                    untrained: bool = False, queries: list[str] | None = None,
                    model_transform=None) -> tuple[dict, dict, float]:
    """({organ: {query id: Dice}}, {organ: {query id: prediction}}, seconds) of one method on one fold,
    through test.py's `evaluate` (preset 'alpnet'; queries: the folder's test scans unless given).

    untrained: the snapshot's run at step 0 (its initial weights), a control for what training added."""
    start = time.perf_counter()
    spec, size = snapshot, None
    if untrained:
        spec, size = initial_model(snapshot, device)
    queries = list(queries or read_meta(folder)["alpnet"]["test"])
    predictions: dict[str, dict] = {organ: {} for organ in organs}

    def keep(record, _support, _query, prediction) -> None:
        predictions[record["organ"]][record["query"]] = prediction
    name = MASK_COPY if snapshot is None else "method"
    results = evaluate({name: spec}, organs, folder, preset="alpnet", queries=queries, input_size=size,
                       device=device, progress=False, figures=False, save_predictions=False,
                       model_transform=model_transform, on_prediction=keep)["results"][name]
    dice = {organ: {qid: float("nan") for qid in queries} for organ in organs}
    for organ in organs:
        for case in results[organ]["per_volume"]:
            dice[organ][case["query"]] = case["dice_range"]
    return dice, predictions, time.perf_counter() - start


def file_digest(path: Path) -> str:
    """SHA-256 (16 hex digits) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def evaluate_cached(out: Path, snapshot: Path | None, folder: Path, organs: list[str], device: str,
                    untrained: bool = False) -> tuple[dict, dict, float, bool]:
    """(Dice, predictions of the first query scan, seconds, reused) of `evaluate_method`, reused from
    OUT/evaluations/<digest>.json when one exists for the same inputs: the snapshot's bytes, untrained,
    the preset, the prepared folder's meta.json, organs, query scans and device."""
    queries = list(read_meta(folder)["alpnet"]["test"])
    inputs = {"snapshot": None if snapshot is None else file_digest(snapshot), "untrained": untrained,
              "preset": "alpnet", "meta": file_digest(folder / "meta.json"), "organs": list(organs),
              "queries": queries, "device": device}
    path = out / "evaluations" / (hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
                                  + ".json")
    if path.is_file():             # written last: a complete evaluation
        saved = json.loads(path.read_text())
        with np.load(path.with_suffix(".npz")) as arrays:
            first = {organ: {queries[0]: arrays[organ]} for organ in arrays.files}
        return saved["dice"], first, saved["seconds"], True
    dice, predictions, seconds = evaluate_method(snapshot, folder, organs, device, untrained=untrained)
    first = {organ: {queries[0]: per_query[queries[0]]} for organ, per_query in predictions.items()
             if queries[0] in per_query}
    with atomic_path(path.with_suffix(".npz")) as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, **{organ: per_query[queries[0]] for organ, per_query in first.items()})
    write_text_atomic(json.dumps({"inputs": inputs, "dice": dice, "seconds": seconds}, indent=1), path)
    return dice, first, seconds, False


def run_bench(data_dir: Path, out: Path, folds: list[int], settings: list[int], rule: str, budget: dict,
              device: str, figure_hook=None, progress=None,
              label_sets: list[int] = (0, 1), only: list[str] | None = None) -> dict:
    """Every fold x setting x label set x method; returns (and writes OUT/results.json) the results.

    Order (what a short budget finishes first): Setting 2 before Setting 1, fold by fold; each method is
    evaluated right after its training; `progress(results)` runs after every evaluated cell.
    """
    dataset = layout.detect_dataset(data_dir)
    clean_leftovers(out)
    named_base, base = budget_overrides(budget["steps"], budget["input_size"], budget["batch_size"],
                                        budget["full"])
    rows = methods()
    if only is not None:
        unknown = [name for name in only if name not in rows]
        if unknown:
            raise UserError(f"--methods {unknown[0]!r} is not a row of this benchmark: use {', '.join(rows)}")
        rows = {name: how for name, how in rows.items() if name in only
                or how.get("untrained_of") in only}
    log: list[dict] = []
    results = {"data_set": describe_data(data_dir, folds), "rule": rule, "budget": budget,
               "methods": [MASK_COPY, *rows], "cells": [], "log": log}
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
                    dice, predictions, seconds, reused = evaluate_cached(
                        out, snapshot, folder, organs, device, untrained="untrained_of" in how)
                    log.append({"step": f"evaluate {row} fold {fold} setting {setting} labels {label_set}"
                                + (" (reused)" if reused else ""), "seconds": round(seconds, 1)}
                               | ({"reused": True} if reused else {}))
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
