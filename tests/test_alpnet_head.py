"""The ALPNet head (models/alpnet_head.py) against slow loops written here from SSL-ALPNet's rules:
pooled candidates kept iff pooled mask > 0.95 (window 4 training, 2 test), 'gridconv+' iff
max(avg_pool(fg, 4)) >= 0.95 else 'mask' (mean global prototype), background 'gridconv' only,
20 x cosine with norms clamped at 1e-4, softmax-weighted sum per pixel, bilinear upsampling,
query CE with weights 0.05 / 1.0, and the alignment loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.alpnet_head import ALPNetHead, query_loss

H = W = 32
h = w = 8


def _unit(v):
    return v / max(float(v.norm()), 1e-4)


def ref_candidates(feats, masks, window, mode_rule):
    """feats K x C x h x w, masks K x h x w (feature resolution, soft) -> list of candidate vectors.
    mode_rule: 'bg' (local only), 'fg' (gridconv+ if the 4-window rule holds, else mask)."""
    K, C = feats.shape[:2]
    local = []
    for k in range(K):
        for i in range(h // window):
            for j in range(w // window):
                cell = (slice(i * window, (i + 1) * window), slice(j * window, (j + 1) * window))
                if float(masks[k][cell].mean()) > 0.95:
                    local.append(feats[k][:, cell[0], cell[1]].mean((1, 2)))
    if mode_rule == "bg":
        return local
    best = max(float(masks[k, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean())
               for k in range(K) for i in range(h // 4) for j in range(w // 4))
    globals_ = [(feats[k] * masks[k]).sum((1, 2)) / (masks[k].sum() + 1e-5) for k in range(K)]
    if best >= 0.95:
        return local + globals_
    return [torch.stack(globals_).mean(0)]


def ref_score_map(candidates, query):
    """query C x h x w -> h x w: sum_k softmax_k(s_k) s_k, s_k = 20 cos; 0 without candidates."""
    out = torch.zeros(h, w, dtype=torch.float64)
    if not candidates:
        return out
    for x in range(h):
        for y in range(w):
            q = _unit(query[:, x, y].double())
            s = torch.stack([20.0 * (_unit(p.double()) @ q) for p in candidates])
            out[x, y] = (torch.softmax(s, 0) * s).sum()
    return out


def ref_logits(support_feats, support_fg, support_bg, query_feats, window):
    """B x Q x (1 + N) x H x W, one episode and class at a time."""
    B, N, K = support_feats.shape[:3]
    Q = query_feats.shape[1]
    out = torch.zeros(B, Q, 1 + N, h, w, dtype=torch.float64)
    for b in range(B):
        small_fg = F.interpolate(support_fg[b].flatten(0, 1)[:, None], size=(h, w), mode="bilinear",
                                 align_corners=False)[:, 0].view(N, K, h, w)
        small_bg = F.interpolate(support_bg[b].flatten(0, 1)[:, None], size=(h, w), mode="bilinear",
                                 align_corners=False)[:, 0].view(N, K, h, w)
        bg = [c for n in range(N) for c in ref_candidates(support_feats[b, n], small_bg[n], window, "bg")]
        classes = [bg] + [ref_candidates(support_feats[b, n], small_fg[n], window, "fg") for n in range(N)]
        for q in range(Q):
            for c, candidates in enumerate(classes):
                out[b, q, c] = ref_score_map(candidates, query_feats[b, q])
    up = F.interpolate(out.flatten(0, 1), size=(H, W), mode="bilinear", align_corners=False)
    return up.view(B, Q, 1 + N, H, W)


def masks_of_every_kind():
    """support fg B=2 x N=2 x K=2 x H x W: full, empty, partial (left half), soft below threshold."""
    g = torch.Generator().manual_seed(3)
    fg = torch.zeros(2, 2, 2, H, W)
    fg[0, 0, 0] = 1.0                                   # full
    fg[0, 0, 1, :, : W // 2] = 1.0                      # partial
    fg[0, 1, 0, 4:20, 8:30] = 1.0                       # partial box
    fg[0, 1, 1, :16] = 0.93                             # soft cells just below the threshold ...
    fg[0, 1, 1, 16:] = 1.0                              # ... beside full ones: 'gridconv+'
    fg[1, 0] = 0.9                                      # soft, below threshold everywhere -> 'mask'
    fg[1, 1, 0] = (torch.rand(H, W, generator=g) > 0.3).float()   # ragged
    fg[1, 1, 1, 10:12, 10:12] = 1.0                     # tiny
    bg = (1.0 - fg).clamp(0, 1)
    bg[1] = 1.0 - fg[1].amax(0, keepdim=True)           # background: no episode class
    return fg, bg


@pytest.mark.parametrize("training", [True, False])
def test_logits_match_the_slow_loop(training):
    torch.manual_seed(0)
    B, N, K, Q, C = 2, 2, 2, 2, 5
    support_feats = torch.randn(B, N, K, C, h, w)
    query_feats = torch.randn(B, Q, C, h, w)
    fg, bg = masks_of_every_kind()
    head = ALPNetHead().train(training)
    got = head(support_feats, fg, bg, query_feats, (H, W))
    want = ref_logits(support_feats, fg, bg, query_feats, 4 if training else 2)
    assert got.shape == (B, Q, 1 + N, H, W)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_mode_rules_and_empty_classes():
    """'mask' for a soft mask below 0.95 (one candidate: score = 20 cos with the mean global prototype),
    an empty foreground scores 0, a background without any kept cell scores 0, train/test windows differ."""
    torch.manual_seed(1)
    C = 4
    feats = torch.randn(1, 1, 1, C, h, w)
    query = torch.randn(1, 1, C, h, w)
    head = ALPNetHead().train()
    soft = torch.full((1, 1, 1, H, W), 0.9)
    protos = head.compute_prototypes(feats, soft, 1 - soft, (H, W))
    assert protos.present[0, 0].sum() == 0                       # background 0.1 everywhere: nothing kept
    assert protos.present[0, 1].sum() == 1                       # 'mask': the single global prototype
    scores = head.score_features(protos, query)
    assert torch.equal(scores[0, 0, 0], torch.zeros(h, w))
    glob = (feats[0, 0, 0] * 0.9).sum((1, 2)) / (0.9 * h * w + 1e-5)
    expected = 20 * F.cosine_similarity(query[0, 0], glob[:, None, None], dim=0)
    torch.testing.assert_close(scores[0, 0, 1], expected, atol=1e-5, rtol=1e-5)
    empty = torch.zeros(1, 1, 1, H, W)
    scores = head.score_features(head.compute_prototypes(feats, empty, 1 - empty, (H, W)), query)
    assert torch.equal(scores[0, 0, 1], torch.zeros(h, w))      # zero prototype: cosine 0
    full = torch.ones(1, 1, 1, H, W)
    n_train = int(head.compute_prototypes(feats, full, 1 - full, (H, W)).present[0, 1].sum())
    n_test = int(head.eval().compute_prototypes(feats, full, 1 - full, (H, W)).present[0, 1].sum())
    assert (n_train, n_test) == ((h // 4) ** 2 + 1, (h // 2) ** 2 + 1)   # local cells + one global per shot


def test_gradients_finite_without_candidates():
    torch.manual_seed(2)
    feats = torch.randn(1, 1, 1, 4, h, w, requires_grad=True)
    query = torch.randn(1, 1, 4, h, w, requires_grad=True)
    full = torch.ones(1, 1, 1, H, W)                             # background: no candidate at all
    logits = ALPNetHead().train()(feats, full, 1 - full, query, (H, W))
    logits.square().sum().backward()
    assert torch.isfinite(feats.grad).all() and torch.isfinite(query.grad).all()
    assert query.grad.abs().sum() > 0


def test_query_loss_is_the_weighted_cross_entropy():
    torch.manual_seed(3)
    logits = torch.randn(2, 1, 3, 5, 6)
    labels = torch.randint(0, 3, (2, 1, 5, 6))
    labels[0, 0, 0, 0] = 255
    got = query_loss(logits, labels)
    total, weight_sum = 0.0, 0.0
    for b in range(2):
        for x in range(5):
            for y in range(6):
                c = int(labels[b, 0, x, y])
                if c == 255:
                    continue
                wgt = 0.05 if c == 0 else 1.0
                total += -wgt * float(torch.log_softmax(logits[b, 0, :, x, y], 0)[c])
                weight_sum += wgt
    assert math.isclose(float(got), total / weight_sum, rel_tol=1e-5)


def test_alignment_loss_matches_the_slow_loop():
    torch.manual_seed(4)
    B, N, K, Q, C = 2, 2, 2, 1, 5
    support_feats = torch.randn(B, N, K, C, h, w)
    query_feats = torch.randn(B, Q, C, h, w)
    fg, bg = masks_of_every_kind()
    query_feats[0, 0, :, :4, :4] = support_feats[0, 0, 0, :, 0, 0, None, None]  # a 4 x 4 block like way 0
    head = ALPNetHead().train()
    prototypes = head.compute_prototypes(support_feats, fg, bg, (H, W))
    logits = head.score(prototypes, query_feats)
    got = head.alignment_loss(prototypes, logits, query_feats, support_feats, fg, bg)
    want_scores = ref_logits(support_feats, fg, bg, query_feats, 4)    # to check the predicted masks
    per_batch = []
    for b in range(B):
        pred = head.score_features(prototypes, query_feats)[b, 0].argmax(0)  # h x w
        assert bool((pred == 1).any()) and bool((pred == 0).any())
        torch.testing.assert_close(logits[b].double(), want_scores[b], atol=1e-4, rtol=1e-4)
        qbg = (pred == 0).float()[None]
        bg_cands = ref_candidates(query_feats[b], qbg, 4, "bg")
        terms = []
        for n in range(N):
            fg_cands = ref_candidates(query_feats[b], (pred == n + 1).float()[None], 4, "fg")
            for k in range(K):
                small = torch.stack([ref_score_map(bg_cands, support_feats[b, n, k]),
                                     ref_score_map(fg_cands, support_feats[b, n, k])])
                up = F.interpolate(small[None], size=(H, W), mode="bilinear", align_corners=False)
                label = torch.full((H, W), 255, dtype=torch.long)
                label[fg[b, n, k] > 0.5] = 1
                label[bg[b, n, k] > 0.5] = 0
                terms.append(F.cross_entropy(up, label[None], ignore_index=255) if (label != 255).any()
                             else torch.zeros((), dtype=torch.float64))
        per_batch.append(torch.stack(terms).sum() / (N * K))
    want = torch.stack(per_batch).mean()
    assert math.isclose(float(got), float(want), rel_tol=1e-4, abs_tol=1e-5)


def test_prototype_batch_one_broadcasts_and_feature_map_too_small():
    from util.errors import UserError
    torch.manual_seed(5)
    feats = torch.randn(1, 1, 1, 3, h, w)
    fg = torch.zeros(1, 1, 1, H, W)
    fg[..., 8:24, 8:24] = 1
    head = ALPNetHead().eval()
    protos = head.compute_prototypes(feats, fg, 1 - fg, (H, W))
    queries = torch.randn(3, 2, 3, h, w)
    batched = head.score(protos, queries)
    one = head.score(protos, queries[1:2])
    torch.testing.assert_close(batched[1:2], one)
    with pytest.raises(UserError, match="alpnet head pools windows of 4"):
        head.compute_prototypes(torch.randn(1, 1, 1, 3, 3, 3), fg, 1 - fg, (H, W))


def test_fewshot_network_with_the_alpnet_head():
    """model.head 'alpnet' plugs into FewShotSegNet: training forward with the alignment loss, the batched
    evaluation API equals the forward in eval mode, and the training objective uses the weighted CE."""
    from models.fewshot import FewShotSegNet
    from training.objective import episode_loss
    torch.manual_seed(6)
    model = FewShotSegNet(encoder="cnn_small", head="alpnet", align=True)
    support = torch.rand(1, 1, 1, 1, 64, 64)
    fg = torch.zeros(1, 1, 1, 64, 64)
    fg[..., 16:48, 8:40] = 1.0
    query = torch.rand(1, 1, 1, 64, 64)
    logits, align = model.train()(support, fg, 1 - fg, query)
    assert logits.shape == (1, 1, 2, 64, 64) and float(align.detach()) > 0
    labels = (torch.rand(1, 1, 64, 64) > 0.7).long()
    cfg = {"model": {"head": "alpnet", "align": True, "align_weight": 1.0}}
    loss = episode_loss(cfg, logits, labels, align)
    expected = (query_loss(logits, labels) + align).detach()
    assert math.isclose(float(loss.detach()), float(expected), rel_tol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        direct, zero = model(support, fg, 1 - fg, query)
        batched = model.segment(model.encode_support(support, fg, 1 - fg), query)
    assert float(zero) == 0.0
    torch.testing.assert_close(direct, batched)
