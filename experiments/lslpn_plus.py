"""LSLPN+ on CHAOS-T2 (`python scripts/bench_chaos.py --lslpn-plus`; docs/lslpn_plus.md says how each step
runs): each option chosen on each fold's validation scan, combined greedily; the ablation on the test scans of
the benchmark's own LSLPN runs (experiments/chaos.py; options that change training get their own runs); a
timing pass; the report.
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
from experiments.timing import measure
from models.fewshot import PLUS_DEFAULTS
from util.io import write_text_atomic
from util.provenance import git_commit

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
# options that change training -> their train.py key; an option set holding them is evaluated on its own
# LSLPN runs (the LSLPN row's budget, names and seeds plus these overrides; the run name says which)
TRAINING_KEYS: dict[str, str] = {"boundary_weight": "boundary_weight", "input_slices": "model.input_slices"}
LSLPN = "LSLPN"
TIMING_PASSES = 2       # timing passes over all rows; each row keeps its fastest (timing_pass)


def training_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k in TRAINING_KEYS}


def head_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k in PLUS_DEFAULTS}


def run_suffix(train_options: dict) -> str:
    """Run-name suffix of a training option set ('' for LSLPN's own runs), e.g. '_input_slices3'."""
    return "".join(f"_{key}{value}" for key, value in sorted(train_options.items()))


def describe(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items()))


def key_of(options: dict) -> str:
    return json.dumps(options, sort_keys=True) if options else ""


class Bench:
    """Cells (fold, setting, label set) with their folders and LSLPN snapshots; evaluations cached in
    OUT/lslpn_plus.json."""

    def __init__(self, data: Path, out: Path, folds: list[int], device: str, budget: dict):
        self.data, self.out, self.folds, self.device, self.log = data, out, folds, device, []
        self.dataset = steps.layout.detect_dataset(data)
        self.named, self.base = steps.budget_overrides(budget["steps"], budget["input_size"],
                                                       budget["batch_size"], False)
        self.path = out / "lslpn_plus.json"
        self.saved = json.loads(self.path.read_text()) if self.path.is_file() else {"evaluations": {}}

    def cells(self, validation: bool) -> list[dict]:
        """Every (fold, setting, label set) with its folder, snapshot and organs (Setting 2 first)."""
        cells = []
        for setting in (2, 1):
            for fold in self.folds:
                for label_set in (0, 1):
                    folder = steps.prepared(self.data, self.out, fold, setting, label_set if setting == 2
                                            else None, "or", self.log, validation=validation)
                    cell = {"fold": fold, "setting": setting, "label_set": label_set, "folder": folder,
                            "name": f"lslpn_{folder.name}", "organs": self.dataset.test_organs(label_set),
                            "queries": steps.read_meta(folder)["alpnet"]["validation" if validation
                                                                          else "test"]}
                    # Setting 1: one run serves both label sets (no label is read in training)
                    shared = setting == 1 and label_set == 1
                    cell["snapshot"] = cells[-1]["snapshot"] if shared else self.snapshot(cell, {})
                    cells.append(cell)
        return cells

    def snapshot(self, cell: dict, train_options: dict) -> Path:
        """last.pth of the cell's LSLPN run trained with `train_options` (trained unless finished)."""
        if not train_options and "snapshot" in cell:
            return cell["snapshot"]
        how = steps.methods()[LSLPN]
        overrides = [f"{TRAINING_KEYS[k]}={json.dumps(v)}" for k, v in sorted(train_options.items())]
        return steps.train(cell["name"] + run_suffix(train_options), [*self.named, *how["named"]],
                           [*self.base, *how["overrides"], *overrides, f"path.data_dir={cell['folder']}"],
                           self.out / "train", self.log, self.device)

    def evaluate(self, options: dict, cell: dict, stage: str) -> dict:
        """`evaluate_cell`, cached under stage, options, cell, snapshot and meta.json bytes, device."""
        cell = {**cell, "snapshot": self.snapshot(cell, training_options(options))}
        key = "|".join([stage, key_of(options), *(str(cell[k]) for k in ("fold", "setting", "label_set")),
                        steps.file_digest(cell["snapshot"]), steps.file_digest(cell["folder"] / "meta.json"),
                        self.device])
        if key not in self.saved["evaluations"]:
            self.saved["evaluations"][key] = evaluate_cell(options, cell, self.device)
            write_text_atomic(json.dumps(self.saved, indent=1), self.path)
        return self.saved["evaluations"][key]


def mean_dice(bench: Bench, options: dict, cells: list[dict], stage: str) -> float:
    """Mean over cells and organs of the mean Dice over the cell's query scans."""
    values = [np.mean(finite) for cell in cells
              for per_query in bench.evaluate(options, cell, stage)["dice"].values()
              if (finite := [v for v in per_query.values() if v is not None and np.isfinite(v)])]
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
    combination, combined, greedy = {}, baseline, []
    gains = sorted((o for o in best if best[o]["validation"] > baseline),
                   key=lambda o: -best[o]["validation"])
    for option in gains:
        trial = {**combination, **best[option]["settings"]}
        value = mean_dice(bench, trial, cells, "validation")
        greedy.append({"option": option, "validation": value, "kept": value > combined})
        if value > combined:
            combination, combined = trial, value
    return {"baseline": baseline, "candidates": table, "best": best, "greedy": greedy,
            "combination": combination, "combination_validation": combined,
            "chosen": [s["option"] for s in greedy if s["kept"]]}


def test_rows(selection: dict) -> dict[str, dict]:
    """Row name -> option set of the test ablation."""
    best, chosen = selection["best"], selection["chosen"]
    rows = {LSLPN: {}, **{f"+ {option}": dict(b["settings"]) for option, b in best.items()}}
    if chosen:
        rows["LSLPN+"] = dict(selection["combination"])
    for option in chosen if len(chosen) > 1 else []:
        rows[f"LSLPN+ without {option}"] = {k: v for other in chosen if other != option
                                            for k, v in best[other]["settings"].items()}
    return rows


def timing_pass(bench: Bench, rows: dict[str, dict], cells: list[dict], retime: bool) -> dict:
    """Per row on the first cell: seconds per query volume (adaptation apart) and the head's share of a
    forward pass; after one untimed warm-up, TIMING_PASSES passes over the rows, each row's fastest kept.
    Cached; retime: measured again (on a machine the caller keeps quiet)."""
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
        evaluate_cell({}, {**cell, "snapshot": bench.snapshot(cell, {})}, bench.device)   # untimed warm-up
    fastest: dict[str, dict] = {}
    for _ in range(TIMING_PASSES if todo else 0):
        for row, options in todo.items():
            snapshot = bench.snapshot(cell, training_options(options))
            result = evaluate_cell(options, {**cell, "snapshot": snapshot}, bench.device)
            if row not in fastest or result["seconds"] < fastest[row]["seconds"]:
                fastest[row] = result
    for row, result in fastest.items():
        saved["rows"][keys[row]] = {
            "seconds": result["seconds"] / result["volumes"],
            "adapt_seconds": result["adapt_seconds"] / result["volumes"],
            "per_adaptation": result["adapt_seconds"] / max(1, result["adaptations"]),
            "head_share": head_share(bench.snapshot(cell, training_options(rows[row])), rows[row],
                                     bench.device)}
    if todo:
        write_text_atomic(json.dumps(bench.saved, indent=1), bench.path)
    for row in rows:
        print(f"    timing {row}: {saved['rows'][keys[row]]['seconds']:.3f} s per query volume", flush=True)
    return {"cell": where, "rows": {row: saved["rows"][keys[row]] for row in rows}, "quiet": saved["quiet"],
            "passes": TIMING_PASSES, "environment": steps.environment_note()}


def evaluate_cell(options: dict, cell: dict, device: str) -> dict:
    """{dice: {organ: {query: Dice}}, seconds (inference), adapt_seconds, adaptations, volumes} of one
    option set on one cell; test-time adaptation on stored-resolution views."""
    adapted = []

    def transform(model):
        adapted.append(test_time_model(model, head_options(options), options.get("adapt_steps", 0),
                                       options.get("adapt_lr", 1e-2), stored_views=True))
        return adapted[-1]
    dice, _, seconds = steps.evaluate_method(cell["snapshot"], cell["folder"], cell["organs"], device,
                                             queries=cell["queries"], model_transform=transform)
    adapt_seconds = sum(getattr(model, "seconds_adapting", 0.0) for model in adapted)
    return {"dice": dice, "seconds": seconds - adapt_seconds, "adapt_seconds": adapt_seconds,
            "adaptations": sum(getattr(model, "adaptations", 0) for model in adapted),
            "volumes": len(cell["organs"]) * len(cell["queries"])}


def head_share(snapshot, options: dict, device: str, n_queries: int = 16, repeats: int = 5) -> dict:
    """Median seconds of the encoder and of the head for 1 support + n_queries query slices, and the
    head's share of the two."""
    model, info = load_snapshot(snapshot, device)
    model, size = test_time_model(model, head_options(options)), int(info["input"]["input_size"])
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
        encoder = measure(encode, torch.device(device), repeats).median
        head = measure(head_pass, torch.device(device), repeats).median
    return {"encoder_seconds": encoder, "head_seconds": head, "share": head / (encoder + head),
            "n_queries": n_queries, "input_size": size}


# ------------------------------------------------------------------------- report
TARGET_GAIN, MAX_ORGAN_LOSS, MAX_TIME_RATIO = 5.0, 1.0, 2.0       # docs/lslpn_plus.md's target, Dice points


def summary(row: dict, setting: int, cells_of: dict | None = None) -> dict | None:
    """Per organ mean/std over folds and the mean of the organ means (None: no cell in that setting);
    cells_of: only the (fold, setting, label set) cells that row has."""
    keys = {(c["fold"], c["setting"], c["label_set"]) for c in (cells_of or row)["cells"]}
    cells = [c for c in row["cells"] if (c["fold"], c["setting"], c["label_set"]) in keys]
    if not any(c["setting"] == setting for c in cells):
        return None
    folds = summarise_folds(steps.fold_means([{**c, "method": "row"} for c in cells], "row", setting))
    return {"organs": folds, "mean": float(np.mean([folds[o]["mean"] for o in ORGANS if o in folds])),
            "folds": sorted({c["fold"] for c in cells if c["setting"] == setting})}


def setting_table(results: dict, setting: int) -> list[str]:
    rows, timing = results["rows"], results["timing"]["rows"]
    lines = [f"| Method | folds | {' | '.join(HEAD[o] for o in ORGANS)} | mean | vs LSLPN (same folds) | "
             "s / query volume | adaptation s / query volume | head share |", "|---" * 11 + "|"]
    for name, row in rows.items():
        s = summary(row, setting)
        if s is None:
            continue
        t = timing[name]
        delta = 100 * (s["mean"] - summary(rows[LSLPN], setting, row)["mean"])
        organs = " | ".join(f"{_fmt(s['organs'][o]['mean'])} ({_fmt(s['organs'][o]['std'])})" for o in ORGANS)
        adapt = (f"{t['adapt_seconds']:.2f} ({t['per_adaptation']:.1f} per support slice)"
                 if t["adapt_seconds"] else "-")
        lines.append(f"| {name} | {', '.join(map(str, s['folds']))} | {organs} | {_fmt(s['mean'])} | "
                     f"{delta:+.1f} | {t['seconds']:.3f} | {adapt} | {100 * t['head_share']['share']:.0f}% |")
    return lines


def target_lines(results: dict) -> list[str]:
    rows, timing = results["rows"], results["timing"]["rows"]
    if "LSLPN+" not in rows:
        return ["No option raised the validation Dice: there is no LSLPN+ combination to test."]
    lines = []
    for name in (name for name in rows if name.startswith(("LSLPN+", "+"))):
        plus, base = summary(rows[name], 2), summary(rows[LSLPN], 2, rows[name])
        gain = 100 * (plus["mean"] - base["mean"])
        worst = min(100 * (plus["organs"][o]["mean"] - base["organs"][o]["mean"]) for o in ORGANS)
        ratio = timing[name]["seconds"] / timing[LSLPN]["seconds"]
        met = gain >= TARGET_GAIN and worst >= -MAX_ORGAN_LOSS and ratio <= MAX_TIME_RATIO
        adapt = timing[name]["adapt_seconds"]
        lines.append(f"- {name}, Setting 2, folds {', '.join(map(str, plus['folds']))}: {_fmt(plus['mean'])} "
                     f"against LSLPN {_fmt(base['mean'])} on the same folds: {gain:+.1f} Dice points (target "
                     f"+{TARGET_GAIN:.0f}); worst organ {worst:+.1f} (target >= -{MAX_ORGAN_LOSS:.0f}); "
                     f"inference {ratio:.2f}x LSLPN's time per query volume (target <= {MAX_TIME_RATIO:.0f}x)"
                     + (f", adaptation {adapt:.1f} s per query volume on top" if adapt else "")
                     + f". Target {'met' if met else 'not met'}.")
    return lines


def selection_lines(selection: dict) -> list[str]:
    lines = [f"LSLPN on the validation scans: {_fmt(selection['baseline'])} mean Dice "
             "(every fold, both settings).",
             "", "| Option | settings | validation Dice | vs LSLPN |", "|---|---|---|---|"]
    for entry in selection["candidates"]:
        mark = " **(chosen)**" if selection["best"][entry["option"]]["settings"] == entry["settings"] else ""
        lines.append(f"| {entry['option']} | {describe(entry['settings'])}{mark} | "
                     f"{_fmt(entry['validation'])} | "
                     f"{100 * (entry['validation'] - selection['baseline']):+.1f} |")
    lines += ["", "Greedy combination (options in order of their validation gain; kept when the combination "
              "improves):", ""]
    lines += [f"- {g['option']}: validation {_fmt(g['validation'])} -> {'kept' if g['kept'] else 'dropped'}"
              for g in selection["greedy"]] or ["- no option beat LSLPN on the validation scans"]
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
    """The timing pairs of rows that differ only in TRAINING_KEYS (the same computation at test time): the
    noise of the seconds column; '' when there are none."""
    timing, rows = results["timing"]["rows"], results["rows"]
    at_test = {name: {k: v for k, v in row["options"].items() if k not in TRAINING_KEYS}
               for name, row in rows.items()}
    names = list(rows)
    text = "; ".join(f"{a} {timing[a]['seconds']:.3f} s and {b} {timing[b]['seconds']:.3f} s"
                     for i, a in enumerate(names) for b in names[i + 1:] if at_test[a] == at_test[b])
    return (" Rows that differ only in training run the same computation at test time; their seconds show "
            f"the noise of the column: {text}.") if text else ""


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
    lines += ["## Options", "", *(f"- {name}: {describe(row['options']) or 'none (the LSLPN row)'}"
                                  for name, row in results["rows"].items())]
    write_text_atomic("\n".join(lines) + "\n", doc)


def run_sweep(data: Path, out: Path, folds: list[int], device: str, retime: bool, command: str) -> dict:
    """Selection on the validation scans, the test ablation and the timing pass: the results."""
    start = time.perf_counter()
    bench = Bench(data, out, folds, device, {"steps": 100, "input_size": 64, "batch_size": 2})
    print("==> selection on the validation scans", flush=True)
    selection = select(bench, bench.cells(validation=True))
    print(f"==> chosen: {selection['chosen']} ({describe(selection['combination']) or 'none'})", flush=True)
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
