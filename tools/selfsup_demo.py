"""Self-supervised LSLPN on the phantom (and on the real scan when present); not part of `make demo`.

    python tools/selfsup_demo.py              # run (finished steps are reused), print the tables
    python tools/selfsup_demo.py --publish    # copy the report and figures into docs/

Phantom (data/phantom, the demo's; generated and prepared as `make demo` does when missing):
  1. images-only prepared folder of the 20 silver volumes + superpixels   data/selfsup/phantom_unlabeled
  2. supervised LSLPN per fold: the demo's runs (runs/demo/train/lslpn_fold<F>) when finished, else
     the demo's command run here (runs/selfsup_demo/train/lslpn_fold<F>)
  3. self-supervised LSLPN: ONE run on the unlabeled folder (no label, no labeled validation:
     the last snapshot after a fixed number of steps), used for all four folds
  4. self-supervised + supervised fine-tuning: per fold, the demo config started from 3's weights
     (path.init_from), fewer steps, selected on the held-out silver volumes as the demo
  5. evaluation on the gold volumes (preset lslpn) beside mask copy, and PANet when the demo's
     PANet runs exist                                                    runs/selfsup_demo/phantom/
Real scan (../shared/data/real_ct, when present): self-supervised training on that unlabeled
volume plus the phantom's unlabeled silver volumes, then liver, spleen and kidneys of the SAME scan
segmented from 3 annotated slices each (organ range from the labels, 3 chunks), whole-volume Dice,
beside the phantom-supervised snapshot of the fold that held the organ out. One patient, test-time
adaptation: not a benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # demo_steps.py

import demo_steps as demo  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from dataloaders.nifti import save_nifti_atomic  # noqa: E402
from dataloaders.organs import FOLD_ORGANS, TEST_ORGANS  # noqa: E402
from evaluation.metrics import dice  # noqa: E402
from evaluation.protocol import mask_copy, support_offsets  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from training.loop import finished_snapshot  # noqa: E402
from util.atomic import write_text_atomic  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.errors import UserError  # noqa: E402

ROOT = demo.ROOT
WORK_DIR = Path("data/selfsup")
RUN_DIR = Path("runs/selfsup_demo")
UNLABELED = WORK_DIR / "phantom_unlabeled"
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"
SELFSUP_STEPS = 1200          # self-supervised run (demo config otherwise: cnn_small, 128 px, batch 4)
FINETUNE_STEPS = 300          # supervised fine-tuning from the self-supervised weights, per fold
REAL_STEPS = 300              # self-supervised continuation on the real scan
SUPERPIXEL_OPTIONS = ["--window", "-125", "275"]   # same intensity as the demo's labeled folder
REAL_ORGANS = ["liver", "spleen", "kidney_right", "kidney_left"]
REAL_SUPPORT_SLICES = 3
DEMO_RUNS = [demo.RUN_DIR / "train"]   # where `make demo` keeps its runs (--demo-runs)


def finished_last(log_dir: Path, name: str, n_steps: int) -> Path | None:
    """last.pth of the latest run under log_dir/name that reached n_steps (no validation: no best.pth)."""
    return finished_snapshot(log_dir, name, n_steps, snapshot="last.pth")


def model_overrides(snapshot: Path) -> list[str]:
    """`model.<key>=<value>` of the options a run started from `snapshot` must share with it (path.init_from
    refuses another model config; the defaults may have changed since the snapshot was trained)."""
    model = load_checkpoint(str(snapshot))["config"]
    return [f"model.{key}={model[key]}" for key in ("empty_cell",) if key in model]


def train_once(log: list, title: str, log_dir: Path, name: str, n_steps: int, overrides: list[str],
               want: str = "best") -> Path:
    """Train `name` with `train.py with demo <overrides>` unless a finished run exists; its snapshot."""
    find = demo.finished_run if want == "best" else finished_last
    snapshot = find(log_dir, name, n_steps)
    if snapshot is None:
        demo.run_step(title, demo.python_command("train.py", "with", "demo", *overrides, f"name={name}",
                                                 f"path.log_dir={log_dir}", f"n_steps={n_steps}",
                                                 "resume=True"), log)
        snapshot = find(log_dir, name, n_steps)
        if snapshot is None:
            raise UserError(f"training {name} ended without its snapshot at step {n_steps} under "
                            f"{log_dir / name}: "
                            "see its cout.txt")
    else:
        print(f"==> {title}: reusing {snapshot}")
    return snapshot


def unlabeled_folder(log: list, title: str, sources: Path, out: Path) -> None:
    """Images-only prepared folder with superpixels (make_superpixels.py on NIfTI volumes) unless present."""
    if (out / "superpixels" / "meta.json").exists():
        print(f"==> {title}: reusing {out}")
        return
    demo.run_step(title, demo.python_command("scripts/make_superpixels.py", "--images", str(sources), "--out",
                                             str(out), *SUPERPIXEL_OPTIONS, "--overwrite", "--figure",
                                             str(out / "superpixels_overlay.png")), log)


def phantom_part(log: list, device: str, steps: dict, train_supervised: bool) -> dict:
    """Steps 1-5 on the phantom; returns the evaluation results."""
    if not demo.PHANTOM_DIR.exists():
        demo.run_step("generate the phantom (as make demo)", demo.python_command(
            "scripts/make_phantom.py", "--out", str(demo.PHANTOM_DIR), "--n-silver",
            str(demo.PHANTOM["n_silver"]),
            "--n-gold", str(demo.PHANTOM["n_gold"]), "--seed", str(demo.PHANTOM["seed"])), log)
    if not (demo.PREP_DIR / "meta.json").exists():
        demo.run_step("prepare the phantom (as make demo)", demo.python_command(
            "scripts/prepare_visceral.py", "--visceral-dir", str(demo.PHANTOM_DIR), "--out",
            str(demo.PREP_DIR),
            *demo.PREPARE_OPTIONS), log)
    unlabeled_folder(log, "unlabeled phantom: images-only + superpixels",
                     demo.PHANTOM_DIR / "SilverCorpus" / "Volumes", UNLABELED)

    n_demo = demo.demo_n_steps()
    supervised, panet = {}, {}
    for fold, organs in enumerate(FOLD_ORGANS):
        best = demo.finished_run(DEMO_RUNS[0], f"lslpn_fold{fold}", n_demo) \
            or demo.finished_run(RUN_DIR / "train", f"lslpn_fold{fold}", n_demo)
        if best is None and train_supervised:
            best = train_once(log, f"supervised LSLPN fold {fold} (the demo's command; no demo run yet)",
                              RUN_DIR / "train", f"lslpn_fold{fold}", n_demo,
                              [f"fold={fold}", f"path.data_dir={demo.PREP_DIR}"])
        panet_best = demo.finished_run(DEMO_RUNS[0], f"panet_fold{fold}", n_demo)
        for organ in organs:
            if best is not None:
                supervised[organ] = str(best)
            if panet_best is not None:
                panet[organ] = str(panet_best)

    log_dir = RUN_DIR / "train"
    selfsup = train_once(log, "self-supervised LSLPN (no labels)", log_dir, "selfsup", steps["selfsup"],
                         ["selfsup", f"path.data_dir={UNLABELED}",
                          f"lr_milestones=[{steps['selfsup'] * 3 // 4}]"],
                         want="last")
    finetuned = {}
    for fold in steps["finetune_folds"]:
        best = train_once(log, f"self-supervised + fine-tuning fold {fold}", log_dir,
                          f"selfsup_ft_fold{fold}",
                          steps["finetune"], [f"fold={fold}", f"path.data_dir={demo.PREP_DIR}",
                                              f"path.init_from={selfsup}", *model_overrides(selfsup),
                                              f"val_every={max(1, steps['finetune'] // 2)}",
                                              f"lr_milestones=[{steps['finetune'] * 3 // 4}]"])
        for organ in FOLD_ORGANS[fold]:
            finetuned[organ] = str(best)

    from evaluation.evaluate import evaluate  # after training: keeps the subprocess steps' imports light
    complete = len(TEST_ORGANS)
    methods = {"mask copy": None, **({"PANet": panet} if len(panet) == complete else {}),
               **({"LSLPN supervised": supervised} if len(supervised) == complete else {}),
               "LSLPN self-supervised": str(selfsup),
               **({"LSLPN self-sup. + fine-tuning": finetuned} if len(finetuned) == complete else {})}
    start = time.perf_counter()
    results = evaluate(methods, TEST_ORGANS, demo.PREP_DIR, preset="inclusive", out_dir=RUN_DIR / "phantom",
                       split="gold", support="default", input_size=128, device=device, batch_size=64,
                       save_predictions=False)
    partial = {name: rows for name, rows in (("LSLPN supervised", supervised),
                                             ("LSLPN self-sup. + fine-tuning", finetuned))
                                             if 0 < len(rows) < complete}
    organs = sorted({organ for rows in partial.values() for organ in rows}, key=TEST_ORGANS.index)
    if partial:  # rows with some folds only: a second table on the organs they cover
        evaluate({"mask copy": None, "LSLPN self-supervised": str(selfsup), **partial}, organs, demo.PREP_DIR,
                 preset="inclusive", out_dir=RUN_DIR / "phantom_partial", split="gold", support="default",
                 input_size=128, device=device, batch_size=64, save_predictions=False)
    elif (RUN_DIR / "phantom_partial").exists():
        shutil.rmtree(RUN_DIR / "phantom_partial")
    log.append({"step": "evaluate on the gold phantom volumes", "command": "evaluation.evaluate.evaluate "
                "(tools/selfsup_demo.py)", "seconds": round(time.perf_counter() - start, 1)})
    return results


def sparse_support(labels: np.ndarray, value: int, n: int) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """(mask of `n` annotated axial slices: the middle slices of n equal chunks of the organ's range along
    stored axis 2 (evaluation.protocol.support_offsets), the organ's half-open range (z0, z1), mask copy:
    every slice of the range gets its chunk's annotated slice, the protocol's no-model baseline
    evaluation.protocol.mask_copy with the organ's range as both support and query range)."""
    organ = labels == value
    zs = np.flatnonzero(organ.reshape(-1, organ.shape[2]).sum(axis=0) > 0)
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    picks = z0 + support_offsets(z1 - z0, n)                                          # n
    support = np.zeros(organ.shape, dtype=np.uint8)
    support[:, :, picks] = organ[:, :, picks]
    copy = mask_copy(organ, (z0, z1 - 1), organ.shape, (z0, z1 - 1), n)                # X x Y x Z
    return support, (z0, z1), copy


def real_part(log: list, supervised: dict, phantom_selfsup: Path, steps: int, device: str) -> dict | None:
    """Self-supervised training continued on the real scan alone (from the phantom-silver self-supervised
    weights), then few-shot segmentation of the same scan."""
    if not (REAL_CT / "ct.nii.gz").exists():
        print(f"==> real scan: {REAL_CT} not present, skipped")
        return None
    from evaluation.segment import segment_volume
    sources = WORK_DIR / "real_sources"     # a symbolic link only: the scan is never copied
    if not (WORK_DIR / "real_unlabeled" / "superpixels" / "meta.json").exists():
        shutil.rmtree(sources, ignore_errors=True)
        sources.mkdir(parents=True)
        (sources / "real_ct.nii.gz").symlink_to((REAL_CT / "ct.nii.gz").resolve())
    unlabeled_folder(log, "real scan: images-only + superpixels", sources, WORK_DIR / "real_unlabeled")
    selfsup = train_once(log, "self-supervised LSLPN continued on the real scan (no labels)",
                         RUN_DIR / "train", "selfsup_real", steps,
                         ["selfsup", f"path.data_dir={WORK_DIR / 'real_unlabeled'}",
                          f"path.init_from={phantom_selfsup}",
                          *model_overrides(phantom_selfsup), f"lr_milestones=[{steps * 3 // 4}]"],
                          want="last")
    names = {v: k for k, v in json.loads((REAL_CT / "labels.json").read_text())["labels"].items()}
    label_image = nib.load(str(REAL_CT / "labels.nii.gz"))
    if nib.aff2axcodes(label_image.affine)[2] not in ("S", "I"):
        raise UserError(f"{REAL_CT}/labels.nii.gz: the stored third axis is not axial: this script assumes "
                        "it is")
    labels = np.asarray(label_image.dataobj).astype(np.int64)
    out_dir = RUN_DIR / "real"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, start = {}, time.perf_counter()
    for organ in REAL_ORGANS:
        value = int(names[organ])
        support, organ_range, copy = sparse_support(labels, value, REAL_SUPPORT_SLICES)
        mask_path = out_dir / f"support_{organ}.nii.gz"
        save_nifti_atomic(support, label_image.affine, mask_path)
        rows[organ] = {"support_slices": [int(z) for z in np.flatnonzero(support.sum(axis=(0, 1)))],
                       "range": list(organ_range), "mask copy": dice(copy, labels == value)}
        for method, snapshot in (("phantom-supervised LSLPN", supervised.get(organ)),
                                 ("self-supervised on the scan", str(selfsup))):
            if snapshot is None:
                continue
            prediction, _ = segment_volume(snapshot, [(str(REAL_CT / "ct.nii.gz"), str(mask_path))],
                                           str(REAL_CT / "ct.nii.gz"), support_label=1,
                                           query_range=organ_range,
                                           n_chunks=REAL_SUPPORT_SLICES, device=device, progress=False)
            rows[organ][method] = dice(prediction > 0, labels == value)
    log.append({"step": "segment the real scan (4 organs x 2 snapshots)",
                "command": "evaluation.segment.segment_volume "
                "(tools/selfsup_demo.py)", "seconds": round(time.perf_counter() - start, 1)})
    write_text_atomic(json.dumps(rows, indent=1) + "\n", out_dir / "results.json")
    return rows


def real_table(rows: dict) -> str:
    methods = ["mask copy", "phantom-supervised LSLPN", "self-supervised on the scan"]
    lines = ["| organ | support slices (z) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2)
             + "|"]
    for organ, row in rows.items():
        lines.append(f"| {organ} | {', '.join(map(str, row['support_slices']))} | "
                     + " | ".join(f"{100 * row[m]:.1f}" if m in row else "–" for m in methods) + " |")
    means = [[row[m] for row in rows.values() if m in row] for m in methods]
    lines.append("| mean | | " + " | ".join(f"{100 * float(np.mean(v)):.1f}" if len(v) == len(rows) else "–"
                                             for v in means) + " |")
    return "\n".join(lines)


def write_report(results: dict, real: dict | None, log: list, seconds: float, steps: dict) -> Path:
    """runs/selfsup_demo/report.md: steps with commands and seconds, the phantom table, the real-scan
    table."""
    rows = results["table"]["range"]
    ss, copy = rows["LSLPN self-supervised"], rows["mask copy"]
    columns = ("liver", "spleen", "kidney", "psoas")
    beats = [c for c in columns if ss[c] is not None and copy[c] is not None and ss[c] > copy[c]]
    lines = ["# Self-supervised LSLPN (superpixel episodes) on the phantom", "",
             "Produced by `python tools/selfsup_demo.py " + " ".join(steps["argv"]) + "` (not part of `make "
             "demo`). Steps of this invocation (reused steps are not listed):", "",
             "| step | command | seconds |", "|---|---|---|"]
    lines += [f"| {e['step']} | `{e['command']}` | {e['seconds']} |" for e in log]
    when = (f"Wall time of this invocation: {seconds / 60:.1f} min." if seconds else
            "Report rewritten with --report-only from the last invocation's saved results and log.")
    lines += ["", when + " The training runs behind the tables "
              "(full commands in each run's config.json under runs/selfsup_demo/train/; 2 CPU cores, and any "
              "other job on them slows these times: read them as upper bounds):", "",
              *training_times(steps), "",
              f"Self-supervised: one run of {steps['selfsup']} steps (`demo selfsup`: cnn_small, 128 px, "
              "batch 4, lr 1e-2) on the 20 phantom silver volumes prepared images-only: no label is read "
              "anywhere (no labeled validation either: the snapshot is last.pth), and the one snapshot "
              f"serves all four folds. Fine-tuning: {steps['finetune']} supervised `demo` steps per "
              f"fold (folds {steps['finetune_folds']}) "
              "from those weights, best.pth on the held-out silver volumes as the supervised runs. "
              f"Supervised LSLPN and PANet: the demo's runs (600 steps, {DEMO_RUNS[0]}), when present.", "",
              options_line(steps), "", (RUN_DIR / "phantom" / "table.md").read_text().strip()]
    if (RUN_DIR / "phantom_partial" / "table.md").exists():
        lines += ["", "Rows available for some folds only, on their organs:", "",
                  (RUN_DIR / "phantom_partial" / "table.md").read_text().strip()]
    lines += ["", "Pseudo-labels (felzenszwalb defaults, overlay by `make_superpixels.py --figure`): "
              "![superpixels of phantom slices](selfsup_superpixels.png)"]
    lines += ["", f"Self-supervised vs mask copy (organ range): better on {len(beats)} of 4 columns "
              f"({', '.join(beats) or 'none'})."]
    if "LSLPN supervised" in rows:
        sup = rows["LSLPN supervised"]
        lines[-1] += (f" Self-supervised mean = {100 * ss['mean'] / sup['mean']:.0f}% of the supervised "
                      f"LSLPN mean ({ss['mean']:.1f} vs {sup['mean']:.1f}). Target: beat mask copy on every "
                      "organ and >= 85%.")
    else:
        lines[-1] += (" No supervised LSLPN run was available to this invocation (the 85% target is not "
                      "assessed).")
    if real is not None:
        lines += ["", "## Real scan (one patient: test-time adaptation, not a benchmark)", "",
                  f"Self-supervised training continued for {steps['real']} steps on the unlabeled real scan "
                  "alone (../shared/data/real_ct/ct.nii.gz, 30 slices), starting from the phantom "
                  "self-supervised weights above (which saw the 20 unlabeled phantom silver volumes). Then "
                  f"each organ of the SAME scan is segmented from {REAL_SUPPORT_SLICES} of its annotated "
                  "slices (centres of thirds of its axial range; the range is given from the labels, "
                  f"{REAL_SUPPORT_SLICES} chunks). Whole-volume Dice (%) against "
                  "labels.nii.gz (automatic TotalSegmentator labels; the 3 support slices are inside the "
                  "scored volume). Mask copy: each slice of the range gets its chunk's annotated slice (no "
                  "model). The phantom-supervised snapshot is the demo fold that held the organ out.", "",
                  real_table(real), "", "![superpixels of the real scan](selfsup_superpixels_real.png)"]
    path = RUN_DIR / "report.md"
    write_text_atomic("\n".join(lines) + "\n", path)
    return path


def training_times(steps: dict) -> list[str]:
    """Markdown rows: each training run behind the table (reused or not), its command and wall time
    (run.json)."""
    from datetime import datetime
    runs = [("self-supervised", "selfsup", steps["selfsup"], finished_last)]
    runs += [(f"fine-tuning fold {f}", f"selfsup_ft_fold{f}", steps["finetune"], demo.finished_run)
             for f in steps["finetune_folds"]]
    runs += [("self-supervised, real scan", "selfsup_real", steps["real"], finished_last)]
    rows = ["| run | command | minutes | s/step |", "|---|---|---|---|"]
    for title, name, n_steps, find in runs:
        snapshot = find(RUN_DIR / "train", name, n_steps)
        if snapshot is None:
            continue
        folder = snapshot.parent
        run = json.loads((folder / "run.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        info = json.loads((folder / "info.json").read_text()) if (folder / "info.json").exists() else {}
        start, stop = (datetime.fromisoformat(run[key]) for key in ("start_time", "stop_time"))
        minutes = (stop - start).seconds / 60
        command = ("python train.py with "
                   f"demo{' selfsup' if config.get('episodes') == 'superpixels' else ''} "
                   f"fold={config['fold']} n_steps={n_steps} path.data_dir={config['path']['data_dir']}"
                   + (f" path.init_from={config['path']['init_from']}" if config["path"].get("init_from")
                      else "")
                   + f" model.empty_cell={config['model'].get('empty_cell')} ...")
        rows.append(f"| {title} | `{command}` | {minutes:.1f} | {info.get('sec_per_step', float('nan')):.2f} "
                    "|")
    return rows


def options_line(steps: dict) -> str:
    """Which model options the snapshots of the table were trained with (the defaults changed during the
    project)."""
    parts = []
    selfsup = finished_last(RUN_DIR / "train", "selfsup", steps["selfsup"])
    for name, path in (("self-supervised", selfsup), ("supervised LSLPN",
                                                      _supervised_snapshots().get("liver"))):
        if path is not None:
            model = load_checkpoint(str(path))["config"]
            parts.append(f"{name}: encoder {model.get('encoder')}, n_grid {model.get('n_grid')}, "
                         f"empty_cell '{model.get('empty_cell', 'skip')}'")
    return ("Model options of the snapshots: " + "; ".join(parts)
            + " (fine-tuning keeps the self-supervised ones).")


def publish(docs: Path = ROOT / "docs") -> None:
    report = RUN_DIR / "report.md"
    if not report.exists():
        raise UserError(f"{report} does not exist: run `python tools/selfsup_demo.py` first, then --publish")
    shutil.copyfile(report, docs / "selfsup_phantom.md")
    for folder, name in ((UNLABELED, "selfsup_superpixels.png"), (WORK_DIR / "real_unlabeled",
                                                                  "selfsup_superpixels_real.png")):
        if (folder / "superpixels_overlay.png").exists():
            shutil.copyfile(folder / "superpixels_overlay.png", docs / name)
    print(f"published {report} as {docs / 'selfsup_phantom.md'}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--publish", action="store_true", help="copy the finished report into docs/")
    parser.add_argument("--skip-real", action="store_true", help="phantom only")
    parser.add_argument("--demo-runs", default=str(demo.RUN_DIR / "train"),
                        help="folder of the demo's training runs (lslpn_fold<F>, panet_fold<F>)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite report.md from the last invocation's results (no training, no "
                        "evaluation)")
    parser.add_argument("--selfsup-steps", type=int, default=SELFSUP_STEPS)
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS)
    parser.add_argument("--finetune-folds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--real-steps", type=int, default=REAL_STEPS)
    parser.add_argument("--train-supervised", action="store_true",
                        help="train the supervised LSLPN folds here when the demo's runs are missing")
    args = parser.parse_args(argv)
    DEMO_RUNS[0] = Path(args.demo_runs)
    if args.publish:
        publish()
        return 0
    if args.report_only:
        results = json.loads((RUN_DIR / "phantom" / "results.json").read_text())
        real_path = RUN_DIR / "real" / "results.json"
        real = None if args.skip_real or not real_path.exists() else json.loads(real_path.read_text())
        log = json.loads((RUN_DIR / "log.json").read_text()) if (RUN_DIR / "log.json").exists() else []
        steps = {"selfsup": args.selfsup_steps, "finetune": args.finetune_steps,
                 "finetune_folds": args.finetune_folds,
                 "real": args.real_steps, "argv": [a for a in argv if a != "--report-only"]}
        print(write_report(results, real, log, 0.0, steps).read_text())
        return 0
    log: list[dict] = []
    start = time.perf_counter()
    steps = {"selfsup": args.selfsup_steps, "finetune": args.finetune_steps,
             "finetune_folds": args.finetune_folds,
             "real": args.real_steps, "argv": argv}
    results = phantom_part(log, args.device, steps, args.train_supervised)
    selfsup = finished_last(RUN_DIR / "train", "selfsup", args.selfsup_steps)
    real = None if args.skip_real else real_part(log, _supervised_snapshots(), selfsup, args.real_steps,
                                                 args.device)
    write_text_atomic(json.dumps(log, indent=1) + "\n", RUN_DIR / "log.json")
    report = write_report(results, real, log, time.perf_counter() - start, steps)
    print("\n" + report.read_text())
    return 0


def _supervised_snapshots() -> dict[str, str]:
    """organ -> the demo's supervised LSLPN best.pth of the fold that held it out."""
    n_demo = demo.demo_n_steps()
    snapshots = {}
    for fold, organs in enumerate(FOLD_ORGANS):
        best = demo.finished_run(DEMO_RUNS[0], f"lslpn_fold{fold}", n_demo) \
            or demo.finished_run(RUN_DIR / "train", f"lslpn_fold{fold}", n_demo)
        snapshots.update({organ: str(best) for organ in organs if best is not None})
    return snapshots


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_cli(main)
