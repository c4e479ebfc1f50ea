"""The volumetric protocol against hand-worked examples (evaluation/protocol.py, evaluation/metrics.py)."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import dice
from evaluation.protocol import (
    PRESETS,
    aggregate,
    chunk_of_offsets,
    chunk_plan,
    get_preset,
    mask_copy,
    organ_range,
    resize_nearest,
    support_offsets,
    support_shot_offsets,
    support_slices_for_query,
)
from util.errors import UserError


def _mask_with_counts(counts, shape_xy=(8, 8)):
    """X x Y x Z mask whose slice z holds counts[z] voxels (filled in raster order)."""
    mask = np.zeros(shape_xy + (len(counts),), dtype=bool)
    for z, count in enumerate(counts):
        flat = np.zeros(shape_xy[0] * shape_xy[1], dtype=bool)
        flat[:count] = True
        mask[:, :, z] = flat.reshape(shape_xy)
    return mask


def test_presets_match_the_papers():
    assert (PRESETS["inclusive"].n_chunks, PRESETS["inclusive"].threshold, PRESETS["inclusive"].aggregate) \
        == (12, 200, "mean")
    assert ((PRESETS["senet"].n_chunks, PRESETS["senet"].threshold, PRESETS["senet"].aggregate)
            == (10, 10, "median"))
    assert ((PRESETS["alpnet"].n_chunks, PRESETS["alpnet"].threshold, PRESETS["alpnet"].rule)
            == (3, 0, "alpnet"))
    assert ((PRESETS["thirds"].n_chunks, PRESETS["thirds"].threshold, PRESETS["thirds"].aggregate)
            == (3, 1, "mean"))
    with pytest.raises(UserError, match="inclusive"):
        get_preset("nnunet")
    # removed alias: one line naming its last commit
    with pytest.raises(UserError, match="b9c8bb5.*inclusive"):
        get_preset("lslpn")


def test_organ_range_threshold_is_strict_and_gaps_are_inside():
    # slice counts:       z=0 1  2  3  4  5  6  7
    mask = _mask_with_counts([0, 3, 5, 0, 0, 6, 2, 0])
    assert organ_range(mask, threshold=2) == (1, 5)    # 3, 5, 6 > 2; the gap at 3-4 is in the range
    assert organ_range(mask, threshold=5) == (5, 5)    # only 6 > 5 (5 is not MORE than 5)
    assert organ_range(mask, threshold=6) is None      # absent


def test_organ_range_touching_first_and_last_slice():
    mask = _mask_with_counts([4, 0, 0, 0, 4])
    assert organ_range(mask, threshold=1) == (0, 4)


def test_chunks_and_support_offsets_hand_worked():
    # L = 6, n = 3: floor(j * 3 / 6) = 0 0 1 1 2 2
    assert chunk_of_offsets(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    # L = 12, n = 3: floor((i + 0.5) * 4) = 2, 6, 10
    assert support_offsets(12, 3).tolist() == [2, 6, 10]
    # query range shorter than n_chunks: L = 5, n = 12: floor(j * 12 / 5) = 0 2 4 7 9
    assert chunk_of_offsets(5, 12).tolist() == [0, 2, 4, 7, 9]
    # support range shorter than n_chunks: floor((i + 0.5) * 5 / 12), neighbours share slices
    assert support_offsets(5, 12).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]
    assert support_offsets(1, 12).tolist() == [0] * 12


def test_support_slices_for_query_hand_worked():
    # support range 10..21 (L 12), query range 0..5 (L 6), 3 chunks: support z 12, 16, 20
    assert support_slices_for_query((10, 21), (0, 5), 3).tolist() == [12, 12, 16, 16, 20, 20]
    # query shorter than n: query 7..8 (L 2), support 0..11 (L 12), n 12: chunks 0 and 6 -> z 0 and 6
    assert support_slices_for_query((0, 11), (7, 8), 12).tolist() == [0, 6]


def test_chunk_plan_skips_empty_chunks_and_groups_query_slices():
    plan = chunk_plan((0, 11), (7, 8), 12)
    assert [(s.tolist(), q.tolist()) for s, q in plan] == [([0], [7]), ([6], [8])]
    plan = chunk_plan((10, 21), (0, 5), 3)
    assert [(s.tolist(), q.tolist()) for s, q in plan] == [([12], [0, 1]), ([16], [2, 3]), ([20], [4, 5])]
    # every query slice is in exactly one chunk
    plan = chunk_plan((3, 40), (5, 17), 12)
    assert sorted(np.concatenate([q for _, q in plan]).tolist()) == list(range(5, 18))


def test_chunk_plan_with_one_support_volume_per_shot():
    # centres of (0, 11) in 3 chunks: 2, 6, 10; of (10, 21): 12, 16, 20; shot j from volume j
    plan = chunk_plan([(0, 11), (10, 21)], (0, 5), 3)
    assert ([(s.tolist(), q.tolist()) for s, q in plan]
            == [([2, 12], [0, 1]), ([6, 16], [2, 3]), ([10, 20], [4, 5])])
    with pytest.raises(UserError, match="n_shots"):
        chunk_plan([(0, 11), (10, 21)], (0, 5), 3, n_shots=2)


def test_k_shot_offsets_around_chunk_centres_clipped():
    # L 12, n 3, k 3: centres 2, 6, 10 -> centre-1 .. centre+1
    assert support_shot_offsets(12, 3, 3).tolist() == [[1, 2, 3], [5, 6, 7], [9, 10, 11]]
    # k 2: centre and the next slice; L 3, n 1: centre 1 -> 1, 2
    assert support_shot_offsets(3, 1, 2).tolist() == [[1, 2]]
    # k 4 on a range of 3: centre 1, deltas -1..2 clipped to [0, 2]
    assert support_shot_offsets(3, 1, 4).tolist() == [[0, 1, 2, 2]]
    assert support_shot_offsets(12, 3, 1).tolist() == [[2], [6], [10]]
    with pytest.raises(UserError):
        support_shot_offsets(12, 3, 0)


def test_dice_against_a_hand_count():
    prediction = np.zeros((3, 3, 2), dtype=bool)
    target = np.zeros((3, 3, 2), dtype=bool)
    prediction[0, 0, 0] = prediction[1, 1, 0] = prediction[2, 2, 1] = True        # 3 voxels
    target[0, 0, 0] = target[1, 1, 0] = target[0, 1, 1] = target[1, 0, 1] = True  # 4 voxels, 2 shared
    assert dice(prediction, target) == pytest.approx(2 * 2 / 7)
    assert dice(np.zeros(4), np.zeros(4)) == 1.0
    assert dice(np.ones(4), np.zeros(4)) == 0.0


def test_mask_copy_of_a_volume_onto_itself_gives_dice_one():
    rng = np.random.default_rng(0)
    # a prism (same cross-section on every slice): any number of chunks copies it exactly
    prism = np.zeros((10, 9, 20), dtype=bool)
    prism[2:7, 3:8, 4:15] = True
    organ = organ_range(prism, 0)
    for n_chunks in (1, 3, 12):
        copied = mask_copy(prism, organ, prism.shape, organ, n_chunks)
        assert dice(copied, prism) == 1.0
    # any shape, one chunk per slice: slice j is copied from slice j
    blob = rng.random((10, 9, 7)) > 0.5
    blob[..., 0] = blob[..., -1] = True
    assert dice(mask_copy(blob, (0, 6), blob.shape, (0, 6), 7), blob) == 1.0


def test_mask_copy_hand_worked_and_zero_outside_range():
    support = np.zeros((4, 4, 6), dtype=bool)
    support[0, 0, 1] = True        # chunk 0 of support range 0..5 (n 2): middle offset floor(1.5) = 1
    support[3, 3, 4] = True        # chunk 1: middle offset floor(4.5) = 4
    copied = mask_copy(support, (0, 5), (4, 4, 8), (2, 5), 2)   # query slices 2,3 <- z1; 4,5 <- z4
    assert copied[0, 0, [2, 3]].all() and copied[3, 3, [4, 5]].all()
    assert copied.sum() == 4
    assert not copied[..., [0, 1, 6, 7]].any()


def test_resize_nearest_hand_worked():
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    assert resize_nearest(mask, (4, 4)).tolist() == np.kron(mask, np.ones((2, 2), dtype=bool)).tolist()


def test_aggregate_mean_and_median():
    assert aggregate([0.1, 0.2, 0.9], "mean") == pytest.approx(0.4)
    assert aggregate([0.1, 0.2, 0.9], "median") == pytest.approx(0.2)
    assert np.isnan(aggregate([], "mean"))


@pytest.mark.parametrize("rule, n_chunks", [("inclusive", 12), ("inclusive", 3), ("official", 12),
                                            ("senet", 10), ("alpnet", 3)])
def test_every_rule_plans_each_slice_of_the_query_range_once_first_and_last_included(rule, n_chunks):
    for length in range(1, 27):
        for support_length in (1, 5, 13, 30):
            support_mask = _mask_with_counts([0] * 4 + [20] * support_length + [0] * 3)
            support_range = (4, 3 + support_length)
            query_range = (2, 1 + length)
            plan = chunk_plan(support_range, query_range, n_chunks, rule=rule, support_mask=support_mask)
            planned = np.concatenate([query_z for _, query_z in plan]).tolist()
            assert sorted(planned) == list(range(query_range[0], query_range[1] + 1)), length
            assert all(support_range[0] <= z <= support_range[1] for shots, _ in plan for z in shots)
            sources = support_slices_for_query(support_range, query_range, n_chunks, rule, support_mask)
            assert len(sources) == length
