"""models/boundary_loss.py and the `boundary_weight` training option (Kervadec et al., MIDL 2019).

The signed distance maps and the loss are checked against slow per-pixel loops written here; one SGD
step on the logits lowers the loss; boundary_weight = 0 leaves every prototype head's training loss
bit-equal to the loss before the option (bad values: tests/test_training.py's table); the key is part of
the config hash when on (and absent from it when off, so earlier runs keep their digest); two training
steps with the option on log other losses than with it off.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import resolve_config, train_in_process

from config import default_config
from models.alpnet_head import query_loss as alpnet_query_loss
from models.boundary_loss import boundary_loss, class_distance_maps, signed_distance_maps
from training.config_check import check_run_config
from training.loop import config_hash, trajectory_differences
from training.objective import episode_loss


# ------------------------------------------------------------------ slow references
def reference_signed_distance(mask: np.ndarray) -> np.ndarray:
    """Per pixel: outside the mask the distance to the nearest mask pixel, inside minus (the distance to
    the nearest pixel outside - 1); 0 everywhere for an empty or full mask."""
    height, width = mask.shape
    inside = [(r, c) for r in range(height) for c in range(width) if mask[r, c]]
    outside = [(r, c) for r in range(height) for c in range(width) if not mask[r, c]]
    phi = np.zeros((height, width))
    if not inside or not outside:
        return phi
    for r in range(height):
        for c in range(width):
            others = outside if mask[r, c] else inside
            nearest = min(math.hypot(r - r2, c - c2) for r2, c2 in others)
            phi[r, c] = -(nearest - 1.0) if mask[r, c] else nearest
    return phi


def reference_boundary_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over (b, q, c >= 1, r, col) of phi_c / H * softmax_c, one pixel at a time."""
    n_batch, n_queries, n_classes, height, width = logits.shape
    total, count = 0.0, 0
    for b in range(n_batch):
        for q in range(n_queries):
            for c in range(1, n_classes):
                phi = reference_signed_distance(labels[b, q].numpy() == c) / height
                for r in range(height):
                    for col in range(width):
                        scores = [float(logits[b, q, k, r, col]) for k in range(n_classes)]
                        probability = math.exp(scores[c]) / sum(math.exp(s) for s in scores)
                        total += phi[r, col] * probability
                        count += 1
    return total / count


def mask_batch() -> np.ndarray:
    """9 x 11 x 13 masks: empty, full, single pixels (centre, corner), a rectangle, a ring with a hole,
    everything but one pixel, two random multi-component masks."""
    rng = np.random.default_rng(5)
    masks = np.zeros((9, 11, 13), dtype=bool)
    masks[1] = True
    masks[2, 5, 6] = True
    masks[3, 0, 12] = True
    masks[4, 2:7, 3:11] = True
    masks[5, 1:10, 2:11] = True
    masks[5, 4:7, 5:8] = False
    masks[6] = True
    masks[6, 10, 0] = False
    masks[7] = rng.random((11, 13)) > 0.8
    masks[8, 0:3, 0:3] = masks[8, 7:11, 8:13] = masks[8, 5, 5] = True
    return masks


# ------------------------------------------------------------------ signed distance maps
def test_signed_distance_maps_equal_the_per_pixel_reference():
    masks = mask_batch()
    assert len(set(masks[7].ravel())) == 2 and masks[7].sum() > 5           # a scattered random mask
    phi = signed_distance_maps(masks)
    assert phi.shape == masks.shape
    for mask, computed in zip(masks, phi):
        np.testing.assert_allclose(computed, reference_signed_distance(mask), rtol=0, atol=1e-12)


def test_the_sign_and_offset_convention_on_a_square():
    mask = np.zeros((1, 7, 7), dtype=bool)
    mask[0, 2:5, 2:5] = True
    phi = signed_distance_maps(mask)[0]
    assert phi[3, 3] == -1.0                                          # centre: -(2 - 1)
    assert phi[2, 2] == phi[2, 3] == 0.0                              # the mask's boundary pixels
    assert phi[1, 3] == 1.0 and phi[0, 3] == 2.0                      # outside: distance to the mask
    assert phi[1, 1] == pytest.approx(math.sqrt(2)) and phi[0, 0] == pytest.approx(math.sqrt(8))
    assert not signed_distance_maps(np.zeros((2, 4, 4), dtype=bool)).any()
    assert not signed_distance_maps(np.ones((2, 4, 4), dtype=bool)).any()


# ------------------------------------------------------------------ the loss
def random_episode(seed: int, n_ways: int = 2, size: int = 9):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, 1 + n_ways, size, size, generator=generator)
    labels = torch.randint(0, 1 + n_ways, (2, 2, size, size), generator=generator)
    labels[0, 0] = 0                                                  # an empty query
    labels[1, 1, 2:7, 1:6] = 1                                        # a solid block of way 1
    return logits, labels


def test_boundary_loss_equals_the_per_pixel_loop():
    logits, labels = random_episode(0)
    loss = boundary_loss(logits, labels)
    assert loss.shape == () and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(reference_boundary_loss(logits, labels), rel=1e-5, abs=1e-7)


def test_one_sgd_step_on_the_logits_lowers_the_loss_where_it_should():
    """The gradient moves foreground probability into the mask and out of the far background."""
    labels = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    labels[0, 0, 3:9, 3:9] = 1
    logits = torch.zeros(1, 1, 2, 12, 12, requires_grad=True)
    before = boundary_loss(logits, labels)
    before.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = logits - 50.0 * logits.grad
        after = boundary_loss(stepped, labels)
        probability = stepped.softmax(dim=2)[0, 0, 1]
    assert float(after) < float(before.detach())
    assert probability[5, 5] > 0.5 > probability[0, 0]                # deep inside up, far outside down


@pytest.mark.cuda  # skipped without a GPU (conftest.py); tools/gpu_check.sh runs it
def test_labels_on_the_gpu_give_the_cpu_loss_on_the_gpu():
    logits, labels = random_episode(4)
    phi = class_distance_maps(labels.cuda(), n_ways=2)
    assert phi.device.type == "cuda" and torch.equal(phi.cpu(), class_distance_maps(labels, n_ways=2))
    on_gpu = boundary_loss(logits.cuda(), labels.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), boundary_loss(logits, labels))


# ------------------------------------------------------------------ the training objective
def old_episode_loss(cfg, logits, labels, aux_loss):
    """training/objective.py's prototype loss as it was before boundary_weight existed."""
    if cfg["model"].get("head") == "alpnet":
        loss = alpnet_query_loss(logits, labels)
    else:
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(0, 1), ignore_index=255)
    if cfg["model"].get("align", False):
        loss = loss + float(cfg["model"].get("align_weight", 1.0)) * aux_loss.float()
    return loss


@pytest.mark.parametrize("head", ["local", "panet", "alpnet"])
@pytest.mark.parametrize("align", [False, True])
def test_weight_zero_is_bit_equal_to_the_old_loss_and_a_weight_adds_the_term(head, align):
    logits, labels = random_episode(1)
    aux = torch.tensor(0.37)
    model = {"head": head, "align": align, "align_weight": 0.5}
    old = old_episode_loss({"model": model}, logits, labels, aux)
    for cfg in ({"model": model}, {"model": model, "boundary_weight": 0.0}):
        assert torch.equal(episode_loss(cfg, logits, labels, aux), old)
    weighted = episode_loss({"model": model, "boundary_weight": 2.5}, logits, labels, aux)
    torch.testing.assert_close(weighted, old + 2.5 * boundary_loss(logits, labels))
    assert not torch.equal(weighted, old)


def test_senet_ignores_the_weight():
    logits, labels = random_episode(3, n_ways=1)
    cfg, aux = {"model": {"method": "senet"}, "senet": {"double_softmax": False}}, torch.zeros(())
    assert torch.equal(episode_loss({**cfg, "boundary_weight": 1.0}, logits, labels, aux),
                       episode_loss(cfg, logits, labels, aux))


# ------------------------------------------------------------------ config: schema and hash
def test_the_weight_is_a_prototype_option_off_by_default_and_in_the_config_hash_only_when_on():
    for named in [(), ("official",), ("paper",), ("panet",), ("tiny",)]:
        assert resolve_config(named)["boundary_weight"] == 0.0
    check_run_config(resolve_config(boundary_weight=0.5))
    off, on = resolve_config(), resolve_config(boundary_weight=0.5)
    defaults = default_config()
    assert config_hash(on, defaults) != config_hash(off, defaults) != \
        config_hash(resolve_config(boundary_weight=0.25), defaults)
    before_the_key = {key: value for key, value in off.items() if key != "boundary_weight"}
    assert config_hash(off, defaults) == config_hash(before_the_key, defaults)   # a missing key: its default
    assert trajectory_differences(before_the_key, on, defaults) == ["boundary_weight: 0.0 -> 0.5"]
    assert trajectory_differences(before_the_key, off, defaults) == []


# ------------------------------------------------------------------ two training steps
def test_two_training_steps_with_the_boundary_loss_log_other_losses(tmp_path, train_prep):
    losses = {}
    for weight in (0.0, 0.5):
        _, run = train_in_process(tmp_path / str(weight), n_steps=2, val_every=0, save_every=2, print_every=1,
                                  boundary_weight=weight, path={"data_dir": str(train_prep),
                                                                "log_dir": str(tmp_path)})
        losses[weight] = run.logged("loss")
    off, on = losses[0.0], losses[0.5]
    assert len(off) == len(on) == 2 and all(map(math.isfinite, off + on))
    assert on[0] != off[0] and on[1] != off[1]
