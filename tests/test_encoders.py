"""Encoders: shapes, the official DeepLab ResNet-50 layout, SSL-ALPNet's DeepLabv3 ResNet-101, initial
weights (fabricated files, torchvision's cache, offline), frozen BatchNorm, gradients. Nothing downloaded."""
import urllib.error

import pytest
import torch
import torchvision

from models import encoders
from models.checkpoint import model_from_checkpoint
from models.encoders import DeepLabV3ResNet101, ResNet50LSLPN, build_encoder
from models.fewshot import FewShotSegNet
from util.errors import UserError


@pytest.mark.parametrize("name,channels,out_hw", [("cnn_small", 128, (8, 12)), ("vgg16", 512, (4, 6)),
                                                  ("resnet50_lslpn", 256, (5, 7))])
def test_output_shape(name, channels, out_hw):
    torch.manual_seed(0)
    encoder = build_encoder(name).eval()
    assert encoder.out_channels == channels
    with torch.no_grad():
        out = encoder(torch.rand(1, 1, 32, 48))
    assert out.shape == (1, channels, *out_hw)
    with pytest.raises(AssertionError):
        encoder(torch.rand(2, 2, 48, 64))                     # one slice, or a 3-slice stack (2.5D), only


def test_official_resnet_layout():
    """The authors' ResNet (docs/method.md, "The official code's rules"): 65 x 65 features at 512
    (ceil-mode pool, stride on the 1x1 conv), dilation 2 in every layer3 block, official key names,
    N(0, 0.01) convs, no ImageNet norm."""
    torch.manual_seed(0)
    encoder = ResNet50LSLPN()
    meta = encoder.to("meta").eval()
    assert meta(torch.empty(1, 1, 512, 512, device="meta")).shape == (1, 256, 65, 65)
    encoder = ResNet50LSLPN()
    assert encoder.maxpool.ceil_mode and encoder.layer2[0].conv1.stride == (2, 2)
    assert encoder.layer2[0].conv2.stride == (1, 1)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.stride == (1, 1) for b in encoder.layer3)
    assert all(layer[0].downsample is not None for layer in (encoder.layer1, encoder.layer2, encoder.layer3))
    assert encoder.layer4[0].dilation == (2, 2) and encoder.layer4[0].bias is not None
    assert isinstance(encoder.layer4[2], torch.nn.Dropout2d) and encoder.layer4[2].p == 0.5
    keys = set(encoder.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.5.conv3.weight", "layer4.0.weight",
            "layer1.0.downsample.0.weight"} <= keys
    assert not any(k.startswith(("stem.", "fuse.", "layer4.1", "fc.")) for k in keys)
    assert abs(encoder.layer3[2].conv2.weight.std().item() - 0.01) < 1e-3
    assert abs(encoder.layer4[0].weight.std().item() - 0.01) < 1e-3
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(encoder.to_rgb(x), x.expand(-1, 3, -1, -1))  # no ImageNet mean/std


def test_official_resnet_batchnorm_affine_frozen_statistics_update():
    torch.manual_seed(0)
    encoder = build_encoder("resnet50_lslpn").train()
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = [m.running_mean.clone() for m in bns]
    encoder(torch.rand(2, 1, 16, 16)).square().mean().backward()
    assert all(m.training for m in bns)
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))  # statistics update
    assert all(m.weight.grad is None for m in bns)
    assert encoder.layer4[0].weight.grad.abs().sum() > 0
    encoder.eval()
    frozen = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        encoder(torch.rand(2, 1, 16, 16))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(frozen, bns))


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


def _randomised(state):
    return {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in state.items()}


def test_resnet50_loads_torchvision_imagenet_checkpoint(tmp_path):
    state = _randomised(torchvision.models.resnet50(weights=None).state_dict())
    torch.save(state, tmp_path / "resnet50.pth")
    torch.manual_seed(0)
    official = build_encoder("resnet50_lslpn", str(tmp_path / "resnet50.pth"))
    assert torch.equal(official.conv1.weight, state["conv1.weight"])
    assert torch.equal(official.layer3[5].bn3.running_var, state["layer3.5.bn3.running_var"])
    assert torch.equal(official.layer1[0].downsample[0].weight, state["layer1.0.downsample.0.weight"])
    assert abs(official.layer4[0].weight.std().item() - 0.01) < 1e-3   # fusion conv not loaded


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[dict, str]:
    """(encoder state, path) of a state dict with the official code's keys: DataParallel's module., the
    model's encoder (random weights, made once)."""
    torch.manual_seed(1)
    encoder_state = _randomised(ResNet50LSLPN().state_dict())
    path = tmp_path_factory.mktemp("official") / "official.pth"
    torch.save({f"module.encoder.{k}": v for k, v in encoder_state.items()}, path)
    return encoder_state, str(path)


def _without(official, key, tmp_path) -> str:
    """The official snapshot without `key`, saved as tmp_path/official.pth."""
    state = torch.load(official[1])
    del state[f"module.encoder.{key}"]
    torch.save(state, tmp_path / "official.pth")
    return str(tmp_path / "official.pth")


def test_bad_snapshots_and_checkpoints(tmp_path, official):
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
    path = _without(official, "layer4.0.weight", tmp_path)           # official snapshot, a key missing
    with pytest.raises(UserError, match=r"official.pth: does not match .*layer4.0.weight"):
        build_encoder("resnet50_lslpn", path)


class _FakeWeights:
    """Stands in for a torchvision Weights enum: a URL naming the file, and a download that fails."""
    def __init__(self, url):
        self.url = url

    def get_state_dict(self, progress=False, check_hash=True):
        raise urllib.error.URLError("offline (test)")


def test_pretrained_from_torch_hub_cache_and_offline(tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert encoders.cached_weights_path("vgg16") == str(tmp_path / "torch_home" / "hub" / "checkpoints"
                                                       / "vgg16-397923af.pth")
    state = _vgg_checkpoint(tmp_path / "vgg.pth")
    digest = hashlib.sha256((tmp_path / "vgg.pth").read_bytes()).hexdigest()[:8]
    name = f"vgg16-{digest}.pth"
    monkeypatch.setattr(encoders, "torchvision_weights", lambda _: _FakeWeights(f"https://example.invalid/{name}"))
    # offline, not cached: one line naming the file, its place and path.init_path; no training
    with pytest.raises(UserError, match=rf"{name} are not in .*torch_home.hub.checkpoints .*path.init_path"):
        FewShotSegNet(encoder="vgg16", pretrained=True)
    # cached with the right hash: loaded
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / name).write_bytes((tmp_path / "vgg.pth").read_bytes())
    model = FewShotSegNet(encoder="vgg16", pretrained=True)
    assert torch.equal(model.encoder.features[2].weight, state["features.2.weight"])
    # path.init_path overrides pretrained
    other = _vgg_checkpoint(tmp_path / "other.pth")
    model = FewShotSegNet(encoder="vgg16", pretrained=True, init_path=str(tmp_path / "other.pth"))
    assert torch.equal(model.encoder.features[2].weight, other["features.2.weight"])
    # a cached file whose hash does not match its name is refused
    (cache / name).write_bytes(b"corrupt")
    with pytest.raises(UserError, match="SHA-256 does not match"):
        FewShotSegNet(encoder="vgg16", pretrained=True)


@pytest.mark.parametrize("name", ["cnn_small", "vgg16"])
def test_gradients_reach_trainable_parameters(name):
    """Every trainable parameter gets a gradient; cnn_small's BatchNorm trains."""
    torch.manual_seed(0)
    encoder = build_encoder(name).train()
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    encoder(torch.rand(2, 1, 16, 16)).square().mean().backward()
    for pname, p in encoder.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
    if name == "cnn_small":
        assert any(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))  # BN trains


def test_official_snapshot_as_init_path_and_as_a_test_snapshot(tmp_path, official):
    """path.init_path, and test.py / evaluate (a raw official-code state dict with the official model
    config), load every weight of an official-code snapshot."""
    encoder_state, path = official
    encoder = build_encoder("resnet50_lslpn", path)
    assert torch.equal(encoder.layer4[0].weight, encoder_state["layer4.0.weight"])
    assert torch.equal(encoder.layer3[1].bn2.running_mean, encoder_state["layer3.1.bn2.running_mean"])
    model, state = model_from_checkpoint(path)
    assert state["official_snapshot"] and model.config["encoder"] == "resnet50_lslpn"
    assert torch.equal(model.encoder.layer4[0].bias, encoder_state["layer4.0.bias"])
    partial = _without(official, "layer2.1.conv2.weight", tmp_path)
    partial_error = r"official.pth \(official-code snapshot\): does not match .*layer2.1.conv2"
    with pytest.raises(UserError, match=partial_error):
        model_from_checkpoint(partial)


def test_deeplabv3_resnet101_is_ssl_alpnets_backbone():
    """torchvision's deeplabv3_resnet101 backbone (same keys, layer3/4 dilated, stride 8, no ASPP) + a
    1x1 conv 2048 -> 256 without bias; no ImageNet mean/std; 32 x 32 features at 256."""
    from torchvision.models.segmentation import deeplabv3_resnet101
    with torch.device("meta"):
        reference = deeplabv3_resnet101(weights=None, weights_backbone=None, aux_loss=True)
        encoder = DeepLabV3ResNet101()           # (the full network is slow on a CPU: shapes on 'meta')
        assert encoder(torch.empty(1, 1, 256, 256)).shape == (1, 256, 32, 32)
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(p.requires_grad for m in bns for p in m.parameters())  # BatchNorm trains, not frozen
    assert all(m.training for m in encoder.train().modules())
    mine = {k for k in encoder.state_dict() if k.startswith("backbone.")}
    theirs = {k: v.shape for k, v in reference.state_dict().items() if k.startswith("backbone.")}
    assert mine == set(theirs) and all(encoder.state_dict()[k].shape == theirs[k] for k in mine)
    assert set(encoder.state_dict()) - mine == {"localconv.weight"} and encoder.localconv.bias is None
    assert encoder.localconv.weight.shape == (256, 2048, 1, 1)
    layer2, layer3, layer4 = encoder.backbone.layer2, encoder.backbone.layer3, encoder.backbone.layer4
    assert layer4[0].conv2.dilation == (2, 2) and layer4[2].conv2.dilation == (4, 4)
    assert layer3[1].conv2.dilation == (2, 2) and layer2[0].conv2.stride == (2, 2)
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(encoder.to_rgb(x), x.expand(-1, 3, -1, -1))


def test_deeplabv3_resnet101_loads_the_coco_layout_and_offline_is_one_line(tmp_path, monkeypatch):
    """load_initial takes backbone.* of a deeplabv3_resnet101 state dict (classifier.* skipped, localconv
    kept); the COCO file is looked up in TORCH_HOME by its torchvision name; offline it is one line."""
    import hashlib
    torch.manual_seed(0)
    with torch.device("meta"):
        encoder = DeepLabV3ResNet101()
    encoder = encoder.to_empty(device="cpu")                  # storage only: random init is slow on a CPU
    with torch.no_grad():                      # to_empty leaves garbage (NaN possible): give the conv values
        encoder.localconv.weight.normal_()
    conv = encoder.localconv.weight.clone()
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in encoder.state_dict().items()
             if k.startswith("backbone.")}
    state["classifier.4.weight"] = torch.zeros(21, 256, 1, 1)
    encoder.load_initial(state, "test")
    assert torch.equal(encoder.backbone.layer4[2].conv3.weight, state["backbone.layer4.2.conv3.weight"])
    assert torch.equal(encoder.localconv.weight, conv)
    del state["backbone.layer3.22.bn2.weight"]
    with pytest.raises(UserError, match="does not match encoder deeplabv3_resnet101.*layer3.22.bn2.weight"):
        encoder.load_initial(state, "test")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert encoders.cached_weights_path("deeplabv3_resnet101").endswith(
        "hub/checkpoints/deeplabv3_resnet101_coco-586e9e4e.pth")
    torch.save({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "small.pth")
    digest = hashlib.sha256((tmp_path / "small.pth").read_bytes()).hexdigest()[:8]
    name = f"deeplabv3_resnet101_coco-{digest}.pth"
    fake = _FakeWeights(f"https://example.invalid/{name}")
    monkeypatch.setattr(encoders, "torchvision_weights", lambda _: fake)
    offline = rf"COCO weights {name} are not in .*torch_home.hub.checkpoints .*init_path"
    with pytest.raises(UserError, match=offline):
        build_encoder("deeplabv3_resnet101", pretrained=True)              # offline, not cached: no training
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / name).write_bytes((tmp_path / "small.pth").read_bytes())   # read from the cache, hash checked
    assert set(encoders.imagenet_state("deeplabv3_resnet101")) == {"backbone.conv1.weight"}
    (cache / name).write_bytes(b"corrupt")
    with pytest.raises(UserError, match="SHA-256 does not match"):
        build_encoder("deeplabv3_resnet101", pretrained=True)
