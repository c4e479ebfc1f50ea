"""Training curves (loss and validation Dice against step; one panel per fold, one line per method) from
RUNS/<method>_fold<F>/<id>/metrics.json (as `make demo` writes them), runs joined in id order.

    python tools/training_curves.py runs/demo/train --out runs/demo/training_curves.png
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from training.loop import iter_runs
from util.cli import run_cli
from util.errors import UserError
from util.io import atomic_path

NAME = re.compile(r"^(?P<method>.+)_fold(?P<fold>\d+)$")
LABELS = {"mask_copy": "mask copy", "panet": "PANet", "senet": "SENet", "lslpn": "LSLPN"}
ORDER = ["mask copy", "PANet", "SENet", "LSLPN"]           # the published table's order
METRICS = (("loss", "training loss\n(each method's own)"), ("val_dice", "validation Dice"))


def read_metric(run_dirs: list[Path], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric` joined over run folders in id order (a later run wins at a step)."""
    by_step: dict[int, float] = {}
    for run_dir in run_dirs:
        path = run_dir / "metrics.json"
        try:
            with open(path) as handle:
                entry = json.load(handle).get(metric)
        except ValueError as error:
            raise UserError(f"{path} is not valid JSON ({error}): delete the run folder or rerun "
                            "it") from None
        if not entry:
            continue
        for step, value in zip(entry["steps"], entry["values"]):
            by_step[int(step)] = float(value)
    steps = np.array(sorted(by_step), dtype=int)
    return steps, np.array([by_step[s] for s in steps], dtype=float)


def collect(runs_root: str | Path) -> dict[int, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """fold -> method label -> metric -> (steps, values), from RUNS/<method>_fold<F>/<id>/metrics.json."""
    root = Path(runs_root)
    if not root.is_dir():
        raise UserError(f"runs folder {root} does not exist: train first (make demo) or pass the folder "
                        "that holds <method>_fold<F>/")
    curves: dict[int, dict[str, dict]] = {}
    for folder in sorted(root.iterdir()):
        match = NAME.match(folder.name)
        if not match or not folder.is_dir():
            continue
        run_dirs = [run for run in iter_runs(root, folder.name) if (run / "metrics.json").is_file()]
        if not run_dirs:
            continue
        method = LABELS.get(match["method"].lower(), match["method"])
        curves.setdefault(int(match["fold"]), {})[method] = {
            metric: read_metric(run_dirs, metric) for metric, _ in METRICS}
    if not curves:
        raise UserError(f"no <method>_fold<F>/<id>/metrics.json under {root}: pass the folder of the "
                        "training runs (e.g. runs/demo/train)")
    return curves


def plot(curves: dict, out: str | Path, command: str) -> Path:
    """Two rows (loss, validation Dice) x one column per fold; written atomically."""
    import matplotlib  # deferred: plotting only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = sorted(curves)
    methods = sorted({m for per_fold in curves.values() for m in per_fold},
                     key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(METRICS), len(folds), figsize=(3.6 * len(folds), 5.6), squeeze=False,
                             sharex="col")
    for column, fold in enumerate(folds):
        for row, (metric, title) in enumerate(METRICS):
            ax = axes[row][column]
            for method in methods:
                steps, values = curves[fold].get(method, {}).get(metric, (np.array([]), np.array([])))
                if steps.size:
                    ax.plot(steps, values, color=colours[method], label=method,
                            marker="o" if metric == "val_dice" else None, markersize=3,
                            linewidth=1.0 if metric == "loss" else 1.5)
            ax.set_title(f"fold {fold}" if row == 0 else "")
            ax.set_ylabel(title if column == 0 else "")
            if row == len(METRICS) - 1:
                ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    legend: dict = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), frameon=False)
    fig.text(0.5, -0.01, f"made by: {command}", ha="center", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out = Path(out)
    try:
        with atomic_path(out) as temporary:
            fig.savefig(temporary, format=out.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="folder holding <method>_fold<F>/<id>/metrics.json")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUNS/../training_curves.png)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs).parent / "training_curves.png"
    command = f"python tools/training_curves.py {args.runs} --out {out}"
    print(f"wrote {plot(collect(args.runs), out, command)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
