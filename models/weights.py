"""Encoder initial weights: ImageNet / COCO via torchvision's weights API, local files, official snapshots.

- `imagenet_state(encoder)`: the torchvision state dict of an encoder (VGG16_Weights.IMAGENET1K_V1,
  ResNet50_Weights.IMAGENET1K_V1, or for deeplabv3_resnet101 SSL-ALPNet's COCO initialisation
  DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1), read from torch.hub's cache
  ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints) after checking the SHA-256
  prefix in its file name. When the file is not cached, torchvision downloads it (hash-checked);
  when that fails (offline) a one-line UserError names the file, its expected place and the
  options path.init_path / model.pretrained=False. Nothing trains from random weights silently.
- `read_state_file(path)`: a local state dict (torchvision checkpoint or official-code snapshot).
- `strip_prefixes(state)`: drop DataParallel's 'module.' prefix.
"""
from __future__ import annotations

import hashlib
import os
import re

import torch

from util.errors import UserError
from util.io import safe_torch_load


class _TorchvisionWeights:
    """One of torchvision's weights enums (its `url` and `get_state_dict`), looked up when first used."""

    def __init__(self, encoder: str):
        self.encoder = encoder

    def _weights(self):
        # heavy optional dependency: importing torchvision loads torch._dynamo (~1.5-2 s of CPU per process),
        # which a process that looks up no torchvision weights (cnn_small, a config error) need not pay
        from torchvision.models import ResNet50_Weights, VGG16_Weights
        from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights  # torchvision: as above
        return {"vgg16": VGG16_Weights.IMAGENET1K_V1,
                "resnet50_lslpn": ResNet50_Weights.IMAGENET1K_V1,
                "deeplabv3_resnet101": DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1}[self.encoder]

    @property
    def url(self) -> str:
        return self._weights().url

    def get_state_dict(self, *args, **kwargs) -> dict:
        return self._weights().get_state_dict(*args, **kwargs)


IMAGENET_WEIGHTS = {encoder: _TorchvisionWeights(encoder)
                    for encoder in ("vgg16", "resnet50_lslpn", "deeplabv3_resnet101")}
_TRAINED_ON = {"deeplabv3_resnet101": "COCO"}   # the others: ImageNet
_HASH = re.compile(r"-([a-f0-9]+)\.")


def weights_name(encoder: str) -> str:
    """'ImageNet' or 'COCO': what the encoder's torchvision weights were trained on."""
    return _TRAINED_ON.get(encoder, "ImageNet")


def cached_weights_path(encoder: str) -> str:
    """Where torch.hub keeps (or would keep) the weights file of `encoder`."""
    url = IMAGENET_WEIGHTS[encoder].url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _check_hash(path: str) -> None:
    """The file's SHA-256 starts with the hex digits in its name (torch.hub's convention)."""
    match = _HASH.search(os.path.basename(path))
    if match is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise UserError(f"{path}: SHA-256 does not match the hash in its name (corrupt or partial "
                        "download): delete it and retry, or set path.init_path to a good copy")


def imagenet_state(encoder: str) -> dict:
    """torchvision's ImageNet (COCO) state dict for `encoder` (cached, hash-checked); UserError offline."""
    if encoder not in IMAGENET_WEIGHTS:
        raise UserError(f"model.pretrained = True: encoder {encoder} has no pretrained weights: "
                        "set model.pretrained=False")
    path = cached_weights_path(encoder)
    if not os.path.isfile(path):
        try:
            return IMAGENET_WEIGHTS[encoder].get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
            raise UserError(f"model.pretrained = True: {weights_name(encoder)} weights "
                            f"{os.path.basename(path)} are not in {os.path.dirname(path)} and could not be "
                            "downloaded "
                            f"({type(error).__name__}): copy the file there, or set path.init_path to a "
                            "local copy, or model.pretrained=False to train from random weights") from None
    _check_hash(path)
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


def strip_prefixes(state: dict) -> dict:
    """Drop DataParallel's 'module.' prefix from every key."""
    return {k.removeprefix("module."): v for k, v in state.items()}
