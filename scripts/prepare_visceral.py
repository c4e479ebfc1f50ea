"""Prepare a VISCERAL, multi-label, images-only or SSL-ALPNet data set (docs/DESIGN.md, "Prepared data").

    python scripts/prepare_visceral.py --visceral-dir data/phantom --out data/prepared_phantom
    python scripts/prepare_visceral.py --visceral-dir AMOS --layout multilabel --label-map map.json --out PREP
    python scripts/prepare_visceral.py --visceral-dir MY_CT_DIR --layout images-only --out PREP   # no labels
    python scripts/prepare_visceral.py --visceral-dir CHAOST2 --layout alpnet --fold 0 --setting 2 --out PREP
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dataloaders.prepare import Selection, prepare_dataset
from util.cli import run_cli
from util.errors import UserError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visceral-dir", required=True, help="source ROOT (SilverCorpus/, GoldCorpus/)")
    parser.add_argument("--out", required=True, help="prepared folder to create")
    parser.add_argument("--layout", default="visceral", choices=["visceral", "multilabel", "images-only",
                                                                 "alpnet"],
                        help="images-only: a folder of NIfTI CT volumes, all slices, no labels "
                             "(self-supervised training; add superpixels with scripts/make_superpixels.py); "
                             "alpnet: SSL-ALPNet's layout (CHAOS-T2 / SABS), one fold (--fold, --setting)")
    parser.add_argument("--fold", type=int, default=0, help="alpnet layout: SSL-ALPNet fold 0-4")
    parser.add_argument("--setting", type=int, default=2, help="alpnet layout: 1 or 2 (test-organ slices "
                                                               "dropped)")
    parser.add_argument("--label-set", type=int, default=0, help="alpnet layout: 0 kidneys, 1 liver + spleen "
                                                                 "tested")
    parser.add_argument("--rule", default="or", help="alpnet layout, Setting 2: 'or' (SSL-ALPNet) or 'and'")
    parser.add_argument("--label-map", help="JSON label name -> value map (multilabel layout)")
    parser.add_argument("--allow-missing-labels", action="store_true",
                        help="multilabel: accept map values absent from a volume")
    parser.add_argument("--size", type=int, default=256, help="preparation size S of training slices")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"),
                        help="HU window instead of per-slice min-max scaling, e.g. -125 275")
    parser.add_argument("--n-val", type=int,
                        help="silver volumes held out for validation (default 20%%, >= 1)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--min-voxels", type=int, default=150, help="a slice qualifies with MORE voxels")
    parser.add_argument("--max-per-volume", type=int, default=5, help="slices drawn when many qualify")
    parser.add_argument("--many", type=int, default=20, help="'many' qualifying slices")
    parser.add_argument("--keep-all-slices", action="store_true", help="keep every qualifying slice")
    parser.add_argument("--official-slices", action="store_true",
                        help="as the official notebook: the last axial slice of a volume is never considered")
    parser.add_argument("--workers", type=int, default=2)
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    existing.add_argument("--skip-existing", action="store_true", help="do nothing when --out exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.skip_existing and out.exists():
        print(f"{out}: exists, kept (--skip-existing)")
        return 0
    if args.layout == "alpnet":
        return prepare_alpnet_layout(args, out)
    intensity = {"mode": "window", "window": list(args.window)} if args.window else {"mode": "minmax"}
    rule = Selection(args.min_voxels, args.max_per_volume, args.many, args.keep_all_slices,
                     args.official_slices)
    start = time.perf_counter()
    meta = prepare_dataset(args.visceral_dir, out, args.layout, args.label_map, args.size, intensity,
                           args.n_val, args.seed, rule, args.workers, args.overwrite,
                           args.allow_missing_labels)
    splits = meta["splits"]
    overlaps = sum(v["overlap_voxels"] for v in meta["volumes"].values())
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s: train {len(splits['train'])}, val "
          f"{len(splits['val'])}, gold {len(splits['gold'])} volumes; prep size {args.size}; intensity "
          f"{meta['intensity']}; {overlaps} overlapping mask voxels resolved (smaller structure wins)")
    return 0


def prepare_alpnet_layout(args, out: Path) -> int:
    """--layout alpnet: SSL-ALPNet's normalisation (MR z-score, CT training statistics), no HU window."""
    from dataloaders.layouts import detect_dataset
    from dataloaders.prepare import prepare_alpnet
    dataset = detect_dataset(args.visceral_dir)
    if args.window:
        what = "an HU window on MR volumes (no Hounsfield units)" if dataset.modality == "MR" else \
            "an HU window instead of SSL-ALPNet's CT normalisation"
        raise UserError(f"--window {args.window[0]:g} {args.window[1]:g}: {args.visceral_dir} is "
                        f"{dataset.name} ({dataset.modality}); {what} is refused: leave --window out (the "
                        "layout is normalised as SSL-ALPNet's loader)")
    if args.size != 256:
        raise UserError(f"--size {args.size}: the SSL-ALPNet layout is used at its stored 256 x 256: leave "
                        "--size out (train at another input_size instead)")
    start = time.perf_counter()
    meta = prepare_alpnet(args.visceral_dir, out, args.fold, args.setting, args.label_set, args.rule,
                          args.overwrite)
    kept = meta["alpnet"]["kept"]
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s: {dataset.name} fold {args.fold} setting "
          f"{args.setting}; train {len(meta['splits']['train'])} scans "
          f"({sum(v['kept'] for v in kept.values())} of {sum(v['slices'] for v in kept.values())} slices "
          f"kept), test {', '.join(meta['alpnet']['test'])}, support {meta['alpnet']['support']}; intensity "
          f"{meta['intensity']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
