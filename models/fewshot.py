"""FewShotSegNet: encoder + location-sensitive local prototype head (+ PANet's alignment loss).

With `n_grid=1` it is the PANet baseline (global prototypes); `align=True` adds PANet's prototype
alignment regularisation (PAR): in training, the query prediction (argmax masks) builds prototypes
from the query features that segment the support images, with cross-entropy against the support
masks (pixels in neither the support foreground nor its background are ignored).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.encoders import ENCODERS, build_encoder
from models.local_prototypes import LocalPrototypeHead, Prototypes, check_episode, check_options
from util.errors import UserError

_CONFIG_KEYS = ("encoder", "n_grid", "overlap", "vote", "resolution", "min_pixels", "scale", "align")
_IGNORE = 255


class FewShotSegNet(nn.Module):
    """Few-shot segmentation network.

    forward(support_images B x N x K x 1 x H x W, support_fg B x N x K x H x W,
            support_bg B x N x K x H x W, query_images B x Q x 1 x H x W)
        -> (logits B x Q x (1 + N) x H x W, align_loss scalar)
    """

    def __init__(self, encoder: str = "vgg16", init_path: str | None = None, n_grid: int = 8,
                 overlap: bool = True, vote: str = "max", resolution: str = "image",
                 min_pixels: float = 10, scale: float = 20.0, align: bool = False):
        super().__init__()
        if encoder not in ENCODERS:
            raise UserError(f"model.encoder = {encoder!r}: unknown encoder: use one of "
                            f"{', '.join(ENCODERS)}")
        check_options(n_grid, overlap, vote, resolution, min_pixels, scale)
        self.config = {"encoder": encoder, "n_grid": n_grid, "overlap": overlap, "vote": vote,
                       "resolution": resolution, "min_pixels": min_pixels, "scale": float(scale),
                       "align": bool(align)}
        self.encoder = build_encoder(encoder, init_path)
        self.head = LocalPrototypeHead(n_grid, overlap, vote, resolution, min_pixels, scale)
        self.align = bool(align)

    @classmethod
    def from_config(cls, model_cfg: dict, init_path: str | None = None) -> "FewShotSegNet":
        """Build from config.py's `model` dict (keys it does not use, e.g. align_weight, ignored)."""
        return cls(init_path=init_path, **{k: model_cfg[k] for k in _CONFIG_KEYS if k in model_cfg})

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
        logits = self.head.score(prototypes, query_feats)           # B x Q x (1+N) x H x W
        if self.align and self.training:
            align_loss = self._alignment_loss(logits, query_feats, support_feats, support_fg,
                                              support_bg)
        else:
            align_loss = logits.new_zeros(())
        return logits, align_loss

    def _alignment_loss(self, logits: Tensor, query_feats: Tensor, support_feats: Tensor,
                        support_fg: Tensor, support_bg: Tensor) -> Tensor:
        """PANet PAR: query prediction -> query prototypes -> segment the support images.

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
