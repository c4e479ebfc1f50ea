"""Generate the synthetic thorax-abdomen CT phantom (phantom/) in the VISCERAL Anatomy3 layout, then
print the mask-copy Dice per test organ on its gold volumes (the data set does not solve itself).

    python scripts/make_phantom.py --out data/phantom --n-silver 20 --n-gold 6 --seed 2021
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dataloaders.prepared import default_support
from evaluation.dataset_check import format_mask_copy, mask_copy_dice
from evaluation.protocols import get_preset
from phantom import generate_phantom
from util.cli import run_cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="phantom ROOT folder to create")
    parser.add_argument("--n-silver", type=int, default=20, help="training (silver corpus) volumes")
    parser.add_argument("--n-gold", type=int, default=6, help="test (gold corpus) volumes, at least 2")
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--size", type=int, default=256, help="in-plane pixels (X = Y)")
    parser.add_argument("--slices", type=int, default=64, help="nominal slice count (varies by +-1/8)")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--preset", default="inclusive", help="protocol preset of the mask-copy check")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    existing.add_argument("--skip-existing", action="store_true", help="do nothing when --out exists")
    args = parser.parse_args(argv)
    get_preset(args.preset)  # an unknown preset fails before anything is written
    out = Path(args.out)
    if args.skip_existing and out.exists():
        print(f"{out}: exists, kept (--skip-existing)")
        return 0
    start = time.perf_counter()
    result = generate_phantom(out, args.n_silver, args.n_gold, args.seed, args.size, args.slices,
                              args.workers, args.overwrite)
    cases = result["cases"].values()
    slices, lps = [case["shape"][2] for case in cases], sum(case["orientation"] == "LPS" for case in cases)
    print(f"wrote {out}: {args.n_silver} silver + {args.n_gold} gold volumes of {args.size} x {args.size} x "
          f"{min(slices)}-{max(slices)} slices ({lps} stored LPS) in {time.perf_counter() - start:.1f} s")
    labels = result["gold_labels"]
    support = default_support(list(labels))
    print(format_mask_copy(mask_copy_dice(labels, support, args.preset), support, args.preset))
    return 0


if __name__ == "__main__":
    run_cli(main)
