"""Figures and a combined Table 1 from evaluation run folders written by test.py.

    python scripts/make_figures.py runs/test/1                         # results.png, misalignment.png
    python scripts/make_figures.py runs/test/1 runs/test/2 runs/test/3 runs/test/4 --table table.md

With --table, the runs (e.g. one per fold) are merged into one table in the paper's Table 1 layout
(organs as columns, methods as rows); they must share the protocol preset.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import run_cli  # noqa: E402
from util.errors import UserError  # noqa: E402
from evaluation.figures import make_figures  # noqa: E402
from evaluation.protocol import ProtocolPreset  # noqa: E402
from util.atomic import write_text_atomic  # noqa: E402
from evaluation.results import markdown_table, read_results  # noqa: E402
from util.paths import check_output_file, check_writable_folder  # noqa: E402


def merged_table(run_dirs: list[Path]) -> str:
    """One Table 1 (range and whole-volume Dice) over several runs' results.json."""
    summary: dict = {}
    presets = set()
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="evaluation run folders (results.json inside)")
    parser.add_argument("--table", type=Path, help="write the merged Table 1 markdown here")
    args = parser.parse_args(argv)
    for run in args.runs:     # before drawing anything: every results.json readable, every output writable
        read_results(run)
        check_writable_folder(run, "run folder")
    if args.table:
        check_output_file(args.table, [run / name for run in args.runs for name in ("results.json", "table.md")],
                          "--table")
    for run in args.runs:
        for path in make_figures(run):
            print(f"wrote {path}")
    if args.table:
        write_text_atomic(merged_table(args.runs), args.table)
        print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    run_cli(main)
