"""Figures of an evaluation run folder: results.png (per organ, the support slice and every method's query
slice, truth green, prediction red) and misalignment.png (alignment Dice of mask copy against each
model's Dice). All are drawn in memory first (`render_figures`), then written (`make_figures`).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from evaluation.results import read_results
from util.errors import UserError
from util.io import write_bytes_atomic

MASK_COPY = "mask copy"
METHOD_ORDER = (MASK_COPY, "PANet", "SENet", "LSLPN")   # the published table's order; others after, by name
ORGAN_COLOURS = {"liver": "tab:red", "spleen": "tab:purple", "kidney_right": "tab:blue",
                 "kidney_left": "tab:cyan", "psoas_right": "tab:orange", "psoas_left": "tab:olive"}


def display(slice_xy: np.ndarray) -> np.ndarray:
    """Canonical X x Y slice -> Y x X display image: anterior up, patient right on the left."""
    return np.flip(np.asarray(slice_xy).T, axis=(0, 1))


def _pyplot():
    # deferred: matplotlib (heavy) is only needed when a figure is drawn
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred, after choosing the Agg backend
    return plt


FIGURE_NAMES = ("results.png", "misalignment.png")   # what make_figures writes in a run folder


def _png(fig) -> bytes:
    """A drawn figure as PNG bytes (closed afterwards)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def load_figure_data(path: str | Path) -> dict[str, dict]:
    """figure_data.npz -> organ -> {support_image, support_mask, query_image, query_mask, ...,
    predictions: {method: X x Y bool}}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: run test.py (or evaluation.evaluate.evaluate with out_dir) "
                        "first")
    data: dict[str, dict] = {}
    try:
        with np.load(path) as archive:
            for key in archive.files:
                parts = key.split("|")
                entry = data.setdefault(parts[0], {"predictions": {}})
                if parts[1] == "prediction":
                    entry["predictions"][parts[2]] = archive[key]
                else:
                    entry[parts[1]] = archive[key]
    except (ValueError, OSError, EOFError, IndexError, zipfile.BadZipFile) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:80]
        raise UserError(f"{path}: unreadable ({reason}): the file is corrupt or truncated; run test.py again "
                        "for this folder") from None
    return data


def _outline(ax, mask: np.ndarray, colour: str) -> None:
    """Draw the outline of a canonical X x Y mask on a display-oriented axis."""
    shown = display(mask).astype(float)
    if shown.any():
        ax.contour(shown, levels=[0.5], colors=[colour], linewidths=1.0)


def qualitative_png(data: dict[str, dict]) -> bytes:
    """results.png's bytes: per organ, the support slice with its mask and the query slice per method."""
    if not data:
        raise UserError("no organ was scored, so there is nothing to draw: check the skipped cases in "
                        "results.json")
    plt = _pyplot()
    methods = sorted({m for entry in data.values() for m in entry["predictions"]},
                     key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    fig, axes = plt.subplots(len(data), 1 + len(methods), figsize=(2.6 * (1 + len(methods)), 2.6 * len(data)),
                             squeeze=False)
    for row, (organ, entry) in enumerate(data.items()):
        ax = axes[row, 0]
        ax.imshow(display(entry["support_image"]), cmap="gray")
        shown_mask = display(entry["support_mask"])
        mask = np.ma.masked_where(~shown_mask.astype(bool), shown_mask)
        ax.imshow(mask, cmap="autumn", alpha=0.45)
        ax.set_title(f"{organ}: support {entry['support']} z={int(entry['support_z'])}", fontsize=7)
        for column, method in enumerate(methods, start=1):
            ax = axes[row, column]
            ax.imshow(display(entry["query_image"]), cmap="gray")
            _outline(ax, entry["query_mask"], "lime")
            if method in entry["predictions"]:
                _outline(ax, entry["predictions"][method], "red")
            ax.set_title(f"{method}: query {entry['query']} z={int(entry['query_z'])}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("support mask (filled); query: ground truth (green), prediction (red)", fontsize=8)
    return _png(fig)


def misalignment_pairs(results: dict, method: str) -> dict[str, tuple[list[float], list[float]]]:
    """organ -> (alignment Dice of mask copy, segmentation Dice of `method`) over shared query volumes."""
    table = results["results"]
    pairs = {}
    for organ, entry in table.get(method, {}).items():
        copied = table.get(MASK_COPY, {}).get(organ, {}).get("per_volume", [])
        copy = {(c["support"], c["query"]): c["dice_range"] for c in copied}
        cases = [(copy[(c["support"], c["query"])], c["dice_range"]) for c in entry["per_volume"]
                 if (c["support"], c["query"]) in copy]
        if cases:
            pairs[organ] = ([a for a, _ in cases], [s for _, s in cases])
    return pairs


def misalignment_png(results: dict) -> bytes | None:
    """misalignment.png's bytes: one panel per model method; None when there is no mask copy or no model."""
    models = [m for m in results["results"] if m != MASK_COPY]
    if MASK_COPY not in results["results"] or not models:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(3.8 * len(models), 3.6), squeeze=False)
    for ax, method in zip(axes[0], models):
        pairs = misalignment_pairs(results, method)
        for organ, (alignment, segmentation) in pairs.items():
            ax.scatter(100 * np.asarray(alignment), 100 * np.asarray(segmentation), s=16,
                       color=ORGAN_COLOURS.get(organ, "gray"), label=organ)
        ax.plot([0, 100], [0, 100], color="gray", linewidth=0.8, linestyle="--")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("alignment Dice (mask copy) %")
        ax.set_ylabel(f"{method} Dice %")
        ax.set_title(f"{method} ({results['preset']['name']} protocol)", fontsize=9)
        if pairs:
            ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def render_figures(run_dir: str | Path) -> dict[Path, bytes]:
    """{path: PNG bytes} of results.png and (with a mask-copy row and a model) misalignment.png of a run
    folder, drawn in memory: nothing is written, so every input is checked before any figure is replaced."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    data = load_figure_data(run_dir / "figure_data.npz")
    try:
        figures = {run_dir / "results.png": qualitative_png(data)} if data else {}   # none: nothing scored
        scatter = misalignment_png(results)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:80]
        raise UserError(f"{run_dir}: results.json / figure_data.npz hold entries of an unexpected form "
                        f"({reason}): run test.py again for this folder") from None
    if scatter is not None:
        figures[run_dir / "misalignment.png"] = scatter
    return figures


def write_figures(figures: dict[Path, bytes]) -> list[Path]:
    """Write rendered figures (`render_figures`), each atomically; returns their paths."""
    for path, png in figures.items():
        write_bytes_atomic(png, path)
    return list(figures)


def make_figures(run_dir: str | Path) -> list[Path]:
    """Write results.png and (with a mask-copy row and a model) misalignment.png in `run_dir`: all drawn
    first (`render_figures`), then written."""
    return write_figures(render_figures(run_dir))
