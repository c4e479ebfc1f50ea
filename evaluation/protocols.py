"""Volumetric protocol presets and their rules: organ range, chunk plan, mask copy, Dice.

One plan function per rule, all with the same signature and output (`chunk_plan` dispatches on the
preset's rule): 'inclusive' (this project's), 'official' (the authors' eval.py), 'senet' (the SENet
evaluator's pairing), 'alpnet' (SSL-ALPNet's validation.py). The rules are written out in docs/method.md
("The SENet volumetric protocol", "The official code's rules", "The SENet evaluator's own pairing", "The
SSL-ALPNet protocol"). Volumes are `X x Y x Z` (or SSL-ALPNet's `Y x X x Z`) with axial slices last.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.fewshot import MODEL_OPTIONS, PLUS_DEFAULTS
from util.errors import UserError
from util.options import BOOL, ORGANS, SNAPSHOTS, SUPPORT, Option, choice, integer, number


@dataclass(frozen=True)
class ProtocolPreset:
    """How a paper computes volumetric Dice."""
    name: str
    n_chunks: int
    threshold: int          # a slice is in the organ range when it has MORE than this many voxels
    aggregate: str          # 'mean' or 'median' over query volumes
    rule: str = "inclusive"  # a key of PLANS: organ range, chunks, support slices
    dice_smooth: float = 0.0  # added to numerator and denominator of the Dice
    dice_eps: float = 0.0     # added to the denominator only (SENet's evaluator: 1e-4)


PRESETS: dict[str, ProtocolPreset] = {
    "inclusive": ProtocolPreset("inclusive", n_chunks=12, threshold=200, aggregate="mean"),
    "official": ProtocolPreset("official", n_chunks=12, threshold=200, aggregate="mean", rule="official",
                               dice_smooth=0.001),
    "senet": ProtocolPreset("senet", n_chunks=10, threshold=10, aggregate="median", rule="senet",
                            dice_eps=1e-4),
    "alpnet": ProtocolPreset("alpnet", n_chunks=3, threshold=0, aggregate="mean", rule="alpnet"),
    "thirds": ProtocolPreset("thirds", n_chunks=3, threshold=1, aggregate="mean"),   # 3 inclusive chunks
}


def get_preset(name: str) -> ProtocolPreset:
    """The preset called `name`; a clear error for an unknown one."""
    if name not in PRESETS:
        raise UserError(f"protocol preset '{name}' is unknown: use one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ------------------------------------------------------------------------------------ organ ranges
def qualifying_slices(mask: np.ndarray, threshold: int) -> np.ndarray:
    """Sorted z of the axial slices with more than `threshold` voxels of a binary X x Y x Z mask."""
    counts = np.asarray(mask).reshape(-1, np.shape(mask)[-1]).astype(bool).sum(axis=0)  # Z
    return np.flatnonzero(counts > threshold)


def organ_range(organ_mask: np.ndarray, threshold: int) -> tuple[int, int] | None:
    """First and last axial slice (inclusive) with more than `threshold` organ voxels; None if none."""
    slices = qualifying_slices(organ_mask, threshold)
    if slices.size == 0:
        return None
    return int(slices[0]), int(slices[-1])


def preset_range(organ_mask: np.ndarray, preset: ProtocolPreset,
                 role: str = "support") -> tuple[int, int] | None:
    """The organ range (first, last), inclusive, under the preset's rule; None when empty. 'official':
    slices z = 0 .. Z-2 qualify, cropped to [first, last); 'senet' query: `query_crop`; else `organ_range`."""
    if preset.rule == "senet" and role == "query":
        return query_crop(organ_mask, preset.threshold)
    if preset.rule != "official":
        return organ_range(organ_mask, preset.threshold)
    found = organ_range(np.asarray(organ_mask)[..., :-1], preset.threshold)
    if found is None or found[1] - 1 < found[0]:
        return None
    return found[0], found[1] - 1


# ------------------------------------------------------------------- 'inclusive' and 'official'
def official_bounds(length: int, n_chunks: int) -> np.ndarray:
    """Chunk boundaries floor(i * L / n), i = 0..n, of the official eval.py. Shape: (n + 1,)."""
    return (np.arange(n_chunks + 1) * length) // n_chunks


def support_offsets(length: int, n_chunks: int) -> np.ndarray:
    """Offset of the middle slice of each support chunk: min(L-1, floor((i+0.5) L / n)). Shape: (n,)."""
    middles = np.floor((np.arange(n_chunks) + 0.5) * length / n_chunks).astype(int)
    return np.minimum(middles, length - 1)


def chunk_offsets(length: int, n_chunks: int, rule: str = "inclusive") -> np.ndarray:
    """Chunk index of every offset 0..L-1 of a query range under `rule` (inclusive: floor(j n / L)). (L,)"""
    if rule != "official":
        return (np.arange(length) * n_chunks) // length
    return np.searchsorted(official_bounds(length, n_chunks), np.arange(length), side="right") - 1


def centre_offsets(length: int, n_chunks: int, rule: str = "inclusive") -> np.ndarray:
    """Offset of the support slice of each chunk under `rule` (official: an empty chunk's start). (n,)"""
    if rule != "official":
        return support_offsets(length, n_chunks)
    bounds = official_bounds(length, n_chunks)
    return np.minimum(bounds[:-1] + (bounds[1:] - bounds[:-1]) // 2, length - 1)


def support_shot_offsets(length: int, n_chunks: int, n_shots: int = 1, rule: str = "inclusive") -> np.ndarray:
    """Offsets of the k support slices of each chunk (centre +- (k-1)//2, clipped). Shape: (n, k)."""
    if n_shots < 1:
        raise UserError(f"n_shots {n_shots} must be >= 1")
    centres = centre_offsets(length, n_chunks, rule)                             # n
    deltas = np.arange(n_shots) - (n_shots - 1) // 2                             # k
    return np.clip(centres[:, None] + deltas[None, :], 0, length - 1)            # n x k


def _range_plan(rule: str):
    def plan(support_ranges, query_range, n_chunks, n_shots=1, support_mask=None):
        """k slices of one support range around each chunk centre, or one shot per support range."""
        ranges = np.asarray(support_ranges, dtype=int)
        if ranges.ndim == 1:                                                             # one volume
            first, last = ranges
            shots = first + support_shot_offsets(last - first + 1, n_chunks, n_shots, rule)   # n x k
        else:                                                                            # one shot a volume
            assert n_shots == 1, "several support volumes: one shot each"
            shots = np.stack([first + centre_offsets(last - first + 1, n_chunks, rule)
                              for first, last in ranges], axis=1)                          # n x r
        chunk = chunk_offsets(query_range[1] - query_range[0] + 1, n_chunks, rule)       # query offsets
        return [(shots[i], query_range[0] + np.flatnonzero(chunk == i)) for i in np.unique(chunk)]
    return plan


inclusive_plan = _range_plan("inclusive")
official_plan = _range_plan("official")


# ---------------------------------------------------------------------------------------- 'senet'
SENET_THRESHOLD = 10


def support_indices(n_kept: int, n: int = 10) -> np.ndarray:
    """Indices into the kept support slices: round(linspace(0, Ns-1, n+1)) + (Ns//n)//2, first n."""
    indices = np.round(np.linspace(0, n_kept - 1, n + 1)).astype(int) + (n_kept // n) // 2
    return np.minimum(indices[:n], n_kept - 1)


def support_shots(mask: np.ndarray, n: int = 10, threshold: int = SENET_THRESHOLD,
                  n_shots: int = 1) -> np.ndarray | None:
    """Absolute z of each chunk's support slice(s), n x k; None when no slice qualifies."""
    kept = qualifying_slices(mask, threshold)
    if kept.size == 0:
        return None
    centres = support_indices(kept.size, n)                                        # n
    deltas = np.arange(n_shots) - (n_shots - 1) // 2                               # k
    return kept[np.clip(centres[:, None] + deltas[None, :], 0, kept.size - 1)]     # n x k


def query_crop(mask: np.ndarray, threshold: int = SENET_THRESHOLD) -> tuple[int, int] | None:
    """(first - 1, end of the first run of qualifying slices), inclusive; None when none qualifies."""
    kept = qualifying_slices(mask, threshold)
    if kept.size == 0:
        return None
    gaps = np.flatnonzero(np.diff(kept) > 1)
    return max(int(kept[0]) - 1, 0), int(kept[gaps[0]]) if gaps.size else int(kept[-1])


def query_chunks(length: int, n: int = 10) -> list[np.ndarray]:
    """Offsets 0..length-1 of the cropped query in n chunks: [q_i, q_{i+1}) and the last = [length-1]."""
    q = np.round(np.linspace(0, length - 1, n)).astype(int)
    return [np.arange(q[i], q[i + 1]) for i in range(n - 1)] + [np.array([length - 1])]


def senet_plan(support_ranges, query_range, n_chunks, n_shots=1, support_mask=None):
    """Rule 'senet': support slices by linspace over its qualifying slices, linspace query chunks."""
    shots = support_shots(support_mask, n_chunks, SENET_THRESHOLD, n_shots)        # n x k
    if shots is None:
        raise UserError(f"protocol rule 'senet': the support has no slice with more than {SENET_THRESHOLD} "
                        "organ voxels")
    chunks = query_chunks(query_range[1] - query_range[0] + 1, n_chunks)
    return [(shots[i], query_range[0] + offsets) for i, offsets in enumerate(chunks) if offsets.size]


# --------------------------------------------------------------------------------------- 'alpnet'
def organ_slice_list(mask: np.ndarray) -> np.ndarray:
    """Ascending z of a binary mask's slices with >= 1 voxel (SSL-ALPNet's classmap_1 rule)."""
    return qualifying_slices(mask, 0)


def percentiles(n_part: int = 3) -> np.ndarray:
    """SSL-ALPNet's support percentiles: (2i + 1) / (2 n_part), i = 0..n_part-1 (n_part must be odd)."""
    if n_part < 1 or n_part % 2 == 0:
        raise UserError(f"n_part {n_part}: SSL-ALPNet's support parts must be an odd number (3)")
    return (2 * np.arange(n_part) + 1) / (2 * n_part)


def support_positions(n_slices: int, n_part: int = 3) -> list[int]:
    """Positions int(pct * n) in the support's organ-slice list (14 -> 2, 7, 11; 2 -> 0, 1, 1)."""
    if n_slices < 1:
        raise UserError("support scan does not hold the organ (no slice): pick another support scan")
    return [int(p * n_slices) for p in percentiles(n_part)]


def support_slices(organ_slices, n_part: int = 3) -> list[int]:
    """The support z of each part: organ_slices[int(pct * |organ_slices|)]."""
    zs = list(organ_slices)
    return [int(zs[i]) for i in support_positions(len(zs), n_part)]


def query_parts(z_min: int, z_max: int, n_part: int = 3) -> np.ndarray:
    """Part of every z in z_min..z_max (inclusive): int((z - z_min) // ((z_max - z_min) / n)), clipped."""
    if z_max == z_min:
        return np.zeros(1, dtype=int)
    z = np.arange(z_min, z_max + 1)
    return np.clip(((z - z_min) // ((z_max - z_min) / n_part)).astype(int), 0, n_part - 1)


def alpnet_plan(support_ranges, query_range, n_chunks, n_shots=1, support_mask=None):
    """Rule 'alpnet': percentile support slices, thirds of the query's own range; 1 shot of one volume."""
    if n_shots != 1 or np.asarray(support_ranges).ndim != 1:
        raise UserError("protocol preset 'alpnet' is 1-shot from one support volume (SSL-ALPNet): set "
                        "eval.n_shots=1 and one eval.support")
    shots = support_slices(organ_slice_list(support_mask), n_chunks)
    parts = query_parts(query_range[0], query_range[1], n_chunks)
    zs = np.arange(query_range[0], query_range[1] + 1)
    return [(np.array([shots[p]]), zs[parts == p]) for p in range(n_chunks) if (parts == p).any()]


# ------------------------------------------------------------------------------------ the planner
PLANS = {"inclusive": inclusive_plan, "official": official_plan, "senet": senet_plan, "alpnet": alpnet_plan}


def chunk_plan(support_ranges, query_range: tuple[int, int], n_chunks: int, n_shots: int = 1,
               rule: str = "inclusive", support_mask: np.ndarray | None = None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The work of one query volume: per chunk holding query slices, (support z of its k shots (k,),
    query z (m,)), in chunk order. support_ranges: one range (k = n_shots slices of it) or one range per
    support volume (shot j from volume j); rules 'senet' and 'alpnet' need the support's organ mask."""
    return PLANS[rule](support_ranges, query_range, n_chunks, n_shots, support_mask)


def support_slices_for_query(support_range: tuple[int, int], query_range: tuple[int, int],
                             n_chunks: int, rule: str = "inclusive",
                             support_mask: np.ndarray | None = None) -> np.ndarray:
    """For each query slice z in query_range (inclusive), the support slice that segments it (1 shot)."""
    sources = np.empty(query_range[1] - query_range[0] + 1, dtype=int)
    for shots, query_z in chunk_plan(support_range, query_range, n_chunks, 1, rule, support_mask):
        sources[query_z - query_range[0]] = shots[0]
    return sources


def mask_copy(support_mask: np.ndarray, support_range: tuple[int, int], query_shape: tuple[int, ...],
              query_range: tuple[int, int], n_chunks: int, rule: str = "inclusive") -> np.ndarray:
    """The no-model baseline: each query slice gets its support slice's mask (nearest resize to the
    query's in-plane size); bool array of `query_shape`, 0 outside query_range."""
    prediction = np.zeros(query_shape, dtype=bool)
    sources = support_slices_for_query(support_range, query_range, n_chunks, rule, support_mask)
    for offset, support_z in enumerate(sources):
        prediction[..., query_range[0] + offset] = resize_nearest(support_mask[..., support_z],
                                                                  query_shape[:2])
    return prediction


def resize_nearest(mask_2d: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D mask to `shape` (pixel centres mapped, as torch 'nearest-exact')."""
    mask_2d = np.asarray(mask_2d)
    if mask_2d.shape == tuple(shape):
        return mask_2d.astype(bool)
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * mask_2d.shape[0] / shape[0]).astype(int),
                      mask_2d.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * mask_2d.shape[1] / shape[1]).astype(int),
                      mask_2d.shape[1] - 1)
    return mask_2d[np.ix_(rows, cols)].astype(bool)


# ---------------------------------------------------------------------------------------- scores
def dice(prediction: np.ndarray, target: np.ndarray, smooth: float = 0.0, eps: float = 0.0) -> float:
    """(2|P & T| + smooth) / (|P| + |T| + smooth + eps) of two binary masks; 1.0 when both are empty.
    `smooth` 0.001: the official eval.py (preset 'official'); `eps` 1e-4: the SENet evaluator's."""
    prediction, target = np.asarray(prediction).astype(bool), np.asarray(target).astype(bool)
    if prediction.shape != target.shape:
        raise ValueError(f"dice: prediction shape {prediction.shape} != target shape {target.shape}")
    denominator = int(prediction.sum()) + int(target.sum())
    if denominator == 0:
        return 1.0
    return (2.0 * int(np.logical_and(prediction, target).sum()) + smooth) / (denominator + smooth + eps)


def aggregate(values, how: str) -> float:
    """Mean or median of per-volume values (NaN when there are none)."""
    values = np.asarray(list(values), dtype=float)
    if values.size == 0:
        return float("nan")
    return float(values.mean()) if how == "mean" else float(np.median(values))


def summarise_folds(per_fold: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{organ: {"mean", "std", "n_folds"}} over folds of per-fold organ means (std: population, ddof 0)."""
    out = {}
    for organ in sorted({organ for values in per_fold.values() for organ in values}):
        values = np.array([per_fold[f][organ] for f in sorted(per_fold) if organ in per_fold[f]], float)
        values = values[np.isfinite(values)]
        out[organ] = {"mean": float(values.mean()) if values.size else float("nan"),
                      "std": float(values.std()) if values.size else float("nan"),
                      "n_folds": int(values.size)}
    return out


# test.py's eval.* options, checked once by training/config_check.py
EVAL_OPTIONS = {
    "preset": choice(*PRESETS),
    "support": Option(SUPPORT),
    "n_shots": integer(1, example="1"),
    "snapshots": Option(SNAPSHOTS),     # method name -> checkpoint: its entries are not config keys
    "organs": Option(ORGANS, nullable=True),
    "split": choice("gold", "val"),
    "batch_size": integer(1, example="16"),
    "save_predictions": Option(BOOL),
    "adapt_steps": integer(0, example="20"),
    "adapt_lr": number(0, low_open=True, example="1e-2"),
    # the LSLPN+ head options at test time, each checked as the model.* key of the same name
    **{f"head_options.{name}": MODEL_OPTIONS[name] for name in PLUS_DEFAULTS},
}
