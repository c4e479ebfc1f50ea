"""SENet (models/senet.py, training/objective.py) against references written from the released
SENet code's layout and optimisation (docs/method.md, "The SENet volumetric protocol")."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.fewshot import build_model
from models.senet import N_POINTS, SENet, dice_loss, senet_loss
from training.objective import build_senet_optimizer, build_senet_scheduler, epoch_of_step
from util.errors import UserError

RELEASED_USED_PARAMETERS = 971_212     # parameters the released fold1 model uses in its forward pass


def _episode(B=2, K=1, Q=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(B, 1, K, 1, size, size, generator=g)
    fg = (torch.rand(B, 1, K, size, size, generator=g) > 0.7).float()
    query = torch.rand(B, Q, 1, size, size, generator=g)
    return support, fg, 1 - fg, query


# ------------------------------------------------------- functional reference (the released SENet layout)
def _block(x, block):
    """conv 5x5 pad 2 -> PReLU (one slope) -> BatchNorm (eval statistics)."""
    y = F.conv2d(x, block.conv.weight, block.conv.bias, stride=1, padding=2)
    y = F.prelu(y, block.prelu.weight)
    return F.batch_norm(y, block.norm.running_mean, block.norm.running_var, block.norm.weight,
                        block.norm.bias, training=False, eps=block.norm.eps)


def _reference(model, support_image, support_mask, query_image, official_bug=False):
    """SENet forward written literally from the released layout (M x 1 x H x W image and mask,
    M x 1 x H x W query)."""
    c, s = model.conditioner, model.segmenter
    # Conditioner: e1 e2 e3 e4 (the 4th reuses encode3 under the official bug), bn, d4 d3 d2 d1.
    x = torch.cat([support_image, support_mask], 1)
    cond_feats, cond_idx = [], []
    for level in range(4):
        block = c.encoders[2] if (official_bug and level == 3) else c.encoders[level]
        x, idx = F.max_pool2d(_block(x, block), 2, 2, return_indices=True)
        cond_feats.append(x)
        cond_idx.append(idx)
    x = _block(x, c.bottleneck)
    cond_feats.append(x)
    for level in (3, 2, 1, 0):
        x = _block(F.max_unpool2d(x, cond_idx[level], 2, 2), c.decoders[level])
        cond_feats.append(x)
    gates = [torch.sigmoid(F.conv2d(f, conv.weight, conv.bias)) for f, conv in zip(cond_feats, c.squeeze)]
    # Segmenter: each gate multiplies the same-size feature; one skip: decode4 <- cat(out4, unpool(bn)).
    y, seg_idx = query_image, []
    for level in range(4):
        pre = _block(y, s.encoders[level])
        y, idx = F.max_pool2d(pre, 2, 2, return_indices=True)
        y = y * gates[level]
        seg_idx.append(idx)
    out4 = pre
    y = _block(y, s.bottleneck) * gates[4]
    y = _block(torch.cat([out4, F.max_unpool2d(y, seg_idx[3], 2, 2)], 1), s.decoders[3]) * gates[5]
    for point, level in zip((6, 7, 8), (2, 1, 0)):
        y = _block(F.max_unpool2d(y, seg_idx[level], 2, 2), s.decoders[level]) * gates[point]
    return F.conv2d(y, s.classifier.weight, s.classifier.bias)


def _randomise_bn(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=g) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("official_bug", [False, True])
def test_forward_matches_the_written_reference(official_bug):
    torch.manual_seed(0)
    model = SENet(official_bug=official_bug).eval()
    _randomise_bn(model)
    support, fg, bg, query = _episode(B=2, size=32)
    with torch.no_grad():
        logits, aux = model(support, fg, bg, query)
        expected = _reference(model, support[:, 0, 0], fg[:, 0, 0, None], query[:, 0], official_bug)
    assert logits.shape == (2, 1, 2, 32, 32)
    assert float(aux) == 0.0
    torch.testing.assert_close(logits[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_official_bug_changes_the_conditioner_path():
    torch.manual_seed(0)
    fixed, buggy = SENet().eval(), SENet(official_bug=True).eval()
    assert len(fixed.conditioner.encoders) == 4 and len(buggy.conditioner.encoders) == 3
    calls = []
    buggy.conditioner.encoders[2].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    support, fg, bg, _ = _episode(B=1, size=32)
    buggy.encode_support(support, fg, bg)
    assert calls == [(1, 16, 8, 8), (1, 16, 4, 4)]    # encode3 runs on e2 and again on e3
    # The same weights (encode4 aside) give other gates at e4 with and without the bug.
    state = {k: v for k, v in fixed.state_dict().items() if not k.startswith("conditioner.encoders.3.")}
    buggy.load_state_dict(state)
    with torch.no_grad():
        g_fixed = fixed.encode_support(support, fg, bg).gates
        g_buggy = buggy.encode_support(support, fg, bg).gates
    for point in range(3):
        torch.testing.assert_close(g_fixed[point], g_buggy[point])
    assert not torch.allclose(g_fixed[3], g_buggy[3])


def _used_parameters(model) -> int:
    model.train()
    support, fg, bg, query = _episode(B=2, size=16)
    logits, _ = model(support, fg, bg, query)
    logits.sum().backward()
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


def test_parameter_count_single_deepest_skip_and_widths():
    buggy = SENet(official_bug=True)
    assert _used_parameters(buggy) == RELEASED_USED_PARAMETERS
    assert sum(p.numel() for p in buggy.parameters()) == RELEASED_USED_PARAMETERS  # nothing dead is built
    fixed = SENet()
    used = _used_parameters(fixed)
    assert used == RELEASED_USED_PARAMETERS + 6_449     # encode4 of the conditioner: 16*16*25+16 +1 +32
    assert abs(used / RELEASED_USED_PARAMETERS - 1) < 0.01
    assert sum(p.numel() for p in fixed.segmenter.parameters()) == 925_067
    assert sum(p.numel() for p in fixed.conditioner.parameters()) == 52_628 - 34  # no unused classifier
    model = SENet()
    seg, cond = model.segmenter, model.conditioner
    assert [d.conv.in_channels for d in seg.decoders] == [64, 64, 64, 128]
    assert [d.conv.in_channels for d in cond.decoders] == [16, 16, 16, 16]
    assert [e.conv.in_channels for e in seg.encoders] == [1, 64, 64, 64]
    assert [e.conv.in_channels for e in cond.encoders] == [2, 16, 16, 16]
    assert all(m.kernel_size == (5, 5) and m.padding == (2, 2) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert len(cond.squeeze) == N_POINTS and all(m.out_channels == 1 for m in cond.squeeze)
    assert seg.classifier.in_channels == 64 and seg.classifier.out_channels == 2


def _gates_for(shapes, zero_point=None):
    return tuple(torch.zeros(s) if i == zero_point else torch.ones(s) for i, s in enumerate(shapes))


def test_each_gate_acts_at_its_point():
    """Gate k zero -> the segmenter feature right after point k is zero; the skip is taken before gating."""
    torch.manual_seed(0)
    model = SENet().eval()
    seg = model.segmenter
    size = 16
    shapes = [(1, 1, size >> (i + 1), size >> (i + 1)) for i in range(4)] + [(1, 1, 1, 1)] + \
             [(1, 1, size >> i, size >> i) for i in (3, 2, 1, 0)]
    # Inputs of the block that follows each point: encoders 2-4, bottleneck, decoders 4..1, classifier.
    followers = [seg.encoders[1], seg.encoders[2], seg.encoders[3], seg.bottleneck, seg.decoders[3],
                 seg.decoders[2], seg.decoders[1], seg.decoders[0], seg.classifier]
    seen = {}
    for index, module in enumerate(followers):
        module.register_forward_pre_hook(lambda m, args, index=index: seen.__setitem__(index, args[0]))
    query = torch.rand(1, 1, size, size)
    with torch.no_grad():
        seg(query, _gates_for(shapes))
        reference = dict(seen)
        for point in range(N_POINTS):
            seg(query, _gates_for(shapes, point))
            assert seen[point].abs().max() == 0, f"gate {point} did not zero the feature after it"
            for earlier in range(point):
                torch.testing.assert_close(seen[earlier], reference[earlier])
    # The skip: zeroing e4's gate leaves decode4's skip half (out4, pre-pool, ungated) unchanged.
    captured = {}
    seg.decoders[3].conv.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    with torch.no_grad():
        seg(query, _gates_for(shapes))
        skip_open = captured["x"][:, :64].clone()
        seg(query, _gates_for(shapes, 3))
    torch.testing.assert_close(captured["x"][:, :64], skip_open)
    assert skip_open.abs().max() > 0


def test_shapes_kshot_and_broadcast():
    torch.manual_seed(0)
    model = SENet().eval()
    support, fg, bg, _ = _episode(B=1, K=3, size=48)
    with torch.no_grad():
        gates = model.encode_support(support, fg, bg)
        assert [tuple(g.shape) for g in gates.gates][:5] == [(1, 1, 24, 24), (1, 1, 12, 12), (1, 1, 6, 6),
                                                             (1, 1, 3, 3), (1, 1, 3, 3)]
        logits = model.segment(gates, torch.rand(2, 5, 1, 48, 48))
        assert logits.shape == (2, 5, 2, 48, 48)
        # k shots: the gates are the mean of the single-shot gates
        single = [model.encode_support(support[:, :, k:k + 1], fg[:, :, k:k + 1], bg[:, :, k:k + 1]).gates
                  for k in range(3)]
        for point in range(N_POINTS):
            torch.testing.assert_close(gates.gates[point], sum(s[point] for s in single) / 3)


def test_a_side_not_divisible_by_16_is_one_line_and_the_config_round_trips():
    model = SENet().eval()
    support, fg, bg, query = _episode(B=1, size=32)
    with pytest.raises(UserError, match="divisible by 16"):
        model(support[..., :24, :24], fg[..., :24, :24], bg[..., :24, :24], query[..., :24, :24])
    model = SENet(official_bug=True)
    assert model.config == {"method": "senet", "official_bug": True}
    rebuilt = build_model({**model.config, "encoder": "ignored"})
    rebuilt.load_state_dict(model.state_dict())


# ------------------------------------------------------------------------------------ loss (s.2)
def _dice_loss_loops(probabilities: np.ndarray, labels: np.ndarray, eps=1e-4) -> float:
    """Per channel 1 - 2 sum(p g) / (sum(p + g) + eps) over batch and pixels, mean over channels."""
    M, C, H, W = probabilities.shape
    per_channel = []
    for c in range(C):
        inter = total = 0.0
        for m in range(M):
            for y in range(H):
                for x in range(W):
                    g = 1.0 if labels[m, y, x] == c else 0.0
                    inter += probabilities[m, c, y, x] * g
                    total += probabilities[m, c, y, x] + g
        per_channel.append(1 - 2 * inter / (total + eps))
    return float(np.mean(per_channel))


def test_dice_loss_matches_the_loop_reference_and_ignores_label_255():
    g = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64), dim=1)
    labels = (torch.rand(3, 5, 6, generator=g) > 0.6).long()
    expected = _dice_loss_loops(probabilities.numpy(), labels.numpy())
    assert float(dice_loss(probabilities, labels)) == pytest.approx(expected, rel=1e-12)
    g = torch.Generator().manual_seed(2)
    probabilities = torch.softmax(torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64), dim=1)
    labels = (torch.rand(2, 4, 5, generator=g) > 0.5).long()
    labels[0, :2] = 255
    keep = labels[0, 2:], labels[1]
    expected_p = torch.cat([probabilities[0, :, 2:].flatten(1), probabilities[1].flatten(1)], 1)  # C x n
    expected_l = torch.cat([keep[0].flatten(), keep[1].flatten()])
    expected = _dice_loss_loops(expected_p[None, :, None].numpy(), expected_l[None, None].numpy())
    assert float(dice_loss(probabilities, labels)) == pytest.approx(expected, rel=1e-12)


def test_senet_loss_single_and_double_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 2, 8, 8, generator=g, dtype=torch.float64)
    labels = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).long()
    p = logits.flatten(0, 1).numpy()
    once = np.exp(p) / np.exp(p).sum(1, keepdims=True)
    twice = np.exp(once) / np.exp(once).sum(1, keepdims=True)
    flat = labels.flatten(0, 1).numpy()
    assert float(senet_loss(logits, labels)) == pytest.approx(_dice_loss_loops(once, flat), rel=1e-6)
    assert float(senet_loss(logits, labels, double_softmax=True)) == pytest.approx(
        _dice_loss_loops(twice, flat), rel=1e-6)


# ------------------------------------------------------------------------- optimisation (s.2)
def test_one_sgd_with_two_groups_equals_two_optimisers():
    torch.manual_seed(0)
    a = SENet()
    b = SENet()
    b.load_state_dict(a.state_dict())
    shared = build_senet_optimizer(a, lr=1e-3, momentum=0.99, weight_decay=1e-4)
    scheduler = build_senet_scheduler(shared, n_steps=4, epochs=4, step_epochs=2)
    separate = [torch.optim.SGD(b.segmenter.parameters(), lr=1e-3, momentum=0.99, weight_decay=1e-4),
                torch.optim.SGD(b.conditioner.parameters(), lr=1e-3, momentum=0.99, weight_decay=1e-4)]
    step_lrs = [torch.optim.lr_scheduler.StepLR(o, 2, gamma) for o, gamma in zip(separate, (0.1, 0.001))]
    for step in range(4):
        support, fg, bg, query = _episode(B=2, size=16, seed=step)
        labels = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(step)) > 0.5).long()
        # official order: StepLR stepped at the start of each epoch (epoch = step here)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)    # "scheduler.step() before optimizer.step()"
            for s in step_lrs:
                s.step()
        for model, optimisers in ((a, [shared]), (b, separate)):
            loss = senet_loss(model(support, fg, bg, query)[0], labels)
            for o in optimisers:
                o.zero_grad()
            loss.backward()
            for o in optimisers:
                o.step()
        assert [g["lr"] for g in shared.param_groups] == pytest.approx([o.param_groups[0]["lr"]
                                                                        for o in separate])
        scheduler.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=name)


def test_schedule_scaled_to_n_steps():
    model = SENet()
    optimizer = build_senet_optimizer(model, lr=1e-3, momentum=0.99, weight_decay=1e-4)
    assert [g["name"] for g in optimizer.param_groups] == ["segmenter", "conditioner"]
    assert optimizer.param_groups[0]["momentum"] == 0.99 and optimizer.param_groups[1]["weight_decay"] == 1e-4
    n_steps = 2020                                          # 20 epochs x 101 batches
    scheduler = build_senet_scheduler(optimizer, n_steps)
    lrs = []
    for _ in range(n_steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    starts = {epoch: (epoch - 1) * 101 for epoch in range(1, 21)}
    assert [epoch_of_step(starts[e], n_steps, 20) for e in starts] == list(range(1, 21))
    for epoch, step in starts.items():
        seg, cond = lrs[step]
        if epoch <= 9:
            assert (seg, cond) == pytest.approx((1e-3, 1e-3))
        elif epoch <= 19:
            assert (seg, cond) == pytest.approx((1e-4, 1e-6))
        else:
            assert (seg, cond) == pytest.approx((1e-5, 1e-9))
        assert lrs[step + 100] == lrs[step]                 # constant within an epoch
