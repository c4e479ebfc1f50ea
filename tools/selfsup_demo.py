"""Self-supervised LSLPN on the phantom (and on the real scan when present); not part of `make demo`.

    python tools/selfsup_demo.py              # run (finished steps are reused), print the tables
    python tools/selfsup_demo.py --publish    # copy the report and figures into docs/

Steps (docs/selfsup_phantom.md): superpixels of the unlabeled silver volumes, one self-supervised run,
supervised fine-tuning per fold, evaluation on the gold volumes; on ../shared/data/real_ct, organs of one
real scan segmented from 3 annotated slices each (one patient: not a benchmark).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from dataloaders.nifti import save_nifti_atomic
from dataloaders.organs import FOLD_ORGANS, TEST_ORGANS
from demo import run as demo
from evaluation.evaluate import evaluate
from evaluation.protocols import dice, mask_copy, support_offsets
from experiments.runner import ROOT, finished, python_command, run_step, train_or_reuse
from util.cli import run_cli
from util.errors import UserError
from util.io import write_text_atomic

WORK_DIR = Path("data/selfsup")
RUN_DIR = Path("runs/selfsup_demo")
UNLABELED = WORK_DIR / "phantom_unlabeled"
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"
SUPERPIXEL_OPTIONS = ["--window", "-125", "275"]   # same intensity as the demo's labeled folder
REAL_ORGANS = ["liver", "spleen", "kidney_right", "kidney_left"]
REAL_SUPPORT_SLICES = 3


def unlabeled_folder(log: list, title: str, sources: Path, out: Path) -> None:
    """Images-only prepared folder with superpixels (make_superpixels.py on NIfTI volumes) unless present."""
    if (out / "superpixels" / "meta.json").exists():
        print(f"==> {title}: reusing {out}")
        return
    run_step(title, python_command("scripts/make_superpixels.py", "--images", str(sources), "--out", str(out),
                                   *SUPERPIXEL_OPTIONS, "--overwrite", "--figure",
                                   str(out / "superpixels_overlay.png")), log)


def selfsup_run(log: list, title: str, name: str, data: Path, n_steps: int, *more: str) -> Path:
    """last.pth of `train.py with demo selfsup` on an unlabeled folder (validation is off there)."""
    return train_or_reuse(["demo", "selfsup", f"path.data_dir={data}", f"lr_milestones=[{n_steps * 3 // 4}]",
                           *more, f"name={name}", f"path.log_dir={RUN_DIR / 'train'}", f"n_steps={n_steps}"],
                          snapshot="last.pth", title=title, log=log)


def demo_snapshots(method: str, train: bool = False) -> dict[str, str]:
    """organ -> best.pth of the demo's run of `method` for the fold that held the organ out (finished
    runs only, unless `train`)."""
    snapshots = {}
    for fold, organs in enumerate(FOLD_ORGANS):
        arguments = ["demo", *demo.METHODS[method], *demo.training_overrides(method, fold)]
        best = train_or_reuse(arguments, title=f"supervised {method} fold {fold}") if train \
            else finished(arguments)
        snapshots.update({organ: str(best) for organ in organs if best is not None})
    return snapshots


def phantom_part(log: list, args) -> tuple[dict, Path, dict]:
    """Steps 1-4 on the phantom: (evaluation results, self-supervised snapshot, supervised snapshots)."""
    demo.make_data(log)
    unlabeled_folder(log, "unlabeled phantom: images-only + superpixels",
                     demo.PHANTOM_DIR / "SilverCorpus" / "Volumes", UNLABELED)
    supervised, panet = demo_snapshots("LSLPN", args.train_supervised), demo_snapshots("PANet")
    selfsup = selfsup_run(log, "self-supervised LSLPN (no labels)", "selfsup", UNLABELED, args.selfsup_steps)
    finetuned, n_steps = {}, args.finetune_steps
    for fold, organs in enumerate(FOLD_ORGANS):
        best = train_or_reuse(["demo", f"fold={fold}", f"path.data_dir={demo.PREP_DIR}",
                               f"path.init_from={selfsup}", f"val_every={max(1, n_steps // 2)}",
                               f"lr_milestones=[{n_steps * 3 // 4}]", f"name=selfsup_ft_fold{fold}",
                               f"path.log_dir={RUN_DIR / 'train'}", f"n_steps={n_steps}"],
                              title=f"self-supervised + fine-tuning fold {fold}", log=log)
        finetuned.update({organ: str(best) for organ in organs})
    start = time.perf_counter()
    methods = {"mask copy": None, "PANet": panet, "LSLPN supervised": supervised,
               "LSLPN self-supervised": str(selfsup), "LSLPN self-sup. + fine-tuning": finetuned}
    results = evaluate({name: spec for name, spec in methods.items()  # rows with every fold only
                        if not isinstance(spec, dict) or len(spec) == len(TEST_ORGANS)},
                       TEST_ORGANS, demo.PREP_DIR, preset="inclusive", out_dir=RUN_DIR / "phantom",
                       split="gold", support="default", input_size=128, device=args.device, batch_size=64,
                       save_predictions=False)
    log.append({"step": "evaluate on the gold phantom volumes", "command": "evaluation.evaluate.evaluate "
                "(tools/selfsup_demo.py)", "seconds": round(time.perf_counter() - start, 1)})
    return results, selfsup, supervised


def sparse_support(labels: np.ndarray, value: int, n: int) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """(mask of `n` annotated axial slices at the middles of n equal chunks of the organ's range along stored
    axis 2, the organ's half-open range (z0, z1), mask copy of those slices over the range: the protocol's
    no-model baseline)."""
    organ = labels == value
    zs = np.flatnonzero(organ.reshape(-1, organ.shape[2]).sum(axis=0) > 0)
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    picks = z0 + support_offsets(z1 - z0, n)                                          # n
    support = np.zeros(organ.shape, dtype=np.uint8)
    support[:, :, picks] = organ[:, :, picks]
    copy = mask_copy(organ, (z0, z1 - 1), organ.shape, (z0, z1 - 1), n)                # X x Y x Z
    return support, (z0, z1), copy


def real_part(log: list, supervised: dict, phantom_selfsup: Path, args) -> dict | None:
    """Self-supervised training continued on the real scan alone (from the phantom self-supervised
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
    selfsup = selfsup_run(log, "self-supervised LSLPN continued on the real scan (no labels)", "selfsup_real",
                          WORK_DIR / "real_unlabeled", args.real_steps, f"path.init_from={phantom_selfsup}")
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
                       "mask copy": dice(copy, labels == value)}
        for method, snapshot in (("phantom-supervised LSLPN", supervised.get(organ)),
                                 ("self-supervised on the scan", str(selfsup))):
            if snapshot is not None:
                prediction, _ = segment_volume(snapshot, [(str(REAL_CT / "ct.nii.gz"), str(mask_path))],
                                               str(REAL_CT / "ct.nii.gz"), support_label=1,
                                               query_range=organ_range, n_chunks=REAL_SUPPORT_SLICES,
                                               device=args.device, progress=False)
                rows[organ][method] = dice(prediction > 0, labels == value)
    log.append({"step": "segment the real scan (4 organs x 2 snapshots)", "command":
                "evaluation.segment.segment_volume (tools/selfsup_demo.py)",
                "seconds": round(time.perf_counter() - start, 1)})
    return rows


def real_table(rows: dict) -> str:
    methods = ["mask copy", "phantom-supervised LSLPN", "self-supervised on the scan"]
    lines = ["| organ | support slices (z) | " + " | ".join(methods) + " |",
             "|---" * (len(methods) + 2) + "|"]
    for organ, row in rows.items():
        lines.append(f"| {organ} | {', '.join(map(str, row['support_slices']))} | "
                     + " | ".join(f"{100 * row[m]:.1f}" if m in row else "–" for m in methods) + " |")
    means = [[row[m] for row in rows.values() if m in row] for m in methods]
    lines.append("| mean | | " + " | ".join(f"{100 * float(np.mean(v)):.1f}" if len(v) == len(rows) else "–"
                                             for v in means) + " |")
    return "\n".join(lines)


def write_report(results: dict, real: dict | None, log: list, seconds: float, argv: list[str], args) -> Path:
    """runs/selfsup_demo/report.md: the steps with their commands and seconds, the phantom and real-scan
    tables."""
    rows = results["table"]["range"]
    ss, copy = rows["LSLPN self-supervised"], rows["mask copy"]
    beats = [c for c in ("liver", "spleen", "kidney", "psoas")
             if ss[c] is not None and copy[c] is not None and ss[c] > copy[c]]
    lines = ["# Self-supervised LSLPN (superpixel episodes) on the phantom", "",
             f"Produced by `python tools/selfsup_demo.py {' '.join(argv)}` (not part of `make demo`) in "
             f"{seconds / 60:.1f} min. Steps of this invocation (reused steps are not listed):", "",
             "| step | command | seconds |", "|---|---|---|",
             *[f"| {e['step']} | `{e['command']}` | {e['seconds']} |" for e in log], "",
             f"Self-supervised: one run of {args.selfsup_steps} steps (`demo selfsup`: cnn_small, 128 "
             "px, batch 4, lr 1e-2) on the 20 phantom silver volumes prepared images-only: no label is "
             "read anywhere (no labeled validation either: the snapshot is last.pth), and the one "
             f"snapshot serves all four folds. Fine-tuning: {args.finetune_steps} supervised `demo` steps "
             "per fold from those weights, best.pth on the held-out silver volumes as the supervised "
             f"runs. Supervised LSLPN and PANet: the demo's runs ({demo.RUN_DIR / 'train'}), when "
             "finished.", "",
             (RUN_DIR / "phantom" / "table.md").read_text().strip(), "",
             "Pseudo-labels (felzenszwalb defaults, overlay by `make_superpixels.py --figure`): "
             "![superpixels of phantom slices](selfsup_superpixels.png)", "",
             f"Self-supervised vs mask copy (organ range): better on {len(beats)} of 4 columns "
             f"({', '.join(beats) or 'none'})."]
    if "LSLPN supervised" in rows:
        sup = rows["LSLPN supervised"]
        lines[-1] += (f" Self-supervised mean = {100 * ss['mean'] / sup['mean']:.0f}% of the supervised "
                      f"LSLPN mean ({ss['mean']:.1f} vs {sup['mean']:.1f}). Target: beat mask copy on "
                      "every organ and >= 85%.")
    if real is not None:
        lines += ["", "## Real scan (one patient: test-time adaptation, not a benchmark)", "",
                  f"Self-supervised training continued for {args.real_steps} steps on the unlabeled real "
                  "scan alone (../shared/data/real_ct/ct.nii.gz), starting from the phantom "
                  "self-supervised weights above. Then each organ of the SAME scan is segmented from "
                  f"{REAL_SUPPORT_SLICES} of its annotated slices (centres of thirds of its axial range; "
                  f"the range is given from the labels, {REAL_SUPPORT_SLICES} chunks). Whole-volume Dice "
                  "(%) against labels.nii.gz (automatic TotalSegmentator labels; the support slices are "
                  "inside the scored volume). Mask copy: each slice of the range gets its chunk's "
                  "annotated slice (no model). The phantom-supervised snapshot is the demo fold that held "
                  "the organ out.", "",
                  real_table(real), "", "![superpixels of the real scan](selfsup_superpixels_real.png)"]
    path = RUN_DIR / "report.md"
    write_text_atomic("\n".join(lines) + "\n", path)
    return path


def publish(docs: Path = ROOT / "docs") -> None:
    report = RUN_DIR / "report.md"
    if not report.exists():
        raise UserError(f"{report} does not exist: run `python tools/selfsup_demo.py` first, then --publish")
    shutil.copyfile(report, docs / "selfsup_phantom.md")
    for folder, name in ((UNLABELED, "selfsup_superpixels.png"),
                         (WORK_DIR / "real_unlabeled", "selfsup_superpixels_real.png")):
        if (folder / "superpixels_overlay.png").exists():
            shutil.copyfile(folder / "superpixels_overlay.png", docs / name)
    print(f"published {report} as {docs / 'selfsup_phantom.md'}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--publish", action="store_true", help="copy the finished report into docs/")
    parser.add_argument("--selfsup-steps", type=int, default=1200, help="the self-supervised run's steps")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps per fold")
    parser.add_argument("--real-steps", type=int, default=300, help="self-supervised steps on the real scan")
    parser.add_argument("--train-supervised", action="store_true",
                        help="train the demo's supervised LSLPN folds here when they are not finished")
    args = parser.parse_args(argv)
    if args.publish:
        publish()
        return 0
    log: list[dict] = []
    start = time.perf_counter()
    results, selfsup, supervised = phantom_part(log, args)
    real = real_part(log, supervised, selfsup, args)
    report = write_report(results, real, log, time.perf_counter() - start, argv, args)
    print("\n" + report.read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_cli(main)
