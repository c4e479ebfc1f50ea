"""Property tests (hypothesis): the local prototype head and FewShotSegNet give finite, bounded logits of
the contract's shape for any shapes, options and masks (an all-empty way is a UserError); Dice is bounded,
symmetric and equals a slow set count.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluation.protocols import dice
from models.local_prototypes import VOTES, LocalPrototypeHead
from util.errors import UserError

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
MASK_KINDS = ("random", "empty", "full", "one_pixel", "sparse")


def make_mask(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A float 0/1 mask of `shape` of the given kind."""
    if kind == "empty":
        return torch.zeros(shape)
    if kind == "full":
        return torch.ones(shape)
    if kind == "one_pixel":
        mask = torch.zeros(shape).flatten(0, -3)
        mask[:, 0, 0] = 1.0
        return mask.view(shape)
    p = 0.5 if kind == "random" else 0.05
    return (torch.rand(shape, generator=generator) < p).float()


@st.composite
def episodes(draw):
    """(head options, support_features, support_fg, support_bg, query_features, image_size)."""
    B, N, K, Q = (draw(st.integers(1, 2)) for _ in range(4))
    C = draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    stride = draw(st.sampled_from([1, 2, 4]))
    H, W = h * stride + draw(st.integers(0, stride - 1)), w * stride + draw(st.integers(0, stride - 1))
    options = {"n_grid": draw(st.integers(1, min(h, w))), "overlap": draw(st.booleans()),
               "vote": draw(st.sampled_from(list(VOTES))),
               "resolution": draw(st.sampled_from(["image", "feature"])),
               "min_pixels": draw(st.integers(0, 6)), "scale": draw(st.sampled_from([1.0, 20.0]))}
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    support = torch.randn(B, N, K, C, h, w, generator=g)
    query = torch.randn(B, Q, C, h, w, generator=g)
    if draw(st.booleans()):  # dead (all-zero) feature vectors, as after a ReLU
        support = support * (torch.rand(B, N, K, 1, h, w, generator=g) < 0.7)
        query = query * (torch.rand(B, Q, 1, h, w, generator=g) < 0.7)
    fg = make_mask(draw(st.sampled_from(MASK_KINDS)), (B, N, K, H, W), g)
    bg_kind = draw(st.sampled_from(("complement", *MASK_KINDS)))
    bg = (1 - fg.amax(1, keepdim=True)).expand_as(fg).contiguous() if bg_kind == "complement" \
        else make_mask(bg_kind, (B, N, K, H, W), g)
    return options, support, fg, bg, query, (H, W)


@SETTINGS
@given(episodes())
def test_head_logits_are_finite_bounded_and_shaped(episode):
    options, support, fg, bg, query, (H, W) = episode
    head = LocalPrototypeHead(**options)
    empty_way = bool((fg.flatten(2).sum(-1) == 0).any())
    if empty_way:
        with pytest.raises(UserError, match="empty mask"):
            head(support, fg, bg, query, (H, W))
        return
    logits = head(support, fg, bg, query, (H, W))
    B, N, Q = support.shape[0], support.shape[1], query.shape[1]
    assert logits.shape == (B, Q, 1 + N, H, W)
    assert torch.isfinite(logits).all()
    assert logits.abs().max() <= options["scale"] * (1 + 1e-4)


@SETTINGS
@given(episodes())
def test_head_gradients_are_finite(episode):
    options, support, fg, bg, query, (H, W) = episode
    if bool((fg.flatten(2).sum(-1) == 0).any()):
        return
    support, query = support.requires_grad_(), query.requires_grad_()
    LocalPrototypeHead(**options)(support, fg, bg, query, (H, W)).sum().backward()
    assert torch.isfinite(support.grad).all() and torch.isfinite(query.grad).all()


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(n_grid=st.integers(1, 4), vote=st.sampled_from(list(VOTES)),
       resolution=st.sampled_from(["image", "feature"]),
       fg_kind=st.sampled_from(["random", "full", "one_pixel"]),
       seed=st.integers(0, 1000))
def test_fewshot_net_outputs_are_finite_for_any_mask(n_grid, vote, resolution, fg_kind, seed):
    from models.fewshot import FewShotSegNet
    torch.manual_seed(seed)
    model = FewShotSegNet(encoder="cnn_small", n_grid=n_grid, vote=vote, resolution=resolution,
                          align=True).train()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 1, 1, 1, 32, 32, generator=g)
    fg = make_mask(fg_kind, (1, 1, 1, 32, 32), g)
    logits, align_loss = model(images, fg, 1 - fg, torch.rand(1, 1, 1, 32, 32, generator=g))
    assert logits.shape == (1, 1, 2, 32, 32)
    assert torch.isfinite(logits).all() and torch.isfinite(align_loss)


# ----------------------------------------------------------------------------------- metrics
def slow_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice from sets of voxel coordinates (obviously correct, slow)."""
    p = {tuple(i) for i in np.argwhere(a)}
    t = {tuple(i) for i in np.argwhere(b)}
    return 1.0 if not p and not t else 2 * len(p & t) / (len(p) + len(t))


@st.composite
def mask_pairs(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    g = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kinds = {"empty": lambda: np.zeros(shape, bool), "full": lambda: np.ones(shape, bool),
             "random": lambda: g.random(shape) < g.random()}
    a = kinds[draw(st.sampled_from(sorted(kinds)))]()
    b = kinds[draw(st.sampled_from(sorted(kinds)))]()
    dtype = draw(st.sampled_from([bool, np.uint8, np.float32]))
    scale = 255 if dtype is not bool and draw(st.booleans()) else 1   # 0/255 masks are binary too
    return a.astype(dtype) * scale, b.astype(dtype) * scale


@settings(max_examples=100, deadline=None, derandomize=True)
@given(mask_pairs())
def test_dice_bounded_symmetric_and_matches_a_set_count(pair):
    a, b = pair
    value = dice(a, b)
    assert np.isfinite(value) and 0.0 <= value <= 1.0
    assert value == dice(b, a)
    assert dice(a, a) == 1.0 and dice(b, b) == 1.0
    assert value == pytest.approx(slow_dice(a != 0, b != 0), abs=1e-12)


def test_dice_refuses_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 3)), np.zeros((3, 2)))
