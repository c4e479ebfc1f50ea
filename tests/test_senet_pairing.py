"""The official SENet evaluator's pairing (evaluation/senet_pairing.py), hand-worked from the released
SENet evaluator (docs/method.md, "The SENet evaluator's own pairing")."""
from __future__ import annotations

import numpy as np

from evaluation.senet_pairing import plan, query_chunks, query_crop, support_indices, support_shots


def _mask(counts: dict[int, int], n_slices: int = 40) -> np.ndarray:
    """X x Y x Z mask with counts[z] voxels set in slice z (a 10 x 10 in-plane grid)."""
    mask = np.zeros((10, 10, n_slices), dtype=bool)
    for z, count in counts.items():
        mask.reshape(100, n_slices)[:count, z] = True
    return mask


def test_support_indices_by_hand():
    # Ns = 25: linspace(0, 24, 11) = 0 2.4 4.8 7.2 9.6 12 14.4 16.8 19.2 21.6 24 -> round 0 2 5 7 10 12 14 17
    # 19 22 24;
    # + (25 // 10) // 2 = 1; first 10 kept.
    assert support_indices(25).tolist() == [1, 3, 6, 8, 11, 13, 15, 18, 20, 23]
    # Ns = 6: 0 .5 1 1.5 2 2.5 3 3.5 4 4.5 5 -> np.round (halves to even) 0 0 1 2 2 2 3 4 4 4 5; + 0.
    assert support_indices(6).tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4]


def test_support_keeps_only_qualifying_slices():
    # Qualifying (> 10 voxels): z 10..14 and 17..21; z 15 has 10 voxels (not more), z 16 none.
    counts = {z: 30 for z in list(range(10, 15)) + list(range(17, 22))}
    counts[15] = 10
    shots = support_shots(_mask(counts))
    # Ns = 10: 0 .9 1.8 2.7 3.6 4.5 5.4 6.3 7.2 8.1 9 -> 0 1 2 3 4 4 5 6 7 8 (9); + (10//10)//2 = 0
    assert shots[:, 0].tolist() == [10, 11, 12, 13, 14, 14, 17, 18, 19, 20]
    assert support_shots(_mask(counts), n_shots=3)[0].tolist() == [10, 10, 11]   # clipped at the first kept
    assert support_shots(_mask({3: 10})) is None


def test_query_crop_by_hand():
    # qualifying 5..9, a gap at 10, again 11..12; z 3 has 5 voxels -> crop 4 .. 9
    counts = {3: 5, **{z: 20 for z in range(5, 10)}, 11: 20, 12: 20}
    assert query_crop(_mask(counts)) == (4, 9)
    assert query_crop(_mask({0: 20, 1: 20})) == (0, 1)          # no slice before 0
    assert query_crop(_mask({4: 11})) == (3, 4)
    assert query_crop(_mask({4: 10})) is None


def test_query_chunks_by_hand():
    # Nq = 23: linspace(0, 22, 10) = 0 2.44 4.89 7.33 9.78 12.2 14.7 17.1 19.6 22 -> 0 2 5 7 10 12 15 17 20 22
    chunks = [c.tolist() for c in query_chunks(23)]
    assert chunks == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9], [10, 11], [12, 13, 14], [15, 16], [17, 18, 19],
                      [20, 21], [22]]
    # Nq = 5: 0 .44 .89 1.33 1.78 2.22 2.67 3.11 3.56 4 -> 0 0 1 1 2 2 3 3 4 4
    assert [c.tolist() for c in query_chunks(5)] == [[], [0], [], [1], [], [2], [], [3], [], [4]]


def test_plan_pairs_chunks_with_support_slices():
    support = _mask({z: 30 for z in range(100, 125)}, n_slices=130)      # Ns = 25
    query = _mask({z: 30 for z in range(21, 25)}, n_slices=40)           # crop 20 .. 24, Nq = 5
    support_range, crop, pairs = plan(support, query)
    assert support_range == (100, 124) and crop == (20, 24)
    kept = 100 + np.array([1, 3, 6, 8, 11, 13, 15, 18, 20, 23])
    assert [(int(s[0]), q.tolist()) for s, q in pairs] == [
        (kept[1], [20]), (kept[3], [21]), (kept[5], [22]), (kept[7], [23]), (kept[9], [24])]
    assert plan(support, _mask({}, 40)) is None
