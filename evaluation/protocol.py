"""The SENet volumetric evaluation protocol as used by the paper (docs/method.md, "The SENet volumetric
protocol").

Volumes here are canonical arrays `X x Y x Z` with axial slices along the last axis (Z).
For one organ: its slice range in a volume is the set of axial slices with more than `threshold`
organ voxels, taken from the first to the last such slice (gaps inside are part of the range).
Support range and query range are each split into `n_chunks` chunks by relative position; the
middle slice of support chunk i segments every query slice of chunk i.

Chunk rule (stated once, used everywhere): a slice at offset j (0 <= j < L) of a range of length L
belongs to chunk floor(j * n / L). The slice that represents chunk i of a support range of length L
is offset min(L - 1, floor((i + 0.5) * L / n)). Both are defined for L < n too: then some chunks
hold no query slice, and neighbouring chunks may share a support slice.

k-shot (n_shots = k > 1): chunk i is represented by the k support slices at offsets
c + d for d = -(k-1)//2 ... k//2 around its centre offset c, clipped to the range [0, L-1]
(so near the ends, or for short ranges, a slice may repeat). k = 1 is the rule above.

Two rule sets (a preset names its own, and every results file names the preset):
- 'inclusive' (this project's rule above, presets 'inclusive' and 'thirds'): the range is
  first..last qualifying slice over all Z slices, inclusive; plain Dice. ('thirds': 3 chunks of this
  rule, an approximation of SSL-ALPNet's protocol.)
- 'official' (the authors' eval.py, docs/method.md, "The official code's rules"; preset 'official'):
  qualifying slices are looked for in z = 0 .. Z-2 only, and the range is cropped to [first, last)
  (the last qualifying slice is dropped); chunk i of a range of L slices is offsets floor(i L / n) ..
  floor((i + 1) L / n) - 1, its support slice the chunk's middle element (index len // 2); Dice
  smoothed, (2|A.B| + 0.001) / (|A| + |B| + 0.001). For L < n some chunks are empty; the
  official code would index an empty support chunk (an error) when its query chunk is not empty;
  we then take the support slice where the empty chunk starts, offset min(floor(i L / n), L - 1).
- 'senet' (the official SENet evaluator, docs/method.md, "The SENet evaluator's own pairing"; preset
  'senet'; evaluation/senet_pairing.py):
  10 support slices by linspace over the support's slices with > 10 organ voxels; the query cropped
  from 1 slice before its first such slice to the end of their first contiguous run, cut into chunks
  by linspace; Dice 2|A.B| / (|A| + |B| + 1e-4); median over query volumes. Its planner needs the
  support mask (`support_mask` arguments below), not only the support range.
- 'alpnet' (SSL-ALPNet's validation.py exactly, preset 'alpnet'; evaluation/alpnet_protocol.py): the
  organ range is the first..last slice with >= 1 voxel; support slice of part p = the support's
  organ-slice list at int(pct_p * count), pct = 1/6, 1/2, 5/6; query part of z =
  int((z - first) // ((last - first) / 3)) clipped to [0, 2]; plain 3D Dice over the query range; mean.
  1 shot of one support volume only. Its planner needs the support mask too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from evaluation import alpnet_protocol, senet_pairing
from util.errors import UserError


@dataclass(frozen=True)
class ProtocolPreset:
    """How a paper computes volumetric Dice."""
    name: str
    n_chunks: int
    threshold: int          # a slice is in the organ range when it has MORE than this many voxels
    aggregate: str          # 'mean' or 'median' over query volumes
    rule: str = "inclusive"  # 'inclusive' or 'official': organ range, chunks, Dice (module docstring)
    dice_smooth: float = 0.0  # added to numerator and denominator of the Dice
    dice_eps: float = 0.0     # added to the denominator only (SENet's evaluator: 1e-4)

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ProtocolPreset] = {
    "inclusive": ProtocolPreset("inclusive", n_chunks=12, threshold=200, aggregate="mean"),
    "official": ProtocolPreset("official", n_chunks=12, threshold=200, aggregate="mean", rule="official",
                               dice_smooth=0.001),
    "senet": ProtocolPreset("senet", n_chunks=10, threshold=10, aggregate="median", rule="senet",
                            dice_eps=1e-4),
    "alpnet": ProtocolPreset("alpnet", n_chunks=3, threshold=0, aggregate="mean", rule="alpnet"),
    "thirds": ProtocolPreset("thirds", n_chunks=3, threshold=1, aggregate="mean"),
}


def get_preset(name: str) -> ProtocolPreset:
    """The preset called `name`; a clear error for an unknown one."""
    if name not in PRESETS:
        raise UserError(f"protocol preset '{name}' is unknown: use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def organ_range(organ_mask: np.ndarray, threshold: int) -> tuple[int, int] | None:
    """First and last axial slice (inclusive) with more than `threshold` organ voxels.

    organ_mask: X x Y x Z binary. Returns None when no slice qualifies (organ absent).
    """
    counts = np.asarray(organ_mask).reshape(-1, organ_mask.shape[-1]).astype(bool).sum(axis=0)  # Z
    slices = np.flatnonzero(counts > threshold)
    if slices.size == 0:
        return None
    return int(slices[0]), int(slices[-1])


def preset_range(organ_mask: np.ndarray, preset: ProtocolPreset,
                 role: str = "support") -> tuple[int, int] | None:
    """The organ range (first, last), inclusive, under the preset's rule; None when empty.

    'official': slices z = 0 .. Z-2 with more than `threshold` voxels, cropped to [first, last).
    'senet': role 'query' gives SENet's query crop (senet_pairing.query_crop); role 'support' the
    first and last qualifying slice (its support slices come from the mask: `chunk_plan`).
    """
    if preset.rule == "senet" and role == "query":
        return senet_pairing.query_crop(organ_mask, preset.threshold)
    if preset.rule != "official":
        return organ_range(organ_mask, preset.threshold)
    found = organ_range(np.asarray(organ_mask)[..., :-1], preset.threshold)
    if found is None or found[1] - 1 < found[0]:
        return None
    return found[0], found[1] - 1


def official_bounds(length: int, n_chunks: int) -> np.ndarray:
    """Chunk boundaries floor(i * L / n), i = 0..n, of the official eval.py. Shape: (n + 1,)."""
    if length < 1 or n_chunks < 1:
        raise ValueError(f"range length {length} and n_chunks {n_chunks} must both be >= 1")
    return (np.arange(n_chunks + 1) * length) // n_chunks


def chunk_offsets(length: int, n_chunks: int, rule: str = "inclusive") -> np.ndarray:
    """Chunk index of every offset 0..L-1 of a query range under `rule`. Shape: (L,)."""
    if rule != "official":
        return chunk_of_offsets(length, n_chunks)
    return np.searchsorted(official_bounds(length, n_chunks), np.arange(length), side="right") - 1


def centre_offsets(length: int, n_chunks: int, rule: str = "inclusive") -> np.ndarray:
    """Offset of the support slice of each chunk under `rule`. Shape: (n,)."""
    if rule != "official":
        return support_offsets(length, n_chunks)
    bounds = official_bounds(length, n_chunks)
    return np.minimum(bounds[:-1] + (bounds[1:] - bounds[:-1]) // 2, length - 1)


def chunk_of_offsets(length: int, n_chunks: int) -> np.ndarray:
    """Chunk index of every offset 0..length-1 of a range: floor(j * n / L). Shape: (length,)."""
    if length < 1 or n_chunks < 1:
        raise ValueError(f"range length {length} and n_chunks {n_chunks} must both be >= 1")
    return (np.arange(length) * n_chunks) // length


def support_offsets(length: int, n_chunks: int) -> np.ndarray:
    """Offset of the middle slice of each support chunk: min(L-1, floor((i+0.5) L / n)). Shape: (n,)."""
    if length < 1 or n_chunks < 1:
        raise ValueError(f"range length {length} and n_chunks {n_chunks} must both be >= 1")
    middles = np.floor((np.arange(n_chunks) + 0.5) * length / n_chunks).astype(int)
    return np.minimum(middles, length - 1)


def support_shot_offsets(length: int, n_chunks: int, n_shots: int = 1, rule: str = "inclusive") -> np.ndarray:
    """Offsets of the k support slices of each chunk (centre +- (k-1)//2, clipped). Shape: (n, k)."""
    if n_shots < 1:
        raise UserError(f"n_shots {n_shots} must be >= 1")
    centres = centre_offsets(length, n_chunks, rule)                             # n
    deltas = np.arange(n_shots) - (n_shots - 1) // 2                             # k
    return np.clip(centres[:, None] + deltas[None, :], 0, length - 1)            # n x k


def chunk_plan(support_ranges, query_range: tuple[int, int], n_chunks: int,
               n_shots: int = 1, rule: str = "inclusive",
               support_mask: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The work of one query volume (the one chunk planner): for every chunk holding at least one
    query slice, (support z of its k shots (k,), absolute query z of its slices (m,)), in chunk order.

    support_ranges: one support organ range (first, last): its k = n_shots slices around each chunk
    centre are the shots (all from that one volume); or a list of r ranges, one per support volume:
    shot j is the chunk centre of volume j (k = r, n_shots must be 1).
    Chunks without query slices (query range shorter than n_chunks) are left out. `rule`:
    'inclusive' or 'official' chunking, or 'senet' (module docstring; needs `support_mask`,
    the X x Y x Z organ mask of the one support volume).
    """
    if rule == "senet":
        return _senet_plan(support_mask, query_range, n_chunks, n_shots)
    if rule == "alpnet":
        return _alpnet_plan(support_mask, support_ranges, query_range, n_chunks, n_shots)
    ranges = np.asarray(support_ranges, dtype=int)
    if ranges.ndim == 1:                                                               # one support volume
        first, last = ranges
        shots = first + support_shot_offsets(last - first + 1, n_chunks, n_shots, rule)  # n x k
    else:                                                                              # one shot per volume
        if n_shots != 1:
            raise UserError(f"n_shots {n_shots} with {len(ranges)} support volumes: give one volume per shot "
                            "or one volume with n_shots")
        shots = np.stack([first + centre_offsets(last - first + 1, n_chunks, rule)
                          for first, last in ranges], axis=1)                            # n x r
    query_length = query_range[1] - query_range[0] + 1
    chunk = chunk_offsets(query_length, n_chunks, rule)                                # query offsets
    plan = []
    for index in np.unique(chunk):
        plan.append((shots[index], query_range[0] + np.flatnonzero(chunk == index)))
    return plan


def _senet_plan(support_mask, query_range: tuple[int, int], n_chunks: int,
                n_shots: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """chunk_plan of rule 'senet' (evaluation/senet_pairing.py) for a query range (its crop)."""
    if support_mask is None:
        raise UserError("protocol rule 'senet' needs the support mask: pass support_mask to chunk_plan")
    shots = senet_pairing.support_shots(support_mask, n_chunks, senet_pairing.THRESHOLD, n_shots)  # n x k
    if shots is None:
        raise UserError("protocol rule 'senet': the support has no slice with more than "
                        f"{senet_pairing.THRESHOLD} organ voxels")
    chunks = senet_pairing.query_chunks(query_range[1] - query_range[0] + 1, n_chunks)
    return [(shots[i], query_range[0] + offsets) for i, offsets in enumerate(chunks) if offsets.size]


def _alpnet_plan(support_mask, support_ranges, query_range: tuple[int, int], n_chunks: int,
                 n_shots: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """chunk_plan of rule 'alpnet' (evaluation/alpnet_protocol.py): percentile support slices, query
    thirds."""
    if support_mask is None:
        raise UserError("protocol rule 'alpnet' needs the support mask: pass support_mask to chunk_plan")
    if n_shots != 1 or np.asarray(support_ranges).ndim != 1:
        raise UserError("protocol preset 'alpnet' is 1-shot from one support volume (SSL-ALPNet): set "
                        "eval.n_shots=1 and one eval.support")
    shots = alpnet_protocol.support_slices(alpnet_protocol.organ_slice_list(support_mask), n_chunks)
    parts = alpnet_protocol.query_parts(query_range[0], query_range[1], n_chunks)
    zs = np.arange(query_range[0], query_range[1] + 1)
    return [(np.array([shots[p]]), zs[parts == p]) for p in range(n_chunks) if (parts == p).any()]


def aggregate(values, how: str) -> float:
    """Mean or median of per-volume values (NaN when there are none)."""
    values = np.asarray(list(values), dtype=float)
    if values.size == 0:
        return float("nan")
    if how == "mean":
        return float(values.mean())
    if how == "median":
        return float(np.median(values))
    raise UserError(f"aggregate '{how}' is unknown: use 'mean' or 'median'")


def support_slices_for_query(support_range: tuple[int, int], query_range: tuple[int, int],
                             n_chunks: int, rule: str = "inclusive",
                             support_mask: np.ndarray | None = None) -> np.ndarray:
    """For each query slice z in query_range (inclusive), the support slice that segments it.

    Returns an int array of length (query_range[1] - query_range[0] + 1), absolute support z.
    Rule 'senet' needs `support_mask` (the X x Y x Z organ mask of the support volume).
    """
    if rule in ("senet", "alpnet"):
        sources = np.empty(query_range[1] - query_range[0] + 1, dtype=int)
        plan = _senet_plan(support_mask, query_range, n_chunks, 1) if rule == "senet" else \
            _alpnet_plan(support_mask, support_range, query_range, n_chunks, 1)
        for shots, query_z in plan:
            sources[query_z - query_range[0]] = shots[0]
        return sources
    support_length = support_range[1] - support_range[0] + 1
    query_length = query_range[1] - query_range[0] + 1
    chunk = chunk_offsets(query_length, n_chunks, rule)                          # query offsets -> chunk
    return support_range[0] + centre_offsets(support_length, n_chunks, rule)[chunk]


def mask_copy(support_mask: np.ndarray, support_range: tuple[int, int], query_shape: tuple[int, ...],
              query_range: tuple[int, int], n_chunks: int, rule: str = "inclusive") -> np.ndarray:
    """The no-model baseline: copy the support chunk's mask onto each query slice of that chunk.

    support_mask: X x Y x Z binary (support volume). The copied slice is resized with nearest
    neighbour to the query's in-plane size when the two differ. Slices outside query_range are 0.
    Returns a bool array of `query_shape`.
    """
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
