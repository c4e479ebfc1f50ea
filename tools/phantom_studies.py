"""Studies on the synthetic phantom; training runs through experiments/runner.py (finished runs reused):

    python tools/phantom_studies.py ablation --folds 0 1 2 3 -- demo      # docs/ablation_phantom.md
    python tools/phantom_studies.py lslpn-plus      # after `make demo`: docs/lslpn_plus_phantom.md
    python tools/phantom_studies.py selfsup         # self-supervised LSLPN: docs/selfsup_phantom.md
    python tools/phantom_studies.py superpixels --volumes 2           # best single-superpixel Dice, 2D vs 3D
    python tools/phantom_studies.py long-run --steps 2000 --out docs/long_run_check.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dataloaders.organs import FOLD_ORGANS, TEST_ORGANS
from util.cli import run_cli
from util.errors import UserError
from util.io import write_text_atomic

# each study imports what it runs inside its function: lslpn-plus pins the CPU numerics before torch loads
ROOT = Path(__file__).resolve().parents[1]
ORGANS = ["liver", "spleen", "kidney", "psoas"]
COLUMNS = [*ORGANS, "mean"]
ABLATION = """Ablation of the paper (docs/method.md, "VISCERAL data, folds and the paper's figures"): n_grid
16, 8, 4, 1, non-overlapping cells, mean vote, and SENet. The overrides after `--` go to train.py (runs under
OUT/<variant>/fold<F>/); every variant is evaluated beside mask copy at its training size; OUT/ablation.md."""
ABLATION_VARIANTS: dict[str, dict] = {   # variant -> model overrides (SENet: senet [senet_demo])
    "n_grid 16": {"n_grid": 16, "overlap": True, "vote": "max"},
    "n_grid 8": {"n_grid": 8, "overlap": True, "vote": "max"},
    "n_grid 4": {"n_grid": 4, "overlap": True, "vote": "max"},
    "n_grid 1 (global)": {"n_grid": 1, "overlap": True, "vote": "max"},
    "n_grid 8 non-overlapping": {"n_grid": 8, "overlap": False, "vote": "max"},
    "n_grid 8 mean vote": {"n_grid": 8, "overlap": True, "vote": "mean"},
    "SENet": {},
}
SELFSUP_WORK, SELFSUP_RUNS = Path("data/selfsup"), Path("runs/selfsup_demo")
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"
REAL_ORGANS, REAL_SUPPORT_SLICES = ["liver", "spleen", "kidney_right", "kidney_left"], 3
STEP_LINE = re.compile(r"step (\d+)/(\d+)\s+loss (\S+)")


def by_organ(snapshots: dict[int, object]) -> dict[str, str]:
    """organ -> snapshot of the fold that held it out, from {fold: snapshot} (None: the fold is left out)."""
    return {organ: str(path) for fold, path in snapshots.items() if path is not None
            for organ in FOLD_ORGANS[fold]}


def dice_cells(row: dict, columns: list[str] = COLUMNS, dash: str = "–") -> str:
    """Table cells of one Dice row (%, `dash` where an organ was not evaluated)."""
    return " | ".join(dash if row.get(c) is None else f"{row[c]:.1f}" for c in columns)


def train_variant(variant: str, fold: int, overrides: list[str], out: Path, python: str) -> Path:
    """best.pth of one ablation variant on one fold (trained unless a finished run of its config exists)."""
    from experiments.runner import train_or_reuse
    model = [f"model.{key}={value}" for key, value in ABLATION_VARIANTS[variant].items()]
    named = ["senet", *(["senet_demo"] if "demo" in overrides else [])] if variant == "SENet" else []
    slug = "".join(ch if ch.isalnum() else "_" for ch in variant).strip("_")
    return train_or_reuse([*overrides, *named, f"fold={fold}", *model,
                           f"path.log_dir={out / slug / f'fold{fold}'}"],
                          title=f"train {variant}, fold {fold}", python=python)


def ablation(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    argv, overrides = argv[:split], argv[split + 1:]
    from evaluation.evaluate import evaluate
    from experiments.runner import resolved_config
    parser = argparse.ArgumentParser(prog="phantom_studies.py ablation", description=ABLATION)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS),
                        choices=list(ABLATION_VARIANTS))
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
    out = args.out.resolve()
    snapshots = {variant: by_organ({fold: train_variant(variant, fold, overrides, out, args.python)
                                    for fold in args.folds}) for variant in args.variants}
    settings = config["eval"]
    results = evaluate({"mask copy": None, **snapshots}, [o for f in args.folds for o in FOLD_ORGANS[f]],
                       config["path"]["data_dir"], preset=settings["preset"], out_dir=args.out / "eval",
                       split=settings["split"], support=settings["support"], device=config["device"],
                       input_size=None if "SENet" in args.variants else config["input_size"],  # SENet: own
                       batch_size=settings["batch_size"], save_predictions=False,
                       config={"overrides": overrides, "folds": args.folds})
    lines = [f"Ablation, Dice (%) over the organ slice range (preset '{results['preset']['name']}').", "",
             "| Variant | n_grid | overlap | vote | " + " | ".join(COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for method, row in results["table"]["range"].items():
        spec = ABLATION_VARIANTS.get(method, {})
        lines.append(f"| {method} | {spec.get('n_grid', '–')} | {spec.get('overlap', '–')} | "
                     f"{spec.get('vote', '–')} | {dice_cells(row)} |")
    write_text_atomic("\n".join(lines) + "\n", args.out / "ablation.md")
    print("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'ablation.md'}")
    return 0


def lslpn_plus(argv: list[str]) -> int:
    from demo import pin_cpu_numerics
    pin_cpu_numerics()  # the demo's pins, set before torch loads
    from demo import run as demo
    from evaluation.adaptation import test_time_head_options, test_time_model
    from evaluation.evaluate import evaluate
    from evaluation.results import table_rows
    from experiments.runner import resolved_config
    from util.provenance import git_commit
    start, log = time.perf_counter(), []
    if not (demo.RUN_DIR / "train" / "lslpn_fold0").is_dir():
        raise UserError(f"no demo runs under {demo.RUN_DIR / 'train'}: run `make demo` first")
    plain = demo.train_all(log, False, [], {"LSLPN": []})["LSLPN"]            # reused: the demo's runs
    plus = demo.train_all(log, False, [], {"LSLPN_plus": ["lslpn_plus"]})["LSLPN_plus"]
    config = resolved_config(["demo", "lslpn_plus"])
    settings = config["eval"]
    head = test_time_head_options(settings)

    def test_time(model):
        return test_time_model(model, head, settings["adapt_steps"], settings["adapt_lr"])
    variants = {"LSLPN (the demo's runs)": (plain, None),
                "LSLPN+ at test time (the demo's LSLPN runs)": (plain, test_time),
                "LSLPN+ (trained with the boundary loss)": (plus, test_time)}
    rows = []
    for label, (snapshots, transform) in variants.items():
        tic = time.perf_counter()
        results = evaluate({label: snapshots}, TEST_ORGANS, demo.PREP_DIR, preset="inclusive", split="gold",
                           support="default", device="cpu", batch_size=settings["batch_size"],
                           save_predictions=False, figures=False, progress=False, model_transform=transform)
        row = table_rows(results["results"], "range")[label]
        print(f"    {label}: {row}", flush=True)
        rows.append(f"| {label} | {dice_cells(row, ORGANS, '-')} | {row['mean']:.1f} | "
                    f"{time.perf_counter() - tic:.0f} |")
    trained = [entry for entry in log if entry["step"].startswith("train")]
    n_plus_runs = len(set(map(str, plus.values())))                     # one per fold
    options = ", ".join(f"{k}={v}" for k, v in sorted(head.items()))
    lines = ["# LSLPN+ on the phantom demo", "",
             "Generated by `python tools/phantom_studies.py lslpn-plus` after `make demo`, at commit "
             f"{git_commit()} ({(time.perf_counter() - start) / 60:.1f} min on 2 CPU cores for this "
             f"invocation, which trained {len(trained)} of the {n_plus_runs} lslpn_plus "
             "runs and reused the others). Synthetic phantom, not patients: gold volumes, preset inclusive, "
             "support 10000132, Dice (%) over the organ slice range, as the demo's table. The LSLPN+ options "
             "are those of the "
             "`lslpn_plus` config, chosen on CHAOS-T2 validation scans (docs/lslpn_plus.md), not on the "
             f"phantom: training with boundary_weight={config['boundary_weight']} (the demo's schedule "
             f"otherwise); at test time the head options {options} and test-time adaptation "
             f"({settings['adapt_steps']} steps at lr {settings['adapt_lr']} per support slice).", "",
             "| Method | " + " | ".join(ORGANS) + " | mean | evaluation seconds |", "|---" * 7 + "|", *rows]
    write_text_atomic("\n".join(lines) + "\n", ROOT / "docs" / "lslpn_plus_phantom.md")
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------- selfsup
def unlabeled_folder(log: list, title: str, sources: Path, out: Path) -> None:
    """Images-only prepared folder with superpixels (make_superpixels.py on NIfTI volumes) unless present."""
    from experiments.runner import python_command, run_step
    if (out / "superpixels" / "meta.json").exists():
        print(f"==> {title}: reusing {out}")
        return
    run_step(title, python_command("scripts/make_superpixels.py", "--images", str(sources), "--out", str(out),
                                   "--window", "-125", "275", "--overwrite", "--figure",   # the demo's window
                                   str(out / "superpixels_overlay.png")), log)


def selfsup_run(log: list, title: str, name: str, data: Path, n_steps: int, *more: str) -> Path:
    """last.pth of `train.py with demo selfsup` on an unlabeled folder (validation is off there)."""
    from experiments.runner import train_or_reuse
    return train_or_reuse(["demo", "selfsup", f"path.data_dir={data}", f"lr_milestones=[{n_steps * 3 // 4}]",
                           *more, f"name={name}", f"path.log_dir={SELFSUP_RUNS / 'train'}",
                           f"n_steps={n_steps}"],
                          snapshot="last.pth", title=title, log=log)


def phantom_part(log: list, args) -> tuple[dict, Path, dict]:
    """The phantom steps: (evaluation results, self-supervised snapshot, supervised snapshots)."""
    from demo import run as demo
    from evaluation.evaluate import evaluate
    from experiments.runner import finished, train_or_reuse
    demo.make_data(log)
    unlabeled = SELFSUP_WORK / "phantom_unlabeled"
    unlabeled_folder(log, "unlabeled phantom: images-only + superpixels",
                     demo.PHANTOM_DIR / "SilverCorpus" / "Volumes", unlabeled)

    def demo_runs(method: str, train: bool = False) -> dict[str, str]:   # finished runs only, unless `train`
        if train:
            return demo.train_all(log, False, [], {method: demo.METHODS[method]})[method]
        return by_organ({fold: finished([*demo.CONFIGS, *demo.METHODS[method], *demo.training_overrides(
            method, fold)]) for fold in range(len(FOLD_ORGANS))})
    supervised, panet = demo_runs("LSLPN", args.train_supervised), demo_runs("PANet")
    selfsup = selfsup_run(log, "self-supervised LSLPN (no labels)", "selfsup", unlabeled, args.selfsup_steps)
    n = args.finetune_steps
    finetuned = by_organ({fold: train_or_reuse(
        ["demo", f"fold={fold}", f"path.data_dir={demo.PREP_DIR}", f"path.init_from={selfsup}",
         f"val_every={max(1, n // 2)}", f"lr_milestones=[{n * 3 // 4}]", f"name=selfsup_ft_fold{fold}",
         f"path.log_dir={SELFSUP_RUNS / 'train'}", f"n_steps={n}"],
        title=f"self-supervised + fine-tuning fold {fold}", log=log) for fold in range(len(FOLD_ORGANS))})
    start = time.perf_counter()
    methods = {"mask copy": None, "PANet": panet, "LSLPN supervised": supervised,
               "LSLPN self-supervised": str(selfsup), "LSLPN self-sup. + fine-tuning": finetuned}
    results = evaluate({name: spec for name, spec in methods.items()  # rows with every fold only
                        if not isinstance(spec, dict) or len(spec) == len(TEST_ORGANS)},
                       TEST_ORGANS, demo.PREP_DIR, preset="inclusive", out_dir=SELFSUP_RUNS / "phantom",
                       split="gold", support="default", input_size=128, device=args.device, batch_size=64,
                       save_predictions=False)
    log.append({"step": "evaluate on the gold phantom volumes", "command": "evaluation.evaluate.evaluate "
                "(tools/phantom_studies.py selfsup)", "seconds": round(time.perf_counter() - start, 1)})
    return results, selfsup, supervised


def sparse_support(labels: np.ndarray, value: int, n: int) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """(mask of `n` annotated axial slices at the middles of n equal chunks of the organ's range along axis 2,
    the organ's half-open range (z0, z1), mask copy of those slices over the range: no-model baseline)."""
    from evaluation.protocols import mask_copy, support_offsets
    organ = labels == value
    zs = np.flatnonzero(organ.reshape(-1, organ.shape[2]).sum(axis=0) > 0)
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    picks = z0 + support_offsets(z1 - z0, n)                                          # n
    support = np.zeros(organ.shape, dtype=np.uint8)
    support[:, :, picks] = organ[:, :, picks]
    return support, (z0, z1), mask_copy(organ, (z0, z1 - 1), organ.shape, (z0, z1 - 1), n)   # X x Y x Z


def real_part(log: list, supervised: dict, phantom_selfsup: Path, args) -> dict | None:
    """Self-supervised training continued on the real scan alone, then few-shot segmentation of that scan."""
    if not (REAL_CT / "ct.nii.gz").exists():
        print(f"==> real scan: {REAL_CT} not present, skipped")
        return None
    import nibabel as nib

    from dataloaders.nifti import save_nifti_atomic
    from evaluation.protocols import dice
    from evaluation.segment import segment_volume
    sources, unlabeled = SELFSUP_WORK / "real_sources", SELFSUP_WORK / "real_unlabeled"
    if not (unlabeled / "superpixels" / "meta.json").exists():   # a symbolic link only: never copied
        shutil.rmtree(sources, ignore_errors=True)
        sources.mkdir(parents=True)
        (sources / "real_ct.nii.gz").symlink_to((REAL_CT / "ct.nii.gz").resolve())
    unlabeled_folder(log, "real scan: images-only + superpixels", sources, unlabeled)
    selfsup = selfsup_run(log, "self-supervised LSLPN continued on the real scan (no labels)", "selfsup_real",
                          unlabeled, args.real_steps, f"path.init_from={phantom_selfsup}")
    names = {v: k for k, v in json.loads((REAL_CT / "labels.json").read_text())["labels"].items()}
    label_image = nib.load(str(REAL_CT / "labels.nii.gz"))
    if nib.aff2axcodes(label_image.affine)[2] not in ("S", "I"):
        raise UserError(f"{REAL_CT}/labels.nii.gz: the stored third axis is not axial: this script assumes "
                        "it is")
    labels = np.asarray(label_image.dataobj).astype(np.int64)
    (SELFSUP_RUNS / "real").mkdir(parents=True, exist_ok=True)
    rows, start = {}, time.perf_counter()
    for organ in REAL_ORGANS:
        value = int(names[organ])
        support, organ_range, copy = sparse_support(labels, value, REAL_SUPPORT_SLICES)
        mask_path = SELFSUP_RUNS / "real" / f"support_{organ}.nii.gz"
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
                "evaluation.segment.segment_volume (tools/phantom_studies.py selfsup)",
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


def selfsup_report(results: dict, real: dict | None, log: list, seconds: float, argv: list[str],
                   args) -> Path:
    """runs/selfsup_demo/report.md: the steps (commands, seconds), the phantom and real-scan tables."""
    rows = results["table"]["range"]
    ss, copy = rows["LSLPN self-supervised"], rows["mask copy"]
    beats = [c for c in ORGANS if ss[c] is not None and copy[c] is not None and ss[c] > copy[c]]
    lines = ["# Self-supervised LSLPN (superpixel episodes) on the phantom", "",
             f"Produced by `python tools/phantom_studies.py selfsup {' '.join(argv)}` (not part of "
             f"`make demo`) in {seconds / 60:.1f} min. Steps of this invocation (reused steps are not "
             "listed):", "",
             "| step | command | seconds |", "|---|---|---|",
             *[f"| {e['step']} | `{e['command']}` | {e['seconds']} |" for e in log], "",
             f"Self-supervised: one run of {args.selfsup_steps} steps (`demo selfsup`: cnn_small, 128 "
             "px, batch 4, lr 1e-2) on the 20 phantom silver volumes prepared images-only: no label is "
             "read anywhere (no labeled validation either: the snapshot is last.pth), and the one "
             f"snapshot serves all four folds. Fine-tuning: {args.finetune_steps} supervised `demo` steps "
             "per fold from those weights, best.pth on the held-out silver volumes as the supervised "
             "runs. Supervised LSLPN and PANet: the demo's runs (runs/demo/train), when finished.", "",
             (SELFSUP_RUNS / "phantom" / "table.md").read_text().strip(), "",
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
                  "the organ out.", "", real_table(real), "",
                  "![superpixels of the real scan](selfsup_superpixels_real.png)"]
    write_text_atomic("\n".join(lines) + "\n", SELFSUP_RUNS / "report.md")
    return SELFSUP_RUNS / "report.md"


def selfsup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="phantom_studies.py selfsup", description=(
        "Self-supervised LSLPN on the phantom (and on ../shared/data/real_ct when present): superpixels of "
        "the unlabeled silver volumes, one self-supervised run, fine-tuning per fold, evaluation on the gold "
        "volumes; finished steps are reused."))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--publish", action="store_true", help="copy the finished report into docs/")
    parser.add_argument("--selfsup-steps", type=int, default=1200, help="the self-supervised run's steps")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps per fold")
    parser.add_argument("--real-steps", type=int, default=300, help="self-supervised steps on the real scan")
    parser.add_argument("--train-supervised", action="store_true",
                        help="train the demo's supervised LSLPN folds here when they are not finished")
    args = parser.parse_args(argv)
    report = SELFSUP_RUNS / "report.md"
    if args.publish:
        if not report.exists():
            raise UserError(f"{report} does not exist: run `python tools/phantom_studies.py selfsup` first, "
                            "then --publish")
        shutil.copyfile(report, ROOT / "docs" / "selfsup_phantom.md")
        for folder, name in (("phantom_unlabeled", "selfsup_superpixels.png"),
                             ("real_unlabeled", "selfsup_superpixels_real.png")):
            if (SELFSUP_WORK / folder / "superpixels_overlay.png").exists():
                shutil.copyfile(SELFSUP_WORK / folder / "superpixels_overlay.png", ROOT / "docs" / name)
        print(f"published {report} as {ROOT / 'docs' / 'selfsup_phantom.md'}")
        return 0
    log: list[dict] = []
    start = time.perf_counter()
    results, selfsup_snapshot, supervised = phantom_part(log, args)
    real = real_part(log, supervised, selfsup_snapshot, args)
    print("\n" + selfsup_report(results, real, log, time.perf_counter() - start, argv, args).read_text())
    return 0


# ------------------------------------------------------------------------- superpixels
def best_dice(organ: np.ndarray, segments: np.ndarray) -> float:
    """Dice of the single segment id (> 0) that best matches the binary `organ` (same shape)."""
    ids, overlap = np.unique(segments[organ & (segments > 0)], return_counts=True)
    if ids.size == 0:
        return 0.0
    sizes = np.bincount(segments.ravel().astype(np.int64))[ids]
    return float((2 * overlap / (sizes + organ.sum())).max())


def superpixels(argv: list[str]) -> int:
    from skimage.segmentation import slic

    from dataloaders.layouts import find_cases, load_case
    from dataloaders.organs import NAME_TO_INDEX
    from dataloaders.superpixels import SuperpixelParams, body_mask, stack_superpixels
    from dataloaders.transforms import resize_image, resize_label, scale_intensity
    parser = argparse.ArgumentParser(prog="phantom_studies.py superpixels", description=(
        "Per test organ and slice of the gold phantom volumes (> 200 organ voxels), the Dice of the ONE "
        "superpixel that best matches the organ (an upper bound for a pseudo-label) for 2D felzenszwalb, 2D "
        "slic and 3D slic; also the seconds per volume."))
    parser.add_argument("--phantom", default="data/phantom")
    parser.add_argument("--volumes", type=int, default=2, help="gold volumes measured")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    slic_params = SuperpixelParams(method="slic")

    def supervoxels_3d(images: np.ndarray) -> np.ndarray:   # N x S x S, body only, ids > 0
        body = np.stack([body_mask(image, slic_params.body_threshold) for image in images])
        return slic(images.astype(np.float64), n_segments=slic_params.n_segments * images.shape[0],
                    compactness=slic_params.compactness, sigma=slic_params.sigma, channel_axis=None,
                    mask=body, start_label=1)
    methods = {"felzenszwalb 2D": lambda images: stack_superpixels(images, SuperpixelParams()),
               "slic 2D": lambda images: stack_superpixels(images, slic_params), "slic 3D": supervoxels_3d}
    scores = {m: {o: [] for o in TEST_ORGANS} for m in methods}
    seconds = {m: 0.0 for m in methods}
    cases = find_cases(Path(args.phantom) / "GoldCorpus")[:args.volumes]
    window = {"mode": "window", "window": [-125.0, 275.0]}
    for case in cases:
        volume = load_case(case)
        images = resize_image(scale_intensity(np.moveaxis(volume.image.array, 2, 0), window), args.size)
        labels = resize_label(np.moveaxis(volume.label, 2, 0), args.size)                  # N x S x S
        segments = {}
        for method, segment in methods.items():
            start = time.perf_counter()
            segments[method] = segment(images)
            seconds[method] += time.perf_counter() - start
        for organ in TEST_ORGANS:
            mask = labels == NAME_TO_INDEX[organ]
            for z in np.flatnonzero(mask.sum(axis=(1, 2)) > 200):
                for method in methods:
                    scores[method][organ].append(best_dice(mask[z], segments[method][z]))
    print(f"best single-superpixel Dice (%) per organ slice (> 200 voxels), {len(cases)} gold phantom "
          f"volumes, {args.size} px")
    print("| method | " + " | ".join(TEST_ORGANS) + " | mean | s/volume |")
    print("|---" * (len(TEST_ORGANS) + 3) + "|")
    for method in methods:
        values = [100 * np.mean(scores[method][o]) for o in TEST_ORGANS]
        print(f"| {method} | " + " | ".join(f"{v:.1f}" for v in values)
              + f" | {np.mean(values):.1f} | {seconds[method] / len(cases):.1f} |")
    return 0


# ------------------------------------------------------------------------- long-run
def rss_mb(pid: int) -> float | None:
    """Resident set size of process `pid` in MiB (None when it has exited)."""
    try:
        line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def long_run_report(samples: list[dict], code: int | None, seconds: float, command: str, steps: int,
                    tail: str) -> tuple[str, bool]:
    """Markdown report (code None: the run goes on, a partial report) and whether the check passed."""
    finite = all(math.isfinite(s["loss"]) for s in samples)
    complete = code == 0 and bool(samples) and samples[-1]["step"] == steps
    rss = [s["rss_mb"] for s in samples if s["rss_mb"] is not None]
    lines = ["# Long-run check: demo training, memory and loss", "", f"Command: `{command}`", "",
             f"Machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs "
             "(shared with other work while it ran).", "",
             f"Result: {'STILL RUNNING (partial report)' if code is None else f'exit code {code}'}; "
             f"{samples[-1]['step'] if samples else 0} of {steps} steps in "
             f"{seconds:.0f} s; losses {'all finite' if finite else 'NOT all finite'}.", ""]
    if len(rss) >= 2:
        after_warmup = rss[2:] if len(rss) >= 4 else rss
        lines += [f"RSS (VmRSS of the train.py process, sampled at every 100-step summary line): first "
                  f"{rss[0]:.0f} MiB, last {rss[-1]:.0f} MiB, min {min(rss):.0f}, max {max(rss):.0f}; growth "
                  f"from the {'3rd' if len(rss) >= 4 else '1st'} sample to the last: "
                  f"{after_warmup[-1] - after_warmup[0]:+.0f} MiB.", ""]
    lines += ["| step | mean loss (last 100 steps) | RSS MiB | elapsed s |", "|---:|---:|---:|---:|"]
    lines += [f"| {s['step']} | {s['loss']:.4f} | {s['rss_mb']:.0f} | {s['seconds']:.0f} |" for s in samples]
    if not complete:
        lines += ["", "Last output lines:", "", "```", tail, "```"]
    return "\n".join(lines) + "\n", finite and complete


def long_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="phantom_studies.py long-run", description=(
        "Many demo training steps (not in CI): the train.py process's RSS sampled at each 100-step summary "
        "line; fails (exit 1) on a NaN/inf loss or a failed process. Linux."))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--data-dir", default="data/prepared_phantom", help="prepared phantom (make demo)")
    parser.add_argument("--log-dir", default=None, help="run folder root (default: a temporary folder)")
    parser.add_argument("--out", default="docs/long_run_check.md", help="Markdown report")
    parser.add_argument("extra", nargs="*", help="more Sacred updates, e.g. val_every=500")
    args = parser.parse_args(argv)
    if args.steps < 100:
        raise UserError(f"--steps {args.steps}: use at least 100 (RSS is sampled every 100 steps)")
    if not (ROOT / args.data_dir / "meta.json").is_file() and not Path(args.data_dir, "meta.json").is_file():
        raise UserError(f"--data-dir {args.data_dir}: not a prepared folder: run `make demo` (or "
                        "scripts/prepare_visceral.py) first")
    command = "python tools/phantom_studies.py long-run " + " ".join(argv)
    start, samples, tail = time.perf_counter(), [], []
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.Popen([sys.executable, "train.py", "with", "demo", f"n_steps={args.steps}",
                                 "print_every=100", f"path.data_dir={args.data_dir}",
                                 f"path.log_dir={args.log_dir or scratch}", "device=cpu", *args.extra],
                                cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in (line for raw in proc.stdout for line in raw.replace("\r", "\n").splitlines()):
            tail = (tail + [line])[-20:]
            match = STEP_LINE.search(line)
            if match:
                sample = {"step": int(match.group(1)), "loss": float(match.group(3)),
                          "rss_mb": rss_mb(proc.pid), "seconds": time.perf_counter() - start}
                samples.append(sample)
                print(f"step {sample['step']:>5}  loss {sample['loss']:.4f}  RSS {sample['rss_mb']:.0f} MiB  "
                      f"{sample['seconds']:.0f} s", flush=True)
                write_text_atomic(long_run_report(samples, None, time.perf_counter() - start, command,
                                                  args.steps, "\n".join(tail))[0], args.out)
        code = proc.wait()
    text, ok = long_run_report(samples, code, time.perf_counter() - start, command, args.steps,
                               "\n".join(tail))
    write_text_atomic(text, args.out)
    print(f"wrote {args.out}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


STUDIES = {"ablation": ablation, "lslpn-plus": lslpn_plus, "selfsup": selfsup,
           "superpixels": superpixels, "long-run": long_run}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in STUDIES:
        raise UserError(f"{argv[0] if argv else 'no study'}: unknown: use {', '.join(STUDIES)} "
                        "(python tools/phantom_studies.py STUDY --help)")
    return STUDIES[argv[0]](argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_cli(main)
