"""Seconds per query volume and peak memory of scripts/segment_volume.py on CHAOS-T2 scans, the section
'segment' of BENCHMARKS.md (`scripts/bench_chaos.py --speed`): every organ of two support scans in one call,
no range given, each checkpoint in its own process on 2 threads; seconds from the output sidecars, peak
memory = that process's peak resident set size (ru_maxrss, read by os.wait4).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from dataloaders import layouts as layout
from dataloaders.label_map import sidecar_path
from evaluation.protocols import dice
from experiments.chaos import HEAD, ORGANS
from experiments.runner import ROOT
from models.checkpoint import load_checkpoint
from util.errors import UserError
from util.io import write_text_atomic

MARKERS = ("<!-- begin segment -->", "<!-- end segment -->")


def measure(checkpoint: Path, data_dir: Path, supports: list[int], queries: list[int], work: Path,
            out: Path) -> dict:
    """{'queries': [{'id', 'seconds', 'dice': {organ: value}}], 'wall', 'cpu', 'peak_mib'} of one
    checkpoint: the supports linked (never copied) into work/supports with their label names, one
    segment_volume.py call writing into `out`."""
    dataset = layout.detect_dataset(data_dir)
    folder = work / "supports"
    folder.mkdir(parents=True, exist_ok=True)
    for sid in supports:
        for kind in ("image", "label"):
            link = folder / f"{kind}_{sid}.nii.gz"
            if not link.is_symlink():
                link.symlink_to(Path(data_dir).resolve() / f"{kind}_{sid}.nii.gz")
    names = {str(value): name for value, name in dataset.vocabulary.items()}
    (folder / "labels.json").write_text(json.dumps({"labels": names}))
    images = [Path(data_dir) / f"image_{qid}.nii.gz" for qid in queries]
    command = [sys.executable, str(ROOT / "scripts" / "segment_volume.py"), "--checkpoint", str(checkpoint),
               "--support-dir", str(folder), *(a for image in images for a in ("--query", str(image))),
               "--out", str(out), "--device", "cpu", "--no-progress"]
    log = work / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode:
        raise UserError(f"segment_volume.py failed on {checkpoint} (exit {process.returncode}): see {log}")
    rows = []
    for qid, image in zip(queries, images):
        labels = out / image.name.replace(".nii.gz", "_labels.nii.gz")
        predicted = np.asarray(nib.load(labels).dataobj)
        truth = np.asarray(nib.load(Path(data_dir) / f"label_{qid}.nii.gz").dataobj)
        rows.append({"id": qid, "seconds": json.loads(sidecar_path(labels).read_text())["seconds"],
                     "dice": {name: dice(predicted == value, truth == value)
                              for value, name in dataset.vocabulary.items()}})
    return {"queries": rows, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "peak_mib": usage.ru_maxrss / 1024}


def describe(checkpoint: Path) -> str:
    """'encoder, input S x S, step N' of a train.py checkpoint."""
    state = load_checkpoint(str(checkpoint))
    size = state.get("input_size")
    return f"{state['model_config'].get('encoder')}, input {size} x {size}, step {state.get('step')}"


def speed_section(checkpoints: list[Path], data_dir: Path, work: Path, command: str) -> str:
    """The markdown section (between MARKERS) of every checkpoint on fold 0's query scans."""
    dataset = layout.detect_dataset(data_dir)
    test, support, training = layout.fold_scans(layout.scan_ids(data_dir), 0, dataset)
    supports, queries = [support, training[0]], test[:3]
    load = [os.getloadavg()]
    results = {str(c): measure(Path(c), data_dir, supports, queries, work, work / f"out_{i}")
               for i, c in enumerate(checkpoints)}
    load.append(os.getloadavg())
    cols, shown = " | ".join(HEAD[o] for o in ORGANS), ", ".join(map(str, queries))
    when = "; ".join(", ".join(f"{v:.2f}" for v in a) + f" ({w})" for a, w in zip(load, ("start", "end")))
    lines = [MARKERS[0], "## Segmenting a scan: seconds per query volume", "", f"Command: `{command}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}; {platform.processor() or 'cpu'}, {os.cpu_count()} cores "
             f"visible, 2 threads; load average (1, 5, 15 min) {when} (above 2: other work shared the cores, "
             "the seconds are upper bounds).", "",
             f"`scripts/segment_volume.py --support-dir` with {dataset.name} scans {supports[0]} and "
             f"{supports[1]} as the supports segments liver, spleen and both kidneys of scans {shown} in "
             "one call, no range given (found from the images). Seconds per query: its sidecar's (read the"
             " volume, find each organ's range, score, write; the first query also encodes the support "
             "slices). Wall: the whole process (Python start, model and supports loaded); CPU: its user + "
             "system seconds (less sensitive to other work on the cores). Peak memory: the"
             " process's peak resident set size (ru_maxrss from os.wait4), MiB. Dice (%) over the whole "
             "volume, a sanity check of the output.", "",
             f"| checkpoint | query | seconds | {cols} |", "|---" * (len(ORGANS) + 3) + "|"]
    for checkpoint, result in results.items():
        for row in result["queries"]:
            lines.append(f"| `{checkpoint}` | {row['id']} | {row['seconds']:.1f} | "
                         + " | ".join(f"{100 * row['dice'][o]:.1f}" for o in ORGANS) + " |")
    lines += ["", "| checkpoint | model | seconds per query (mean) | wall s | CPU s (user + sys) | "
              "peak MiB |", "|---|---|---|---|---|---|"]
    for checkpoint, result in results.items():
        mean = float(np.mean([row["seconds"] for row in result["queries"]]))
        lines.append(f"| `{checkpoint}` | {describe(Path(checkpoint))} | {mean:.1f} | {result['wall']:.1f} | "
                     f"{result['cpu']:.1f} | {result['peak_mib']:.0f} |")
    return "\n".join(lines + ["", MARKERS[1]])


def write_section(section: str, doc: Path) -> None:
    """Replace the section between MARKERS in `doc` (appended when absent)."""
    text = doc.read_text() if doc.is_file() else ""
    if MARKERS[0] in text and MARKERS[1] in text:
        head, rest = text.split(MARKERS[0], 1)
        text = head + section + rest.split(MARKERS[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text_atomic(text, doc)
