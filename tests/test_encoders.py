"""Encoders: shapes, ImageNet checkpoint loading (fabricated files), frozen BatchNorm, gradients."""
import logging

import pytest
import torch
import torchvision

from models.encoders import build_encoder
from util.errors import UserError


@pytest.mark.parametrize("name,channels,stride", [("cnn_small", 128, 4), ("vgg16", 512, 8),
                                                  ("resnet50_lslpn", 256, 8)])
def test_output_shape(name, channels, stride):
    torch.manual_seed(0)
    encoder = build_encoder(name).eval()
    assert (encoder.out_channels, encoder.output_stride) == (channels, stride)
    with torch.no_grad():
        out = encoder(torch.rand(1, 1, 32, 48))
    assert out.shape == (1, channels, 32 // stride, 48 // stride)
    with pytest.raises(UserError, match="B x 1 x H x W"):
        encoder(torch.rand(2, 3, 48, 64))                     # grayscale input only


def test_unknown_encoder_and_random_init_log(caplog):
    with pytest.raises(UserError, match="model.encoder = 'vgg19'"):
        build_encoder("vgg19")
    with caplog.at_level(logging.WARNING, logger="lslpn"):
        build_encoder("cnn_small")
    lines = [r for r in caplog.records if r.name == "lslpn"]
    assert len(lines) == 1 and "random initialisation" in lines[0].getMessage()


def _vgg_checkpoint(path):
    """The key layout of vgg16-397923af.pth (conv layers of torchvision's vgg16 plus a classifier
    entry), without building the 100M-parameter classifier."""
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": torch.randn_like(v) for k, v in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    torch.save(state, path)
    return state


def test_vgg16_loads_torchvision_checkpoint(tmp_path):
    state = _vgg_checkpoint(tmp_path / "vgg16.pth")
    encoder = build_encoder("vgg16", str(tmp_path / "vgg16.pth"))
    assert torch.equal(encoder.features[0].weight, state["features.0.weight"])
    assert torch.equal(encoder.features[28].bias, state["features.28.bias"])
    assert encoder.features[28].dilation == (2, 2)           # conv5 dilated


def test_resnet50_loads_torchvision_checkpoint(tmp_path):
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    encoder = build_encoder("resnet50_lslpn", str(tmp_path / "resnet50.pth"))
    assert torch.equal(encoder.stem[0].weight, state["conv1.weight"])
    assert torch.equal(encoder.layer3[5].bn3.running_var, state["layer3.5.bn3.running_var"])
    assert encoder.layer3[0].conv2.dilation == (1, 1) and encoder.layer3[1].conv2.dilation == (2, 2)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        build_encoder("vgg16", str(tmp_path / "missing.pth"))
    state = _vgg_checkpoint(tmp_path / "vgg16.pth")
    del state["features.26.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="features.26.weight"):
        build_encoder("vgg16", str(tmp_path / "partial.pth"))
    with pytest.raises(UserError, match="does not match encoder resnet50_lslpn"):
        build_encoder("resnet50_lslpn", str(tmp_path / "vgg16.pth"))  # another network's keys
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        build_encoder("vgg16", str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("name", ["cnn_small", "vgg16", "resnet50_lslpn"])
def test_gradients_reach_trainable_parameters(name):
    """Every trainable parameter gets a gradient; resnet50_lslpn's BatchNorm stays frozen."""
    torch.manual_seed(0)
    encoder = build_encoder(name).train()
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    encoder(torch.rand(2, 1, 16, 16)).square().mean().backward()
    for pname, p in encoder.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
    if name == "resnet50_lslpn":
        assert bns and all(not m.training for m in bns)      # eval mode even in train()
        assert all(not p.requires_grad and p.grad is None for m in bns for p in m.parameters())
        assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))  # stats untouched
        assert encoder.fuse.training                         # dropout follows train()
    elif name == "cnn_small":
        assert any(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))  # BN trains
