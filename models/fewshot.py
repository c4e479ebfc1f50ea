"""FewShotSegNet (encoder + parameter-free head `model.head`), build_model ('prototype' or 'senet') and
MODEL_OPTIONS, the model.* options checked once before a model is built. The heads: docs/method.md."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from models.alpnet_head import ALPNetHead
from models.encoders import ENCODER_CLASSES, IMAGENET_WEIGHTS, build_encoder
from models.local_prototypes import RESOLUTIONS, VOTES, LocalPrototypeHead, Prototypes, check_episode
from models.lslpn_plus import FUSIONS, LSLPNPlusHead
from models.panet import PANetHead
from models.senet import METHOD as SENET
from models.senet import SENet
from util.errors import UserError
from util.options import BOOL, GRIDS, Option, check_options, choice, fail, integer, number

PROTOTYPE = "prototype"
METHOD_NAMES = {PROTOTYPE: "prototype (LSLPN/PANet)", SENET: "SENet"}   # model.method

# LSLPN+ options of the local head (models/lslpn_plus.py) and their plain-head values
PLUS_DEFAULTS = {"grids": [], "grid_fusion": "mean", "query_rounds": 0, "query_weight": 0.5,
                 "query_confidence": 0.0}


def local_head(options: Mapping) -> nn.Module:
    """The local head; with LSLPN+ options (grids, query_rounds: models/lslpn_plus.py) the LSLPN+ head."""
    options = {**PLUS_DEFAULTS, **options}
    grids = list(options["grids"] or [options["n_grid"]])

    def at(n_grid: int) -> LocalPrototypeHead:
        return LocalPrototypeHead(n_grid, options["overlap"], options["vote"], options["resolution"],
                                  options["min_pixels"], options["scale"])
    if grids == [options["n_grid"]] and not options["query_rounds"]:
        return at(options["n_grid"])
    return LSLPNPlusHead([at(n) for n in grids], options["grid_fusion"], options["query_rounds"],
                         options["query_weight"], options["query_confidence"])


HEADS = {  # model.head -> the head built from the model options
    "local": local_head,
    "panet": lambda options: PANetHead(options["scale"]),
    "alpnet": lambda options: ALPNetHead(options["scale"]),
}
# The model of the authors' code: the config an official-code snapshot is run with.
OFFICIAL_MODEL_CONFIG = {"encoder": "resnet50_lslpn", "head": "local", "n_grid": 8, "overlap": True,
                         "vote": "max", "resolution": "image", "min_pixels": 10, "scale": 20.0,
                         "align": False, "input_slices": 1, **PLUS_DEFAULTS}
_CONFIG_KEYS = (*OFFICIAL_MODEL_CONFIG, "pretrained")   # the config keys a FewShotSegNet is built from


class FewShotSegNet(nn.Module):
    """forward(support_images B x N x K x C x H x W, support_fg and support_bg B x N x K x H x W,
    query_images B x Q x C x H x W) -> (logits B x Q x (1 + N) x H x W, align_loss), C = input_slices.
    `pretrained`/`init_path` choose initial weights (not in `config`: a snapshot's replace them)."""

    def __init__(self, encoder: str = "vgg16", init_path: str | None = None, n_grid: int = 8,
                 overlap: bool = True, vote: str = "max", resolution: str = "image",
                 min_pixels: float = 10, scale: float = 20.0, align: bool = False,
                 head: str = "local", pretrained: bool = False, input_slices: int = 1, **plus):
        super().__init__()
        plus = {**PLUS_DEFAULTS, **plus}
        self.config = {"encoder": encoder, "head": head, "n_grid": n_grid, "overlap": overlap, "vote": vote,
                       "resolution": resolution, "min_pixels": min_pixels, "scale": float(scale),
                       "align": bool(align), "input_slices": int(input_slices),
                       **plus, "grids": list(plus["grids"])}
        self.encoder = build_encoder(encoder, init_path, pretrained)
        self.head = HEADS[head](self.config)

    @classmethod
    def from_config(cls, model_cfg: Mapping, init_path: str | None = None) -> "FewShotSegNet":
        """Build from config.py's `model` dict (keys it does not use, e.g. align_weight, ignored)."""
        return cls(init_path=init_path, **{k: model_cfg[k] for k in _CONFIG_KEYS if k in model_cfg})

    # ---- batched evaluation API -----------------------------------------------------------
    def encode_support(self, support_images: Tensor, support_fg: Tensor,
                       support_bg: Tensor) -> Prototypes:
        """Prototypes of support images B x N x K x C x H x W with masks B x N x K x H x W."""
        assert support_images.dim() == 6 and support_images.shape[3] == self.config["input_slices"]
        B, N, K, _, H, W = support_images.shape
        feats = self.encoder(support_images.flatten(0, 2))
        feats = feats.unflatten(0, (B, N, K))                     # B x N x K x C x h x w
        check_episode(feats, support_fg, support_bg, (H, W))
        return self.head.compute_prototypes(feats, support_fg, support_bg, (H, W))

    def segment(self, prototypes: Prototypes, query_images: Tensor) -> Tensor:
        """Logits B x Q x (1 + N) x H x W of query images B x Q x C x H x W (prototype batch 1 broadcasts)."""
        shape = (self.config["input_slices"], *prototypes.image_size)    # the support's C x H x W
        assert query_images.dim() == 5 and query_images.shape[2:] == shape, tuple(query_images.shape)
        B, Q = query_images.shape[:2]
        feats = self.encoder(query_images.flatten(0, 1)).unflatten(0, (B, Q))
        return self.head.score(prototypes, feats)

    # ---- training forward -----------------------------------------------------------------
    def forward(self, support_images: Tensor, support_fg: Tensor, support_bg: Tensor,
                query_images: Tensor) -> tuple[Tensor, Tensor]:
        C = self.config["input_slices"]
        assert support_images.dim() == 6 and support_images.shape[3] == C
        B, N, K, _, H, W = support_images.shape
        Q = query_images.shape[1]
        assert query_images.shape == (B, Q, C, H, W), tuple(query_images.shape)
        # One encoder pass over support and query images (PANet), shared BatchNorm statistics.
        feats = self.encoder(torch.cat([support_images.flatten(0, 2), query_images.flatten(0, 1)]))
        support_feats = feats[: B * N * K].unflatten(0, (B, N, K))  # B x N x K x C x h x w
        query_feats = feats[B * N * K:].unflatten(0, (B, Q))        # B x Q x C x h x w
        check_episode(support_feats, support_fg, support_bg, (H, W))
        prototypes = self.head.compute_prototypes(support_feats, support_fg, support_bg, (H, W))
        logits = self.head.score(prototypes, query_feats)           # B x Q x (1+N) x H x W
        if not (self.config["align"] and self.training):
            return logits, logits.new_zeros(())
        return logits, self.head.alignment_loss(prototypes, logits, query_feats, support_feats,
                                                support_fg, support_bg)


# ---- building ------------------------------------------------------------------------------------
def method_of(model_config: Mapping) -> str:
    """'prototype' or 'senet' of a model config (a missing key means 'prototype')."""
    return model_config.get("method") or PROTOTYPE


def build_model(model_config: Mapping, init_path: str | None = None) -> nn.Module:
    """A FewShotSegNet or SENet from a checked model config dict (keys the model does not use ignored)."""
    if method_of(model_config) == SENET:
        return SENet(bool(model_config.get("official_bug", False)))
    return FewShotSegNet.from_config(model_config, init_path)


def model_input_slices(model) -> int:
    """Slices per image a model takes: its config's input_slices, 1 where absent (SENet, test doubles)."""
    return int((getattr(model, "config", None) or {}).get("input_slices", 1))


def with_head_options(model: nn.Module, options: Mapping) -> nn.Module:
    """A copy of a trained prototype model with its head rebuilt with other (parameter-free) options."""
    rebuilt = build_model({**model.config, **dict(options)})
    rebuilt.load_state_dict(model.state_dict())
    device = next(model.parameters()).device
    return rebuilt.to(device).train(model.training)


# ---- the model's options: config.py's model.* keys ------------------------------------------------
MODEL_OPTIONS = {
    "method": choice(*METHOD_NAMES),
    "encoder": choice(*ENCODER_CLASSES),
    "n_grid": integer(1, example="8"),
    "overlap": Option(BOOL),
    "vote": choice(*VOTES),
    "resolution": choice(*RESOLUTIONS),
    "min_pixels": number(0, example="10"),
    "scale": number(0, low_open=True, example="20.0"),
    "align": Option(BOOL),
    "align_weight": number(0, example="1.0"),
    "head": choice(*HEADS),
    "pretrained": Option(BOOL),
    "input_slices": choice(1, 3),   # the slice, or z - 1, z, z + 1 (dataloaders/transforms.py)
    # LSLPN+ (models/lslpn_plus.py; defaults PLUS_DEFAULTS)
    "grids": Option(GRIDS),
    "grid_fusion": choice(*FUSIONS),
    "query_rounds": integer(0, example="1"),
    "query_weight": number(0, 1, example="0.5"),
    "query_confidence": number(0, 1, example="0.0"),
}
SNAPSHOT_OPTIONS = {"official_bug": Option(BOOL)}   # SENet's switch, in a snapshot's model config


def check_model_rules(model: Mapping, prefix: str = "model", input_size: int | None = None) -> None:
    """The rules between the model's keys (missing keys are defaults): SENet takes one slice, 'panet' one
    cell, LSLPN+ options need the local head, pretrained weights exist; every grid fits `input_size`."""
    if model.get("method") == SENET:
        if model.get("input_slices", 1) != 1:
            raise fail(f"{prefix}.input_slices", model["input_slices"], "SENet takes one slice per image "
                       "(2.5D input is an option of the prototype methods)",
                       f"set {prefix}.input_slices=1, or {prefix}.method=prototype")
        return
    head, encoder, n_grid = model.get("head", "local"), model.get("encoder", "vgg16"), model.get("n_grid", 8)
    if head == "panet" and model.get("n_grid", 1) != 1:
        raise fail(f"{prefix}.n_grid", model["n_grid"], "the 'panet' head has global prototypes",
                   f"set {prefix}.n_grid=1")
    if model.get("pretrained", False) and encoder not in IMAGENET_WEIGHTS:
        raise fail(f"{prefix}.pretrained", True, f"encoder {encoder} has no ImageNet weights",
                   f"set {prefix}.pretrained=False")
    if isinstance(input_size, int):
        side = input_size // ENCODER_CLASSES[encoder].output_stride
        for key, largest in (("n_grid", n_grid), ("grids", max(model.get("grids") or [0]))):
            if largest > side:
                raise fail(f"{prefix}.{key}", model.get(key, n_grid), f"larger than the {side} x {side} "
                           f"feature map of encoder {encoder} at input_size {input_size}",
                           f"use {prefix}.{key} <= {side} or a larger input_size")
    for key in ("grids", "query_rounds"):
        if head != "local" and model.get(key):
            raise fail(f"{prefix}.{key}", model[key], f"an LSLPN+ option of the local head, not of the "
                       f"'{head}' head", f"set {prefix}.head=local or {prefix}.{key}="
                       f"{'[]' if key == 'grids' else '0'}")


def check_model_config(model: Mapping, prefix: str = "model", input_size: int | None = None,
                       source: str = "") -> None:
    """A model section alone (a mapping, e.g. a snapshot's): keys, values, then `check_model_rules`;
    messages name `prefix`.<key>, after "`source`: " when given."""
    schema = {f"{prefix}.{key}": option for key, option in {**MODEL_OPTIONS, **SNAPSHOT_OPTIONS}.items()}
    try:
        check_options(model, schema, "config.py", prefix=f"{prefix}.")
        check_model_rules(model, prefix, input_size)
    except UserError as error:
        if not source:
            raise
        raise UserError(f"{source}: {error}") from None
