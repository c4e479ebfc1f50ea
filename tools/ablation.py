"""Ablation of the paper (docs/method.md, "VISCERAL data, folds and the paper's figures"): grid size, overlap
and vote, trained and evaluated.

    python tools/ablation.py --folds 0 1 2 3 -- demo            # demo size on a CPU
    python tools/ablation.py --folds 0 1 2 3 -- paper class_setting=all_structures

Variants (everything else from the Sacred overrides after `--`, given to train.py as they are):
  n_grid 16, 8, 4, 1 (overlapping cells, max vote), n_grid 8 non-overlapping, n_grid 8 mean vote,
  and SENet as the comparison method (named config `senet`, plus `senet_demo` when the overrides
  name `demo`). Snapshots are evaluated at the input size each was trained at.
Each variant x fold is trained with train.py under OUT/<variant>/fold<F>/ (the script can be resumed: an
existing best.pth/last.pth there is reused when its run's config.json equals the config train.py would run
with now, up to the keys that leave the weights unchanged (training/loop.py: path.log_dir, device, eval.*,
...); a snapshot trained under other settings, or of unknown settings, is refused with the keys that differ),
then all variants are evaluated in one run of evaluation.evaluate.evaluate next to the mask-copy baseline:
OUT/eval/ holds results.json, results.csv and the table; OUT/ablation.md is the table in the paper's ablation
layout (variants as rows).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import default_config, ex  # noqa: E402  (before sacred: config.py silences its import warning)

# isort: split
from sacred.arg_parser import get_config_updates  # noqa: E402
from sacred.utils import SacredError  # noqa: E402

from dataloaders.organs import FOLD_ORGANS  # noqa: E402
from evaluation.evaluate import evaluate  # noqa: E402
from training.loop import iter_runs, read_run_config, trajectory_differences  # noqa: E402
from util.atomic import write_text_atomic  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.errors import UserError  # noqa: E402

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


def find_snapshot(log_dir: Path) -> Path | None:
    """Newest best.pth (else last.pth) of the Sacred runs under log_dir/<name>/<id>/."""
    runs = list(iter_runs(log_dir))
    for file in ("best.pth", "last.pth"):
        found = sorted((run / file for run in runs if (run / file).is_file()),
                       key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def check_reusable(snapshot: Path, planned: dict) -> None:
    """A one-line error unless the run of `snapshot` was trained with the `planned` config: the keys that
    training/loop.py leaves out of a run's identity and the run name may differ; n_steps and val_every (they
    decide which snapshot exists) may not."""
    stored = read_run_config(snapshot.parent)
    fix = f"delete {snapshot.parent} (or pass another --out) and re-run"
    if stored is None:
        raise UserError(f"{snapshot}: its run has no readable config.json, so the settings it was trained "
                        f"under are unknown: {fix}")
    differences = [line for line in trajectory_differences(stored, planned, default_config())
                   if not line.startswith("name:")] + [
        f"{key}: {stored.get(key)} -> {planned.get(key)}" for key in ("n_steps", "val_every")
        if stored.get(key) != planned.get(key)]
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6
                                              else "")
        raise UserError(f"{snapshot}: trained under other settings than this ablation asks for ({shown}): "
                        f"{fix}")


def train_variant(variant: str, fold: int, overrides: list[str], out: Path, python: str) -> Path:
    """Train one variant on one fold with train.py (skipped when a snapshot of the same config exists)."""
    log_dir = out / _slug(variant) / f"fold{fold}"
    model = [f"model.{key}={value}" for key, value in VARIANTS[variant].items()]
    named = VARIANT_CONFIGS.get(variant, []) + (DEMO_CONFIGS.get(variant, []) if "demo" in overrides else [])
    arguments = [*overrides, *named, f"fold={fold}", *model, f"path.log_dir={log_dir}"]
    planned = resolved_config(arguments)
    snapshot = find_snapshot(log_dir)
    if snapshot is not None:
        check_reusable(snapshot, planned)
        print(f"[{variant}, fold {fold}] reusing {snapshot} (same config)")
        return snapshot
    command = [python, str(ROOT / "train.py"), "with", *arguments]
    print(f"[{variant}, fold {fold}] " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise UserError(f"training {variant} on fold {fold} failed (see above): fix it and re-run (done "
                        "variants are reused)")
    snapshot = find_snapshot(log_dir)
    if snapshot is None:
        raise UserError(f"train.py wrote no best.pth/last.pth under {log_dir}: check its output")
    return snapshot


def resolved_config(overrides: list[str]) -> dict:
    """The Sacred config train.py would see for these overrides (as JSON types, like a run's config.json);
    an unknown key or named config is one line."""
    updates, named = get_config_updates(overrides)
    try:
        run = ex._create_run("print_config", updates, named_configs=named, options={"--unobserved": True})
    except (SacredError, KeyError) as error:
        what = "; ".join(line.strip() for line in str(error).splitlines()
                         if line.strip()) or type(error).__name__
        raise UserError(f"overrides after --: {what}: check the spelling against config.py (named configs: "
                        f"{', '.join(sorted(ex.named_configs))}; keys: python train.py "
                        "print_config)") from None
    return json.loads(json.dumps(dict(run.config), default=str))


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
    config = resolved_config(overrides)
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
