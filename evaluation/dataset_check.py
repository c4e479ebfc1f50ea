"""The mask-copy honesty check (docs/method.md "Mask copy"): a data set on which copying the support's
mask scores high does not test few-shot segmentation (the folder itself: dataloaders.prepared.check_folder).
"""
from __future__ import annotations

import numpy as np

from dataloaders.organs import NAME_TO_INDEX, TABLE_COLUMNS, TEST_ORGANS
from dataloaders.prepared import default_support
from evaluation.protocols import dice, get_preset, mask_copy, preset_range
from util.errors import UserError

DEFAULT_PRESET = "inclusive"


def mask_copy_dice(labels: dict[str, np.ndarray], support: str | None = None, preset: str = DEFAULT_PRESET,
                   organs: list[str] | None = None) -> dict[str, dict]:
    """{organ: {"mean", "median", "n", "per_query": {pid: dice}}} of copying the support's mask to each
    other volume (labels: {pid: X x Y x Z uint8}), 3D over the query's organ range; no range: not scored."""
    rule = get_preset(preset)
    support = support or default_support(list(labels))
    if support not in labels:
        raise UserError(f"support volume {support} not among {', '.join(sorted(labels))}: pick one of them")
    results = {}
    for organ in organs or TEST_ORGANS:
        index = NAME_TO_INDEX[organ]
        support_mask = labels[support] == index
        support_range = preset_range(support_mask, rule)
        per_query = {}
        for pid, label in sorted(labels.items()):
            query_mask = label == index
            query_range = None if pid == support or support_range is None else \
                preset_range(query_mask, rule, role="query")
            if query_range is None:
                continue
            prediction = mask_copy(support_mask, support_range, query_mask.shape, query_range, rule.n_chunks,
                                   rule.rule)
            z = slice(query_range[0], query_range[1] + 1)
            per_query[pid] = dice(prediction[..., z], query_mask[..., z], rule.dice_smooth, rule.dice_eps)
        values = list(per_query.values())
        results[organ] = {"mean": float(np.mean(values)) if values else float("nan"),
                          "median": float(np.median(values)) if values else float("nan"),
                          "n": len(values), "per_query": per_query}
    return results


def format_mask_copy(results: dict[str, dict], support: str, preset: str) -> str:
    """A `mask_copy_dice` result per organ side, then the README table's organs (kidney, psoas: the mean
    of their scored sides) and their mean."""
    lines = [f"mask-copy Dice (no model; support {support}, preset {preset}, mean over query volumes):"]
    for organ, result in results.items():
        lines.append(f"  {organ:<14} {result['mean']:.3f}  (median {result['median']:.3f}, n={result['n']})")
    columns = {}
    for column, sides in TABLE_COLUMNS.items():
        values = [results[side]["mean"] for side in sides
                  if side in results and np.isfinite(results[side]["mean"])]
        if values:
            columns[column] = float(np.mean(values))
    if columns:
        lines.append("  organs as in the README table (kidney, psoas: mean of right and left): "
                     + ", ".join(f"{column} {value:.3f}" for column, value in columns.items()))
        mean = np.mean(list(columns.values()))
        lines.append(f"  {'mean':<14} {mean:.3f}  (mean of the {len(columns)} organs {', '.join(columns)}, "
                     "each side pair counted once)")
    return "\n".join(lines)
