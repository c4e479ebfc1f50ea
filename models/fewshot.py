"""FewShotSegNet: encoder + prototype head (+ an alignment loss), and the model's option check.

Heads (`head`):
- 'local': the location-sensitive local prototype head (models/local_prototypes.py). With
  `align=True` it adds this project's own alignment loss (PANet's idea on the local head: the
  image-resolution argmax of the query logits builds local prototypes from the query features
  that segment the support images; not PANet's exact rule).
- 'panet': PANet's global prototypes exactly (models/panet.py: prototypes from upsampled
  features, scores at feature resolution then upsampled), with PANet's alignment loss when
  `align=True`. n_grid must be 1.

`check_model_options(model_cfg)` validates the config.py `model` dict with one-line errors.
"""
from __future__ import annotations

import numbers
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.encoders import ENCODERS, build_encoder, load_official_snapshot
from models.local_prototypes import (EMPTY_CELL_RULES, LocalPrototypeHead, Prototypes, check_episode,
                                     check_options)
from models.panet import PANetHead, alignment_loss, upsample
from util.errors import UserError

HEADS = ("local", "panet")
# The model of the authors' code (method.md section 6): the config an official-code snapshot is run with.
OFFICIAL_MODEL_CONFIG = {"encoder": "resnet50_lslpn", "head": "local", "n_grid": 8, "overlap": True,
                         "vote": "max", "resolution": "image", "min_pixels": 10, "scale": 20.0,
                         "empty_cell": "zero", "align": False}


def is_official_snapshot(state) -> bool:
    """A raw state dict saved by the official code: tensors under encoder.* (or module.encoder.*)."""
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values()) \
        and all(k.removeprefix("module.").startswith("encoder.") for k in state)
# config keys the network is built from; missing keys take the constructor defaults (older snapshots)
_CONFIG_KEYS = ("encoder", "head", "n_grid", "overlap", "vote", "resolution", "min_pixels", "scale",
                "empty_cell", "align")
_IGNORE = 255


def check_model_options(model_cfg: Mapping, prefix: str = "model") -> None:
    """UserError (one line, naming `prefix`.<key>) for an invalid model option of config.py."""
    cfg = dict(model_cfg)
    if cfg.get("encoder", "vgg16") not in ENCODERS:
        raise UserError(f"{prefix}.encoder = {cfg.get('encoder')!r}: unknown encoder: use one of "
                        f"{', '.join(ENCODERS)}")
    head = cfg.get("head", "local")
    if head not in HEADS:
        raise UserError(f"{prefix}.head = {head!r}: unknown head: use 'local' (LSLPN) or 'panet'")
    try:
        check_options(cfg.get("n_grid", 8), cfg.get("overlap", True), cfg.get("vote", "max"),
                      cfg.get("resolution", "image"), cfg.get("min_pixels", 10), cfg.get("scale", 20.0),
                      cfg.get("empty_cell", "skip"))
    except UserError as error:
        raise UserError(str(error).replace("model.", f"{prefix}.", 1)) from None
    if head == "panet" and cfg.get("n_grid", 8) != 1:
        raise UserError(f"{prefix}.n_grid = {cfg.get('n_grid')}: the 'panet' head has global prototypes: "
                        f"set {prefix}.n_grid=1")
    for key in ("align", "pretrained"):
        if not isinstance(cfg.get(key, False), bool):
            raise UserError(f"{prefix}.{key} = {cfg.get(key)!r}: must be true or false")
    weight = cfg.get("align_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight < 0:
        raise UserError(f"{prefix}.align_weight = {weight!r}: must be a number >= 0")
    if cfg.get("pretrained", False) and cfg.get("encoder") == "cnn_small":
        raise UserError(f"{prefix}.pretrained = True: encoder cnn_small has no ImageNet weights: "
                        f"set {prefix}.pretrained=False")


class FewShotSegNet(nn.Module):
    """Few-shot segmentation network.

    forward(support_images B x N x K x 1 x H x W, support_fg B x N x K x H x W,
            support_bg B x N x K x H x W, query_images B x Q x 1 x H x W)
        -> (logits B x Q x (1 + N) x H x W, align_loss scalar)
    `pretrained`/`init_path` choose the encoder's initial weights (models/encoders.py); they are
    not part of `config` (a snapshot's weights replace them).
    """

    def __init__(self, encoder: str = "vgg16", init_path: str | None = None, n_grid: int = 8,
                 overlap: bool = True, vote: str = "max", resolution: str = "image",
                 min_pixels: float = 10, scale: float = 20.0, align: bool = False,
                 empty_cell: str = "skip", head: str = "local", pretrained: bool = False):
        super().__init__()
        check_model_options({"encoder": encoder, "head": head, "n_grid": n_grid, "overlap": overlap,
                             "vote": vote, "resolution": resolution, "min_pixels": min_pixels,
                             "scale": scale, "empty_cell": empty_cell, "align": align,
                             "pretrained": pretrained})
        self.config = {"encoder": encoder, "head": head, "n_grid": n_grid, "overlap": overlap,
                       "vote": vote, "resolution": resolution, "min_pixels": min_pixels,
                       "scale": float(scale), "empty_cell": empty_cell, "align": bool(align)}
        self.encoder = build_encoder(encoder, init_path, pretrained)
        self.head = PANetHead(scale) if head == "panet" else \
            LocalPrototypeHead(n_grid, overlap, vote, resolution, min_pixels, scale, empty_cell)
        self.align = bool(align)

    @classmethod
    def from_config(cls, model_cfg: Mapping, init_path: str | None = None) -> "FewShotSegNet":
        """Build from config.py's `model` dict (keys it does not use, e.g. align_weight, ignored)."""
        keys = _CONFIG_KEYS + ("pretrained",)
        return cls(init_path=init_path, **{k: model_cfg[k] for k in keys if k in model_cfg})

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, with a one-line error for a snapshot of the other ResNet-50 layout, and
        official-code snapshots (module./encoder.* keys of resnet50_lslpn) accepted."""
        keys = {k.removeprefix("module.") for k in state_dict}
        if self.config["encoder"] == "resnet50_lslpn" and ({"encoder.stem.0.weight", "encoder.fuse.0.weight"} & keys):
            raise UserError("snapshot: weights of the torchvision-layout ResNet-50 (encoder.stem.*, "
                            "encoder.fuse.*): build it with model.encoder=resnet50_torchvision")
        if self.config["encoder"] == "resnet50_torchvision" and "encoder.layer4.0.weight" in keys:
            raise UserError("snapshot: weights of the official-layout ResNet-50 (encoder.conv1, "
                            "encoder.layer4.0): build it with model.encoder=resnet50_lslpn")
        if any(k.startswith("module.") for k in state_dict):
            state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_official_snapshot(self, state_dict: dict, source: str) -> None:
        """Encoder weights of a snapshot saved by the official code (resnet50_lslpn only)."""
        if self.config["encoder"] != "resnet50_lslpn":
            raise UserError(f"{source}: an official-code snapshot holds the resnet50_lslpn encoder: "
                            "set model.encoder=resnet50_lslpn")
        load_official_snapshot(self.encoder, state_dict, source)

    # ---- batched evaluation API -----------------------------------------------------------
    def _encode(self, images: Tensor) -> Tensor:
        """M x 1 x H x W -> M x C x h x w."""
        return self.encoder(images)

    def encode_support(self, support_images: Tensor, support_fg: Tensor,
                       support_bg: Tensor) -> Prototypes:
        """Prototypes of support images B x N x K x 1 x H x W with masks B x N x K x H x W."""
        _check_images("support_images", support_images, 6)
        B, N, K, _, H, W = support_images.shape
        feats = self._encode(support_images.flatten(0, 2))
        feats = feats.unflatten(0, (B, N, K))                     # B x N x K x C x h x w
        check_episode(feats, support_fg, support_bg, (H, W))
        return self.head.compute_prototypes(feats, support_fg, support_bg, (H, W))

    def segment(self, prototypes: Prototypes, query_images: Tensor) -> Tensor:
        """Logits B x Q x (1 + N) x H x W of query images B x Q x 1 x H x W.

        Prototypes of batch 1 are broadcast over any query batch.
        """
        _check_images("query_images", query_images, 5)
        if tuple(query_images.shape[-2:]) != prototypes.image_size:
            raise UserError(f"query_images: size {tuple(query_images.shape[-2:])} differs from the "
                            f"support size {prototypes.image_size}: resize both to input_size")
        B, Q = query_images.shape[:2]
        feats = self._encode(query_images.flatten(0, 1)).unflatten(0, (B, Q))
        return self.head.score(prototypes, feats)

    # ---- training forward -----------------------------------------------------------------
    def forward(self, support_images: Tensor, support_fg: Tensor, support_bg: Tensor,
                query_images: Tensor) -> tuple[Tensor, Tensor]:
        _check_images("support_images", support_images, 6)
        _check_images("query_images", query_images, 5)
        B, N, K, _, H, W = support_images.shape
        Bq, Q = query_images.shape[:2]
        if Bq != B or tuple(query_images.shape[-2:]) != (H, W):
            raise UserError(f"query_images: shape {tuple(query_images.shape)}: expected B x Q x 1 x H x W "
                            f"with B = {B} and H x W = {H} x {W} as the support images")
        # One encoder pass over support and query images (PANet), shared BatchNorm statistics.
        feats = self._encode(torch.cat([support_images.flatten(0, 2), query_images.flatten(0, 1)]))
        support_feats = feats[: B * N * K].unflatten(0, (B, N, K))  # B x N x K x C x h x w
        query_feats = feats[B * N * K:].unflatten(0, (B, Q))        # B x Q x C x h x w
        check_episode(support_feats, support_fg, support_bg, (H, W))
        prototypes = self.head.compute_prototypes(support_feats, support_fg, support_bg, (H, W))
        train_align = self.align and self.training
        if isinstance(self.head, PANetHead):
            scores = self.head.score_features(prototypes, query_feats)  # B x Q x (1+N) x h x w
            logits = upsample(scores, (H, W))
            align_loss = alignment_loss(self.head, scores, query_feats, support_feats, support_fg,
                                        support_bg) if train_align else logits.new_zeros(())
            return logits, align_loss
        logits = self.head.score(prototypes, query_feats)           # B x Q x (1+N) x H x W
        if train_align:
            return logits, self._local_alignment_loss(logits, query_feats, support_feats, support_fg,
                                                      support_bg)
        return logits, logits.new_zeros(())

    def _local_alignment_loss(self, logits: Tensor, query_feats: Tensor, support_feats: Tensor,
                              support_fg: Tensor, support_bg: Tensor) -> Tensor:
        """This project's alignment loss on the local head: query prediction -> query local
        prototypes -> segment the support images (not PANet's exact rule; see models/panet.py).

        Queries act as the shots of every way; support image (n, k) is scored against the
        background and way-n prototypes only; loss averaged over ways and shots.
        """
        B, N, K = support_feats.shape[:3]
        H, W = logits.shape[-2:]
        pred = logits.argmax(dim=2)                                 # B x Q x H x W
        ways = torch.arange(1, N + 1, device=pred.device).view(1, N, 1, 1, 1)
        query_fg = (pred.unsqueeze(1) == ways).float()              # B x N x Q x H x W
        query_bg = (pred == 0).float().unsqueeze(1).expand_as(query_fg)
        qfeats = query_feats.unsqueeze(1).expand(B, N, *query_feats.shape[1:])  # B x N x Q x C x h x w
        prototypes = self.head.compute_prototypes(qfeats, query_fg, query_bg, (H, W))
        supp_logits = self.head.score(prototypes, support_feats.flatten(1, 2))  # B x NK x (1+N) x H x W
        supp_logits = supp_logits.unflatten(1, (N, K))              # B x N x K x (1+N) x H x W
        fg_channel = torch.arange(1, N + 1, device=pred.device).view(1, N, 1, 1, 1, 1)
        fg_logits = supp_logits.gather(3, fg_channel.expand(B, N, K, 1, H, W))
        pair = torch.cat([supp_logits[:, :, :, :1], fg_logits], dim=3)  # B x N x K x 2 x H x W
        target = torch.full(support_fg.shape, _IGNORE, dtype=torch.long, device=pred.device)
        target[support_bg > 0.5] = 0
        target[support_fg > 0.5] = 1
        loss = F.cross_entropy(pair.flatten(0, 2).float(), target.flatten(0, 2),
                               ignore_index=_IGNORE, reduction="none")  # BNK x H x W
        counted = (target.flatten(0, 2) != _IGNORE).flatten(1).sum(1).clamp_min(1)
        per_image = loss.flatten(1).sum(1) / counted                # BNK
        return per_image.mean()


def _check_images(name: str, images: Tensor, dims: int) -> None:
    shape = "B x N x K x 1 x H x W" if dims == 6 else "B x Q x 1 x H x W"
    if images.dim() != dims or images.shape[-3] != 1:
        raise UserError(f"{name}: shape {tuple(images.shape)}: expected {shape} (one channel)")
