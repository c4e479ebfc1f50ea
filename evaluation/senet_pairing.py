"""The official SENet evaluator's slice pairing (docs/method.md, "The SENet evaluator's own pairing").

Volumes are canonical `X x Y x Z` arrays with axial slices along the last axis; "qualifying" slices
hold MORE than `threshold` (10) organ voxels.
- Support: only its qualifying slices are kept, Ns of them (in z order). The support slices are the
  kept slices at indices round(linspace(0, Ns-1, n+1)) + (Ns // n) // 2, the first n kept (n = 10),
  i.e. roughly the middle slice of each of n chunks (np.round: halves to even). Indices are clipped
  to Ns - 1 (only reachable for Ns < n).
- Query: cropped from 1 slice before its first qualifying slice to the end of the first contiguous
  run of qualifying slices (inclusive; the start is clipped at slice 0). This is the official crop
  under torch < 1.2 (the released code computes it on transitions a[i] != a[i+1]). A gap inside the organ
  ends the crop.
- Pairing: q = round(linspace(0, Nq-1, n)) over the Nq cropped query slices; query chunk i =
  offsets [q_i, q_{i+1}) for i < n-1, paired with support slice i; the last chunk is the single
  offset Nq - 1, paired with support slice n - 1. Chunks left empty (Nq < n) are dropped.
- Dice on the cropped query: 2|P & G| / (|P| + |G| + 1e-4) (evaluation.metrics.dice with eps);
  the median over query volumes per organ.
k > 1 shots (not in the official evaluator): the kept slices at index +- (k-1)//2 around each
support index, clipped to the kept slices (the chunk rule's k-shot rule of evaluation/protocol.py).
"""
from __future__ import annotations

import numpy as np

N_SLICES = 10
THRESHOLD = 10
DICE_EPS = 1e-4


def qualifying_slices(mask: np.ndarray, threshold: int = THRESHOLD) -> np.ndarray:
    """Sorted z of the axial slices with more than `threshold` voxels of a binary X x Y x Z mask."""
    counts = np.asarray(mask).reshape(-1, np.shape(mask)[-1]).astype(bool).sum(axis=0)  # Z
    return np.flatnonzero(counts > threshold)


def support_indices(n_kept: int, n: int = N_SLICES) -> np.ndarray:
    """Indices into the kept support slices: round(linspace(0, Ns-1, n+1)) + (Ns//n)//2, first n."""
    if n_kept < 1:
        raise ValueError("the support has no qualifying slice")
    indices = np.round(np.linspace(0, n_kept - 1, n + 1)).astype(int) + (n_kept // n) // 2
    return np.minimum(indices[:n], n_kept - 1)


def support_shots(mask: np.ndarray, n: int = N_SLICES, threshold: int = THRESHOLD,
                  n_shots: int = 1) -> np.ndarray | None:
    """Absolute z of each chunk's support slice(s), n x k; None when no slice qualifies."""
    kept = qualifying_slices(mask, threshold)
    if kept.size == 0:
        return None
    centres = support_indices(kept.size, n)                                        # n
    deltas = np.arange(n_shots) - (n_shots - 1) // 2                               # k
    return kept[np.clip(centres[:, None] + deltas[None, :], 0, kept.size - 1)]     # n x k


def query_crop(mask: np.ndarray, threshold: int = THRESHOLD) -> tuple[int, int] | None:
    """(first - 1, end of the first run of qualifying slices), inclusive; None when none qualifies."""
    kept = qualifying_slices(mask, threshold)
    if kept.size == 0:
        return None
    first = int(kept[0])
    gaps = np.flatnonzero(np.diff(kept) > 1)
    run_end = int(kept[gaps[0]]) if gaps.size else int(kept[-1])
    return max(first - 1, 0), run_end


def query_chunks(length: int, n: int = N_SLICES) -> list[np.ndarray]:
    """Offsets 0..length-1 of the cropped query in n chunks: [q_i, q_{i+1}) and the last = [length-1]."""
    if length < 1:
        raise ValueError("the query crop is empty")
    q = np.round(np.linspace(0, length - 1, n)).astype(int)
    chunks = [np.arange(q[i], q[i + 1]) for i in range(n - 1)]
    chunks.append(np.array([length - 1]))
    return chunks


def plan(support_mask: np.ndarray, query_mask: np.ndarray, n: int = N_SLICES, threshold: int = THRESHOLD,
         n_shots: int = 1) -> tuple[tuple[int, int], tuple[int, int],
                                    list[tuple[np.ndarray, np.ndarray]]] | None:
    """(support range, query crop, [(support z (k,), query z (m,)) per non-empty chunk]).

    The support range (first and last qualifying slice) is for records and figures only.
    None when the organ qualifies in neither the support nor the query.
    """
    shots = support_shots(support_mask, n, threshold, n_shots)
    crop = query_crop(query_mask, threshold)
    if shots is None or crop is None:
        return None
    kept = qualifying_slices(support_mask, threshold)
    pairs = [(shots[i], crop[0] + offsets)
             for i, offsets in enumerate(query_chunks(crop[1] - crop[0] + 1, n)) if offsets.size]
    return (int(kept[0]), int(kept[-1])), crop, pairs
