"""Feature encoders: B x 1 x H x W slices in [0, 1] -> B x C x H/stride x W/stride features.

- 'vgg16': PANet's VGG-16 (method.md section 2): torchvision's VGG-16 conv layers, pools 1-3 of
  kernel 3 stride 2, pool4 of stride 1, conv5 dilated by 2, no pool5 and no ReLU after conv5_3.
  Output stride 8, 512 channels.
- 'resnet50_lslpn': the paper's customized ResNet-50: torchvision ResNet-50 conv1..layer3 with
  layer3 dilated (stride 1, dilation 2); concat(layer2, layer3) -> 3x3 conv (dilation 2) to 256
  channels -> ReLU -> Dropout2d(0.5). Output stride 8, 256 channels. BatchNorm frozen (affine
  parameters without gradient, running statistics in eval mode), as the paper.
- 'cnn_small': a compact conv-BN-ReLU net for the CPU demo, output stride 4, 128 channels,
  about 0.35 GMAC per 128 x 128 slice; no coordinate channels (location comes from the head).

The 1-channel input is repeated to 3 channels here (the only place). The ImageNet encoders also
apply the ImageNet mean/std normalisation their weights expect. `init_path` loads a local
torchvision checkpoint (vgg16-397923af.pth / resnet50-0676ba61.pth key names); never downloads.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.vgg import cfgs, make_layers

from util.errors import UserError

ENCODERS = ("vgg16", "resnet50_lslpn", "cnn_small")
log = logging.getLogger("lslpn")
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _Encoder(nn.Module):
    """Common input handling: B x 1 x H x W in [0, 1] -> 3 channels (optionally ImageNet-normalised)."""
    out_channels: int
    output_stride: int

    def __init__(self, imagenet_norm: bool):
        super().__init__()
        self.imagenet_norm = imagenet_norm
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def to_rgb(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise UserError(f"encoder input: shape {tuple(x.shape)}: expected B x 1 x H x W slices")
        x = x.expand(-1, 3, -1, -1)                               # B x 3 x H x W
        return (x - self.mean) / self.std if self.imagenet_norm else x


class VGG16Encoder(_Encoder):
    """PANet VGG-16, built on torchvision's layer list so that checkpoint keys match `features.*`."""
    out_channels, output_stride = 512, 8

    def __init__(self):
        super().__init__(imagenet_norm=True)
        features = make_layers(cfgs["D"], batch_norm=False)  # torchvision's vgg16().features
        for i in (4, 9, 16):
            features[i] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        features[23] = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        for i in (24, 26, 28):
            features[i].dilation, features[i].padding = (2, 2), (2, 2)
        features[29], features[30] = nn.Identity(), nn.Identity()  # no ReLU after conv5_3, no pool5
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.to_rgb(x))                      # B x 512 x H/8 x W/8

    def load_imagenet(self, state: dict) -> list[str]:
        """Load conv weights from a torchvision vgg16 state dict; returns the missing keys."""
        mine = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        return _load_matching(self, {k: v for k, v in state.items() if k in mine}, mine,
                              lambda k: k.removeprefix("features."), self.features)


class FrozenBNMixin:
    """BatchNorm layers stay in eval mode with affine parameters frozen (the paper)."""

    def freeze_batchnorm(self):
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


class ResNet50LSLPN(FrozenBNMixin, _Encoder):
    """The paper's customized ResNet-50 (layer2 + dilated layer3 -> 256 channels, stride 8)."""
    out_channels, output_stride = 256, 8

    def __init__(self):
        super().__init__(imagenet_norm=True)
        net = resnet50(weights=None, replace_stride_with_dilation=[False, True, False])
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.fuse = nn.Sequential(nn.Conv2d(512 + 1024, 256, 3, padding=2, dilation=2),
                                  nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.freeze_batchnorm()

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer1(self.stem(self.to_rgb(x)))
        mid = self.layer2(x)                                      # B x 512 x H/8 x W/8
        deep = self.layer3(mid)                                   # B x 1024 x H/8 x W/8
        return self.fuse(torch.cat([mid, deep], dim=1))           # B x 256 x H/8 x W/8

    def load_imagenet(self, state: dict) -> list[str]:
        prefix = {"conv1.": "stem.0.", "bn1.": "stem.1."}
        def rename(k):
            for old, new in prefix.items():
                if k.startswith(old):
                    return new + k[len(old):]
            return k
        backbone = {k: v for k, v in self.state_dict().items() if not k.startswith("fuse.")}
        wanted = {}
        for k in state:
            if not k.startswith(("layer4.", "fc.")):
                wanted[rename(k)] = state[k]
        return _load_matching(self, wanted, backbone, lambda k: k, self)


class SmallCNN(_Encoder):
    """Compact conv-BN-ReLU encoder for CPU demos: stride 4, 128 channels, random init."""
    out_channels, output_stride = 128, 4

    def __init__(self):
        super().__init__(imagenet_norm=False)
        def block(cin, cout, stride=1, dilation=1):
            return [nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(
            *block(3, 32, stride=2), *block(32, 64),
            *block(64, 64, stride=2), *block(64, 128),
            *block(128, 128, dilation=2),
            nn.Conv2d(128, 128, 1),                               # linear projection, as PANet's conv5_3
        )
        nn.init.zeros_(self.features[-1].bias)  # no constant offset shared by all positions

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.to_rgb(x))                      # B x 128 x H/4 x W/4


def _load_matching(model: nn.Module, given: dict, expected: dict, to_local, target: nn.Module) -> list:
    """Copy `given` into `target` when the keys and shapes of `expected` all match; else raise."""
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in given)
    wrong = sorted(k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        return missing + [f"{k} (shape {tuple(given[k].shape)} != {tuple(expected[k].shape)})"
                          for k in wrong]
    target.load_state_dict({to_local(k): given[k] for k in expected}, strict=False)
    return []


def build_encoder(name: str, init_path: str | None = None) -> nn.Module:
    """Encoder `name` ('vgg16', 'resnet50_lslpn', 'cnn_small'), optionally ImageNet-initialised.

    `init_path`: a local torchvision checkpoint file (state dict). Missing file, unreadable file or
    mismatching keys raise UserError; without it the encoder starts from random init (one warning).
    """
    builders = {"vgg16": VGG16Encoder, "resnet50_lslpn": ResNet50LSLPN, "cnn_small": SmallCNN}
    if name not in builders:
        raise UserError(f"model.encoder = {name!r}: unknown encoder: use one of {', '.join(ENCODERS)}")
    encoder = builders[name]()
    if init_path is None:
        log.warning("encoder %s: no init_path given: starting from random initialisation", name)
        return encoder
    if name == "cnn_small":
        raise UserError(f"path.init_path = {init_path}: encoder cnn_small has no ImageNet weights: "
                        "set init_path to null or use vgg16 / resnet50_lslpn")
    if not os.path.isfile(init_path):
        raise UserError(f"path.init_path = {init_path}: file not found: give a local torchvision "
                        "checkpoint (e.g. vgg16-397923af.pth); nothing is ever downloaded")
    try:
        state = torch.load(init_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (any unreadable file is the user's to fix)
        raise UserError(f"path.init_path = {init_path}: cannot read it as a torch checkpoint "
                        f"({type(error).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"path.init_path = {init_path}: not a state dict")
    problems = encoder.load_imagenet(state)
    if problems:
        raise UserError(f"path.init_path = {init_path}: does not match encoder {name}: "
                        f"{len(problems)} missing or mismatched keys, e.g. {', '.join(problems[:4])}")
    log.info("encoder %s: ImageNet weights loaded from %s", name, init_path)
    return encoder
