"""Summaries and files of an evaluation: results.json, results.csv and the paper's Table 1 (table.md), from
the records of `evaluation.evaluate.run_protocol` (one per method, organ, support and query). Dice values
are fractions in the files; the markdown table shows percentages as the paper.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dataloaders.organs import TABLE_COLUMNS
from evaluation.protocols import ProtocolPreset, aggregate
from util.errors import UserError
from util.io import write_text_atomic

METRICS = {"range": "dice_range", "volume": "dice_volume"}


def _stats(values: list[float], how: str) -> dict:
    """mean, median, std (population), n and the preset's aggregate `value` of per-volume Dice."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return {"value": None, "mean": None, "median": None, "std": None, "n": 0}
    return {"value": aggregate(array, how), "mean": float(array.mean()), "median": float(np.median(array)),
            "std": float(array.std()), "n": int(array.size)}


def summarise(records: list[dict], preset: ProtocolPreset) -> dict:
    """method -> organ -> {'range' / 'volume': per-volume statistics pooled over supports, with `value` =
    mean over supports of the preset's aggregate and `std_over_supports`; 'per_volume': the scored
    cases; 'skipped': the others, with the reason}."""
    summary: dict = {}
    for record in records:
        entry = summary.setdefault(record["method"], {}).setdefault(
            record["organ"], {"per_volume": [], "skipped": []})
        if record["skipped"]:
            entry["skipped"].append({key: record[key] for key in ("support", "query", "skipped")})
        else:
            entry["per_volume"].append({key: record[key] for key in (
                "support", "query", "dice_range", "dice_volume", "support_range", "query_range")})
    for organs in summary.values():
        for entry in organs.values():
            supports = sorted({case["support"] for case in entry["per_volume"]})
            for metric, key in METRICS.items():
                pooled = _stats([case[key] for case in entry["per_volume"]], preset.aggregate)
                per_support = [aggregate([c[key] for c in entry["per_volume"] if c["support"] == s],
                                         preset.aggregate) for s in supports]
                pooled["value"] = float(np.mean(per_support)) if per_support else None
                pooled["std_over_supports"] = float(np.std(per_support)) if per_support else None
                pooled["n_supports"] = len(supports)
                entry[metric] = pooled
    return summary


def table_rows(summary: dict, metric: str = "range") -> dict[str, dict[str, float | None]]:
    """method -> Table 1 column (liver, spleen, kidney, psoas, mean) -> Dice % (None when not evaluated):
    the mean of the column's evaluated organs (kidney, psoas: both sides); 'mean' that of the columns."""
    rows = {}
    for method, organs in summary.items():
        row = {}
        for column, members in TABLE_COLUMNS.items():
            values = [organs[o][metric]["value"] for o in members if o in organs
                      and organs[o][metric]["value"] is not None]
            row[column] = 100.0 * float(np.mean(values)) if values else None
        present = [value for value in row.values() if value is not None]
        row["mean"] = float(np.mean(present)) if present else None
        rows[method] = row
    return rows


def _support_spread(summary: dict, method: str, column: str, metric: str) -> float | None:
    """Mean over a column's organs of the std over supports, in % (None when one support)."""
    members = TABLE_COLUMNS.get(column, [])
    spreads = [summary[method][o][metric]["std_over_supports"] for o in members
               if o in summary[method] and summary[method][o][metric]["n_supports"] > 1]
    return 100.0 * float(np.mean(spreads)) if spreads else None


def markdown_table(summary: dict, preset: ProtocolPreset, metric: str = "range", fold=None) -> str:
    """The paper's Table 1 layout: methods as rows, liver/spleen/kidney/psoas/mean as columns."""
    rows = table_rows(summary, metric)
    columns = list(TABLE_COLUMNS) + ["mean"]
    what = "organ slice range" if metric == "range" else "whole volume (stricter)"
    rule = {"official": "official eval.py rule: range from z 0..Z-2 cropped to [first, last), floor(i*L/n) "
                        "chunks, Dice smoothed 0.001",
            "senet": "official SENet evaluator rule: support slices by linspace over its qualifying slices, "
                     "query cropped from 1 slice before its first qualifying slice to the end of that run, "
                     "linspace chunks, Dice 2|A.B|/(|A|+|B|+1e-4)",
            "alpnet": "SSL-ALPNet's rule: support slices at 1/6, 1/2, 5/6 of its organ slices, query thirds "
                      "of its own ground-truth range, plain Dice",
            }.get(preset.rule, "inclusive range, centre slices")
    lines = [f"Dice (%) over the {what}; protocol preset '{preset.name}' ({preset.n_chunks} chunks, "
             f"slices with > {preset.threshold} voxels, {rule}, {preset.aggregate} over query volumes)"
             + (f"; fold {fold}" if fold is not None else "") + ".", "",
             "| Method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, row in rows.items():
        cells = []
        for column in columns:
            value = row[column]
            spread = _support_spread(summary, method, column, metric)
            cell = "–" if value is None else f"{value:.1f}"
            if value is not None and spread is not None:
                cell += f" ± {spread:.1f}"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    notes = unscored_notes(summary)
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


def unscored_notes(summary: dict) -> list[str]:
    """Why an organ has no score ('–' in the table) or fewer volumes than the others: one line per organ
    (skips depend on the organ's slices, not the method: the first method speaks for all)."""
    notes, seen = [], set()
    for organs in summary.values():
        for organ, entry in organs.items():
            if organ in seen or not entry["skipped"]:
                continue
            seen.add(organ)
            reasons = sorted({case["skipped"] for case in entry["skipped"]})
            shown = "; ".join(reasons[:2]) + (f"; and {len(reasons) - 2} more" if len(reasons) > 2 else "")
            total = len(entry["skipped"]) + len(entry["per_volume"])
            if not entry["per_volume"]:
                notes.append(f"{organ}: not scored ('–'): none of its {total} cases can be scored ({shown}); "
                             "per case in results.csv")
            else:
                notes.append(f"{organ}: {len(entry['skipped'])} of {total} cases not scored ({shown})")
    return notes


def records_csv(records: list[dict]) -> str:
    """One CSV row per case: method, organ, support, query, preset, Dice (range, volume), ranges, skipped."""
    buffer = io.StringIO()
    fields = ["method", "organ", "support", "query", "preset", "dice_range", "dice_volume",
              "support_range", "query_range", "skipped"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = dict(record)
        for key in ("support_range", "query_range"):
            row[key] = "" if row[key] is None else f"{row[key][0]}-{row[key][1]}"
        for key in ("dice_range", "dice_volume"):
            row[key] = "" if row[key] is None else f"{row[key]:.6f}"
        row["skipped"] = row["skipped"] or ""
        writer.writerow({key: row[key] for key in fields})
    return buffer.getvalue()


def _jsonable(value):
    """Tuples -> lists, numpy scalars -> Python, NaN -> None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_results(run_dir: str | Path) -> dict:
    """results.json of an evaluation run folder; missing, corrupt or foreign files are one-line UserErrors."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: point at a folder written by test.py")
    try:
        results = json.loads(path.read_text())
    except (ValueError, OSError) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:80]
        raise UserError(f"{path}: unreadable ({reason}): the file is corrupt or truncated; run test.py again "
                        "for this folder") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict) \
            or not isinstance(results.get("preset"), dict):
        raise UserError(f"{path}: not a results.json written by test.py (no 'results'/'preset' entries): "
                        "point at an evaluation run folder")
    return results


def write_outputs(out_dir: str | Path | None, records: list, preset: ProtocolPreset, header: dict) -> dict:
    """The results dict (header: fold, split, supports, n_shots, config and methods), written as
    results.json with results.csv and table.md under out_dir (None: not written)."""
    summary = summarise(records, preset)
    results = _jsonable({**header, "preset": asdict(preset), "results": summary,
                         "table": {m: table_rows(summary, m) for m in METRICS}})
    if out_dir is None:
        return results
    out_dir = Path(out_dir)
    write_text_atomic(json.dumps(results, indent=1, sort_keys=False) + "\n", out_dir / "results.json")
    write_text_atomic(records_csv(records), out_dir / "results.csv")
    fold = header.get("fold")
    table = (markdown_table(summary, preset, "range", fold) + "\n"
             + markdown_table(summary, preset, "volume", fold))
    write_text_atomic(table, out_dir / "table.md")
    return results
