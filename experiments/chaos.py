"""The steps of SSL-ALPNet's protocol benchmark (scripts/bench_chaos.py, its --lslpn-plus sweep), each reused
when finished with the same inputs (docs/bench_chaos.md says what each row is):
  prepare   one folder per fold and Setting (and label set in Setting 2)     OUT/prepared/<tag>
  train     every method through experiments.runner.train_or_reuse           OUT/train/<name>/<id>/
  evaluate  test.py's `evaluate` (preset 'alpnet') on the fold's query scans  OUT/evaluations/<digest>.json
  no oracle the same scans segmented as evaluation/segment.py does (range found, whole volume scored)
Results per cell in OUT/results.json; the report (docs/bench_chaos.md) and its overlay figure below.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dataloaders import layouts as layout
from dataloaders.label_map import sidecar_path
from dataloaders.nifti import NiftiVolume, _clean_stale, _pid_alive, save_nifti_atomic
from dataloaders.organs import NAME_TO_INDEX
from dataloaders.prepare import normalised_volume, prepare_alpnet
from dataloaders.prepared import load_volume, read_meta
from dataloaders.superpixels import make_alpnet_superpixels
from dataloaders.transforms import needs_hounsfield
from evaluation.evaluate import evaluate
from evaluation.protocols import dice as dice_score
from evaluation.protocols import organ_slice_list, summarise_folds, support_slices
from evaluation.segment import LabelledScan, load_model, organ_supports, segment_scan
from experiments.runner import ROOT, train_or_reuse
from models.checkpoint import load_checkpoint, model_input
from models.fewshot import build_model
from phantom import DEMO as PHANTOM
from phantom import DEMO_DIR as PHANTOM_DIR
from phantom import generate_phantom
from util.device import resolve_device, seed_everything
from util.errors import UserError
from util.io import atomic_path, write_text_atomic

MASK_COPY = "mask copy"
NO_ORACLE_CHUNKS = 3        # support slices per query without the oracle, as the protocol's (1/6, 1/2, 5/6)
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
    shipped = not layout.missing_superpixels(data_dir, ids)
    return {"name": dataset.name, "modality": dataset.modality, "scans": len(ids),
            "queries_per_fold": sorted({len(layout.fold_scans(ids, fold, dataset)[0]) for fold in folds}),
            "folder": str(Path(data_dir).resolve()), "published": len(ids) == dataset.separators[-1],
            "superpixels": "the folder's" if shipped else "made by this project",
            "classmap": (Path(data_dir) / layout.CLASSMAP).is_file()}


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
    return ["demo"], [f"n_steps={steps}", f"input_size={input_size}", f"batch_size={batch_size}",
                      f"lr_milestones=[{max(1, (3 * steps) // 4)}]", f"save_every={steps}",
                      f"print_every={max(1, steps // 4)}", "val_every=0", "augment.p=0.0"]


def tag(fold: int, setting: int, label_set: int | None, rule: str, validation: bool = False) -> str:
    """Prepared-folder name of one fold / setting / label set (validation: its validation scan held out)."""
    held = "_validation" if validation else ""
    if setting == 1:
        return f"fold{fold}_setting1{held}"
    return f"fold{fold}_setting2_labels{label_set}" + ("" if rule == "or" else f"_{rule}") + held


def prepared(data_dir: Path, out: Path, fold: int, setting: int, label_set: int | None, rule: str,
             log: list, validation: bool = False) -> Path:
    """The prepared folder of (fold, setting, label set), made unless one with the same meta exists
    (validation: the fold's validation scan held out of training, dataloaders/prepare.py)."""
    folder = out / "prepared" / tag(fold, setting, label_set, rule, validation)
    try:
        whole = read_meta(folder)
        meta, held = whole["alpnet"], bool(whole["alpnet"].get("validation"))
        if (meta["fold"], meta["setting"], meta["rule"], meta.get("gold_image"), held) \
                == (fold, setting, rule, "as stored", validation) \
                and (setting == 1 or meta["label_set"] == label_set) and meta.get("superpixels") and \
                whole["source"]["dir"] == str(data_dir.resolve()):
            return folder
    except (UserError, KeyError, TypeError):
        pass
    superpixels = superpixel_source(data_dir, out, log)
    start = time.perf_counter()
    prepare_alpnet(data_dir, folder, fold, setting, label_set or 0, rule, overwrite=True,
                   validation=validation, superpixel_dir=superpixels)
    log.append({"step": f"prepare {folder.name}", "seconds": round(time.perf_counter() - start, 1)})
    print(f"==> prepared {folder} ({log[-1]['seconds']} s)", flush=True)
    return folder


def superpixel_source(data_dir: Path, out: Path, log: list) -> Path:
    """The folder of the superpix-MIDDLE files: the data folder when it holds every scan's, else
    OUT/superpixels, made once with SSL-ALPNet's parameters (the data folder is never written)."""
    ids = layout.scan_ids(data_dir)
    target = out / "superpixels"
    for folder in (data_dir, target):
        if not layout.missing_superpixels(folder, ids):
            return folder
    start = time.perf_counter()
    made = make_alpnet_superpixels(data_dir, out=target, progress=False)
    log.append({"step": f"superpixels of {len(made['written'])} scans (SSL-ALPNet's parameters) into "
                        f"{target}", "seconds": round(time.perf_counter() - start, 1)})
    print(f"==> {log[-1]['step']} ({log[-1]['seconds']} s)", flush=True)
    return target


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


@functools.cache
def gold_volume(folder: Path, pid: str) -> dict:
    """A prepared evaluation volume, normalised as SSL-ALPNet's loader, read once per process."""
    volume = load_volume(folder, "gold", pid)
    volume["image"] = normalised_volume(volume["image"], read_meta(folder)["intensity"])
    return volume


def initial_model(snapshot: Path, device: str):
    """(model, input size, intensity) a run started from: its config built under its seed (as training.loop
    builds it)."""
    state = load_checkpoint(str(snapshot))
    seed_everything(int(state["seed"]))
    return (build_model(dict(state["model_config"])).to(device).eval(), int(state["input_size"]),
            model_input(state)[1])


def evaluate_method(snapshot: Path | None, folder: Path, organs: list[str], device: str,
                    untrained: bool = False, queries: list[str] | None = None,
                    model_transform=None) -> tuple[dict, dict, float]:
    """({organ: {query id: Dice}}, {organ: {query id: prediction}}, seconds) of one method on one fold,
    through test.py's `evaluate` (preset 'alpnet'; queries: the folder's test scans unless given).

    untrained: the snapshot's run at step 0 (its initial weights), a control for what training added."""
    start = time.perf_counter()
    spec, size = snapshot, None
    if untrained:
        spec, size, _ = initial_model(snapshot, device)
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


def surface_distance_95(prediction: np.ndarray, target: np.ndarray, spacing) -> float:
    """95th percentile (mm) of the distances from each surface voxel of either mask to the other's surface,
    both directions pooled (medpy's hd95); surface: voxels with a 6-neighbour outside the mask or the
    volume. NaN when either mask is empty. Masks X x Y x Z bool, spacing (3,) mm."""
    if not prediction.any() or not target.any():
        return float("nan")
    box, = ndimage.find_objects((prediction | target).astype(np.uint8))          # both surfaces lie inside
    a, b = (np.pad(mask[box], 1) for mask in (prediction, target))
    a, b = (mask ^ ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1)) for mask in (a, b))
    distances = [ndimage.distance_transform_edt(~to, sampling=spacing)[source]      # mm, per surface voxel
                 for source, to in ((a, b), (b, a))]
    return float(np.percentile(np.concatenate(distances), 95))


def evaluate_no_oracle(snapshot: Path | None, folder: Path, organs: list[str], device: str,
                       untrained: bool = False) -> tuple[dict, dict, float]:
    """({organ: {query id: Dice}}, {organ: {query id: HD95 mm}}, seconds): each query scan segmented for
    every organ at once as evaluation/segment.py does (`segment_scan`: the range found from the images,
    the largest 3D component kept), no ground truth used, scored over the whole volume. None: mask copy."""
    start, device = time.perf_counter(), resolve_device(device)
    model, size, intensity = None, None, None
    if untrained:
        model, size, intensity = initial_model(snapshot, device)
    elif snapshot is not None:
        model, size, intensity = load_model(snapshot, device, None, None)
    meta = read_meta(folder)["alpnet"]
    support = load_volume(folder, "gold", meta["support"])
    names = {NAME_TO_INDEX[organ]: organ for organ in organs}
    scan = LabelledScan(np.asarray(support["image"], dtype=np.float32), support["label"], support["affine"],
                        names, meta["support"])
    by_organ, prototypes = organ_supports([scan], None), {}       # an organ absent from the support: NaN
    scores = {"dice": {organ: {} for organ in organs}, "hd95": {organ: {} for organ in organs}}
    for qid in meta["test"]:
        query = load_volume(folder, "gold", qid)
        image = np.asarray(query["image"], dtype=np.float32)                       # X x Y x Z as stored
        volume = NiftiVolume(image, query["affine"], query["affine"], image.shape, "as stored", Path(qid))
        labels, _ = segment_scan(model, by_organ, volume, image, size, intensity, device, 16,
                                 NO_ORACLE_CHUNKS, prototypes)
        for value, organ in names.items():
            predicted, truth = labels == value, query["label"] == value
            scores["dice"][organ][qid] = dice_score(predicted, truth) if value in by_organ else float("nan")
            scores["hd95"][organ][qid] = surface_distance_95(predicted, truth, query["spacing"])
    return scores["dice"], scores["hd95"], time.perf_counter() - start


def file_digest(path: Path) -> str:
    """SHA-256 (16 hex digits) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cache_entry(out: Path, snapshot: Path | None, folder: Path, organs: list[str], device: str,
                untrained: bool, preset: str) -> tuple[dict, Path]:
    """(inputs, OUT/evaluations/<digest of the inputs>.json) of one evaluation."""
    inputs = {"snapshot": None if snapshot is None else file_digest(snapshot), "untrained": untrained,
              "preset": preset, "meta": file_digest(folder / "meta.json"), "organs": list(organs),
              "queries": list(read_meta(folder)["alpnet"]["test"]), "device": device}
    if preset != "alpnet":
        inputs["n_chunks"] = NO_ORACLE_CHUNKS
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return inputs, out / "evaluations" / f"{digest}.json"


def no_oracle_cached(out: Path, snapshot: Path | None, folder: Path, organs: list[str], device: str,
                     untrained: bool = False) -> tuple[dict, dict, float, bool]:
    """(Dice, HD95, seconds, reused) of `evaluate_no_oracle`, reused as `evaluate_cached`'s."""
    inputs, path = cache_entry(out, snapshot, folder, organs, device, untrained, "no oracle")
    if path.is_file():
        saved = json.loads(path.read_text())
        return saved["dice"], saved["hd95"], saved["seconds"], True
    dice, hd95, seconds = evaluate_no_oracle(snapshot, folder, organs, device, untrained)
    saved = {"inputs": inputs, "dice": dice, "hd95": hd95, "seconds": seconds}
    write_text_atomic(json.dumps(saved, indent=1), path)
    return dice, hd95, seconds, False


def evaluate_cached(out: Path, snapshot: Path | None, folder: Path, organs: list[str], device: str,
                    untrained: bool = False) -> tuple[dict, dict, float, bool]:
    """(Dice, predictions of the first query scan, seconds, reused) of `evaluate_method`, reused from
    OUT/evaluations/<digest>.json when one exists for the same inputs: the snapshot's bytes, untrained,
    the preset, the prepared folder's meta.json, organs, query scans and device."""
    queries = list(read_meta(folder)["alpnet"]["test"])
    inputs, path = cache_entry(out, snapshot, folder, organs, device, untrained, "alpnet")
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


def run_bench(data_dir: Path, out: Path, folds: list[int], settings: list[int], rules: list[str],
              budget: dict, device: str, figure_hook=None, progress=None,
              label_sets: list[int] = (0, 1), only: list[str] | None = None) -> dict:
    """Every fold x setting x label set x method; returns (and writes OUT/results.json) the results. Order
    (a short budget finishes the first): Setting 2 under rules[0], Setting 1, then Setting 2 under the other
    rules (protocol Dice only); each method is evaluated right after its training, under the protocol and
    without the oracle; `progress(results)` runs after every cell."""
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
    rule = rules[0]
    results = {"data_set": describe_data(data_dir, folds), "rule": rule, "budget": budget,
               "methods": [MASK_COPY, *rows], "cells": [], "log": log}
    passes = [(2, rule)] * (2 in settings) + [(1, None)] * (1 in settings) + [(2, r) for r in rules[1:]
                                                                               if 2 in settings]
    for setting, cell_rule in passes:
        extra = cell_rule not in (None, rule)        # another rule's Setting 2: protocol Dice only
        where = " " + cell_rule.upper() + " rule" if extra else ""
        for fold in folds:
            shared = prepared(data_dir, out, fold, setting, None, rule, log) if setting == 1 else None
            selfsup_snapshots: dict[str, Path] = {}
            for label_set in label_sets:
                folder = shared or prepared(data_dir, out, fold, setting, label_set, cell_rule, log)
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
                        name = f"{key}_{folder.name}" + (            # run names: the folders' tags
                            f"_labels{label_set}" if setting == 1 and supervised else "")
                        labels = supervised_fold(dataset, label_set) if supervised else []
                        snapshot = train(name, [*named_base, *how["named"]],
                                         [*base, *how["overrides"], *labels, f"path.data_dir={folder}"],
                                         out / "train", log, device)
                        log[-1].update({"rule": cell_rule} if extra else {})
                        if setting == 1 and not supervised:
                            selfsup_snapshots[row] = snapshot
                    done[row] = snapshot
                    untrained = "untrained_of" in how
                    cell_name = f"{row} fold {fold} setting {setting} labels {label_set}{where}"
                    dice, predictions, seconds, reused = evaluate_cached(out, snapshot, folder, organs,
                                                                         device, untrained)
                    log.append({"step": f"evaluate {cell_name}" + (" (reused)" if reused else ""),
                                "seconds": round(seconds, 1)} | ({"reused": True} if reused else {})
                               | ({"rule": cell_rule} if extra else {}))
                    cell = {"method": row, "fold": fold, "setting": setting, "rule": cell_rule,
                            "label_set": label_set, "snapshot": str(snapshot) if snapshot else None,
                            "dice": dice, "kept_slices": sum(v["kept"] for v in kept.values()),
                            "all_slices": sum(v["slices"] for v in kept.values())}
                    results["cells"].append(cell)
                    if not extra:
                        cell["no_oracle_dice"], cell["no_oracle_hd95"], seconds, reused = no_oracle_cached(
                            out, snapshot, folder, organs, device, untrained)
                        log.append({"step": f"no oracle {cell_name}" + (" (reused)" if reused else ""),
                                    "seconds": round(seconds, 1), "no_oracle": True}
                                   | ({"reused": True} if reused else {}))
                        if figure_hook is not None:
                            figure_hook(row, fold, setting, label_set, folder, predictions)
                    print(f"    {row:18s} {cell_name[len(row) + 1:]}: " + ", ".join(
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
    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
            f"torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")


# ------------------------------------------------------------------ report and overlay figure
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right"]      # the published tables' order
HEAD = {"liver": "liver", "spleen": "spleen", "kidney_left": "LK", "kidney_right": "RK"}
# SSL-ALPNet (ECCV 2020) Table 1 as reproduced by the FoB-SAM README (commit 40d0e23): liver / spleen / LK
# / RK / mean per (data set, Setting), pretrained ResNet-101 (COCO DeepLabv3), GPU, 100k iterations.
PUBLISHED = {("chaos_t2", 1): [76.10, 72.18, 81.92, 85.18, 78.84],
             ("chaos_t2", 2): [73.05, 67.02, 73.63, 78.39, 73.02],
             ("sabs", 1): [78.29, 70.96, 72.36, 71.81, 73.35],
             ("sabs", 2): [73.67, 60.25, 63.34, 54.82, 63.02]}
TITLE = {"chaos_t2": "CHAOS-T2 abdominal MRI", "sabs": "SABS (BTCV) abdominal CT"}
NORMALISATION = {"MR": "z-scored per volume",
                 "CT": "one mean and std over every voxel of the fold's training scans (SSL-ALPNet's rule)"}


def queries_text(data_set: dict) -> str:
    """'4' (or '4-5' when folds differ) query scans per fold."""
    counts = data_set["queries_per_fold"]
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def fold_means(cells: list[dict], method: str, setting: int, key: str = "dice") -> dict[int, dict]:
    """{fold: {organ: mean over the fold's query scans}} of one method and setting (both label sets), of the
    cells' `key` scores ({organ: {query: value}}; NaN values left out)."""
    out: dict[int, dict[str, float]] = {}
    for cell in cells:
        if cell["method"] == method and cell["setting"] == setting and key in cell:
            for organ, per_query in cell[key].items():
                values = [v for v in per_query.values() if v is not None and np.isfinite(v)]
                out.setdefault(cell["fold"], {})[organ] = float(np.mean(values)) if values else float("nan")
    return out


def _fmt(value: float) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _mm(value: float) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.1f}"


def summary_cells(per_fold: dict[int, dict[str, float]], fmt=_fmt) -> list[str]:
    """Per organ of ORGANS 'mean (std over folds)' (the std with several folds only), then their mean."""
    summary = summarise_folds(per_fold)
    stats = [summary.get(o, {"mean": float("nan"), "n_folds": 0}) for o in ORGANS]
    cells = [f"{fmt(s['mean'])} ({fmt(s['std'])})" if s["n_folds"] > 1 else fmt(s["mean"]) for s in stats]
    return cells + [fmt(float(np.nanmean([s["mean"] for s in stats])))]


def main_cells(results: dict) -> list[dict]:
    """The cells of the main tables: Setting 1, and Setting 2 under the main rule."""
    return [cell for cell in results["cells"] if cell["rule"] in (None, results["rule"])]


def logged_seconds(results: dict, **where) -> float:
    """Total seconds of the log's steps whose fields match `where` (a missing field counts as None)."""
    return sum(entry["seconds"] or 0.0 for entry in results["log"]
               if all(entry.get(key) == value for key, value in where.items()))


def published_row(data_set: dict, setting: int) -> list[float] | None:
    """SSL-ALPNet's published figures for this data set and Setting; None unless the folder holds the
    whole data set those figures are for."""
    return PUBLISHED.get((data_set["name"], setting)) if data_set["published"] else None


def setting_tables(results: dict, setting: int) -> list[str]:
    """Markdown: over the folds (mean and std of fold means) and per fold, one row per method."""
    lines = []
    folds = sorted({c["fold"] for c in main_cells(results) if c["setting"] == setting})
    if not folds:
        return lines
    cols = " | ".join(HEAD[o] for o in ORGANS)
    lines += [f"Over {len(folds)} fold(s) ({', '.join(map(str, folds))}): mean (std over folds) of the "
              f"per-fold mean Dice (%) over each fold's {queries_text(results['data_set'])} query scans.", "",
              f"| Method | {cols} | mean |",
              "|---" * (len(ORGANS) + 2) + "|"]
    cells = main_cells(results)
    for method in results["methods"]:
        per_fold = fold_means(cells, method, setting)
        if per_fold:
            lines.append(f"| {method} | " + " | ".join(summary_cells(per_fold)) + " |")
    published = published_row(results["data_set"], setting)
    if published is not None:
        lines.append("| *published SSL-ALPNet (pretrained ResNet-101, GPU, 100k iterations, 5 folds)* | "
                     + " | ".join(f"*{v:.1f}*" for v in published[:4]) + f" | *{published[4]:.1f}* |")
    lines += ["", "Per fold (Dice %):", "", f"| Method | fold | {cols} |", "|---" * (len(ORGANS) + 2) + "|"]
    for method in results["methods"]:
        per_fold = fold_means(cells, method, setting)
        for fold in sorted(per_fold):
            lines.append(f"| {method} | {fold} | "
                         + " | ".join(_fmt(per_fold[fold].get(o, np.nan)) for o in ORGANS)
                         + " |")
    return lines + [""]


def rule_tables(results: dict) -> list[str]:
    """Markdown: Setting 2's protocol Dice under each exclusion rule run, and what the other rules cost."""
    rules = list(dict.fromkeys(c["rule"] for c in results["cells"] if c["setting"] == 2))
    if len(rules) < 2:
        return []
    main, cols = results["rule"], " | ".join(HEAD[o] for o in ORGANS)
    lines = ["## Setting 2 under the OR rule (SSL-ALPNet) and the AND rule (Q-Net lineage)", "",
             "Protocol Dice (%) as in the Setting 2 table, mean (std over folds). The AND rule drops only "
             "the training slices holding ALL test organs, so the others stay in training: the difference "
             "is what that leak is worth. Mask copy and the untrained network read no training slice (the "
             "same figures under both rules).", "", f"| Method | rule | {cols} | mean |",
             "|---" * (len(ORGANS) + 3) + "|"]
    for method in results["methods"]:
        means = {}
        for rule in rules:
            per_fold = fold_means([c for c in results["cells"] if c["rule"] == rule], method, 2)
            if per_fold:
                lines.append(f"| {method} | {rule.upper()} | " + " | ".join(summary_cells(per_fold)) + " |")
                summary = summarise_folds(per_fold)
                means[rule] = [summary.get(o, {"mean": float("nan")})["mean"] for o in ORGANS]
        for rule in [r for r in rules if r != main and r in means and main in means]:
            change = [100 * (a - b) for a, b in zip(means[rule], means[main])]
            shown = [f"{v:+.1f}" if np.isfinite(v) else "-" for v in change + [float(np.nanmean(change))]]
            lines.append(f"| {method} | {rule.upper()} - {main.upper()} (points) | " + " | ".join(shown)
                         + " |")
    for rule in rules[1:]:
        lines += ["", f"Cost of the {rule.upper()}-rule rows: "
                  f"{logged_seconds(results, rule=rule) / 60:.1f} min of training and evaluation (the log's "
                  f"'{rule.upper()} rule' and '_{rule}' steps; reused ones at the seconds they took)."]
    return lines + [""]


def no_oracle_tables(results: dict) -> list[str]:
    """Markdown: Dice and HD95 of every method segmenting the query scans without the ground-truth range."""
    cells = [c for c in main_cells(results) if "no_oracle_dice" in c]
    if not cells:
        return []
    cols = " | ".join(HEAD[o] for o in ORGANS)
    empty = sum(int(not np.isfinite(v)) for c in cells for per_query in c["no_oracle_hd95"].values()
                for v in per_query.values())
    scored = sum(len(per_query) for c in cells for per_query in c["no_oracle_hd95"].values())
    lines = ["## No oracle: the organ's range found from the images, the whole volume scored", "",
             "The protocol above takes each query's scored slices and its chunks from the query's own "
             "ground truth. Here every method segments each query scan as `scripts/segment_volume.py` does"
             " for a new patient (evaluation/segment.py, `segment_scan`): the label set's test organs in "
             "one call from the fold's support scan, each organ's axial range found from the images (the "
             "support organ's relative position in the body's axial extent, widened by half its length "
             f"each side), {NO_ORACLE_CHUNKS} support slices per range as the protocol's, the organ's "
             "largest 3D connected component kept, a voxel claimed by two organs to the higher score; mask"
             " copy copies the support's masks along the same plan. Scored over the whole query volume: 3D"
             " Dice (%), and HD95 (mm, the scan's voxel spacing): the 95th percentile of the distances "
             "from each surface voxel of prediction and ground truth to the other's surface, both "
             f"directions pooled (medpy's hd95). {empty} of {scored} scored (query, organ, method) cases "
             "had an empty prediction: no HD95, left out of its mean (Dice 0 counted).", ""]
    for setting in (1, 2):
        if not any(c["setting"] == setting for c in cells):
            continue
        for key, what, fmt in (("no_oracle_dice", "Dice (%)", _fmt), ("no_oracle_hd95", "HD95 (mm)", _mm)):
            lines += [f"Setting {setting}, {what}, mean (std over folds) of the per-fold means:", "",
                      f"| Method | {cols} | mean |", "|---" * (len(ORGANS) + 2) + "|"]
            for method in results["methods"]:
                per_fold = fold_means(cells, method, setting, key)
                if per_fold:
                    lines.append(f"| {method} | " + " | ".join(summary_cells(per_fold, fmt)) + " |")
            lines.append("")
    protocol = sum(e["seconds"] or 0.0 for e in results["log"]
                   if e["step"].startswith("evaluate") and e.get("rule") is None)
    lines += [f"Cost: {logged_seconds(results, no_oracle=True) / 60:.1f} min for these evaluations, "
              f"{protocol / 60:.1f} min for the protocol's evaluations of the same cells (the log's "
              "'no oracle' and 'evaluate' steps; a reused step counts the seconds it took when computed).",
              ""]
    return lines


def write_report(results: dict, doc: Path, figure: Path | None) -> Path:
    """docs/bench_chaos.md from results.json."""
    budget, exclusion = results["budget"], results["exclusion"]
    regime = ("the published settings (`--full`)" if budget["full"] else
              "a CPU budget: `demo` config (cnn_small encoder from random initialisation), "
              f"{budget['steps']} steps, "
              f"batch {budget['batch_size']}, input {budget['input_size']} x {budget['input_size']} "
              "(predictions upsampled to the stored 256 x 256 for scoring), no intensity augmentation")
    episodes = ("SSL-ALPNet's own episode recipe (selfsup.episodes=alpnet: its id draw, affine, elastic "
                "and gamma)")
    data_set = results["data_set"]
    title = TITLE[data_set["name"]]
    if any(published_row(data_set, setting) for setting in (1, 2)):
        scale = ("The published row is SSL-ALPNet's ECCV 2020 Table 1 for this data set (pretrained "
                 "ResNet-101, GPU, 100k iterations): a different regime from this CPU run, beside it for "
                 "scale only.")
    else:
        scale = (f"No published row: SSL-ALPNet's figures are for the whole data set ({title}), and this "
                 f"folder holds {data_set['scans']} scans.")
    lines = [f"# {title} under SSL-ALPNet's protocol", "",
             f"Generated by `{results['command']}` (scripts/bench_chaos.py)"
             + (f" at commit {results['commit']}" if results.get("commit") else "")
             + f"; total wall time {results['seconds'] / 60:.1f} min on {results['environment']}."
             + ("" if results.get("complete", True) else
                " **Partial**: written while the run was still going (or after it stopped); "
                "only the cells below were finished."), "",
             f"Data: {title} ({data_set['modality']}), {data_set['scans']} scans in `{data_set['folder']}`, "
             "SSL-ALPNet's preprocessed layout (image / label / superpix-MIDDLE / classmap_1.json"
             + ("" if data_set.get("classmap", True) else "; the classmap computed from the labels")
             + "), read as "
             f"its loader: {NORMALISATION[data_set['modality']]}, slices as stored, [:256, :256]. Protocol "
             "(evaluation/protocols.py, preset `alpnet`): SSL-ALPNet's 5-fold circular split "
             f"({queries_text(data_set)} query scans per fold, the next scan in sorted order as the support, "
             "left out "
             "of training); support slices at the percentiles 1/6, 1/2, 5/6 of the support's organ slices; "
             "query thirds over the query's own ground-truth range, only that range scored; 3D Dice without "
             "smoothing; mean over the fold's query scans, then mean and std over the folds. Label set 0 "
             "tests the kidneys, 1 liver and spleen. Setting 1: training slices may show the test organs; "
             "Setting 2: every training slice "
             f"holding ANY test organ is dropped ({results['rule'].upper()} rule).", "",
             f"Training: {regime}. Self-supervised rows train on "
             + ("SSL-ALPNet's own superpixels" if data_set.get("superpixels") != "made by this project"
                else "superpixels made by this project with SSL-ALPNet's parameters (make_superpixels.py "
                     "--alpnet; on CHAOS-T2, 19 of 20 scans identical to SSL-ALPNet's own files)")
             + " through "
             "the same loop (train.py, `selfsup`: one superpixel of a random training slice as the "
             "foreground, "
             f"two random views) with {episodes}; 'LSLPN, supervised' trains on the other label set's organ "
             "labels (the paper's regime). "
             "'LSLPN, untrained' is the LSLPN run's network at step 0 (its seeded random initial weights, "
             "no training): "
             "what the local-prototype matching gives before any learning. Mask copy has no model. "
             + scale,
             ""]
    for setting in (1, 2):
        body = setting_tables(results, setting)
        if body:
            lines += [f"## Setting {setting}", ""] + body
    if exclusion:
        lines += ["## Setting 2: training slices kept, OR rule (SSL-ALPNet) vs AND rule (Q-Net lineage)", "",
                  "| fold | label set (test organs) | all slices | kept, OR | kept, AND |",
                  "|---|---|---|---|---|"]
        for key, counts in exclusion.items():
            fold, label_set = key.split("/")
            organs = "kidneys" if label_set == "0" else "liver, spleen"
            lines.append(f"| {fold} | {label_set} ({organs}) | {counts['all']} | {counts['or']} "
                         f"| {counts['and']} |")
        lines.append("")
    lines += rule_tables(results) + no_oracle_tables(results)
    if figure is not None and figure.exists():
        lines += ["## Overlays", "", f"![support, query, ground truth and predictions]({figure.name})", "",
                  "Each row: the support slice with its mask, the query slice with the ground truth, "
                  "then each method's prediction (fold 0, Setting 2 when run, the query's middle organ "
                  "slice).", ""]
    lines += ["## Wall time of every step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {entry['step']} | {entry['seconds']} |" for entry in results["log"]]
    lines.append("")
    write_text_atomic("\n".join(lines), doc)
    return doc


class OverlayCollector:
    """Keeps one query slice per (organ, method) of the first fold/setting seen, then draws the PNG."""

    def __init__(self, setting: int):
        self.setting = setting
        self.rows: dict[str, dict] = {}

    def __call__(self, method: str, fold: int, setting: int, label_set: int, folder: Path, predictions: dict):
        if setting != self.setting:
            return
        meta = read_meta(folder)["alpnet"]
        for organ, per_query in predictions.items():
            row = self.rows.get(organ)
            if row is None:
                qid = meta["test"][0]
                query = gold_volume(folder, qid)
                support = gold_volume(folder, meta["support"])
                index = NAME_TO_INDEX[organ]
                zs = organ_slice_list(query["label"] == index)
                z = int(zs[len(zs) // 2])
                sz = support_slices(organ_slice_list(support["label"] == index))[1]
                row = self.rows[organ] = {"fold": fold, "qid": qid, "z": z, "query": query["image"][:, :, z],
                                          "truth": query["label"][:, :, z] == index,
                                          "support": support["image"][:, :, sz],
                                          "support_mask": support["label"][:, :, sz] == index, "methods": {}}
            if row["fold"] == fold and row["qid"] in per_query:
                row["methods"].setdefault(method, per_query[row["qid"]][:, :, row["z"]])

    def draw(self, path: Path) -> Path | None:
        if not self.rows:
            return None
        import matplotlib  # heavy optional dependency: only when drawing
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        methods = list(next(iter(self.rows.values()))["methods"])
        organs = [o for o in ORGANS if o in self.rows]
        fig, axes = plt.subplots(len(organs), 2 + len(methods),
                                 figsize=(2.2 * (2 + len(methods)), 2.3 * len(organs)),
                                 squeeze=False)
        for r, organ in enumerate(organs):
            row = self.rows[organ]
            panels = [("support", row["support"], row["support_mask"], "tab:blue"),
                      ("query + truth", row["query"], row["truth"], "tab:green")]
            panels += [(m, row["query"], row["methods"].get(m, np.zeros_like(row["truth"])), "tab:red")
                       for m in methods]
            for c, (title, image, mask, colour) in enumerate(panels):
                ax = axes[r, c]
                ax.imshow(image, cmap="gray")
                if mask.any():
                    ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
                if c >= 2:
                    ax.contour(row["truth"].astype(float), levels=[0.5], colors=["tab:green"], linewidths=0.6,
                               linestyles="dotted")
                ax.set_title(title, fontsize=8)
                ax.set_xticks([]), ax.set_yticks([])
            axes[r, 0].set_ylabel(f"{organ}\nscan {row['qid']} z {row['z']}", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        return path


# ------------------------------------------------------------------ --speed: seconds per query scan
SPEED_MARKERS = ("<!-- begin segment -->", "<!-- end segment -->")
DEMO_PHANTOM = ROOT / PHANTOM_DIR       # `make demo`'s CT phantom, else one generated with its seed
PHANTOM_ORGANS = {NAME_TO_INDEX[organ]: organ for organ in ORGANS}     # label value -> organ


def phantom_scans(work: Path) -> tuple[Path, str, list[str]]:
    """(work/phantom_scans, where its scans come from, patient ids): the CT phantom's gold scans as
    image_<id>.nii.gz (linked) + label_<id>.nii.gz (the masks of ORGANS merged)."""
    phantom, source = DEMO_PHANTOM, f"`{PHANTOM_DIR}` of `make demo`"
    if not (phantom / "GoldCorpus").is_dir():
        phantom, source = work / "phantom", f"generated with `make demo`'s seed {PHANTOM['seed']}"
        if not phantom.is_dir():
            generate_phantom(phantom, n_silver=1, n_gold=5, seed=PHANTOM["seed"])
    folder = work / "phantom_scans"
    folder.mkdir(parents=True, exist_ok=True)
    cases = layout.find_cases(phantom / "GoldCorpus")
    for case in cases:
        link = folder / f"image_{case.pid}.nii.gz"
        link.unlink(missing_ok=True)
        link.symlink_to(case.volume_path.resolve())
        masks = {value: np.asarray(nib.load(case.mask_paths[value]).dataobj) > 0 for value in PHANTOM_ORGANS}
        label, _ = layout.merge_masks(masks)
        save_nifti_atomic(label, nib.load(case.volume_path).affine, folder / f"label_{case.pid}.nii.gz")
    return folder, source, [case.pid for case in cases]


def speed_scans(checkpoint: Path, data_dir: Path | None, work: Path) -> tuple[str, Path, dict, list, list]:
    """(data as the section names it, folder, vocabulary, support ids, query ids) of a checkpoint: with a
    CT window the CT phantom's gold scans 1-2 | 3-5, else the MR folder's fold-0 support + training scan |
    its first 3 tests."""
    if needs_hounsfield(model_input(load_checkpoint(str(checkpoint)))[1]):
        folder, source, ids = phantom_scans(work)
        return f"CT phantom (synthetic; {source})", folder, PHANTOM_ORGANS, ids[:2], ids[2:5]
    data_dir = data_dir or default_data()
    dataset = layout.detect_dataset(data_dir)
    test, support, training = layout.fold_scans(layout.scan_ids(data_dir), 0, dataset)
    data = f"{dataset.name} ({dataset.modality})"
    return data, data_dir, dataset.vocabulary, [support, training[0]], test[:3]


def measure_segment(checkpoint: Path, data_dir: Path, vocabulary: dict, supports: list[int],
                    queries: list[int], work: Path, out: Path) -> dict:
    """{'queries': [{'id', 'seconds', 'dice': {organ: value}}], 'wall', 'cpu', 'peak_mib'} of one
    checkpoint: the supports linked (never copied) into <out>_supports with their label names, one
    segment_volume.py call writing into `out`."""
    folder = work / f"{out.name}_supports"
    folder.mkdir(parents=True, exist_ok=True)
    for sid in supports:
        for kind in ("image", "label"):
            link = folder / f"{kind}_{sid}.nii.gz"
            link.unlink(missing_ok=True)
            link.symlink_to(Path(data_dir).resolve() / f"{kind}_{sid}.nii.gz")
    names = {str(value): name for value, name in vocabulary.items()}
    (folder / "labels.json").write_text(json.dumps({"labels": names}))
    images = [Path(data_dir) / f"image_{qid}.nii.gz" for qid in queries]
    command = [sys.executable, str(ROOT / "scripts" / "segment_volume.py"), "--checkpoint", str(checkpoint),
               "--support-dir", str(folder), *(a for image in images for a in ("--query", str(image))),
               "--out", str(out), "--device", "cpu", "--no-progress"]
    log = work / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode:
        raise UserError(f"segment_volume.py failed on {checkpoint} (exit {process.returncode}): see {log}")
    rows = []
    for qid, image in zip(queries, images):
        labels = out / image.name.replace(".nii.gz", "_labels.nii.gz")
        predicted = np.asarray(nib.load(labels).dataobj)
        truth = np.asarray(nib.load(Path(data_dir) / f"label_{qid}.nii.gz").dataobj)
        rows.append({"id": qid, "seconds": json.loads(sidecar_path(labels).read_text())["seconds"],
                     "dice": {name: dice_score(predicted == value, truth == value)
                              for value, name in vocabulary.items()}})
    return {"queries": rows, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "peak_mib": usage.ru_maxrss / 1024}


def describe_checkpoint(checkpoint: Path) -> str:
    """'encoder, input S x S, step N' of a train.py checkpoint."""
    state = load_checkpoint(str(checkpoint))
    size = state.get("input_size")
    return f"{state['model_config'].get('encoder')}, input {size} x {size}, step {state.get('step')}"


def speed_section(checkpoints: list[Path], data_dir: Path | None, work: Path, command: str) -> str:
    """The markdown section of every checkpoint on query scans of its own kind (`speed_scans`; BENCHMARKS.md,
    between SPEED_MARKERS)."""
    load = [os.getloadavg()]
    results = {}
    for i, checkpoint in enumerate(checkpoints):
        data, folder, vocabulary, supports, queries = speed_scans(checkpoint, data_dir, work)
        result = measure_segment(checkpoint, folder, vocabulary, supports, queries, work, work / f"out_{i}")
        results[str(checkpoint)] = dict(result, data=data, supports=supports)
    load.append(os.getloadavg())
    cols = " | ".join(HEAD[o] for o in ORGANS)
    when = "; ".join(", ".join(f"{v:.2f}" for v in a) + f" ({w})" for a, w in zip(load, ("start", "end")))
    lines = ["", "## Segmenting a scan: seconds per query volume", "", f"Command: `{command}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}; {platform.processor() or 'cpu'}, {os.cpu_count()} cores "
             f"visible, 2 threads; load average (1, 5, 15 min) {when} (above 2: other work shared the cores, "
             "the seconds are upper bounds).", "",
             "`scripts/segment_volume.py --support-dir` with two annotated scans as the supports segments "
             "liver, spleen and both kidneys of each query scan in one call, no range given (found from the "
             "images). Each checkpoint runs on scans of its own kind: one trained with a CT window on the CT "
             "phantom's gold scans (synthetic: its Dice checks the output, it says nothing of patients), "
             "the others on the MR folder's fold-0 support and first training scan (supports) and its first "
             "three test scans (queries); the data column names them. Seconds per query: its sidecar's (read "
             "the volume, find each organ's range, score, write; the first query also encodes the support "
             "slices). Wall: the whole process (Python start, model and supports loaded); CPU: its user + "
             "system seconds (less sensitive to other work on the cores). Peak memory: the"
             " process's peak resident set size (ru_maxrss from os.wait4), MiB. Dice (%) over the whole "
             "volume, a sanity check of the output.", "",
             f"| checkpoint | data | supports | query | seconds | {cols} |", "|---" * (len(ORGANS) + 5) + "|"]
    for checkpoint, result in results.items():
        for row in result["queries"]:
            lines.append(f"| `{checkpoint}` | {result['data']} | {', '.join(map(str, result['supports']))} | "
                         f"{row['id']} | {row['seconds']:.1f} | "
                         + " | ".join(f"{100 * row['dice'][o]:.1f}" for o in ORGANS) + " |")
    lines += ["", "| checkpoint | data | organs | model | seconds per query (mean) | wall s | "
              "CPU s (user + sys) | peak MiB |", "|---" * 8 + "|"]
    for checkpoint, result in results.items():
        mean = float(np.mean([row["seconds"] for row in result["queries"]]))
        lines.append(f"| `{checkpoint}` | {result['data']} | {len(ORGANS)} | "
                     f"{describe_checkpoint(Path(checkpoint))} | {mean:.1f} | "
                     f"{result['wall']:.1f} | {result['cpu']:.1f} | {result['peak_mib']:.0f} |")
    return "\n".join(lines + ["", ""])
