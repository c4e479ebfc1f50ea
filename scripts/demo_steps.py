"""The end-to-end demo on the synthetic phantom (`make demo`), step by step.

  1. generate the default phantom (seeded) unless it exists            data/phantom
  2. prepare it into 2D training slices + evaluation volumes, check it  data/prepared_phantom
  3. train LSLPN (n_grid 8, overlapping, max vote), the PANet global
     baseline (n_grid 1, alignment) and SENet (`senet senet_demo`: its
     schedule shortened, at 64 x 64) on all four folds, `demo` config   runs/demo/train/<name>/<id>/
  4. evaluate mask copy, PANet, SENet and LSLPN with the `inclusive`
     protocol preset on the gold phantom volumes, each snapshot at the
     input size it was trained at                                       runs/demo/
  5. draw the training curves (tools/training_curves.py)                runs/demo/training_curves.png
  6. write report.md (paper's Table 1 layout), results.json, results.png, misalignment.png
     and print the table last.

Finished steps are reused (an existing phantom, prepared folder, or a training run that reached its
last step); `redo` names steps to run again. Every step runs the same commands a user would type,
as subprocesses, so their progress bars show.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from config import default_config, ex  # before sacred: config.py silences its import warning

# isort: split
from sacred.arg_parser import get_config_updates
from sacred.initialize import create_run

from dataloaders.organs import FOLD_ORGANS, TEST_ORGANS
from dataloaders.prepared import read_meta
from evaluation.evaluate import evaluate
from training.loop import config_hash, finished_snapshot
from util.atomic import write_text_atomic
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PHANTOM_DIR = Path("data/phantom")
PREP_DIR = Path("data/prepared_phantom")
RUN_DIR = Path("runs/demo")
PHANTOM = {"n_silver": 20, "n_gold": 6, "seed": 2021}
METHODS = {  # table row -> Sacred named configs / overrides on top of `demo`
    "PANet": ["panet"],
    "SENet": ["senet", "senet_demo"],      # config.py senet_demo: SENet's schedule shortened for the CPU
    "LSLPN": [],
}
# The phantom's soft tissues differ by tens of HU; per-slice min-max scaling (the official default)
# lets bone and air set the range and leaves them a few grey levels apart, which the demo's short
# training from random initialisation cannot separate. The demo therefore prepares with the
# abdominal HU window [-125, 275] (REPRODUCTION.md lists this difference).
PREPARE_OPTIONS = ["--window", "-125", "275"]


def python_command(script: str, *args: str) -> list[str]:
    """The command line that runs one of our entry points with this interpreter."""
    return [sys.executable, str(ROOT / script), *args]


def run_step(title: str, command: list[str], log: list[dict]) -> None:
    """Run one command with its output streaming; a failure stops the demo with one line."""
    shown = " ".join(os.path.relpath(part, Path.cwd()) if part.startswith(str(ROOT)) else part
                     for part in command[1:])
    print(f"\n==> {title}\n$ python {shown}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=Path.cwd())
    seconds = time.perf_counter() - start
    log.append({"step": title, "command": f"python {shown}", "seconds": round(seconds, 1)})
    if result.returncode != 0:
        raise UserError(f"demo step '{title}' failed (exit {result.returncode}): fix the message above "
                        f"and run `make demo` again; finished steps are reused")


def prepared_as_demo() -> bool:
    """PREP_DIR exists and was prepared with the demo's intensity window (a stale folder is prepared
    again)."""
    window = [float(v) for v in PREPARE_OPTIONS[PREPARE_OPTIONS.index("--window") + 1:][:2]]
    try:
        return read_meta(PREP_DIR).get("intensity") == {"mode": "window", "window": window}
    except UserError:
        return False


def finished_run(log_dir: Path, name: str, n_steps: int, wanted_hash: str | None = None) -> Path | None:
    """best.pth of the latest run under log_dir/name whose last.pth reached n_steps, else None.

    With `wanted_hash`, only a run trained with that config (`training.loop.config_hash`, as resume
    uses) counts: a run left by an older config (other milestones, model options, data) is not reused.
    """
    return finished_snapshot(log_dir, name, n_steps, "best.pth", wanted_hash)


def training_hash(overrides: list[str], named: list[str] | tuple[str, ...]) -> str:
    """config_hash of the config `train.py with demo <named> <overrides>` resolves (what its checkpoints
    record)."""
    updates, more_named = get_config_updates(list(overrides))
    config = create_run(ex, "print_config", config_updates=updates,
                        named_configs=["demo", *named, *more_named]).config
    return config_hash(config, default_config())


def demo_n_steps(named: list[str] | tuple[str, ...] = ()) -> int:
    """n_steps of the `demo` named config followed by `named` (as train.py will resolve it)."""
    return int(create_run(ex, "print_config", config_updates={},
                          named_configs=["demo", *named]).config["n_steps"])


def train_all(log: list[dict], redo: bool, extra: list[str],
              methods: dict[str, list[str]] = METHODS) -> dict[str, dict[str, str]]:
    """Train every method (table row -> named configs on top of `demo`) on every fold, reusing finished
    runs (run name: <row in lower case>_fold<F>); returns method -> organ -> best.pth."""
    log_dir = RUN_DIR / "train"
    snapshots: dict[str, dict[str, str]] = {}
    for method, named in methods.items():
        n_steps = demo_n_steps(named)
        snapshots[method] = {}
        for fold, organs in enumerate(FOLD_ORGANS):
            name = f"{method.lower()}_fold{fold}"
            overrides = [f"fold={fold}", f"name={name}", f"path.log_dir={log_dir}",
                         f"path.data_dir={PREP_DIR}",
                         *extra]
            wanted = training_hash(overrides, named)
            best = None if redo else finished_run(log_dir, name, n_steps, wanted)
            if best is None:
                resume = [] if redo else ["resume=True"]
                run_step(f"train {method} fold {fold} ({', '.join(organs)})",
                         python_command("train.py", "with", "demo", *named, *overrides, *resume), log)
                best = finished_run(log_dir, name, n_steps, wanted)
                if best is None:
                    raise UserError(f"training {name} ended without best.pth/last.pth at step {n_steps} "
                                    f"under {log_dir / name}: see its cout.txt")
            else:
                print(f"==> train {method} fold {fold}: reusing {best}")
            for organ in organs:
                snapshots[method][organ] = str(best)
    return snapshots


def run_demo(redo: set[str], extra: list[str], device: str = "auto") -> dict:
    """All steps; returns the evaluation results (as results.json)."""
    log: list[dict] = []
    start = time.perf_counter()
    if "phantom" in redo or not PHANTOM_DIR.exists():
        run_step("generate the phantom", python_command(
            "scripts/make_phantom.py", "--out", str(PHANTOM_DIR), "--n-silver", str(PHANTOM["n_silver"]),
            "--n-gold", str(PHANTOM["n_gold"]), "--seed", str(PHANTOM["seed"]), "--overwrite"), log)
    else:
        print(f"==> phantom: reusing {PHANTOM_DIR}")
    if {"phantom", "prepare"} & redo or not prepared_as_demo():
        run_step("prepare the phantom", python_command(
            "scripts/prepare_visceral.py", "--visceral-dir", str(PHANTOM_DIR), "--out", str(PREP_DIR),
            *PREPARE_OPTIONS, "--overwrite"), log)
    else:
        print(f"==> prepare: reusing {PREP_DIR}")
    run_step("check the prepared data", python_command("scripts/check_dataset.py", str(PREP_DIR)), log)
    snapshots = train_all(log, bool({"phantom", "prepare", "train"} & redo), extra)

    print(f"\n==> evaluate mask copy, {', '.join(METHODS)} on the gold volumes (preset inclusive)",
          flush=True)
    config = create_run(ex, "print_config", config_updates={}, named_configs=["demo"]).config
    eval_start = time.perf_counter()
    results = evaluate({"mask copy": None, **snapshots}, TEST_ORGANS, PREP_DIR, preset="inclusive",
                       out_dir=RUN_DIR, split="gold", support="default", input_size=None,  # each its own
                       device=device, batch_size=config["eval"]["batch_size"], config=dict(config))
    log.append({"step": "evaluate", "command": "evaluation.evaluate.evaluate (see scripts/demo_steps.py)",
                "seconds": round(time.perf_counter() - eval_start, 1)})
    run_step("training curves", python_command("tools/training_curves.py", str(RUN_DIR / "train"),
                                               "--out", str(RUN_DIR / "training_curves.png")), log)
    write_report(results, log, time.perf_counter() - start)
    return results


def write_report(results: dict, log: list[dict], seconds: float) -> Path:
    """runs/demo/report.md: the Table 1 layout written by evaluation/evaluate.py, plus how it was made."""
    table = (RUN_DIR / "table.md").read_text().strip()
    lines = ["# LSLPN demo on the synthetic phantom", "",
             "Produced by `make demo` (`python scripts/demo.py`). Steps:", "",
             "| step | command | seconds |", "|---|---|---|"]
    lines += [f"| {entry['step']} | `{entry['command']}` | {entry['seconds']} |" for entry in log]
    numerics = ", ".join(f"{key}={os.environ.get(key, 'unset')}" for key in
                         ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS",
                          "MKL_NUM_THREADS"))
    lines += ["", f"Total wall time of this invocation: {seconds / 60:.1f} min (reused steps take no time).",
              f"CPU numerics (pinned by scripts/demo.py for bit-reproducible runs): {numerics}; torch "
              f"{torch.__version__}, {torch.get_num_threads()} intra-op threads.",
              "Figures: results.png (qualitative), misalignment.png (alignment vs segmentation Dice),",
              "training_curves.png (loss and validation Dice against step, per fold and method).", "",
              "SENet runs `with demo senet senet_demo`: its own architecture, Dice loss and per-arm SGD, "
              "but its",
              "20-epoch schedule squeezed into 200 steps of 2 episodes at 64 x 64 slices with lr 1e-2 "
              "(config.py",
              "senet_demo), about a tenth of its full schedule: on 2 CPU cores the full one takes hours. "
              "It is",
              "evaluated at 64 x 64, the others at 128 x 128 (each snapshot at its training size).", "",
              "Volumetric Dice (preset `inclusive`: 12 chunks, organ range = first to last slice with "
              "> 200 voxels, mean over",
              "query volumes) on the gold phantom volumes, one fixed support volume. Kidney and psoas are",
              "the means of left and right. Snapshots are selected on held-out silver volumes, "
              "never on gold.",
              "", table]
    path = RUN_DIR / "report.md"
    write_text_atomic("\n".join(lines) + "\n", path)
    return path


def replace_block(path: Path, marker: str, body: str) -> None:
    """Replace the text between <!-- marker:begin --> and <!-- marker:end --> in `path` (atomic)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise UserError(f"{path} has no {begin} ... {end} block: restore the markers")
    head, rest = text.split(begin, 1)
    write_text_atomic(head + begin + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1], path)


def publish(docs: Path = ROOT / "docs") -> None:
    """Copy the finished demo's table and figures into README.md, REPRODUCTION.md and docs/ (maintainers)."""
    report = RUN_DIR / "report.md"
    if not report.exists():
        raise UserError(f"{report} does not exist: run `make demo` first, then publish")
    for name in ("results.png", "misalignment.png", "training_curves.png", "report.md"):
        if (RUN_DIR / name).exists():
            shutil.copyfile(RUN_DIR / name, docs / f"demo_{name}")
    table = (RUN_DIR / "table.md").read_text().strip()
    made = ("Volumetric Dice on the gold phantom volumes (preset `inclusive`), produced by `make demo` on 2 "
            "CPU cores and copied here by `python scripts/demo.py --publish`; the full report with the "
            "commands and run times of every step is [docs/demo_report.md](docs/demo_report.md).")
    replace_block(ROOT / "README.md", "demo", "\n\n".join([
        made, table, "![Support and query slices with outlines](docs/demo_results.png)"]))
    replace_block(ROOT / "REPRODUCTION.md", "demo", "\n\n".join([
        made, table, "![Alignment Dice against segmentation Dice](docs/demo_misalignment.png)"]))
    print(f"published the demo table into README.md and REPRODUCTION.md, figures into {docs}")
