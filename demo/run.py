"""The end-to-end demo on the synthetic phantom (`make demo`, `python -m demo`), step by step: generate
the phantom (data/phantom), prepare and check it (data/prepared_phantom), train PANet, SENet (`senet
senet_demo`, 64 x 64) and LSLPN on the four folds with `demo make_demo` (runs/demo/train/<name>/<id>/),
evaluate them beside mask copy on the gold volumes (preset inclusive, each snapshot at its training size),
draw the training curves and write runs/demo/report.md in the paper's Table 1 layout. Finished steps are
reused (experiments/runner.py); `redo` names steps to run again. Every step runs the command a user would
type, as a subprocess.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from dataloaders.organs import FOLD_ORGANS, TEST_ORGANS
from dataloaders.prepared import read_meta
from demo import PINNED_NUMERICS
from evaluation.evaluate import evaluate
from experiments import runner
from experiments.runner import ROOT, python_command, resolved_config, run_step, train_or_reuse
from phantom import DEMO as PHANTOM
from phantom import DEMO_DIR as PHANTOM_DIR
from util.device import cpu_has_native_bf16
from util.errors import UserError
from util.io import write_text_atomic

PREP_DIR = Path("data/prepared_phantom")
RUN_DIR = Path("runs/demo")
CONFIGS = ["demo", "make_demo"]   # the named configs of every demo run (config.py)
METHODS = {  # table row -> Sacred named configs / overrides on top of CONFIGS
    "PANet": ["panet"],
    "SENet": ["senet", "senet_demo", "n_steps=100"],   # senet_demo's schedule (config.py) in 100 steps
    "LSLPN": [],
}
# The phantom's soft tissues differ by tens of HU; per-slice min-max scaling (the official default)
# lets bone and air set the range and leaves them a few grey levels apart, which the demo's short
# training from random initialisation cannot separate. The demo therefore prepares with the
# abdominal HU window [-125, 275] (REPRODUCTION.md lists this difference).
WINDOW = (-125, 275)
PREPARE_OPTIONS = ["--window", *map(str, WINDOW)]


FAILED = ("demo step '{title}' failed (exit {code}): fix the message above and run `make demo` again; "
          "finished steps are reused")


def prepared_as_demo() -> bool:
    """PREP_DIR exists and was prepared with the demo's intensity window (a stale folder is prepared
    again)."""
    try:
        return read_meta(PREP_DIR).get("intensity") == {"mode": "window", "window": list(WINDOW)}
    except UserError:
        return False


def train_all(log: list[dict], redo: bool, extra: list[str],
              methods: dict[str, list[str]] = METHODS) -> dict[str, dict[str, str]]:
    """Train every method (table row -> named configs on top of CONFIGS) on every fold, reusing finished
    runs (run name: <row in lower case>_fold<F>); returns method -> organ -> best.pth."""
    snapshots: dict[str, dict[str, str]] = {}
    for method, named in methods.items():
        snapshots[method] = {}
        for fold, organs in enumerate(FOLD_ORGANS):
            best = train_or_reuse([*CONFIGS, *named, *training_overrides(method, fold), *extra], redo=redo,
                                  title=f"train {method} fold {fold} ({', '.join(organs)})", log=log,
                                  failed=FAILED)
            for organ in organs:
                snapshots[method][organ] = str(best)
    return snapshots


def training_overrides(method: str, fold: int) -> list[str]:
    """train.py settings of one demo run: <method>_fold<F> under runs/demo/train, on the prepared phantom."""
    return [f"fold={fold}", f"name={method.lower()}_fold{fold}", f"path.log_dir={RUN_DIR / 'train'}",
            f"path.data_dir={PREP_DIR}"]


def make_data(log: list[dict], redo: set[str] = frozenset()) -> None:
    """The demo's phantom and its prepared folder, unless they exist (and `redo` does not name them)."""
    if "phantom" in redo or not PHANTOM_DIR.exists():
        run_step("generate the phantom", python_command(
            "scripts/make_phantom.py", "--out", str(PHANTOM_DIR), "--n-silver", str(PHANTOM["n_silver"]),
            "--n-gold", str(PHANTOM["n_gold"]), "--seed", str(PHANTOM["seed"]), "--overwrite"), log, FAILED)
    else:
        print(f"==> phantom: reusing {PHANTOM_DIR}")
    if {"phantom", "prepare"} & redo or not prepared_as_demo():
        run_step("prepare the phantom", python_command(
            "scripts/prepare_visceral.py", "--visceral-dir", str(PHANTOM_DIR), "--out", str(PREP_DIR),
            *PREPARE_OPTIONS, "--overwrite"), log, FAILED)
    else:
        print(f"==> prepare: reusing {PREP_DIR}")


def run_demo(redo: set[str], extra: list[str], device: str = "auto") -> dict:
    """All steps; returns the evaluation results (as results.json)."""
    log: list[dict] = []
    start = time.perf_counter()
    make_data(log, redo)
    run_step("check the prepared data", python_command("scripts/check_dataset.py", str(PREP_DIR)), log,
             FAILED)
    snapshots = train_all(log, bool({"phantom", "prepare", "train"} & redo), extra)

    print(f"\n==> evaluate mask copy, {', '.join(METHODS)} on the gold volumes (preset inclusive)",
          flush=True)
    config = resolved_config(CONFIGS)
    eval_start = time.perf_counter()
    results = evaluate({"mask copy": None, **snapshots}, TEST_ORGANS, PREP_DIR, preset="inclusive",
                       out_dir=RUN_DIR, split="gold", support="default", input_size=None,  # each its own
                       device=device, batch_size=config["eval"]["batch_size"], config=dict(config))
    log.append({"step": "evaluate", "command": "evaluation.evaluate.evaluate (see demo/run.py)",
                "seconds": round(time.perf_counter() - eval_start, 1)})
    run_step("training curves", python_command("tools/training_curves.py", str(RUN_DIR / "train"), "--out",
                                               str(RUN_DIR / "training_curves.png")), log, FAILED)
    write_report(results, log, time.perf_counter() - start)
    return results


def write_report(results: dict, log: list[dict], seconds: float) -> Path:
    """runs/demo/report.md: the Table 1 layout written by evaluation/evaluate.py, plus how it was made."""
    table = (RUN_DIR / "table.md").read_text().strip()
    lines = ["# LSLPN demo on the synthetic phantom", "",
             "Produced by `make demo` (`python -m demo`). Steps:", "",
             "| step | command | seconds |", "|---|---|---|"]
    lines += [f"| {entry['step']} | `{entry['command']}` | {entry['seconds']} |" for entry in log]
    numerics = ", ".join(f"{key}={os.environ.get(key, 'unset')}" for key in PINNED_NUMERICS)
    senet = resolved_config(CONFIGS + METHODS["SENet"])
    bf16 = "with" if cpu_has_native_bf16() else "without"
    lines += ["", f"Total wall time of this invocation: {seconds / 60:.1f} min (reused steps take no time).",
              f"CPU numerics: {numerics} (pinned by demo/__main__.py), kernels "
              f"{torch.backends.cpu.get_cpu_capability()}, {bf16} native bf16 (amp=True: bf16 autocast "
              f"only with it); torch {torch.__version__}, {torch.get_num_threads()} intra-op threads.",
              "Figures: results.png (qualitative), misalignment.png (alignment vs segmentation Dice),",
              "training_curves.png (loss and validation Dice against step, per fold and method).", "",
              schedule(), "",
              f"SENet runs `with {' '.join(CONFIGS + METHODS['SENet'])}`: its own architecture, Dice loss "
              "and per-arm SGD, but its",
              f"20-epoch schedule squeezed into {senet['n_steps']} steps of {senet['batch_size']} episodes "
              f"at {senet['input_size']} x {senet['input_size']} slices with lr {senet['lr']:g} (config.py",
              "senet_demo): on 2 CPU cores the full one takes hours. It is",
              f"evaluated at {senet['input_size']} x {senet['input_size']}, the others at 128 x 128 (each "
              "snapshot at its training size).", "",
              "Volumetric Dice (preset `inclusive`: 12 chunks, organ range = first to last slice with "
              "> 200 voxels, mean over",
              "query volumes) on the gold phantom volumes, one fixed support volume. Kidney and psoas are",
              "the means of left and right. Snapshots are selected on held-out silver volumes, "
              "never on gold.",
              "", table]
    path = RUN_DIR / "report.md"
    write_text_atomic("\n".join(lines) + "\n", path)
    return path


def schedule() -> str:
    """The training schedule of PANet and LSLPN (config.py `demo make_demo`), a sentence of the report."""
    c = resolved_config(CONFIGS)
    return (f"PANet and LSLPN train `with {' '.join(CONFIGS)}` (config.py): {c['n_steps']} steps of "
            f"{c['batch_size']} episodes at {c['input_size']} x {c['input_size']}, SGD lr {c['lr']:g} x "
            f"{c['lr_gamma']:g} at steps {', '.join(map(str, c['lr_milestones']))}, validation every "
            f"{c['val_every']} steps, channels_last {'on' if c['channels_last'] else 'off'}, amp={c['amp']}.")


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
            "CPU cores and copied here by `python -m demo --publish`; the full report with the "
            "commands and run times of every step is [docs/demo_report.md](docs/demo_report.md).")
    for doc, figure in (("README.md", "![Support and query slices with outlines](docs/demo_results.png)"),
                        ("REPRODUCTION.md",
                         "![Alignment Dice against segmentation Dice](docs/demo_misalignment.png)")):
        runner.replace_between(ROOT / doc, "<!-- demo:begin -->", "<!-- demo:end -->",
                               "\n" + "\n\n".join([made, table, figure]) + "\n")
    print(f"published the demo table into README.md and REPRODUCTION.md, figures into {docs}")
