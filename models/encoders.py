"""Feature encoders, B x C_in x H x W slices in [0, 1] (C_in 1, repeated to 3 here, or 3 for 2.5D) ->
B x C x h x w, and their initial weights (a local file, an official-code snapshot or torchvision's,
hash-checked): 'vgg16', 'resnet50_lslpn', 'deeplabv3_resnet101', 'cnn_small'; docs/method.md, "Encoders".
"""
from __future__ import annotations

import hashlib
import os
import re

import torch
from torch import Tensor, nn

from util.errors import UserError
from util.io import safe_torch_load

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


# ---- initial weights ------------------------------------------------------------------------------
# torchvision's weights of each encoder, looked up by name when used (torchvision.models.get_weight)
IMAGENET_WEIGHTS = {"vgg16": "VGG16_Weights.IMAGENET1K_V1",
                    "resnet50_lslpn": "ResNet50_Weights.IMAGENET1K_V1",
                    "deeplabv3_resnet101": "DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1"}


def torchvision_weights(encoder: str):
    """torchvision's weights enum of `encoder` (its `url` and `get_state_dict`)."""
    # heavy optional dependency: torchvision loads torch._dynamo (~1.5-2 s of CPU per process)
    from torchvision.models import get_weight
    return get_weight(IMAGENET_WEIGHTS[encoder])


def cached_weights_path(encoder: str) -> str:
    """Where torch.hub keeps (or would keep) the weights file of `encoder`."""
    url = torchvision_weights(encoder).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def imagenet_state(encoder: str) -> dict:
    """torchvision's ImageNet (COCO) state dict for `encoder` (cached, hash-checked); one line offline."""
    path = cached_weights_path(encoder)
    if not os.path.isfile(path):
        try:
            return torchvision_weights(encoder).get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
            trained_on = "COCO" if encoder == "deeplabv3_resnet101" else "ImageNet"
            raise UserError(f"model.pretrained = True: {trained_on} weights "
                            f"{os.path.basename(path)} are not in {os.path.dirname(path)} and could not be "
                            f"downloaded ({type(error).__name__}): copy the file there, or set "
                            "path.init_path to a local copy, or model.pretrained=False to train from random "
                            "weights") from None
    match = re.search(r"-([a-f0-9]+)\.", os.path.basename(path))   # torch.hub's name-<SHA-256 prefix>.pth
    if match is not None:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if not digest.startswith(match.group(1)):
            raise UserError(f"{path}: SHA-256 does not match the hash in its name (corrupt or partial "
                            "download): delete it and retry, or set path.init_path to a good copy")
    return read_state_file(path, key="model.pretrained")


def read_state_file(path: str, key: str = "path.init_path") -> dict:
    """A state dict from a local file (a {'state_dict': ...} wrapper is unwrapped)."""
    if not os.path.isfile(path):
        raise UserError(f"{key} = {path}: file not found: give a local torchvision checkpoint "
                        "(e.g. vgg16-397923af.pth) or an official-code snapshot")
    state = safe_torch_load(path, "cpu", what=key)   # weights_only: pickled code is refused, never run
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{key} = {path}: not a state dict of tensors")
    return state


# ---- encoders -------------------------------------------------------------------------------------
class _Encoder(nn.Module):
    """Common input handling: slices in [0, 1] -> B x 3 x H x W (optionally ImageNet-normalised), and
    initial weights: the keys `_initial` picks from a torchvision state dict (the rest stays random)."""
    name: str                 # model.encoder
    out_channels: int
    output_stride: int

    def __init__(self, imagenet_norm: bool):
        super().__init__()
        self.imagenet_norm = imagenet_norm
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def to_rgb(self, x: Tensor) -> Tensor:
        """B x 1 x H x W or B x 3 x H x W (2.5D) -> B x 3 x H x W (the network's input)."""
        assert x.dim() == 4 and x.shape[1] in (1, 3), tuple(x.shape)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x    # B x 3 x H x W
        return (x - self.mean) / self.std if self.imagenet_norm else x

    _initial = staticmethod(lambda key: True)   # the keys load_initial takes from a torchvision state dict

    def load_initial(self, state: dict, source: str) -> None:
        _load_matching(self, state, source, self.name, self._initial)


class VGG16Encoder(_Encoder):
    """PANet VGG-16, built on torchvision's layer list so that checkpoint keys match `features.*`."""
    name, out_channels, output_stride = "vgg16", 512, 8

    def __init__(self):
        super().__init__(imagenet_norm=True)
        # heavy optional dependency (torchvision loads torch._dynamo: torchvision_weights)
        from torchvision.models.vgg import cfgs, make_layers
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


class _DeepLabBottleneck(nn.Module):
    """ResNet bottleneck of the official code: stride on conv1 (1x1), dilation on conv2 (3x3)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50LSLPN(_Encoder):
    """The authors' DeepLab-style ResNet-50 (layer2 + dilated layer3 -> 256 channels, stride ~8); initial
    weights: torchvision's resnet50 (layer4 and fc skipped, as the official code) or an official snapshot."""
    name, out_channels, output_stride = "resnet50_lslpn", 256, 8

    def __init__(self):
        super().__init__(imagenet_norm=False)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.inplanes = 64
        self.layer1 = self._layer(64, 3)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 6, dilation=2)
        self.layer4 = nn.Sequential(nn.Conv2d(512 + 1024, 256, 3, padding=2, dilation=2, bias=True),
                                    nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.weight.requires_grad_(False)  # affine frozen; running statistics still update
                m.bias.requires_grad_(False)

    def _layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
        layers = [_DeepLabBottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [_DeepLabBottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.to_rgb(x)))))
        mid = self.layer2(self.layer1(x))                         # B x 512 x h x w (65 x 65 at 512)
        deep = self.layer3(mid)                                   # B x 1024 x h x w
        return self.layer4(torch.cat([mid, deep], dim=1))         # B x 256 x h x w

    _initial = staticmethod(lambda key: not key.startswith("layer4."))

    def load_initial(self, state: dict, source: str) -> None:
        if any(k.removeprefix("module.").startswith("encoder.") for k in state):
            load_official_snapshot(self, state, source)
        else:
            super().load_initial(state, source)


def load_official_snapshot(encoder: ResNet50LSLPN, state: dict, source: str) -> None:
    """Every encoder.* weight of an official-code snapshot into `encoder` (missing keys: error)."""
    _load_matching(encoder, state, source, "resnet50_lslpn (official-code snapshot)", prefix="encoder.")


class DeepLabV3ResNet101(_Encoder):
    """SSL-ALPNet's encoder: deeplabv3_resnet101's dilated ResNet-101 + a 1x1 conv 2048 -> 256 (no bias);
    no ImageNet mean/std (SSL-ALPNet feeds z-scored slices); initial weights: COCO, backbone.* only."""
    name, out_channels, output_stride = "deeplabv3_resnet101", 256, 8

    def __init__(self):
        super().__init__(imagenet_norm=False)
        # heavy optional dependency (torchvision loads torch._dynamo: torchvision_weights)
        from torchvision.models import resnet101
        from torchvision.models._utils import IntermediateLayerGetter  # torchvision: as above
        # torchvision's deeplabv3_resnet101 backbone: resnet101 with layer3 and layer4 dilated, up to layer4
        net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        self.backbone = IntermediateLayerGetter(net, return_layers={"layer4": "out"})
        self.localconv = nn.Conv2d(2048, 256, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        deep = self.backbone(self.to_rgb(x))["out"]                # B x 2048 x H/8 x W/8
        return self.localconv(deep)                               # B x 256 x H/8 x W/8

    _initial = staticmethod(lambda key: key.startswith("backbone."))


class SmallCNN(_Encoder):
    """Compact conv-BN-ReLU encoder for CPU demos: stride 4, 128 channels, random init."""
    name, out_channels, output_stride = "cnn_small", 128, 4

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


def _load_matching(target: nn.Module, state: dict, source: str, what: str, keep=lambda key: True,
                   prefix: str = "") -> None:
    """Copy the weights of `target` that `keep` picks from `state` (keys `prefix`<key>, DataParallel's
    'module.' dropped): every one there, with its shape."""
    plain = {k.removeprefix("module."): v for k, v in state.items()}
    given = {k.removeprefix(prefix): v for k, v in plain.items() if k.startswith(prefix)}
    expected = {k: v for k, v in target.state_dict().items() if keep(k)}
    checked = [k for k in expected if not k.endswith("num_batches_tracked")]
    missing = sorted(k for k in checked if k not in given)
    wrong = sorted(f"{k} (shape {tuple(given[k].shape)} != {tuple(expected[k].shape)})"
                   for k in checked if k in given and tuple(given[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        problems = missing + wrong
        raise UserError(f"{source}: does not match encoder {what}: {len(problems)} missing or "
                        f"mismatched keys, e.g. {', '.join(problems[:4])}")
    target.load_state_dict({k: given[k] for k in expected if k in given}, strict=False)


ENCODER_CLASSES = {cls.name: cls for cls in (VGG16Encoder, ResNet50LSLPN, DeepLabV3ResNet101, SmallCNN)}


def build_encoder(name: str, init_path: str | None = None, pretrained: bool = False) -> nn.Module:
    """Encoder `name` (a key of ENCODER_CLASSES) with its initial weights: `init_path` (a local state
    dict file) overrides `pretrained` (torchvision's weights); with neither, random."""
    # the weights are read before the network is built: a missing file stops at once (no RNG is drawn)
    if init_path is not None:
        state, source = read_state_file(init_path), f"path.init_path = {init_path}"
    elif pretrained:
        state, source = imagenet_state(name), f"model.pretrained ({torchvision_weights(name).url})"
    encoder = ENCODER_CLASSES[name]()
    if init_path is not None or pretrained:
        encoder.load_initial(state, source)
    return encoder
