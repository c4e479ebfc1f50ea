"""The protocol presets' rules (evaluation/protocols.py) against hand-worked examples and slow literal
references: 'inclusive', 'official' (the authors' eval.py), 'senet' (the SENet evaluator's pairing) and
'alpnet' (SSL-ALPNet's validation loop); Dice and aggregation."""
from __future__ import annotations

import numpy as np
import pytest

from dataloaders.organs import NAME_TO_INDEX
from evaluation.dataset_check import mask_copy_dice
from evaluation.protocols import (
    aggregate,
    centre_offsets,
    chunk_offsets,
    chunk_plan,
    dice,
    get_preset,
    mask_copy,
    official_bounds,
    organ_range,
    organ_slice_list,
    percentiles,
    preset_range,
    query_chunks,
    query_crop,
    query_parts,
    resize_nearest,
    summarise_folds,
    support_indices,
    support_offsets,
    support_positions,
    support_shot_offsets,
    support_shots,
    support_slices,
    support_slices_for_query,
)
from util.errors import UserError


# ------------------------------------------------------------------------------ 'inclusive', Dice
def _mask_with_counts(counts, shape_xy=(8, 8)):
    """X x Y x Z mask whose slice z holds counts[z] voxels (filled in raster order)."""
    mask = np.zeros(shape_xy + (len(counts),), dtype=bool)
    for z, count in enumerate(counts):
        flat = np.zeros(shape_xy[0] * shape_xy[1], dtype=bool)
        flat[:count] = True
        mask[:, :, z] = flat.reshape(shape_xy)
    return mask


def test_presets_match_the_papers():
    def fields(name, *keys):
        return tuple(getattr(get_preset(name), key) for key in keys)
    rules = ("n_chunks", "threshold", "aggregate", "rule")
    assert fields("inclusive", *rules, "dice_smooth") == (12, 200, "mean", "inclusive", 0.0)
    assert fields("official", *rules, "dice_smooth") == (12, 200, "mean", "official", 0.001)
    assert fields("senet", *rules, "dice_eps") == (10, 10, "median", "senet", 1e-4)
    assert fields("alpnet", "n_chunks", "threshold", "rule") == (3, 0, "alpnet")
    assert fields("thirds", "n_chunks", "threshold", "aggregate") == (3, 1, "mean")
    with pytest.raises(UserError, match="inclusive"):
        get_preset("nnunet")


def test_organ_range_threshold_is_strict_gaps_inside_and_the_first_and_last_slice():
    # slice counts:       z=0 1  2  3  4  5  6  7
    mask = _mask_with_counts([0, 3, 5, 0, 0, 6, 2, 0])
    assert organ_range(mask, threshold=2) == (1, 5)    # 3, 5, 6 > 2; the gap at 3-4 is in the range
    assert organ_range(mask, threshold=5) == (5, 5)    # only 6 > 5 (5 is not MORE than 5)
    assert organ_range(mask, threshold=6) is None      # absent
    mask = _mask_with_counts([4, 0, 0, 0, 4])
    assert organ_range(mask, threshold=1) == (0, 4)


def test_chunks_support_offsets_and_chunk_plans_hand_worked():
    # L = 6, n = 3: floor(j * 3 / 6) = 0 0 1 1 2 2
    assert chunk_offsets(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    # L = 12, n = 3: floor((i + 0.5) * 4) = 2, 6, 10
    assert support_offsets(12, 3).tolist() == [2, 6, 10]
    # query range shorter than n_chunks: L = 5, n = 12: floor(j * 12 / 5) = 0 2 4 7 9
    assert chunk_offsets(5, 12).tolist() == [0, 2, 4, 7, 9]
    # support range shorter than n_chunks: floor((i + 0.5) * 5 / 12), neighbours share slices
    assert support_offsets(5, 12).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]
    assert support_offsets(1, 12).tolist() == [0] * 12
    # query shorter than n: query 7..8 (L 2), support 0..11 (L 12), n 12: chunks 0 and 6 -> z 0 and 6
    plan = chunk_plan((0, 11), (7, 8), 12)
    assert [(s.tolist(), q.tolist()) for s, q in plan] == [([0], [7]), ([6], [8])]
    # support range 10..21 (L 12), query range 0..5 (L 6), 3 chunks: support z 12, 16, 20
    plan = chunk_plan((10, 21), (0, 5), 3)
    assert [(s.tolist(), q.tolist()) for s, q in plan] == [([12], [0, 1]), ([16], [2, 3]), ([20], [4, 5])]


def test_chunk_plan_with_one_support_volume_per_shot():
    # centres of (0, 11) in 3 chunks: 2, 6, 10; of (10, 21): 12, 16, 20; shot j from volume j
    plan = chunk_plan([(0, 11), (10, 21)], (0, 5), 3)
    assert ([(s.tolist(), q.tolist()) for s, q in plan]
            == [([2, 12], [0, 1]), ([6, 16], [2, 3]), ([10, 20], [4, 5])])


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


def test_dice_against_a_hand_count_and_smoothed():
    prediction = np.zeros((3, 3, 2), dtype=bool)
    target = np.zeros((3, 3, 2), dtype=bool)
    prediction[0, 0, 0] = prediction[1, 1, 0] = prediction[2, 2, 1] = True        # 3 voxels
    target[0, 0, 0] = target[1, 1, 0] = target[0, 1, 1] = target[1, 0, 1] = True  # 4 voxels, 2 shared
    assert dice(prediction, target) == pytest.approx(2 * 2 / 7)
    assert dice(np.zeros(4), np.zeros(4)) == 1.0
    assert dice(np.ones(4), np.zeros(4)) == 0.0
    b = np.zeros((3, 3), bool)                                    # smoothed (the official eval.py's 0.001)
    b[0, 0] = True
    assert dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool), 0.001) == 1.0
    assert dice(np.zeros((3, 3), bool), b, 0.001) == pytest.approx(0.001 / 1.001)
    c = b.copy()
    c[1, 1] = True
    assert dice(b, c, 0.001) == pytest.approx(2.001 / 3.001)


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


def test_mask_copy_hand_worked_zero_outside_range_and_nearest_resize():
    support = np.zeros((4, 4, 6), dtype=bool)
    support[0, 0, 1] = True        # chunk 0 of support range 0..5 (n 2): middle offset floor(1.5) = 1
    support[3, 3, 4] = True        # chunk 1: middle offset floor(4.5) = 4
    copied = mask_copy(support, (0, 5), (4, 4, 8), (2, 5), 2)   # query slices 2,3 <- z1; 4,5 <- z4
    assert copied[0, 0, [2, 3]].all() and copied[3, 3, [4, 5]].all()
    assert copied.sum() == 4
    assert not copied[..., [0, 1, 6, 7]].any()
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    assert resize_nearest(mask, (4, 4)).tolist() == np.kron(mask, np.ones((2, 2), dtype=bool)).tolist()


def test_aggregate_mean_and_median():
    assert aggregate([0.1, 0.2, 0.9], "mean") == pytest.approx(0.4)
    assert aggregate([0.1, 0.2, 0.9], "median") == pytest.approx(0.2)
    assert np.isnan(aggregate([], "mean"))


# -------------------------------------------------------------------------------------- 'official'
def test_official_chunks_of_24_30_and_fewer_than_12_slices():
    # floor(i * 24 / 12) = 2i: chunks of two slices, the support slice is element 2 // 2 = 1
    assert official_bounds(24, 12).tolist() == list(range(0, 25, 2))
    assert chunk_offsets(24, 12, "official").tolist() == [j // 2 for j in range(24)]
    assert centre_offsets(24, 12, "official").tolist() == [2 * i + 1 for i in range(12)]
    # bounds floor(2.5 i) = 0 2 5 7 10 12 15 17 20 22 25 27 30
    assert official_bounds(30, 12).tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30]
    assert chunk_offsets(30, 12, "official")[:8].tolist() == [0, 0, 1, 1, 1, 2, 2, 3]
    assert chunk_offsets(30, 12, "inclusive")[:8].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # floor(12 j / 30)
    # middle element len // 2: [0,2) -> 1, [2,5) -> 3, [5,7) -> 6, [7,10) -> 8
    assert centre_offsets(30, 12, "official")[:4].tolist() == [1, 3, 6, 8]
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


def test_official_mask_copy():
    support = np.zeros((2, 2, 30), bool)
    for z in range(30):
        support[0, 0, z] = bool(z % 2)           # odd slices marked, to see which slice was copied
    copied = mask_copy(support, (0, 29), (2, 2, 30), (0, 29), 12, "official")
    centres = centre_offsets(30, 12, "official")[chunk_offsets(30, 12, "official")]
    assert copied[0, 0].tolist() == [bool(c % 2) for c in centres]


# ----------------------------------------------------------------------------------------- 'senet'
def _senet_mask(counts: dict[int, int], n_slices: int = 40) -> np.ndarray:
    """X x Y x Z mask with counts[z] voxels set in slice z (a 10 x 10 in-plane grid)."""
    mask = np.zeros((10, 10, n_slices), dtype=bool)
    for z, count in counts.items():
        mask.reshape(100, n_slices)[:count, z] = True
    return mask


def test_senet_support_indices_and_shots_by_hand():
    # Ns = 25: linspace(0, 24, 11) = 0 2.4 4.8 7.2 9.6 12 14.4 16.8 19.2 21.6 24 -> round 0 2 5 7 10 12 14 17
    # 19 22 24;
    # + (25 // 10) // 2 = 1; first 10 kept.
    assert support_indices(25).tolist() == [1, 3, 6, 8, 11, 13, 15, 18, 20, 23]
    # Ns = 6: 0 .5 1 1.5 2 2.5 3 3.5 4 4.5 5 -> np.round (halves to even) 0 0 1 2 2 2 3 4 4 4 5; + 0.
    assert support_indices(6).tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4]
    # Qualifying (> 10 voxels): z 10..14 and 17..21; z 15 has 10 voxels (not more), z 16 none.
    counts = {z: 30 for z in list(range(10, 15)) + list(range(17, 22))}
    counts[15] = 10
    shots = support_shots(_senet_mask(counts))
    # Ns = 10: 0 .9 1.8 2.7 3.6 4.5 5.4 6.3 7.2 8.1 9 -> 0 1 2 3 4 4 5 6 7 8 (9); + (10//10)//2 = 0
    assert shots[:, 0].tolist() == [10, 11, 12, 13, 14, 14, 17, 18, 19, 20]
    assert support_shots(_senet_mask(counts), n_shots=3)[0].tolist() == [10, 10, 11]   # clipped at 10
    assert support_shots(_senet_mask({3: 10})) is None


def test_senet_query_crop_and_chunks_by_hand():
    # qualifying 5..9, a gap at 10, again 11..12; z 3 has 5 voxels -> crop 4 .. 9
    counts = {3: 5, **{z: 20 for z in range(5, 10)}, 11: 20, 12: 20}
    assert query_crop(_senet_mask(counts)) == (4, 9)
    assert query_crop(_senet_mask({0: 20, 1: 20})) == (0, 1)          # no slice before 0
    assert query_crop(_senet_mask({4: 11})) == (3, 4)
    assert query_crop(_senet_mask({4: 10})) is None
    # Nq = 23: linspace(0, 22, 10) = 0 2.44 4.89 7.33 9.78 12.2 14.7 17.1 19.6 22 -> 0 2 5 7 10 12 15 17 20 22
    chunks = [c.tolist() for c in query_chunks(23)]
    assert chunks == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9], [10, 11], [12, 13, 14], [15, 16], [17, 18, 19],
                      [20, 21], [22]]
    # Nq = 5: 0 .44 .89 1.33 1.78 2.22 2.67 3.11 3.56 4 -> 0 0 1 1 2 2 3 3 4 4
    assert [c.tolist() for c in query_chunks(5)] == [[], [0], [], [1], [], [2], [], [3], [], [4]]


def test_plan_pairs_chunks_with_support_slices():
    support = _senet_mask({z: 30 for z in range(100, 125)}, n_slices=130)      # Ns = 25
    query = _senet_mask({z: 30 for z in range(21, 25)}, n_slices=40)           # crop 20 .. 24, Nq = 5
    preset = get_preset("senet")
    support_range, crop = preset_range(support, preset), preset_range(query, preset, role="query")
    pairs = chunk_plan(support_range, crop, 10, rule="senet", support_mask=support)
    assert support_range == (100, 124) and crop == (20, 24)
    kept = 100 + np.array([1, 3, 6, 8, 11, 13, 15, 18, 20, 23])
    assert [(int(s[0]), q.tolist()) for s, q in pairs] == [
        (kept[1], [20]), (kept[3], [21]), (kept[5], [22]), (kept[7], [23]), (kept[9], [24])]
    assert preset_range(_senet_mask({}, 40), preset, role="query") is None
    copied = mask_copy(support, support_range, query.shape, crop, preset.n_chunks, preset.rule)
    for (z_support,), z_query in pairs:
        assert (copied[..., z_query[0]] == support[..., z_support]).all()
    assert not copied[..., :20].any() and not copied[..., 25:].any()
    p, g = np.zeros(10, bool), np.zeros(10, bool)                             # 2|P.G| / (|P| + |G| + 1e-4)
    p[:4], g[2:6] = True, True
    assert dice(p, g, preset.dice_smooth, preset.dice_eps) == pytest.approx(2 * 2 / (8 + 1e-4), rel=1e-12)


# ---------------------------------------------------------------------------------------- 'alpnet'
def test_support_percentile_positions_worked_examples():
    assert support_positions(14) == [2, 7, 11]
    assert support_positions(24) == [4, 12, 20]
    assert support_positions(2) == [0, 1, 1]
    assert support_positions(5, n_part=1) == [2]
    # positions 1, 3, 5 of a list with a gap
    assert support_slices([10, 11, 12, 20, 21, 22]) == [11, 20, 22]
    with pytest.raises(UserError, match="odd"):
        percentiles(2)
    with pytest.raises(UserError, match="does not hold the organ"):
        support_positions(0)


def test_query_thirds_worked_examples():
    parts = query_parts(12, 35)
    assert [z for z, p in zip(range(12, 36), parts) if p == 0] == list(range(12, 20))
    assert [z for z, p in zip(range(12, 36), parts) if p == 1] == list(range(20, 28))
    assert [z for z, p in zip(range(12, 36), parts) if p == 2] == list(range(28, 36))
    parts = query_parts(12, 25)
    assert [[z for z, p in zip(range(12, 26), parts) if p == k] for k in range(3)] == \
        [list(range(12, 17)), list(range(17, 21)), list(range(21, 26))]
    assert query_parts(7, 7).tolist() == [0]
    # z_max itself gets int((z_max - z_min) // width) = 3, clipped to 2
    for lo, hi in ((0, 1), (3, 9), (5, 40)):
        literal = [min(2, max(0, int((z - lo) // ((hi - lo) / 3)))) for z in range(lo, hi + 1)]
        assert query_parts(lo, hi).tolist() == literal


def _literal_alpnet_mask_copy(support: np.ndarray, query: np.ndarray) -> float:
    """SSL-ALPNet's validation loop written out: support slice by percentile, query part by thirds of its GT
    range, counts summed over the range only."""
    z_support = [z for z in range(support.shape[2]) if support[:, :, z].any()]
    z_query = [z for z in range(query.shape[2]) if query[:, :, z].any()]
    z_min, z_max = z_query[0], z_query[-1]
    tp = fp = fn = 0
    for z in range(z_min, z_max + 1):
        part = 0 if z_max == z_min else min(2, int((z - z_min) // ((z_max - z_min) / 3)))
        source = z_support[int([1 / 6, 1 / 2, 5 / 6][part] * len(z_support))]
        prediction = support[:, :, source]
        tp += int(np.sum(prediction & query[:, :, z]))
        fp += int(np.sum(prediction & ~query[:, :, z]))
        fn += int(np.sum(~prediction & query[:, :, z]))
    return 2 * tp / (2 * tp + fp + fn)


def _random_organ(rng, shape=(12, 12, 20)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    first = int(rng.integers(0, 6))
    last = int(rng.integers(first + 1, shape[2]))
    for z in range(first, last + 1):
        if rng.random() < 0.15 and first < z < last:
            continue                                            # a gap inside the range still counts
        x, y = rng.integers(0, 6, 2)
        mask[x:x + rng.integers(2, 7), y:y + rng.integers(2, 7), z] = True
    return mask


def test_mask_copy_matches_the_literal_loop_and_the_preset():
    rng = np.random.default_rng(3)
    for _ in range(6):
        support, query = _random_organ(rng), _random_organ(rng)
        query[:, :, -1] = False
        preset = get_preset("alpnet")
        lo, hi = preset_range(query, preset, role="query")
        prediction = mask_copy(support, preset_range(support, preset), query.shape, (lo, hi), 3, "alpnet")
        value = dice(prediction[:, :, lo:hi + 1], query[:, :, lo:hi + 1])
        assert value == pytest.approx(_literal_alpnet_mask_copy(support, query))
        assert (lo, hi) == tuple(organ_slice_list(query)[[0, -1]])
        assert not prediction[:, :, :lo].any() and not prediction[:, :, hi + 1:].any()   # only the range
        # the same protocol through the project's planner (preset 'alpnet', evaluation/protocols.py)
        liver = NAME_TO_INDEX["liver"]
        labels = {"s": support.astype(np.uint8) * liver, "q": query.astype(np.uint8) * liver}
        assert mask_copy_dice(labels, "s", "alpnet",
                              organs=["liver"])["liver"]["mean"] == pytest.approx(value)


def test_preset_alpnet_plan_and_refusals():
    preset = get_preset("alpnet")
    support = np.zeros((3, 3, 30), bool)
    support[1, 1, 5:19] = True                                      # 14 slices: positions 2, 7, 11
    query = np.zeros((3, 3, 40), bool)
    query[1, 1, 12:36] = True
    query_range = preset_range(query, preset, role="query")
    assert query_range == (12, 35)
    plan = chunk_plan(preset_range(support, preset), query_range, 3, rule="alpnet", support_mask=support)
    assert [int(s[0]) for s, _ in plan] == [7, 12, 16]
    assert [(int(q[0]), int(q[-1])) for _, q in plan] == [(12, 19), (20, 27), (28, 35)]
    with pytest.raises(UserError, match="1-shot"):
        chunk_plan(preset_range(support, preset), query_range, 3, n_shots=3, rule="alpnet",
                   support_mask=support)


def test_summarise_folds_mean_and_std_of_fold_means():
    summary = summarise_folds({0: {"liver": 0.5, "spleen": 0.2},
                                  1: {"liver": 0.7, "spleen": float("nan")}})
    assert summary["liver"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "n_folds": 2}
    assert summary["spleen"]["n_folds"] == 1


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
