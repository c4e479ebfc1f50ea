"""Dataset checks: the prepared-folder checker and the mask-copy honesty check.

`check_prepared(prep_dir)` verifies a PREP folder (DESIGN.md "Prepared data folder"): files, shapes,
dtypes, label values, splits and index consistency. Any defect is a one-line UserError that names
the file and the fix; on success it returns a per-class summary (`format_table` prints it).

`mask_copy_dice(labels, support)` is the no-model baseline of method.md section 5: the support
volume's organ mask is copied chunk by chunk onto every query volume (util.protocol.mask_copy).
A data set on which it scores high does not test few-shot segmentation.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dataloaders.organs import INDEX_TO_NAME, NAME_TO_INDEX, TEST_ORGANS
from util.errors import UserError
from util.metrics import dice
from util.protocol import get_preset, mask_copy, organ_range

DEFAULT_SUPPORT = "10000132"
VOLUME_KEYS = ("image", "label", "affine", "original_affine", "original_shape", "original_axcodes", "spacing")


def default_support(pids: list[str]) -> str:
    """The paper's support volume 10000132 when present, else the first patient id in sorted order."""
    return DEFAULT_SUPPORT if DEFAULT_SUPPORT in pids else sorted(pids)[0]


def mask_copy_dice(labels: dict[str, np.ndarray], support: str | None = None, preset: str = "lslpn",
                   organs: list[str] | None = None) -> dict[str, dict]:
    """Mask-copy Dice per organ over the query volumes (all volumes but the support).

    labels: {pid: X x Y x Z uint8 canonical label volume}. Dice is 3D over each query's organ range
    (the protocol's scoring). Returns {organ: {"mean": float or nan, "median": ..., "n": queries
    scored, "per_query": {pid: dice}}}; a volume where the organ has no range is not scored.
    """
    rule = get_preset(preset)
    support = support or default_support(list(labels))
    if support not in labels:
        raise UserError(f"support volume {support} not among {', '.join(sorted(labels))}: pick one of them")
    results = {}
    for organ in organs or TEST_ORGANS:
        index = NAME_TO_INDEX[organ]
        support_mask = labels[support] == index
        support_range = organ_range(support_mask, rule.threshold)
        per_query = {}
        for pid, label in sorted(labels.items()):
            if pid == support or support_range is None:
                continue
            query_mask = label == index
            query_range = organ_range(query_mask, rule.threshold)
            if query_range is None:
                continue
            prediction = mask_copy(support_mask, support_range, query_mask.shape, query_range, rule.n_chunks)
            z = slice(query_range[0], query_range[1] + 1)
            per_query[pid] = dice(prediction[..., z], query_mask[..., z])
        values = list(per_query.values())
        results[organ] = {"mean": float(np.mean(values)) if values else float("nan"),
                          "median": float(np.median(values)) if values else float("nan"),
                          "n": len(values), "per_query": per_query}
    return results


def format_mask_copy(results: dict[str, dict], support: str, preset: str) -> str:
    """Human-readable lines of a `mask_copy_dice` result."""
    lines = [f"mask-copy Dice (no model; support {support}, preset {preset}, mean over query volumes):"]
    for organ, result in results.items():
        lines.append(f"  {organ:<14} {result['mean']:.3f}  (median {result['median']:.3f}, n={result['n']})")
    means = [r["mean"] for r in results.values() if np.isfinite(r["mean"])]
    if means:
        lines.append(f"  {'mean':<14} {np.mean(means):.3f}")
    return "\n".join(lines)
