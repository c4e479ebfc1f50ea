"""The CHAOS-T2 benchmark's report (docs/bench_chaos.md) and overlay figure from its results.json
(scripts/bench_chaos.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from util.atomic import atomic_path, write_text_atomic

ORGANS = ["liver", "spleen", "kidney_left", "kidney_right"]      # the published tables' order
HEAD = {"liver": "liver", "spleen": "spleen", "kidney_left": "LK", "kidney_right": "RK"}
# SSL-ALPNet (ECCV 2020) Table 1 as reproduced by the FoB-SAM README (commit 40d0e23): liver / spleen / LK
# / RK / mean per (data set, Setting), pretrained ResNet-101 (COCO DeepLabv3), GPU, 100k iterations.
PUBLISHED = {("chaos_t2", 1): [76.10, 72.18, 81.92, 85.18, 78.84],
             ("chaos_t2", 2): [73.05, 67.02, 73.63, 78.39, 73.02],
             ("sabs", 1): [78.29, 70.96, 72.36, 71.81, 73.35],
             ("sabs", 2): [73.67, 60.25, 63.34, 54.82, 63.02]}
TITLE = {"chaos_t2": "CHAOS-T2 abdominal MRI", "sabs": "SABS (BTCV) abdominal CT"}
NORMALISATION = {"MR": "z-scored per volume",
                 "CT": "one mean and std over every voxel of the fold's training scans (SSL-ALPNet's rule)"}


def queries_text(data_set: dict) -> str:
    """'4' (or '4-5' when folds differ) query scans per fold."""
    counts = data_set["queries_per_fold"]
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def fold_means(cells: list[dict], method: str, setting: int) -> dict[int, dict[str, float]]:
    """{fold: {organ: mean Dice over the fold's query scans}} of one method and setting (both label sets)."""
    out: dict[int, dict[str, float]] = {}
    for cell in cells:
        if cell["method"] == method and cell["setting"] == setting:
            for organ, per_query in cell["dice"].items():
                values = [v for v in per_query.values() if v is not None and np.isfinite(v)]
                out.setdefault(cell["fold"], {})[organ] = float(np.mean(values)) if values else float("nan")
    return out


def _fmt(value: float) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def published_row(data_set: dict, setting: int) -> list[float] | None:
    """SSL-ALPNet's published figures for this data set and Setting; None unless the folder holds the
    whole data set those figures are for."""
    return PUBLISHED.get((data_set["name"], setting)) if data_set["published"] else None


def setting_tables(results: dict, setting: int) -> list[str]:
    """Markdown: over the folds (mean and std of fold means) and per fold, one row per method."""
    lines = []
    folds = sorted({c["fold"] for c in results["cells"] if c["setting"] == setting})
    if not folds:
        return lines
    cols = " | ".join(HEAD[o] for o in ORGANS)
    lines += [f"Over {len(folds)} fold(s) ({', '.join(map(str, folds))}): mean (std over folds) of the "
              f"per-fold mean Dice (%) over each fold's {queries_text(results['data_set'])} query scans.", "",
              f"| Method | {cols} | mean |",
              "|---" * (len(ORGANS) + 2) + "|"]
    for method in results["methods"]:
        per_fold = fold_means(results["cells"], method, setting)
        if not per_fold:
            continue
        cells, organ_means = [], []
        for organ in ORGANS:
            values = np.array([per_fold.get(f, {}).get(organ, np.nan) for f in folds], float)
            values = values[np.isfinite(values)]
            mean = float(values.mean()) if values.size else float("nan")
            organ_means.append(mean)
            cells.append(f"{_fmt(mean)} ({_fmt(float(values.std()))})" if values.size > 1 else _fmt(mean))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(float(np.nanmean(organ_means)))} |")
    published = published_row(results["data_set"], setting)
    if published is not None:
        lines.append("| *published SSL-ALPNet (pretrained ResNet-101, GPU, 100k iterations, 5 folds)* | "
                     + " | ".join(f"*{v:.1f}*" for v in published[:4]) + f" | *{published[4]:.1f}* |")
    lines += ["", "Per fold (Dice %):", "", f"| Method | fold | {cols} |", "|---" * (len(ORGANS) + 2) + "|"]
    for method in results["methods"]:
        per_fold = fold_means(results["cells"], method, setting)
        for fold in sorted(per_fold):
            lines.append(f"| {method} | {fold} | "
                         + " | ".join(_fmt(per_fold[fold].get(o, np.nan)) for o in ORGANS)
                         + " |")
    return lines + [""]


def write_report(results: dict, doc: Path, figure: Path | None, seconds: float, command: str,
                 exclusion: dict | None, environment: str) -> Path:
    """docs/bench_chaos.md from results.json."""
    budget = results["budget"]
    regime = ("the published settings (`--full`)" if budget["full"] else
              "a CPU budget: `demo` config (cnn_small encoder from random initialisation), "
              f"{budget['steps']} steps, "
              f"batch {budget['batch_size']}, input {budget['input_size']} x {budget['input_size']} "
              "(predictions upsampled to the stored 256 x 256 for scoring), no intensity augmentation")
    episodes = ("SSL-ALPNet's own episode recipe (selfsup.episodes=alpnet: its id draw, affine, elastic "
                "and gamma)")
    data_set = results["data_set"]
    title = TITLE[data_set["name"]]
    if any(published_row(data_set, setting) for setting in (1, 2)):
        scale = ("The published row is SSL-ALPNet's ECCV 2020 Table 1 for this data set (pretrained "
                 "ResNet-101, GPU, 100k iterations): a different regime from this CPU run, beside it for "
                 "scale only.")
    else:
        scale = (f"No published row: SSL-ALPNet's figures are for the whole data set ({title}), and this "
                 f"folder holds {data_set['scans']} scans.")
    lines = [f"# {title} under SSL-ALPNet's protocol", "",
             f"Generated by `{command}` (scripts/bench_chaos.py)"
             + (f" at commit {results['commit']}" if results.get("commit") else "")
             + f"; total wall time {seconds / 60:.1f} min on {environment}."
             + ("" if results.get("complete", True) else
                " **Partial**: written while the run was still going (or after it stopped); "
                "only the cells below were finished."), "",
             f"Data: {title} ({data_set['modality']}), {data_set['scans']} scans in `{data_set['folder']}`, "
             "SSL-ALPNet's preprocessed layout (image / label / superpix-MIDDLE / classmap_1.json), read as "
             f"its loader: {NORMALISATION[data_set['modality']]}, slices as stored, [:256, :256]. Protocol "
             "(evaluation/protocols.py, preset `alpnet`): SSL-ALPNet's 5-fold circular split "
             f"({queries_text(data_set)} query scans per fold, the next scan in sorted order as the support, "
             "left out "
             "of training); support slices at the percentiles 1/6, 1/2, 5/6 of the support's organ slices; "
             "query thirds over the query's own ground-truth range, only that range scored; 3D Dice without "
             "smoothing; mean over the fold's query scans, then mean and std over the folds. Label set 0 "
             "tests the kidneys, 1 liver and spleen. Setting 1: training slices may show the test organs; "
             "Setting 2: every training slice "
             f"holding ANY test organ is dropped ({results['rule'].upper()} rule).", "",
             f"Training: {regime}. Self-supervised rows train on SSL-ALPNet's own superpixels through "
             "the same loop (train.py, `selfsup`: one superpixel of a random training slice as the "
             "foreground, "
             f"two random views) with {episodes}; 'LSLPN, supervised' trains on the other label set's organ "
             "labels (the paper's regime). "
             "'LSLPN, untrained' is the LSLPN run's network at step 0 (its seeded random initial weights, "
             "no training): "
             "what the local-prototype matching gives before any learning. Mask copy has no model. "
             + scale,
             ""]
    for setting in (1, 2):
        body = setting_tables(results, setting)
        if body:
            lines += [f"## Setting {setting}", ""] + body
    if exclusion:
        lines += ["## Setting 2: training slices kept, OR rule (SSL-ALPNet) vs AND rule (Q-Net lineage)", "",
                  "| fold | label set (test organs) | all slices | kept, OR | kept, AND |",
                  "|---|---|---|---|---|"]
        for key, counts in exclusion.items():
            fold, label_set = key.split("/")
            organs = "kidneys" if label_set == "0" else "liver, spleen"
            lines.append(f"| {fold} | {label_set} ({organs}) | {counts['all']} | {counts['or']} "
                         f"| {counts['and']} |")
        lines.append("")
    if figure is not None and figure.exists():
        lines += ["## Overlays", "", f"![support, query, ground truth and predictions]({figure.name})", "",
                  "Each row: the support slice with its mask, the query slice with the ground truth, "
                  "then each method's prediction (fold 0, Setting 2 when run, the query's middle organ "
                  "slice).", ""]
    lines += ["## Wall time of every step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {entry['step']} | {entry['seconds']} |" for entry in results["log"]]
    lines.append("")
    write_text_atomic("\n".join(lines), doc)
    return doc


class OverlayCollector:
    """Keeps one query slice per (organ, method) of the first fold/setting seen, then draws the PNG."""

    def __init__(self, setting: int):
        self.setting = setting
        self.rows: dict[str, dict] = {}

    def __call__(self, method: str, fold: int, setting: int, label_set: int, folder: Path, predictions: dict):
        from dataloaders.organs import NAME_TO_INDEX
        from dataloaders.prepared import read_meta
        from evaluation.protocols import organ_slice_list, support_slices
        from experiments.chaos import gold_volume
        if setting != self.setting:
            return
        meta = read_meta(folder)["alpnet"]
        for organ, per_query in predictions.items():
            row = self.rows.get(organ)
            if row is None:
                qid = meta["test"][0]
                query = gold_volume(folder, qid)
                support = gold_volume(folder, meta["support"])
                index = NAME_TO_INDEX[organ]
                zs = organ_slice_list(query["label"] == index)
                z = int(zs[len(zs) // 2])
                sz = support_slices(organ_slice_list(support["label"] == index))[1]
                row = self.rows[organ] = {"fold": fold, "qid": qid, "z": z, "query": query["image"][:, :, z],
                                          "truth": query["label"][:, :, z] == index,
                                          "support": support["image"][:, :, sz],
                                          "support_mask": support["label"][:, :, sz] == index, "methods": {}}
            if row["fold"] == fold and row["qid"] in per_query:
                row["methods"].setdefault(method, per_query[row["qid"]][:, :, row["z"]])

    def draw(self, path: Path) -> Path | None:
        if not self.rows:
            return None
        import matplotlib  # heavy optional dependency: only when drawing
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        methods = list(next(iter(self.rows.values()))["methods"])
        organs = [o for o in ORGANS if o in self.rows]
        fig, axes = plt.subplots(len(organs), 2 + len(methods),
                                 figsize=(2.2 * (2 + len(methods)), 2.3 * len(organs)),
                                 squeeze=False)
        for r, organ in enumerate(organs):
            row = self.rows[organ]
            panels = [("support", row["support"], row["support_mask"], "tab:blue"),
                      ("query + truth", row["query"], row["truth"], "tab:green")]
            panels += [(m, row["query"], row["methods"].get(m, np.zeros_like(row["truth"])), "tab:red")
                       for m in methods]
            for c, (title, image, mask, colour) in enumerate(panels):
                ax = axes[r, c]
                ax.imshow(image, cmap="gray")
                if mask.any():
                    ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
                if c >= 2:
                    ax.contour(row["truth"].astype(float), levels=[0.5], colors=["tab:green"], linewidths=0.6,
                               linestyles="dotted")
                ax.set_title(f"{title}" if r else f"{title}", fontsize=8)
                ax.set_xticks([]), ax.set_yticks([])
            axes[r, 0].set_ylabel(f"{organ}\nscan {row['qid']} z {row['z']}", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        return path
