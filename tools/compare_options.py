"""Measured effect of the fidelity options on the phantom (REPRODUCTION.md's difference table).

    python tools/compare_options.py --out runs/compare --data data/prepared_phantom

Trains each variant x fold with train.py (finished runs under OUT/<variant>/fold<F> are reused) on top of
`demo`, shortened for 2 CPU cores: cnn_small 200 steps; vgg16 from random weights at 64 x 64, 100 steps.
Evaluates every snapshot beside mask copy under preset 'inclusive' and 'official' (OUT/eval_<preset>/);
OUT/compare.md is the table. Results: docs/fidelity_phantom.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dataloaders.organs import FOLD_ORGANS
from experiments.runner import train_or_reuse
from util.atomic import write_text_atomic
from util.cli import run_cli

VGG_SMALL = ["model.encoder=vgg16", "model.pretrained=False", "input_size=64", "n_steps=100", "lr=1e-3",
             "lr_milestones=[80]", "val_every=50", "save_every=50", "eval.batch_size=16"]
CNN_SHORT = ["n_steps=200", "lr_milestones=[150]", "val_every=50", "save_every=50"]
VARIANTS: dict[str, list[str]] = {
    "cnn_small (200 steps)": CNN_SHORT,
    "vgg16 (64 px, 100 steps)": VGG_SMALL,
}
PRESETS = ("inclusive", "official")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def train(variant: str, fold: int, data: str, out: Path, python: str) -> Path:
    return train_or_reuse(["demo", *VARIANTS[variant], f"fold={fold}", f"path.data_dir={data}",
                           f"path.log_dir={out / _slug(variant) / f'fold{fold}'}"],
                          title=f"train {variant}, fold {fold}", python=python)


def table(results: dict, preset: str) -> str:
    columns = ["liver", "spleen", "kidney", "psoas", "mean"]
    lines = [f"Preset '{preset}', Dice (%) over the organ slice range.", "",
             "| Variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, row in results["table"]["range"].items():
        lines.append(f"| {method} | " + " | ".join("–" if row[c] is None else f"{row[c]:.1f}"
                                                   for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--data", default="data/prepared_phantom", help="prepared phantom folder")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    snapshots: dict[str, dict[str, str]] = {}
    for variant in args.variants:
        for fold in args.folds:
            snapshot = train(variant, fold, args.data, args.out.resolve(), args.python)
            for organ in FOLD_ORGANS[fold]:
                snapshots.setdefault(variant, {})[organ] = str(snapshot)
    if args.train_only:
        return 0
    from evaluation.evaluate import evaluate
    organs = [organ for fold in args.folds for organ in FOLD_ORGANS[fold]]
    blocks = [f"Command: python tools/compare_options.py {' '.join(argv)}", ""]

    def run(preset: str, name: str, spec, size: int) -> dict:
        out = args.out / f"eval_{preset}" / _slug(name)
        result = evaluate({name: spec}, organs, args.data, preset=preset, out_dir=out, split="gold",
                          support="default", input_size=size, device="cpu", batch_size=32,
                          save_predictions=False, config={"argv": argv}, figures=False)
        return result["table"]["range"][name]

    def size_of(variant: str) -> int:
        return 64 if variant.startswith("vgg16") else 128   # each variant at its training size

    for preset in PRESETS:  # the same snapshots under this project's and the authors' evaluation
        rows = {"mask copy": run(preset, "mask copy", None, 128)}
        for variant, by_organ in snapshots.items():
            rows[variant] = run(preset, variant, by_organ, size_of(variant))
        blocks.append(table({"table": {"range": rows}}, preset))
    text = "\n".join(blocks)
    write_text_atomic(text, args.out / "compare.md")
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main)
