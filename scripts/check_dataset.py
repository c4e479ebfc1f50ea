"""Check a prepared folder (files, shapes, dtypes, labels, splits, index.json) and print its per-class table.

    python scripts/check_dataset.py data/prepared_phantom [--mask-copy]   # + mask-copy Dice on gold
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dataloaders.prepared import check_folder, default_support, load_volume
from evaluation.dataset_check import DEFAULT_PRESET, format_mask_copy, mask_copy_dice
from evaluation.protocols import get_preset
from util.cli import run_cli
from util.errors import UserError


def format_table(report: dict) -> str:
    """Per-class table of a `check_folder` report."""
    lines = [f"{'index':>5}  {'class':<24} {'slices':>6} {'volumes':>7} {'val vol':>7} {'gold vol':>8}"]
    lines += [f"{row['index']:>5}  {row['name']:<24} {row['slices']:>6} {row['volumes']:>7} "
              f"{row['val']:>7} {row['gold']:>8}" for row in report["rows"]]
    if not report["labeled"]:
        lines.append("images only (no labels): for self-supervised training (scripts/make_superpixels.py)")
    sizes = report["splits"]
    lines.append(f"train {sizes['train']} volumes, val {sizes['val']}, gold {sizes['gold']}; "
                 f"prep size {report['prep_size']}")
    return "\n".join(lines)


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
    report = check_folder(args.prep)
    print(format_table(report))
    if args.mask_copy:                 # on the gold volumes: test organs, default support
        gold = Path(args.prep) / "volumes" / "gold"
        labels = {path.stem: load_volume(args.prep, "gold", path.stem)["label"]
                  for path in sorted(gold.glob("*.npz"))}
        if len(labels) < 2:
            raise UserError(f"{gold}: fewer than 2 gold volumes: the mask-copy check needs a support and a "
                            "query")
        support = default_support(list(labels))
        print(format_mask_copy(mask_copy_dice(labels, support, args.preset), support, args.preset))
    print(f"{args.prep}: OK")
    return 0


if __name__ == "__main__":
    run_cli(main)
