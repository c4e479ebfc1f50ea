"""Figures, and with --table one Table 1 over the runs (same preset), from test.py's run folders; everything
is read, checked and drawn before the first file is written.

    python scripts/make_figures.py runs/test/1                         # results.png, misalignment.png
    python scripts/make_figures.py runs/test/1 runs/test/2 runs/test/3 runs/test/4 --table table.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.figures import FIGURE_NAMES, render_figures, write_figures
from evaluation.protocols import ProtocolPreset
from evaluation.results import markdown_table, read_results
from util.cli import run_cli
from util.errors import UserError
from util.io import check_output_file, check_writable_folder, same_file, write_text_atomic


def merged_table(run_dirs: list[Path]) -> str:
    """One Table 1 (range and whole-volume Dice) over several runs' results.json."""
    summary, presets = {}, set()
    try:
        for run in run_dirs:
            results = read_results(run)
            presets.add(json.dumps(results["preset"], sort_keys=True))
            for method, organs in results["results"].items():
                for organ, entry in organs.items():
                    if organ in summary.setdefault(method, {}):
                        raise UserError(f"{organ} of '{method}' appears in two runs (second: {run}): "
                                        "pass one run per fold")
                    summary[method][organ] = entry
        if len(presets) != 1:
            raise UserError("the runs use different protocol presets: merge runs of one preset only")
        preset = ProtocolPreset(**json.loads(presets.pop()))
        return markdown_table(summary, preset, "range") + "\n" + markdown_table(summary, preset, "volume")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:80]
        raise UserError(f"results.json of {', '.join(map(str, run_dirs))}: entries of an unexpected form "
                        f"({reason}): run test.py again for these folders") from None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="evaluation run folders (results.json inside)")
    parser.add_argument("--table", type=Path, help="write the merged Table 1 markdown here")
    args = parser.parse_args(argv)
    for run in args.runs:     # before drawing anything: every results.json readable, every output writable
        read_results(run)
        check_writable_folder(run, "run folder")
    if args.table:
        inputs = [run / name for run in args.runs for name in ("results.json", "table.md", "figure_data.npz")]
        check_output_file(args.table, inputs, "--table")
        figure = next((run / name for run in args.runs for name in FIGURE_NAMES
                       if same_file(args.table, run / name)), None)
        if figure is not None:
            raise UserError(f"--table {args.table} is the figure {figure} that this run writes: give another "
                            "path")
    # read and draw everything first (any error leaves every file as it was), then write
    figures = {path: png for run in args.runs for path, png in render_figures(run).items()}
    table = merged_table(args.runs) if args.table else None
    for path in write_figures(figures):
        print(f"wrote {path}")
    if table is not None:
        write_text_atomic(table, args.table)
        print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    run_cli(main)
