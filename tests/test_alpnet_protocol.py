"""SSL-ALPNet's evaluation protocol (evaluation/alpnet_protocol.py, preset 'alpnet'): the worked examples and
slow literal references of its validation loop."""
from __future__ import annotations

import numpy as np
import pytest

from dataloaders.organs import NAME_TO_INDEX
from evaluation import alpnet_protocol as ap
from evaluation.dataset_check import mask_copy_dice
from evaluation.protocol import chunk_plan, get_preset, preset_range
from util.errors import UserError


def test_support_percentile_positions_worked_examples():
    assert ap.support_positions(14) == [2, 7, 11]
    assert ap.support_positions(24) == [4, 12, 20]
    assert ap.support_positions(2) == [0, 1, 1]
    assert ap.support_positions(5, n_part=1) == [2]
    # positions 1, 3, 5 of a list with a gap
    assert ap.support_slices([10, 11, 12, 20, 21, 22]) == [11, 20, 22]
    with pytest.raises(UserError, match="odd"):
        ap.percentiles(2)
    with pytest.raises(UserError, match="does not hold the organ"):
        ap.support_positions(0)


def test_query_thirds_worked_examples():
    parts = ap.query_parts(12, 35)
    assert [z for z, p in zip(range(12, 36), parts) if p == 0] == list(range(12, 20))
    assert [z for z, p in zip(range(12, 36), parts) if p == 1] == list(range(20, 28))
    assert [z for z, p in zip(range(12, 36), parts) if p == 2] == list(range(28, 36))
    parts = ap.query_parts(12, 25)
    assert [[z for z, p in zip(range(12, 26), parts) if p == k] for k in range(3)] == \
        [list(range(12, 17)), list(range(17, 21)), list(range(21, 26))]
    assert ap.query_parts(7, 7).tolist() == [0]
    # z_max itself gets int((z_max - z_min) // width) = 3, clipped to 2
    for lo, hi in ((0, 1), (3, 9), (5, 40)):
        literal = [min(2, max(0, int((z - lo) // ((hi - lo) / 3)))) for z in range(lo, hi + 1)]
        assert ap.query_parts(lo, hi).tolist() == literal


def test_dice_3d_has_no_smoothing():
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 6, 4)) > 0.5, rng.random((6, 6, 4)) > 0.5
    tp = sum(int(a[i, j, k] and b[i, j, k]) for i in range(6) for j in range(6) for k in range(4))
    assert ap.dice_3d(a, b) == pytest.approx(2 * tp / (a.sum() + b.sum()))
    assert np.isnan(ap.dice_3d(np.zeros((2, 2)), np.zeros((2, 2))))
    assert ap.dice_3d(np.ones((2, 2)), np.zeros((2, 2))) == 0.0


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
        query_image = rng.random(query.shape).astype(np.float32)
        value, prediction = ap.evaluate_query(ap.mask_copy_predictor, query_image, support, query_image,
                                              query)
        assert value == pytest.approx(_literal_alpnet_mask_copy(support, query))
        lo, hi = ap.organ_slice_list(query)[[0, -1]]
        assert not prediction[:, :, :lo].any() and not prediction[:, :, hi + 1:].any()   # only the range
        # the same protocol through the project's planner (preset 'alpnet', evaluation/protocol.py)
        liver = NAME_TO_INDEX["liver"]
        labels = {"s": support.astype(np.uint8) * liver, "q": query.astype(np.uint8) * liver}
        assert mask_copy_dice(labels, "s", "alpnet",
                              organs=["liver"])["liver"]["mean"] == pytest.approx(value)


def test_false_positives_outside_the_query_range_are_not_scored():
    support = np.zeros((4, 4, 10), bool)
    support[:2, :2, 2:8] = True
    query = np.zeros((4, 4, 10), bool)
    query[:2, :2, 3:6] = True

    def everywhere(_image, _mask, queries):
        return np.ones(queries.shape, bool)
    value, _ = ap.evaluate_query(everywhere, support.astype(float), support, query.astype(float), query)
    assert value == pytest.approx(2 * 12 / (2 * 12 + 3 * 12))      # only z 3-5 counted: 12 TP, 36 FP


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
    with pytest.raises(UserError, match="support mask"):
        chunk_plan(preset_range(support, preset), query_range, 3, rule="alpnet")


def test_model_predictor_resizes_and_takes_the_argmax():
    import torch

    class Threshold(torch.nn.Module):
        """Foreground where the query is brighter than the support's mean foreground intensity minus 0.5."""
        def encode_support(self, images, fg, bg):
            return (images[:, :, :, 0] * fg).sum() / fg.sum()

        def segment(self, prototype, queries):
            fg = queries[:, :, 0] - (prototype - 0.5)                 # B x Q x S x S
            return torch.stack([torch.zeros_like(fg), fg], dim=2)

    image = np.zeros((16, 16), np.float32)
    image[4:12, 4:12] = 1.0
    predict = ap.model_predictor(Threshold(), input_size=8, batch_size=1)
    out = predict(image, image > 0, np.stack([image, 1 - image]))
    assert out.shape == (2, 16, 16) and out.dtype == bool
    assert out[0, 6, 6] and not out[0, 0, 0] and out[1, 0, 0] and not out[1, 6, 6]


def test_summarise_folds_mean_and_std_of_fold_means():
    summary = ap.summarise_folds({0: {"liver": 0.5, "spleen": 0.2},
                                  1: {"liver": 0.7, "spleen": float("nan")}})
    assert summary["liver"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "n_folds": 2}
    assert summary["spleen"]["n_folds"] == 1
