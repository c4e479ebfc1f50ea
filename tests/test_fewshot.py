"""FewShotSegNet: shapes, config round trip, batched evaluation API, PANet alignment, bad input."""
import pytest
import torch
import torch.nn.functional as F

from config import ex
from models.fewshot import FewShotSegNet
from util.errors import UserError


def _episode(B=2, N=1, K=1, Q=2, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    si = torch.rand(B, N, K, 1, S, S, generator=g)
    qi = torch.rand(B, Q, 1, S, S, generator=g)
    fg = torch.zeros(B, N, K, S, S)
    for n in range(N):
        fg[:, n, :, 4 + 6 * n:16 + 6 * n, 6:22] = 1
    bg = 1 - fg.amax(1, keepdim=True).expand_as(fg)
    return si, fg, bg, qi


def _model(**kwargs):
    torch.manual_seed(0)
    defaults = dict(encoder="cnn_small", n_grid=4, min_pixels=2)
    return FewShotSegNet(**{**defaults, **kwargs})


@pytest.mark.parametrize("resolution,vote", [("image", "max"), ("feature", "mean"), ("image", "cover")])
def test_forward_shapes_and_loss(resolution, vote):
    model = _model(resolution=resolution, vote=vote).train()
    si, fg, bg, qi = _episode(N=2, K=2)
    logits, align = model(si, fg, bg, qi)
    assert logits.shape == (2, 2, 3, 32, 32) and align.shape == () and float(align) == 0
    target = torch.zeros(2, 2, 32, 32, dtype=torch.long)
    F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_config_round_trip_and_the_evaluation_api_matches_forward():
    cfg = ex.configurations[0]()["model"]                    # config.py's model dict (has align_weight)
    cfg = {**cfg, "encoder": "cnn_small", "n_grid": 2, "vote": "mean", "align": True,
           "head": "local", "pretrained": False}
    model = FewShotSegNet.from_config(cfg)
    assert model.config == {k: cfg[k] for k in model.config}
    assert "align_weight" not in model.config and "init_path" not in model.config
    assert "pretrained" not in model.config                   # initial weights, replaced by a snapshot's
    again = FewShotSegNet.from_config(model.config)
    assert again.config == model.config
    again.load_state_dict(model.state_dict())                # same architecture
    # Evaluation path: prototypes once (batch 1), a query batch of several slices.
    model = _model().eval()
    si, fg, bg, qi = _episode(B=1, Q=3)
    with torch.no_grad():
        logits, align = model(si, fg, bg, qi)
        prototypes = model.encode_support(si, fg, bg)
        batched = model.segment(prototypes, qi.view(3, 1, 1, 32, 32))  # 3 x 1 x 2 x H x W
    assert float(align) == 0
    assert batched.shape == (3, 1, 2, 32, 32)
    assert torch.allclose(batched[:, 0], logits[0], atol=1e-4)


def test_alignment_loss():
    model = _model(n_grid=1, align=True).train()             # the PANet baseline with PAR
    si, fg, bg, qi = _episode(N=2, K=2)
    logits, align = model(si, fg, bg, qi)
    assert align.ndim == 0 and torch.isfinite(align) and align.item() > 0
    align.backward()
    assert model.encoder.features[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert float(model(si, fg, bg, qi)[1]) == 0          # eval: no alignment loss


def test_bad_input():
    model = _model(n_grid=4).eval()
    si, fg, bg, qi = _episode()
    with pytest.raises(UserError, match="empty mask"):
        model(si, torch.zeros_like(fg), bg, qi)
    with pytest.raises(UserError, match="model.n_grid = 16"):
        _model(n_grid=16)(si, fg, bg, qi)                     # 16 > 8 x 8 feature map
    for bad in (lambda: model(si, fg[..., :16], bg, qi), lambda: model(si, fg, bg, qi[:1]),
                lambda: model(si, fg, bg, qi[:, :, 0]),  # mask shape, batch sizes, channel axis: asserted
                lambda: model.segment(model.encode_support(si, fg, bg), torch.rand(2, 1, 1, 40, 40))):
        with pytest.raises(AssertionError):
            bad()


def test_training_after_inference_mode_at_the_same_size():
    """Geometry cached during an inference_mode evaluation must not break a later training step."""
    torch.manual_seed(0)
    model = FewShotSegNet(encoder="cnn_small", n_grid=2)
    support = torch.rand(1, 1, 1, 1, 36, 36)
    fg = torch.zeros(1, 1, 1, 36, 36)
    fg[..., 8:20, 8:20] = 1
    query = torch.rand(1, 1, 1, 36, 36)
    model.eval()
    with torch.inference_mode():
        model(support, fg, 1 - fg, query)
    model.train()
    logits, _ = model(support, fg, 1 - fg, query)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


def test_the_schema_checks_model_options_naming_the_key():
    from models.fewshot import check_model_config
    check_model_config({"encoder": "vgg16", "n_grid": 8, "pretrained": True})
    check_model_config(_model().config)                         # what a snapshot stores passes
    for cfg, message in (({"align_weight": -1}, "model.align_weight = -1"),
                         ({"pretrained": "yes"}, "model.pretrained = 'yes'"),
                         ({"vote": "median"}, "eval.model.vote = 'median'")):
        with pytest.raises(UserError, match=message):
            check_model_config(cfg, prefix="eval.model" if "vote" in cfg else "model")


# ---- PANet, exactly as kaixin96/PANet models/fewshot.py (literal loops written from PANet's code)
def _panet_reference(sf, fg, bg, qf, size, scale=20.0):
    """Per episode: prototypes of upsampled features, cosine x scale at feature resolution, then
    the logits upsampled; returns (logits B x Q x (1+N) x H x W, feature scores B x Q x (1+N) x h x w)."""
    B, N, K = sf.shape[:3]
    logits, scores = [], []
    for b in range(B):
        def pooled(n, k, mask):
            up = F.interpolate(sf[b, n, k][None].double(), size=size, mode="bilinear", align_corners=False)
            return (up[0] * mask[None].double()).sum((1, 2)) / (mask.sum() + 1e-5)
        fg_protos = [sum(pooled(n, k, fg[b, n, k]) for k in range(K)) / K for n in range(N)]
        bg_proto = sum(pooled(n, k, bg[b, n, k]) for n in range(N) for k in range(K)) / (N * K)
        dist = [F.cosine_similarity(qf[b].double(), p[None, :, None, None], dim=1) * scale
                for p in [bg_proto] + fg_protos]
        pred = torch.stack(dist, dim=1)                              # Q x (1+N) x h x w
        scores.append(pred)
        logits.append(F.interpolate(pred, size=size, mode="bilinear", align_corners=False))
    return torch.stack(logits), torch.stack(scores)


def _panet_align_reference(scores, qf, sf, fg, bg, scale=20.0):
    """PANet's alignLoss per episode (loops over ways and shots), summed / batch size."""
    B, N, K = sf.shape[:3]
    total = 0.0
    for b in range(B):
        pred_mask = scores[b].argmax(dim=1, keepdim=True)             # Q x 1 x h x w
        binary = [pred_mask == i for i in range(1 + N)]
        skip = [i for i in range(N) if binary[i + 1].sum() == 0]
        pm = torch.stack(binary, dim=1).double()                     # Q x (1+N) x 1 x h x w
        qp = (qf[b].double().unsqueeze(1) * pm).sum((0, 3, 4)) / (pm.sum((0, 3, 4)) + 1e-5)
        loss = 0.0
        for way in range(N):
            if way in skip:
                continue
            for shot in range(K):
                img = sf[b, way, [shot]].double()
                dist = [F.cosine_similarity(img, p[None, :, None, None], dim=1) * scale
                        for p in (qp[0], qp[way + 1])]
                supp_pred = F.interpolate(torch.stack(dist, dim=1), size=fg.shape[-2:], mode="bilinear",
                                          align_corners=False)
                label = torch.full(fg.shape[-2:], 255, dtype=torch.long)
                label[fg[b, way, shot] == 1] = 1
                label[bg[b, way, shot] == 1] = 0
                loss = loss + F.cross_entropy(supp_pred, label[None], ignore_index=255) / K / N
        total = total + loss
    return total / B


@pytest.mark.parametrize("N,K,Q", [(1, 1, 1), (2, 3, 2)])
def test_panet_head_and_alignment_equal_the_panet_loops(N, K, Q):
    from models.panet import PANetHead
    g = torch.Generator().manual_seed(N * 10 + K)
    sf, qf = torch.randn(2, N, K, 6, 5, 7, generator=g), torch.randn(2, Q, 6, 5, 7, generator=g)
    fg = (torch.rand(2, N, K, 19, 26, generator=g) > 0.6).float()
    bg = 1 - fg.amax(1, keepdim=True).expand_as(fg)
    head = PANetHead(20.0)
    protos = head.compute_prototypes(sf, fg, bg, (19, 26))
    scores = head.score_features(protos, qf)
    ref_logits, ref_scores = _panet_reference(sf, fg, bg, qf, (19, 26))
    assert torch.allclose(scores.double(), ref_scores, atol=1e-4)
    assert torch.allclose(head.score(protos, qf).double(), ref_logits, atol=1e-4)
    loss = head.alignment_loss(protos, head.score(protos, qf), qf, sf, fg, bg)
    assert float(loss) == pytest.approx(float(_panet_align_reference(scores, qf, sf, fg, bg)), abs=1e-5)


def test_panet_model_forward_uses_panet_rules():
    model = _model(head="panet", n_grid=1, align=True).train()
    si, fg, bg, qi = _episode(N=2, K=2)
    logits, align = model(si, fg, bg, qi)
    assert logits.shape == (2, 2, 3, 32, 32) and align.item() > 0
    model.eval()
    with torch.no_grad():
        logits, align = model(si, fg, bg, qi)
        feats = model.encoder(torch.cat([si.flatten(0, 2), qi.flatten(0, 1)]))
    ref, _ = _panet_reference(feats[:8].unflatten(0, (2, 2, 2)), fg, bg, feats[8:].unflatten(0, (2, 2)),
                              (32, 32))
    assert float(align) == 0 and torch.allclose(logits.double(), ref, atol=1e-4)
