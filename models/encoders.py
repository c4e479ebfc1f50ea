"""Feature encoders: B x C_in x H x W slices in [0, 1] (C_in 1, or 3 for 2.5D) -> B x C x h x w features.

- 'vgg16': PANet's VGG-16 (docs/method.md, "Encoders"): torchvision's VGG-16 conv layers, pools 1-3 of
  kernel 3 stride 2, pool4 of stride 1, conv5 dilated by 2, no pool5 and no ReLU after conv5_3
  (signed features). Output stride 8, 512 channels. ImageNet mean/std on the input.
- 'resnet50_lslpn': the authors' DeepLab-style ResNet-50 "Res_Deeplab" (docs/method.md, "The official
  code's rules"): bottlenecks with the stride on the first 1x1 conv, stem max pool with ceil_mode (65 x
  65 features at 512 x 512), layer3 with stride 1 and dilation 2 in every block, a 1x1 downsample conv +
  BN in each layer's first block; concat(layer2, layer3) -> 'layer4' = 3x3 conv (dilation 2, 1536 ->
  256, bias) -> ReLU -> Dropout2d(0.5). Every conv weight N(0, 0.01), BatchNorm weight 1, bias 0.
  BatchNorm affine parameters frozen, running statistics update in train mode (the official code trains
  in train() mode). No ImageNet mean/std on the input. Parameter names are the official ones (conv1,
  bn1, layer1-3, layer4.0), so official snapshots load (models/fewshot.py).
- 'deeplabv3_resnet101': SSL-ALPNet's backbone (its models/backbone/torchvision_backbones.py
  TVDeeplabRes101Encoder): torchvision's deeplabv3_resnet101 without its ASPP head, i.e. the
  dilated ResNet-101 (layer3 and layer4 dilated, output stride 8, layer4 = 2048 channels), then a
  new 1x1 conv 2048 -> 256 without bias (PyTorch's default init). 32 x 32 features at 256 x 256.
  BatchNorm trains as usual (train mode, affine trainable), as SSL-ALPNet. No ImageNet mean/std on
  the input (SSL-ALPNet feeds its z-scored slices tiled to 3 channels). Initial weights: torchvision's
  COCO weights (DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1, backbone.* only).
  (The earlier 'resnet50_torchvision' variant was removed: models/removed_options.py.)
- 'cnn_small': a compact conv-BN-ReLU net for the CPU demo, output stride 4, 128 channels; no
  ImageNet weights.

The 1-channel input is repeated to 3 channels here (the only place); a 3-channel input (2.5D: slices
z - 1, z, z + 1, model.input_slices = 3) is taken as it is. ImageNet normalisation, where an encoder uses
it, applies to either. Initial weights
(models/weights.py): `init_path` (a local torchvision checkpoint, or for resnet50_lslpn an
official-code snapshot) overrides `pretrained` (torchvision's weights API: ImageNet, or COCO for
deeplabv3_resnet101).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from models.removed_options import removed_option_error
from models.weights import IMAGENET_WEIGHTS, imagenet_state, read_state_file, strip_prefixes, weights_name
from util.errors import UserError

ENCODERS = ("vgg16", "resnet50_lslpn", "deeplabv3_resnet101", "cnn_small")
log = logging.getLogger("lslpn")
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _Encoder(nn.Module):
    """Common input handling: B x 1 x H x W (repeated) or B x 3 x H x W (2.5D, as is) in [0, 1] ->
    B x 3 x H x W (optionally ImageNet-normalised)."""
    out_channels: int
    output_stride: int

    def __init__(self, imagenet_norm: bool):
        super().__init__()
        self.imagenet_norm = imagenet_norm
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def to_rgb(self, x: Tensor) -> Tensor:
        """B x 1 x H x W or B x 3 x H x W -> B x 3 x H x W (the network's input)."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"encoder input: shape {tuple(x.shape)}: expected B x 1 x H x W slices or "
                            "B x 3 x H x W slice stacks (2.5D)")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x    # B x 3 x H x W
        return (x - self.mean) / self.std if self.imagenet_norm else x

    def load_initial(self, state: dict, source: str) -> None:
        """Load initial weights from a state dict (`source` names it in errors)."""
        raise UserError(f"{source}: encoder {type(self).__name__} has no pretrained weights to load")


class VGG16Encoder(_Encoder):
    """PANet VGG-16, built on torchvision's layer list so that checkpoint keys match `features.*`."""
    out_channels, output_stride = 512, 8

    def __init__(self):
        super().__init__(imagenet_norm=True)
        # heavy optional dependency: importing torchvision loads torch._dynamo (~1.5-2 s of CPU per process),
        # which a process that never builds a torchvision-based encoder (cnn_small, a config error) skips
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

    def load_initial(self, state: dict, source: str) -> None:
        """The conv weights of a torchvision vgg16 state dict (features.*)."""
        mine = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        _load_matching(self, {k: v for k, v in state.items() if k in mine}, mine, source, "vgg16")


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
    """The authors' DeepLab-style ResNet-50 (layer2 + dilated layer3 -> 256 channels, stride ~8)."""
    out_channels, output_stride = 256, 8

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

    def load_initial(self, state: dict, source: str) -> None:
        """A torchvision resnet50 ImageNet state dict (conv1, bn1, layer1-3; layer4 and fc are
        skipped, as the official code) or an official-code snapshot (encoder.* keys)."""
        state = strip_prefixes(state)
        _refuse_layout(state, source)
        if any(k.startswith("encoder.") for k in state):
            load_official_snapshot(self, state, source)
            return
        backbone = {k: v for k, v in self.state_dict().items() if not k.startswith("layer4.")}
        _load_matching(self, {k: v for k, v in state.items() if k in backbone}, backbone, source,
                       "resnet50_lslpn")


def load_official_snapshot(encoder: ResNet50LSLPN, state: dict, source: str) -> None:
    """Every encoder.* weight of an official-code snapshot into `encoder` (missing keys: error)."""
    given = {k.removeprefix("encoder."): v for k, v in strip_prefixes(state).items()
             if k.startswith("encoder.")}
    _refuse_layout(given, source)
    _load_matching(encoder, given, encoder.state_dict(), source, "resnet50_lslpn (official-code snapshot)")


def _refuse_layout(state: dict, source: str) -> None:
    """UserError when weights of the removed torchvision-layout ResNet-50 (keys stem.*, fuse.*) are given."""
    keys = {k.removeprefix("encoder.") for k in state}
    if {"stem.0.weight", "fuse.0.weight"} & keys:
        raise removed_option_error("encoder", "resnet50_torchvision", f"{source}: keys stem.*, fuse.*")


class DeepLabV3ResNet101(_Encoder):
    """SSL-ALPNet's encoder: deeplabv3_resnet101's dilated ResNet-101 + a 1x1 conv 2048 -> 256 (no bias)."""
    out_channels, output_stride = 256, 8

    def __init__(self):
        super().__init__(imagenet_norm=False)
        # heavy optional dependency (torchvision loads torch._dynamo; VGG16Encoder says more)
        from torchvision.models import resnet101
        from torchvision.models._utils import IntermediateLayerGetter  # torchvision: as above
        # torchvision's deeplabv3_resnet101 backbone: resnet101 with layer3 and layer4 dilated, up to layer4
        net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        self.backbone = IntermediateLayerGetter(net, return_layers={"layer4": "out"})
        self.localconv = nn.Conv2d(2048, 256, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        deep = self.backbone(self.to_rgb(x))["out"]                # B x 2048 x H/8 x W/8
        return self.localconv(deep)                               # B x 256 x H/8 x W/8

    def load_initial(self, state: dict, source: str) -> None:
        """The backbone.* weights of a torchvision deeplabv3_resnet101 state dict (its classifier.*
        and aux_classifier.* are skipped); the 1x1 conv keeps its initialisation."""
        state = strip_prefixes(state)
        backbone = {k: v for k, v in self.state_dict().items() if k.startswith("backbone.")}
        _load_matching(self, {k: v for k, v in state.items() if k in backbone}, backbone, source,
                       "deeplabv3_resnet101")


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


def _load_matching(target: nn.Module, given: dict, expected: dict, source: str, what: str) -> None:
    """Copy `given` into `target` when it has every key of `expected` with the same shapes."""
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in given)
    wrong = sorted(f"{k} (shape {tuple(given[k].shape)} != {tuple(expected[k].shape)})"
                   for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        problems = missing + wrong
        raise UserError(f"{source}: does not match encoder {what}: {len(problems)} missing or "
                        f"mismatched keys, e.g. {', '.join(problems[:4])}")
    own = target.state_dict()                                      # once: it is rebuilt on every call
    target.load_state_dict({k: given[k] for k in given if k in own}, strict=False)


ENCODER_CLASSES = {"vgg16": VGG16Encoder, "resnet50_lslpn": ResNet50LSLPN,   # model.encoder -> class
                   "deeplabv3_resnet101": DeepLabV3ResNet101, "cnn_small": SmallCNN}


def build_encoder(name: str, init_path: str | None = None, pretrained: bool = False) -> nn.Module:
    """Encoder `name` (one of ENCODERS) with its initial weights.

    `init_path` (a local state dict file) overrides `pretrained` (torchvision's ImageNet or COCO
    weights, models/weights.py). With neither, random initialisation (one warning line).
    """
    if name not in ENCODER_CLASSES:
        raise UserError(f"model.encoder = {name!r}: unknown encoder: use one of {', '.join(ENCODERS)}")
    if (init_path is not None or pretrained) and name not in IMAGENET_WEIGHTS:
        which = f"path.init_path = {init_path}" if init_path is not None else "model.pretrained = True"
        raise UserError(f"{which}: encoder {name} has no pretrained weights: set path.init_path to null "
                        "and model.pretrained=False, or use vgg16 / resnet50_lslpn / deeplabv3_resnet101")
    # the weights are read before the network is built: a missing file stops at once (no RNG is drawn)
    if init_path is not None:
        state, source = read_state_file(init_path), f"path.init_path = {init_path}"
    elif pretrained:
        state, source = imagenet_state(name), f"model.pretrained ({IMAGENET_WEIGHTS[name].url})"
    encoder = ENCODER_CLASSES[name]()
    if init_path is not None or pretrained:
        encoder.load_initial(state, source)
        log.info("encoder %s: initial weights loaded from %s", name, init_path if init_path is not None
                 else f"torchvision's {weights_name(name)} weights")
    else:
        log.warning("encoder %s: no init_path and pretrained=False: starting from random initialisation",
                    name)
    return encoder
