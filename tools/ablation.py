"""Ablation of the paper (docs/method.md, "VISCERAL data, folds and the paper's figures"): n_grid 16, 8, 4,
1, non-overlapping cells, mean vote, and SENet, trained and evaluated.

    python tools/ablation.py --folds 0 1 2 3 -- demo            # demo size on a CPU
    python tools/ablation.py --folds 0 1 2 3 -- paper class_setting=all_structures

The overrides after `--` go to train.py; finished runs under OUT/<variant>/fold<F>/ are reused. All
variants are evaluated beside mask copy (OUT/eval/), each at its training size; OUT/ablation.md: the table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dataloaders.organs import FOLD_ORGANS
from evaluation.evaluate import evaluate
from experiments.runner import resolved_config, train_or_reuse
from util.atomic import write_text_atomic
from util.cli import run_cli
from util.errors import UserError

# variant name -> model overrides
VARIANTS: dict[str, dict] = {
    "n_grid 16": {"n_grid": 16, "overlap": True, "vote": "max"},
    "n_grid 8": {"n_grid": 8, "overlap": True, "vote": "max"},
    "n_grid 4": {"n_grid": 4, "overlap": True, "vote": "max"},
    "n_grid 1 (global)": {"n_grid": 1, "overlap": True, "vote": "max"},
    "n_grid 8 non-overlapping": {"n_grid": 8, "overlap": False, "vote": "max"},
    "n_grid 8 mean vote": {"n_grid": 8, "overlap": True, "vote": "mean"},
    "SENet": {},
}
# variant name -> named configs after the overrides (and extra ones when the overrides name `demo`)
VARIANT_CONFIGS: dict[str, list[str]] = {"SENet": ["senet"]}
DEMO_CONFIGS: dict[str, list[str]] = {"SENet": ["senet_demo"]}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def train_variant(variant: str, fold: int, overrides: list[str], out: Path, python: str) -> Path:
    """Train one variant on one fold with train.py (skipped when a finished run of the same config exists)."""
    model = [f"model.{key}={value}" for key, value in VARIANTS[variant].items()]
    named = VARIANT_CONFIGS.get(variant, []) + (DEMO_CONFIGS.get(variant, []) if "demo" in overrides else [])
    return train_or_reuse([*overrides, *named, f"fold={fold}", *model,
                           f"path.log_dir={out / _slug(variant) / f'fold{fold}'}"],
                          title=f"train {variant}, fold {fold}", python=python)


def ablation_markdown(results: dict) -> str:
    """The ablation table: variants as rows, Table 1 columns, Dice % over the organ range."""
    rows = results["table"]["range"]
    columns = ["liver", "spleen", "kidney", "psoas", "mean"]
    preset = results["preset"]
    lines = [f"Ablation, Dice (%) over the organ slice range (preset '{preset['name']}').", "",
             "| Variant | n_grid | overlap | vote | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 4) + "|"]
    for method, row in rows.items():
        spec = VARIANTS.get(method, {})
        cells = ["–" if row[c] is None else f"{row[c]:.1f}" for c in columns]
        lines.append(f"| {method} | {spec.get('n_grid', '–')} | {spec.get('overlap', '–')} | "
                     f"{spec.get('vote', '–')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1:]
    else:
        overrides = []
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs train.py")
    args = parser.parse_args(argv)
    if shutil.which(args.python) is None:
        raise UserError(f"--python {args.python}: no such executable: pass the interpreter that has this "
                        "project's requirements (e.g. .venv/bin/python)")
    bad = [fold for fold in args.folds if fold not in range(len(FOLD_ORGANS))]
    if bad:
        raise UserError(f"--folds {bad} do not exist: use 0 (liver), 1 (spleen), 2 (kidneys), 3 (psoas)")
    config = resolved_config(overrides, "overrides after --")
    snapshots: dict[str, dict[str, str]] = {}
    for variant in args.variants:
        for fold in args.folds:
            snapshot = train_variant(variant, fold, overrides, args.out.resolve(), args.python)
            for organ in FOLD_ORGANS[fold]:
                snapshots.setdefault(variant, {})[organ] = str(snapshot)
    organs = [organ for fold in args.folds for organ in FOLD_ORGANS[fold]]
    settings = config["eval"]
    results = evaluate({"mask copy": None, **snapshots}, organs, config["path"]["data_dir"],
                       preset=settings["preset"], out_dir=args.out / "eval", split=settings["split"],
                       support=settings["support"], device=config["device"],
                       input_size=None if "SENet" in args.variants else config["input_size"],
                       # SENet: its own
                       batch_size=settings["batch_size"], save_predictions=False,
                       config={"overrides": overrides, "folds": args.folds})
    table = ablation_markdown(results)
    write_text_atomic(table, args.out / "ablation.md")
    print(table)
    print(f"wrote {args.out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
