"""Check a prepared folder (files, shapes, dtypes, labels, splits, index.json) and print its per-class table.

    python scripts/check_dataset.py data/prepared_phantom [--mask-copy]   # + mask-copy Dice on gold
"""
from __future__ import annotations

import argparse

import util.interrupt  # noqa: F401  (first: a Ctrl-C during the imports below is one line, exit 130)

# isort: split
from evaluation.dataset_check import DEFAULT_PRESET, check_prepared, format_table, prepared_mask_copy
from evaluation.protocols import get_preset
from util.cli import run_cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prep", help="prepared folder (scripts/prepare_visceral.py --out)")
    parser.add_argument("--mask-copy", action="store_true", help="also print the mask-copy Dice on gold")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help="protocol preset of the mask-copy check (evaluation/protocols.py)")
    args = parser.parse_args(argv)
    if args.mask_copy:
        get_preset(args.preset)                    # an unknown preset before the folder is read
    print(format_table(check_prepared(args.prep)))
    if args.mask_copy:
        print(prepared_mask_copy(args.prep, args.preset))
    print(f"{args.prep}: OK")
    return 0


if __name__ == "__main__":
    run_cli(main)
