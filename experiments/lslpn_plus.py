"""LSLPN+ on CHAOS-T2 (docs/lslpn_plus.md says how each step runs): every option chosen on each fold's
validation scan, combined greedily; then the ablation (LSLPN, each option alone, the combination, the
combination without each option) on the test scans of the benchmark's own LSLPN runs (experiments/chaos.py;
options that change training get their own runs); then a timing pass; then the report.
Run by `python scripts/bench_chaos.py --lslpn-plus`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.adaptation import test_time_model
from evaluation.evaluate import load_snapshot
from evaluation.protocols import summarise_folds
from experiments import chaos as steps
from experiments.chaos import HEAD, ORGANS, _fmt
from experiments.chaos import fold_means as method_fold_means
from experiments.timing import measure
from models.fewshot import PLUS_DEFAULTS, with_head_options
from util.io import write_text_atomic

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
        self.data, self.out, self.folds, self.device = data, out, folds, device
        self.dataset = steps.layout.detect_dataset(data)
        self.named_base, self.base = steps.budget_overrides(budget["steps"], budget["input_size"],
                                                            budget["batch_size"], False)
        self.how = steps.methods()[LSLPN]
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
                    folder = steps.prepared(self.data, self.out, fold, setting,
                                                 label_set if setting == 2 else None, "or", self.log,
                                                 validation=validation)
                    name = (f"lslpn_fold{fold}_setting{setting}"
                            + (f"_labels{label_set}" if setting == 2 else "")
                            + ("_validation" if validation else ""))
                    cell = {"fold": fold, "setting": setting, "label_set": label_set, "folder": folder,
                            "name": name, "organs": self.dataset.test_organs(label_set),
                            "queries": steps.read_meta(folder)["alpnet"][
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
        return steps.train(cell["name"] + run_suffix(train_options),
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
                        str(cell["label_set"]), steps.file_digest(cell["snapshot"]),
                        steps.file_digest(cell["folder"] / "meta.json"), self.device])
        if key not in self.saved["evaluations"]:
            result = evaluate_cell(options, cell, self.device)
            self.saved["evaluations"][key] = result
            write_text_atomic(json.dumps(self.saved, indent=1), self.path)
        return self.saved["evaluations"][key]


def mean_dice(bench: Bench, options: dict, cells: list[dict], stage: str) -> float:
    """Mean over cells and organs of the mean Dice over the cell's query scans."""
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
    combination, combined, greedy = {}, baseline, []
    for option in order:
        trial = {**combination, **best[option]["settings"]}
        value = mean_dice(bench, trial, cells, "validation")
        kept = value > combined
        greedy.append({"option": option, "validation": value, "kept": kept})
        if kept:
            combination, combined = trial, value
    chosen = [s["option"] for s in greedy if s["kept"]]
    return {"baseline": baseline, "candidates": table, "best": best, "greedy": greedy,
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
        evaluate_cell({}, warm_up, bench.device)
    fastest: dict[str, dict] = {}
    for _ in range(TIMING_PASSES if todo else 0):
        for row, options in todo.items():
            snapshot = bench.snapshot(cell, training_options(options))
            result = evaluate_cell(options, {**cell, "snapshot": snapshot}, bench.device)
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
            "passes": TIMING_PASSES, "environment": steps.environment_note()}


# ------------------------------------------------------------------------- evaluation of an option set
def head_options(options: dict) -> dict:
    """The option set's LSLPN+ head options (not test-time adaptation, not training options)."""
    return {k: v for k, v in options.items() if k in PLUS_DEFAULTS}


def model_with(snapshot, options: dict, device: str):
    """(model in eval mode with the option set's head options, its input size)."""
    model, info = load_snapshot(snapshot, device)
    head = head_options(options)
    if head:
        model = with_head_options(model, head).eval()
    return model, int(info["input"]["input_size"])


def evaluate_cell(options: dict, cell: dict, device: str) -> dict:
    """{dice: {organ: {query id: Dice}}, seconds (inference, all volumes), adapt_seconds, adaptations,
    volumes (query scans x organs)} of one option set on one cell (query ids of cell['queries'])."""
    head, adapted = head_options(options), []

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
    """Median seconds of the encoder and of the head for 1 support + n_queries query slices, and the
    head's share of the two (the time of one inference step)."""
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


# ------------------------------------------------------------------------- report
TARGET_GAIN, MAX_ORGAN_LOSS, MAX_TIME_RATIO = 5.0, 1.0, 2.0       # docs/lslpn_plus.md's target, Dice points


def fold_means(cells: list[dict], setting: int) -> dict[int, dict[str, float]]:
    """{fold: {organ: mean Dice over the fold's query scans}} of one row's cells in one setting."""
    return method_fold_means([{**cell, "method": "row"} for cell in cells], "row", setting)


def same_cells(row: dict, other: dict) -> dict:
    """`other` restricted to the (fold, setting, label set) cells that `row` has."""
    keys = {(c["fold"], c["setting"], c["label_set"]) for c in row["cells"]}
    kept = [c for c in other["cells"] if (c["fold"], c["setting"], c["label_set"]) in keys]
    return {**other, "cells": kept}


def summary(row: dict, setting: int) -> dict | None:
    """Per organ mean/std over folds and the mean of the organ means (None: no cell in that setting)."""
    cells = [c for c in row["cells"] if c["setting"] == setting]
    if not cells:
        return None
    folds = summarise_folds(fold_means(row["cells"], setting))
    return {"organs": folds, "mean": float(np.mean([folds[o]["mean"] for o in ORGANS if o in folds])),
            "folds": sorted({c["fold"] for c in cells})}


def setting_table(results: dict, setting: int) -> list[str]:
    rows, timing = results["rows"], results["timing"]["rows"]
    cols = " | ".join(HEAD[o] for o in ORGANS)
    lines = [f"| Method | folds | {cols} | mean | vs LSLPN (same folds) | s / query volume "
             "| adaptation s / query volume | head share |", "|---" * 11 + "|"]
    for name, row in rows.items():
        s = summary(row, setting)
        if s is None:
            continue
        base = summary(same_cells(row, rows["LSLPN"]), setting)
        organs = " | ".join(f"{_fmt(s['organs'][o]['mean'])} ({_fmt(s['organs'][o]['std'])})" for o in ORGANS)
        delta = 100 * (s["mean"] - base["mean"])
        t = timing[name]
        adapt = f"{t['adapt_seconds']:.2f} ({t['per_adaptation']:.1f} per support slice)" \
            if t["adapt_seconds"] else "-"
        folds = ", ".join(map(str, s["folds"]))
        lines.append(f"| {name} | {folds} | {organs} | {_fmt(s['mean'])} | {delta:+.1f} | {t['seconds']:.3f} "
                     f"| {adapt} | {100 * t['head_share']['share']:.0f}% |")
    return lines


def _against_lslpn(results: dict, name: str) -> str:
    rows, timing = results["rows"], results["timing"]["rows"]
    plus = summary(rows[name], 2)
    base = summary(same_cells(rows[name], rows["LSLPN"]), 2)
    gain = 100 * (plus["mean"] - base["mean"])
    worst = min(100 * (plus["organs"][o]["mean"] - base["organs"][o]["mean"]) for o in ORGANS)
    ratio = timing[name]["seconds"] / timing["LSLPN"]["seconds"]
    met = gain >= TARGET_GAIN and worst >= -MAX_ORGAN_LOSS and ratio <= MAX_TIME_RATIO
    return (f"- {name}, Setting 2, folds {', '.join(map(str, plus['folds']))}: {_fmt(plus['mean'])} against "
            f"LSLPN {_fmt(base['mean'])} on the same folds: {gain:+.1f} Dice points "
            f"(target +{TARGET_GAIN:.0f}); "
            f"worst organ {worst:+.1f} (target >= -{MAX_ORGAN_LOSS:.0f}); inference {ratio:.2f}x LSLPN's "
            f"time per query volume (target <= {MAX_TIME_RATIO:.0f}x)"
            + (f", adaptation {timing[name]['adapt_seconds']:.1f} s per query volume on top"
               if timing[name]["adapt_seconds"] else "")
            + f". Target {'met' if met else 'not met'}.")


def target_lines(results: dict) -> list[str]:
    rows = results["rows"]
    if "LSLPN+" not in rows:
        return ["No option raised the validation Dice: there is no LSLPN+ combination to test."]
    return [_against_lslpn(results, name) for name in rows if name.startswith(("LSLPN+", "+"))]


def selection_lines(selection: dict) -> list[str]:
    lines = [f"LSLPN on the validation scans: {_fmt(selection['baseline'])} mean Dice "
             "(every fold, both settings).",
             "", "| Option | settings | validation Dice | vs LSLPN |", "|---|---|---|---|"]
    for entry in selection["candidates"]:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(entry["settings"].items()))
        best = selection["best"][entry["option"]]["settings"] == entry["settings"]
        mark = " **(chosen)**" if best else ""
        lines.append(f"| {entry['option']} | {settings}{mark} | {_fmt(entry['validation'])} | "
                     f"{100 * (entry['validation'] - selection['baseline']):+.1f} |")
    lines += ["", "Greedy combination (options in order of their validation gain; kept when the combination "
              "improves):", ""]
    for step in selection["greedy"]:
        lines.append(f"- {step['option']}: validation {_fmt(step['validation'])} -> "
                     f"{'kept' if step['kept'] else 'dropped'}")
    if not selection["greedy"]:
        lines.append("- no option beat LSLPN on the validation scans")
    return lines


def timing_note(timing: dict) -> str:
    """What the seconds and head-share columns are and where they were measured."""
    cell = timing["cell"]
    return ("seconds per query volume (inference of one organ in one scan; adaptation apart, in its own "
            "column) and the head's share of one forward pass (1 support + 16 queries) were measured after "
            f"one untimed warm-up evaluation, in {timing.get('passes', 1)} pass(es) over all rows, row after "
            f"row (each row's fastest pass), on fold {cell['fold']}, Setting {cell['setting']}, label set "
            f"{cell['label_set']} ({timing.get('environment', '2 CPU cores')}), "
            + ("with nothing else running on the cores." if timing.get("quiet")
               else "while other jobs shared the cores: seconds and ratios are loose."))


def noise_note(results: dict) -> str:
    """The timing pairs that run the same computation at test time (option sets that differ only in
    TRAINING_KEYS): their differences show the noise of the seconds column; '' when there are none."""
    timing, rows = results["timing"]["rows"], results["rows"]

    def at_test_time(name: str) -> dict:
        return {k: v for k, v in rows[name]["options"].items() if k not in TRAINING_KEYS}
    names = list(rows)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if at_test_time(a) == at_test_time(b)]
    if not pairs:
        return ""
    text = "; ".join(f"{a} {timing[a]['seconds']:.3f} s and {b} {timing[b]['seconds']:.3f} s"
                     for a, b in pairs)
    return (" Rows that differ only in training run the same computation at test time; their seconds show "
            f"the noise of the column: {text}.")


def write_report(results: dict, doc: Path) -> None:
    folds = results["folds"]
    lines = ["# LSLPN+ on CHAOS-T2 MRI: options beyond the paper, chosen on validation scans", "",
             f"Generated by `{results['command']}` at commit {results['commit']} "
             f"({results['seconds'] / 60:.1f} min on {results['environment']}).", "",
             "Budget and protocol: the LSLPN row of docs/bench_chaos.md (its runs, names and seeds: "
             "`demo selfsup selfsup.episodes=alpnet`, cnn_small from random initialisation, 100 steps, "
             "batch 2, 64 x 64 input), SSL-ALPNet's protocol (preset `alpnet`), "
             f"folds {', '.join(map(str, folds))}, Settings 1 and 2, every row on every fold. Options that "
             "act at test time (the head options have no parameters; test-time adaptation fine-tunes a copy "
             "of the network per support slice) are applied to the LSLPN row's own runs; options that change "
             "training (2.5D input, the boundary loss) have their own runs, trained exactly as the LSLPN row "
             "plus that option.", "",
             f"Timing: {timing_note(results['timing'])}{noise_note(results)}", "",
             "Read with care: (1) the LSLPN runs were retrained for this report with the benchmark's config "
             "and seeds; their means differ from docs/bench_chaos.md's by about a point (another machine "
             "and checkout: README's paragraph 'Reproducibility of these figures' says what varies); "
             "(2) every evaluation is cached in OUT/lslpn_plus.json and reused by later runs of the command, "
             "so the wall time above is that of the last run, not of the whole measurement.", "",
             "## Target", "", *target_lines(results), "",
             "## Selection on validation scans (never the test scans)", "",
             "Per fold, LSLPN was retrained with the fold's validation scan held out "
             "(the first training scan "
             "after the support); each candidate segmented that scan from the fold's support.", "",
             *selection_lines(results["selection"]), ""]
    for setting in (2, 1):
        lines += [f"## Setting {setting}: test scans", "",
                  "Mean (std over folds) of the per-fold mean Dice (%) over each fold's 4 query scans. "
                  "`+ option`: the option alone on LSLPN; `LSLPN+ without option`: the combination "
                  "minus it.", "",
                  *setting_table(results, setting), ""]
    lines += ["## Options", ""]
    for name, row in results["rows"].items():
        settings = ", ".join(f"{k}={v}" for k, v in sorted(row["options"].items())) or "none (the LSLPN row)"
        lines.append(f"- {name}: {settings}")
    write_text_atomic("\n".join(lines) + "\n", doc)


def run_sweep(data: Path, out: Path, folds: list[int], device: str, retime: bool, command: str) -> dict:
    """Selection on the validation scans, the test ablation and the timing pass: the results."""
    from util.provenance import git_commit
    start = time.perf_counter()
    bench = Bench(data, out, folds, device, {"steps": 100, "input_size": 64, "batch_size": 2})
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
    timing = timing_pass(bench, rows, cells, retime)
    return {"selection": selection, "rows": evaluations, "folds": folds, "timing": timing,
            "seconds": time.perf_counter() - start, "commit": git_commit(), "command": command,
            "environment": steps.environment_note(), "log": bench.log}
