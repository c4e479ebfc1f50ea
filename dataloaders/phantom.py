"""Synthetic contrast CT of thorax and abdomen written in the VISCERAL Anatomy3 layout.

The anatomy of one subject (organ layout measured on one real abdominal CT, contrast-CT
Hounsfield units, variation between subjects) is dataloaders/phantom_anatomy.py; this module
stores subjects as VISCERAL files (some in LPS orientation, so readers must reorient) and builds a
whole phantom folder atomically. Same seed -> same bytes.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from dataloaders.nifti import atomic_folder, save_nifti_atomic
from dataloaders.organs import STRUCTURES
from dataloaders.phantom_anatomy import render_subject
from dataloaders.visceral import mask_filename, volume_filename
from util.errors import UserError


def storage_orientation(array: np.ndarray, affine: np.ndarray, lps: bool) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine as stored: unchanged (RAS) or with axes 0 and 1 flipped (LPS)."""
    if not lps:
        return array, affine
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return np.ascontiguousarray(array[::-1, ::-1, :]), affine @ flip


SILVER_FIRST_PID, GOLD_FIRST_PID = 10001000, 10000130   # gold includes 10000132, the paper's support id
CORPORA = {"SilverCorpus": (0, SILVER_FIRST_PID), "GoldCorpus": (1, GOLD_FIRST_PID)}


def write_subject(task: tuple) -> tuple[str, str, np.ndarray | None, dict]:
    """Render and write one subject in VISCERAL naming; returns (corpus, pid, canonical label or None, info).

    task = (root, corpus, index, seed, size, n_slices, keep_label). The subject depends only on
    (seed, corpus, index), so adding subjects never changes existing ones.
    """
    root, corpus, index, seed, size, n_slices, keep_label = task
    code, first = CORPORA[corpus]
    rng = np.random.default_rng([seed, code, index])
    image, label, affine, subject = render_subject(rng, size, n_slices)
    pid = str(first + index)
    folder = Path(root) / corpus
    stored, stored_affine = storage_orientation(image, affine, subject.lps)
    save_nifti_atomic(stored, stored_affine, folder / "Volumes" / volume_filename(pid))
    present = np.flatnonzero(np.bincount(label.reshape(-1), minlength=len(STRUCTURES) + 1))
    for structure in present[present > 0]:
        mask, _ = storage_orientation((label == structure).astype(np.uint8), affine, subject.lps)
        save_nifti_atomic(mask, stored_affine,
                          folder / "Segmentations" / mask_filename(pid, STRUCTURES[structure][1]))
    info = {"shape": list(image.shape), "spacing": [round(float(v), 3) for v in subject.spacing],
            "orientation": "LPS" if subject.lps else "RAS", "structures": int((present > 0).sum())}
    return corpus, pid, (label if keep_label else None), info


def generate_phantom(out: str | Path, n_silver: int, n_gold: int, seed: int, size: int = 256,
                     n_slices: int = 64, workers: int = 2, overwrite: bool = False) -> dict:
    """Write a VISCERAL-layout phantom to `out` atomically; returns a summary with the gold label volumes.

    Returns {"cases": {pid: info}, "gold_labels": {pid: X x Y x Z uint8 canonical}}.
    """
    if n_silver < 1 or n_gold < 2:
        raise UserError(f"phantom: n_silver {n_silver} / n_gold {n_gold}: need at least 1 silver and 2 gold "
                        "volumes (one support, one query)")
    if seed < 0:
        raise UserError(f"phantom: seed {seed} is negative: use --seed >= 0")
    if size < 32 or n_slices < 8:
        raise UserError(f"phantom: size {size} / slices {n_slices} too small: use --size >= 32 and --slices "
                        ">= 8")
    with atomic_folder(out, overwrite) as partial:
        for corpus in CORPORA:
            for sub in ("Volumes", "Segmentations"):
                (partial / corpus / sub).mkdir(parents=True)
        tasks = [(str(partial), "SilverCorpus", i, seed, size, n_slices, False) for i in range(n_silver)]
        tasks += [(str(partial), "GoldCorpus", i, seed, size, n_slices, True) for i in range(n_gold)]
        if workers > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else None)
            with context.Pool(min(workers, len(tasks))) as pool:
                results = pool.map(write_subject, tasks, chunksize=1)
        else:
            results = [write_subject(task) for task in tasks]
    return {"cases": {pid: dict(info, corpus=corpus) for corpus, pid, _, info in results},
            "gold_labels": {pid: label for corpus, pid, label, _ in results if label is not None}}
