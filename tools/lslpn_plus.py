"""LSLPN+ on CHAOS-T2 (docs/lslpn_plus.md, which says how each step runs): every option chosen on each fold's
validation scan (held out of training), combined greedily; then the ablation (LSLPN, each option alone, the
combination, the combination without each option) on the test scans of the benchmark's own LSLPN runs
(experiments/chaos.py; options that change training get their own runs); then a timing pass.

    python tools/lslpn_plus.py                  # everything, reusing finished runs and evaluations
    python tools/lslpn_plus.py --folds 0        # one fold (a quick look; the report says so)
    python tools/lslpn_plus.py --report-only    # rewrite docs/lslpn_plus.md from OUT/lslpn_plus_results.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from util.cli import run_cli
from util.errors import UserError
from util.io import check_output_file, check_writable_folder, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

PINNED_NUMERICS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
DOC = ROOT / "docs" / "lslpn_plus.md"

# option -> candidate settings tried on the validation scans (LSLPN+ model options, or adapt_* for
# test-time adaptation)
CANDIDATES: dict[str, list[dict]] = {
    "query-informed prototypes": [{"query_rounds": r, "query_weight": w, "query_confidence": c}
                                  for r in (1, 2) for w in (0.3, 0.5, 0.7) for c in (0.0, 0.9)],
    "multi-scale grids": [{"grids": g, "grid_fusion": f} for g in ([4, 8], [8, 16], [4, 8, 16])
                          for f in ("mean", "max")],
    "test-time adaptation": [{"adapt_steps": 20, "adapt_lr": lr} for lr in (1e-3, 1e-2)],
    "boundary loss": [{"boundary_weight": w} for w in (0.1, 0.3, 1.0)],
    "2.5D input": [{"input_slices": 3}],
}
# options that change training (the others act on a trained LSLPN at test time): option -> its train.py
# config key. An option set holding them is evaluated on its own LSLPN runs (same budget, names and seeds
# as the LSLPN row, plus these overrides; the run name says which).
TRAINING_KEYS: dict[str, str] = {"boundary_weight": "boundary_weight", "input_slices": "model.input_slices"}
LSLPN = "LSLPN"
TIMING_PASSES = 2       # timing passes over all rows; each row keeps its fastest (timing_pass)


def training_options(options: dict) -> dict:
    """The part of an option set that changes training."""
    return {k: v for k, v in options.items() if k in TRAINING_KEYS}


def run_suffix(train_options: dict) -> str:
    """Run-name suffix of a training option set ('' for LSLPN's own runs), e.g. '_input_slices3'."""
    return "".join(f"_{key}{value}" for key, value in sorted(train_options.items()))


def key_of(options: dict) -> str:
    """A stable text key of an option set ('' for none)."""
    return json.dumps(options, sort_keys=True) if options else ""


def describe(options: dict) -> str:
    """Short text of an option set for tables."""
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "none"


class Bench:
    """Cells (fold, setting, label set) with their prepared folders and LSLPN snapshots, and the cached
    evaluations (OUT/lslpn_plus.json)."""

    def __init__(self, data: Path, out: Path, folds: list[int], device: str, budget: dict):
        from experiments import chaos as steps
        self.steps, self.data, self.out, self.folds, self.device = steps, data, out, folds, device
        self.dataset = steps.layout.detect_dataset(data)
        self.named_base, self.base = steps.budget_overrides(budget["steps"], budget["input_size"],
                                                            budget["batch_size"], False)
        self.how = steps.methods(include_alpnet=False)[LSLPN]
        self.budget, self.log = budget, []
        self.path = out / "lslpn_plus.json"
        self.saved = json.loads(self.path.read_text()) if self.path.is_file() else {"evaluations": {}}

    def cells(self, validation: bool) -> list[dict]:
        """Every (fold, setting, label set) with its folder, snapshot and organs (Setting 2 first)."""
        cells = []
        for setting in (2, 1):
            for fold in self.folds:
                shared_snapshot = None
                for label_set in (0, 1):
                    folder = self.steps.prepared(self.data, self.out, fold, setting,
                                                 label_set if setting == 2 else None, "or", self.log,
                                                 validation=validation)
                    name = (f"lslpn_fold{fold}_setting{setting}"
                            + (f"_labels{label_set}" if setting == 2 else "")
                            + ("_validation" if validation else ""))
                    cell = {"fold": fold, "setting": setting, "label_set": label_set, "folder": folder,
                            "name": name, "organs": self.dataset.test_organs(label_set),
                            "queries": self.steps.read_meta(folder)["alpnet"][
                                "validation" if validation else "test"]}
                    # Setting 1: one run serves both label sets (no label is read in training)
                    cell["snapshot"] = shared_snapshot or self.snapshot(cell, {})
                    if setting == 1:
                        shared_snapshot = cell["snapshot"]
                    cells.append(cell)
        return cells

    def snapshot(self, cell: dict, train_options: dict) -> Path:
        """last.pth of the cell's LSLPN run trained with `train_options` (trained unless finished)."""
        if not train_options and "snapshot" in cell:
            return cell["snapshot"]
        overrides = [f"{TRAINING_KEYS[key]}={json.dumps(value)}"
                     for key, value in sorted(train_options.items())]
        return self.steps.train(cell["name"] + run_suffix(train_options),
                                [*self.named_base, *self.how["named"]],
                                [*self.base, *self.how["overrides"], *overrides,
                                 f"path.data_dir={cell['folder']}"],
                                self.out / "train", self.log, self.device)

    def evaluate(self, options: dict, cell: dict, stage: str) -> dict:
        """{dice: {organ: {query: Dice}}, seconds, adapt_seconds, volumes} of one option set on one cell,
        cached under what it depends on: stage, options, cell, the snapshot's bytes, the prepared folder's
        meta.json and the device."""
        cell = {**cell, "snapshot": self.snapshot(cell, training_options(options))}
        key = "|".join([stage, key_of(options), str(cell["fold"]), str(cell["setting"]),
                        str(cell["label_set"]), self.steps.file_digest(cell["snapshot"]),
                        self.steps.file_digest(cell["folder"] / "meta.json"), self.device])
        if key not in self.saved["evaluations"]:
            result = evaluate_cell(self.steps, options, cell, self.device)
            self.saved["evaluations"][key] = result
            write_text_atomic(json.dumps(self.saved, indent=1), self.path)
        return self.saved["evaluations"][key]


def mean_dice(bench: Bench, options: dict, cells: list[dict], stage: str) -> float:
    """Mean over cells and organs of the mean Dice over the cell's query scans."""
    import numpy as np
    values = []
    for cell in cells:
        for per_query in bench.evaluate(options, cell, stage)["dice"].values():
            finite = [v for v in per_query.values() if v is not None and np.isfinite(v)]
            if finite:
                values.append(float(np.mean(finite)))
    return float(np.mean(values))


def select(bench: Bench, cells: list[dict]) -> dict:
    """Validation Dice of every candidate, the winner per option and the greedy combination."""
    baseline = mean_dice(bench, {}, cells, "validation")
    table, best = [], {}
    for option, candidates in CANDIDATES.items():
        for candidate in candidates:
            value = mean_dice(bench, candidate, cells, "validation")
            table.append({"option": option, "settings": candidate, "validation": value})
            print(f"    validation {option}: {describe(candidate)}: {100 * value:.1f} "
                  f"(LSLPN {100 * baseline:.1f})", flush=True)
            if option not in best or value > best[option]["validation"]:
                best[option] = {"settings": candidate, "validation": value}
    order = sorted((o for o in best if best[o]["validation"] > baseline),
                   key=lambda o: -best[o]["validation"])
    combination, combined, steps = {}, baseline, []
    for option in order:
        trial = {**combination, **best[option]["settings"]}
        value = mean_dice(bench, trial, cells, "validation")
        kept = value > combined
        steps.append({"option": option, "validation": value, "kept": kept})
        if kept:
            combination, combined = trial, value
    chosen = [s["option"] for s in steps if s["kept"]]
    return {"baseline": baseline, "candidates": table, "best": best, "greedy": steps,
            "combination": combination, "combination_validation": combined, "chosen": chosen}


def test_rows(selection: dict) -> dict[str, dict]:
    """Row name -> option set of the test ablation."""
    rows = {LSLPN: {}}
    for option, best in selection["best"].items():
        rows[f"+ {option}"] = dict(best["settings"])
    chosen = selection["chosen"]
    if chosen:
        rows["LSLPN+"] = dict(selection["combination"])
        if len(chosen) > 1:
            for option in chosen:
                rows[f"LSLPN+ without {option}"] = {k: v for other in chosen if other != option
                                                    for k, v in selection["best"][other]["settings"].items()}
    return rows


def timing_pass(bench: Bench, rows: dict[str, dict], cells: list[dict], retime: bool) -> dict:
    """Per row: seconds per query volume (inference; adaptation apart) on one cell (the first: Setting 2,
    first fold, label set 0) and the head's share of a forward pass. After one untimed warm-up evaluation
    (the process's first pays one-time costs), TIMING_PASSES passes over all rows, one row after the other;
    each row keeps its fastest pass. Cached; retime: measured again from scratch, on a machine the caller
    keeps quiet (the Dice evaluations run for hours beside other jobs; these figures should not)."""
    cell = cells[0]
    where = {k: cell[k] for k in ("fold", "setting", "label_set")}
    if retime or "timing" not in bench.saved:
        bench.saved["timing"] = {"quiet": retime, "rows": {}}
    saved = bench.saved["timing"]
    keys = {row: "|".join([key_of(options), str(where), f"passes{TIMING_PASSES}"])
            for row, options in rows.items()}
    todo = {row: options for row, options in rows.items() if keys[row] not in saved["rows"]}
    if todo:
        saved["quiet"] = saved["quiet"] and retime           # a row timed by a plain run is not quiet
        warm_up = {**cell, "snapshot": bench.snapshot(cell, {})}        # untimed: one-time costs
        evaluate_cell(bench.steps, {}, warm_up, bench.device)
    fastest: dict[str, dict] = {}
    for _ in range(TIMING_PASSES if todo else 0):
        for row, options in todo.items():
            snapshot = bench.snapshot(cell, training_options(options))
            result = evaluate_cell(bench.steps, options, {**cell, "snapshot": snapshot}, bench.device)
            if row not in fastest or result["seconds"] < fastest[row]["seconds"]:
                fastest[row] = result
    for row, result in fastest.items():
        snapshot = bench.snapshot(cell, training_options(rows[row]))
        saved["rows"][keys[row]] = {
            "seconds": result["seconds"] / result["volumes"],
            "adapt_seconds": result["adapt_seconds"] / result["volumes"],
            "per_adaptation": result["adapt_seconds"] / max(1, result["adaptations"]),
            "head_share": head_share(snapshot, rows[row], bench.device)}
    if todo:
        write_text_atomic(json.dumps(bench.saved, indent=1), bench.path)
    for row in rows:
        print(f"    timing {row}: {saved['rows'][keys[row]]['seconds']:.3f} s per query volume", flush=True)
    return {"cell": where, "rows": {row: saved["rows"][keys[row]] for row in rows}, "quiet": saved["quiet"],
            "passes": TIMING_PASSES, "environment": bench.steps.environment_note()}


# ------------------------------------------- evaluation of an option set (torch loads here, after the pins)
def model_with(snapshot, options: dict, device: str):
    """(model in eval mode with the option set's head options, its input size); the set's other options
    (test-time adaptation, training options) are not the head's."""
    from evaluation.evaluate import load_snapshot
    from models.fewshot import PLUS_DEFAULTS, with_head_options
    model, info = load_snapshot(snapshot, device)
    head = {k: v for k, v in options.items() if k in PLUS_DEFAULTS}
    if head:
        model = with_head_options(model, head).eval()
    return model, int(info["input"]["input_size"])


def evaluate_cell(steps, options: dict, cell: dict, device: str) -> dict:
    """{dice: {organ: {query id: Dice}}, seconds (inference, all volumes), adapt_seconds, adaptations,
    volumes (query scans x organs)} of one option set on one cell (query ids of cell['queries'])."""
    from evaluation.adaptation import test_time_model
    from models.fewshot import PLUS_DEFAULTS
    head = {k: v for k, v in options.items() if k in PLUS_DEFAULTS}
    adapted = []

    def transform(model):   # the LSLPN+ test-time options, test-time adaptation on stored-resolution views
        model = test_time_model(model, head, options.get("adapt_steps", 0), options.get("adapt_lr", 1e-2),
                                stored_views=True)
        adapted.append(model)
        return model
    dice, _, seconds = steps.evaluate_method(cell["snapshot"], cell["folder"], cell["organs"], device,
                                             queries=cell["queries"], model_transform=transform)
    adapt_seconds = sum(getattr(model, "seconds_adapting", 0.0) for model in adapted)
    return {"dice": dice, "seconds": seconds - adapt_seconds, "adapt_seconds": adapt_seconds,
            "adaptations": sum(getattr(model, "adaptations", 0) for model in adapted),
            "volumes": len(cell["organs"]) * len(cell["queries"])}


def head_share(snapshot, options: dict, device: str, n_queries: int = 16, repeats: int = 5) -> dict:
    """Median seconds (tools/benchmark.measure) of the encoder and of the head for 1 support +
    n_queries query slices, and the head's share of the two (the time of one inference step)."""
    import torch
    from benchmark import measure  # tools/benchmark.py, beside this tool
    model, size = model_with(snapshot, options, device)
    generator = torch.Generator().manual_seed(0)
    support = torch.randn(1, 1, 1, 1, size, size, generator=generator).to(device)
    fg = torch.zeros(1, 1, 1, size, size, device=device)
    fg[..., size // 4: size // 2, size // 4: size // 2] = 1
    queries = torch.randn(1, n_queries, 1, size, size, generator=generator).to(device)
    with torch.inference_mode():
        def encode():
            return (model.encoder(support.flatten(0, 2)).unflatten(0, (1, 1, 1)),
                    model.encoder(queries.flatten(0, 1)).unflatten(0, (1, n_queries)))
        support_features, query_features = encode()

        def head_pass():
            prototypes = model.head.compute_prototypes(support_features, fg, 1 - fg, (size, size))
            return model.head.score(prototypes, query_features)
        device_type = torch.device(device)
        encoder = measure(encode, device_type, repeats).median
        head = measure(head_pass, device_type, repeats).median
    return {"encoder_seconds": encoder, "head_seconds": head, "share": head / (encoder + head),
            "n_queries": n_queries, "input_size": size}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="SSL-ALPNet-layout folder "
                        "(default $CHAOS_T2_DIR or ../shared/data/chaos_mr_t2 beside the repository)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_chaos"),
                        help="the benchmark's folder (its LSLPN runs are reused)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--retime", action="store_true",
                        help="measure the timing pass again, on a quiet machine (nothing else on the cores: "
                             "the report says the timings are quiet)")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if any(f not in range(5) for f in args.folds):
        raise UserError(f"--folds {args.folds}: SSL-ALPNet has folds 0-4: pick among them")
    check_output_file(args.doc, what="--doc", suffixes=(".md",), create_parent=True)   # before any compute
    if not args.report_only:
        check_writable_folder(args.out, "--out")
    os.environ.update(PINNED_NUMERICS)
    import lslpn_plus_report as report  # beside this tool

    from experiments.chaos import default_data
    results_path = args.out / "lslpn_plus_results.json"
    if args.report_only:
        if not results_path.is_file():
            raise UserError(f"{results_path}: no results yet: run tools/lslpn_plus.py first")
        report.write(json.loads(results_path.read_text()), args.doc, TRAINING_KEYS)
        print(f"wrote {args.doc}")
        return 0
    data = args.data or default_data()
    start = time.perf_counter()
    bench = Bench(data, args.out, args.folds, args.device,
                  {"steps": 100, "input_size": 64, "batch_size": 2})
    print("==> selection on the validation scans", flush=True)
    selection = select(bench, bench.cells(validation=True))
    print(f"==> chosen: {selection['chosen']} ({describe(selection['combination'])})", flush=True)
    cells = bench.cells(validation=False)
    rows = test_rows(selection)
    evaluations = {}
    for row, options in rows.items():
        evaluations[row] = {"options": options, "cells": [
            {"fold": c["fold"], "setting": c["setting"], "label_set": c["label_set"],
             **bench.evaluate(options, c, "test")} for c in cells]}
        print(f"    test {row}: {100 * mean_dice(bench, options, cells, 'test'):.1f}", flush=True)
    timing = timing_pass(bench, rows, cells, args.retime)
    from util.provenance import git_commit
    results = {"selection": selection, "rows": evaluations, "folds": args.folds, "timing": timing,
               "seconds": time.perf_counter() - start, "commit": git_commit(),
               "command": shlex.join(["python", "tools/lslpn_plus.py", *argv]),
               "environment": bench.steps.environment_note(), "log": bench.log}
    write_text_atomic(json.dumps(results, indent=1), results_path)
    report.write(results, args.doc, TRAINING_KEYS)
    print(f"\nwrote {args.doc} ({results['seconds'] / 60:.1f} min)")
    print(args.doc.read_text())
    return 0


if __name__ == "__main__":
    run_cli(main)
