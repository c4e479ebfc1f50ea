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


def test_config_round_trip():
    cfg = ex.configurations[0]()["model"]                    # config.py's model dict (has align_weight)
    cfg = {**cfg, "encoder": "cnn_small", "n_grid": 2, "vote": "mean", "align": True}
    model = FewShotSegNet.from_config(cfg)
    assert model.config == {k: cfg[k] for k in model.config}
    assert "align_weight" not in model.config and "init_path" not in model.config
    again = FewShotSegNet.from_config(model.config)
    assert again.config == model.config
    again.load_state_dict(model.state_dict())                # same architecture


def test_encode_support_and_segment_match_forward():
    """Evaluation path: prototypes once (batch 1), a query batch of several slices."""
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


def test_autocast_bfloat16():
    model = _model(resolution="feature").train()
    si, fg, bg, qi = _episode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(si, fg, bg, qi)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_config_errors():
    for kwargs, message in (({"n_grid": 0}, "model.n_grid = 0: must be"),
                            ({"vote": "median"}, "model.vote = 'median'"),
                            ({"resolution": "pixel"}, "model.resolution = 'pixel'"),
                            ({"encoder": "alexnet"}, "model.encoder = 'alexnet'")):
        with pytest.raises(UserError, match=message):
            _model(**kwargs)


def test_bad_input():
    model = _model(n_grid=4).eval()
    si, fg, bg, qi = _episode()
    with pytest.raises(UserError, match="support_fg"):
        model(si, fg[..., :16], bg, qi)                      # mask of the wrong shape
    with pytest.raises(UserError, match="empty mask"):
        model(si, torch.zeros_like(fg), bg, qi)
    with pytest.raises(UserError, match="query_images"):
        model(si, fg, bg, qi[:1])                            # batch sizes differ
    with pytest.raises(UserError, match="query_images"):
        model(si, fg, bg, qi[:, :, 0])                       # channel axis missing
    with pytest.raises(UserError, match="model.n_grid = 16"):
        _model(n_grid=16)(si, fg, bg, qi)                     # 16 > 8 x 8 feature map
    prototypes = model.encode_support(si, fg, bg)
    with pytest.raises(UserError, match="query_images"):
        model.segment(prototypes, torch.rand(2, 1, 1, 40, 40))  # another size than the support


def test_training_after_inference_mode_at_the_same_size():
    """Geometry cached during an inference_mode evaluation must not break a later training step."""
    import torch
    from models.fewshot import FewShotSegNet
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
