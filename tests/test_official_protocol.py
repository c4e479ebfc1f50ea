"""Protocol preset 'official' (the authors' eval.py; docs/method.md, "The official code's rules"),
hand-worked cases, and the 'inclusive' preset kept as this project's rule."""
import numpy as np
import pytest

from evaluation.metrics import dice
from evaluation.protocol import (
    centre_offsets,
    chunk_offsets,
    chunk_plan,
    get_preset,
    mask_copy,
    official_bounds,
    preset_range,
    support_slices_for_query,
)


def test_presets_name_their_rule():
    official, inclusive = get_preset("official"), get_preset("inclusive")
    assert (official.n_chunks, official.threshold, official.aggregate) == (12, 200, "mean")
    assert (official.rule, official.dice_smooth) == ("official", 0.001)
    assert ((inclusive.rule, inclusive.dice_smooth, inclusive.n_chunks, inclusive.threshold)
            == ("inclusive", 0.0, 12, 200))


def test_official_chunks_of_24_slices():
    # floor(i * 24 / 12) = 2i: chunks of two slices, the support slice is element 2 // 2 = 1
    assert official_bounds(24, 12).tolist() == list(range(0, 25, 2))
    assert chunk_offsets(24, 12, "official").tolist() == [j // 2 for j in range(24)]
    assert centre_offsets(24, 12, "official").tolist() == [2 * i + 1 for i in range(12)]


def test_official_chunks_of_30_slices_differ_from_inclusive():
    # bounds floor(2.5 i) = 0 2 5 7 10 12 15 17 20 22 25 27 30
    assert official_bounds(30, 12).tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30]
    assert chunk_offsets(30, 12, "official")[:8].tolist() == [0, 0, 1, 1, 1, 2, 2, 3]
    assert chunk_offsets(30, 12, "inclusive")[:8].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # floor(12 j / 30)
    # middle element len // 2: [0,2) -> 1, [2,5) -> 3, [5,7) -> 6, [7,10) -> 8
    assert centre_offsets(30, 12, "official")[:4].tolist() == [1, 3, 6, 8]


def test_official_chunks_of_a_range_shorter_than_12():
    # L = 5: bounds floor(5 i / 12) = 0 0 0 1 1 2 2 2 3 3 4 4 5; non-empty chunks 2, 4, 7, 9, 11
    assert official_bounds(5, 12).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5]
    assert chunk_offsets(5, 12, "official").tolist() == [2, 4, 7, 9, 11]
    # support slice of each chunk; an empty chunk takes the slice where it would start
    assert centre_offsets(5, 12, "official").tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]


def test_official_plan_short_query_and_short_support():
    # support range 100..129 (S = 30), query range 40..44 (Q = 5): query chunks 2, 4, 7, 9, 11
    plan = chunk_plan((100, 129), (40, 44), 12, rule="official")
    assert [(int(s[0]), q.tolist()) for s, q in plan] == [(106, [40]), (111, [41]), (118, [42]),
                                                            (123, [43]), (128, [44])]
    # support S = 5 (10..14), query Q = 24: every query chunk of two slices; support chunks 0, 1
    # are empty (slice 10 where they start), chunk 2 is {10}, chunk 3 empty (starts at 11) ...
    sources = support_slices_for_query((10, 14), (0, 23), 12, "official")
    assert sources.tolist() == [10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 12, 12,
                                12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14]


def test_official_range_drops_the_last_volume_slice_and_the_last_range_slice():
    mask = np.zeros((4, 4, 12), bool)
    mask[..., 3:11] = True                      # 16 voxels in slices 3..10
    mask[..., 11] = True                        # and in the last slice of the volume
    official = get_preset("official")
    inclusive = get_preset("inclusive")
    official, inclusive = (type(p)(p.name, p.n_chunks, 10, p.aggregate, p.rule, p.dice_smooth)
                           for p in (official, inclusive))   # threshold 10 for a 16-voxel slice
    assert preset_range(mask, inclusive) == (3, 11)
    assert preset_range(mask, official) == (3, 9)         # z 0..10 qualify 3..10; [3, 10) -> 3..9
    one = np.zeros((4, 4, 6), bool)
    one[..., 2] = True
    assert preset_range(one, official) is None            # [2, 2) is empty
    assert preset_range(one, inclusive) == (2, 2)


def test_smoothed_dice():
    a = np.zeros((3, 3), bool)
    b = a.copy()
    b[0, 0] = True
    assert dice(a, a, 0.001) == 1.0
    assert dice(a, b, 0.001) == pytest.approx(0.001 / 1.001)
    c = b.copy()
    c[1, 1] = True
    assert dice(b, c, 0.001) == pytest.approx(2.001 / 3.001)
    assert dice(b, c) == pytest.approx(2 / 3)


def test_official_mask_copy():
    support = np.zeros((2, 2, 30), bool)
    for z in range(30):
        support[0, 0, z] = bool(z % 2)           # odd slices marked, to see which slice was copied
    copied = mask_copy(support, (0, 29), (2, 2, 30), (0, 29), 12, "official")
    centres = centre_offsets(30, 12, "official")[chunk_offsets(30, 12, "official")]
    assert copied[0, 0].tolist() == [bool(c % 2) for c in centres]
