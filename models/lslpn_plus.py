"""LSLPN+ (beyond the paper, off by default, no parameters): multi-scale grids and query-informed prototypes
on the local head; docs/method.md, "LSLPN+ head options", and docs/lslpn_plus.md."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import grid
from models.local_prototypes import Head, LocalPrototypeHead, Prototypes

FUSIONS = ("mean", "max")


@dataclass
class ScalePrototypes:
    """The local prototypes of every grid scale (in the head's grid order) and the support's image size."""
    scales: list[Prototypes]
    image_size: tuple[int, int]


def fuse(logits: list[Tensor], fusion: str) -> Tensor:
    """Logits of several grid scales (each B x Q x L x H x W) -> their mean or element-wise maximum."""
    stacked = torch.stack(logits)                                   # S x B x Q x L x H x W
    return stacked.mean(0) if fusion == "mean" else stacked.amax(0)


def mix_prototypes(support: Tensor, own: Tensor, weight: float) -> Tensor:
    """(1 - w) u_support + w u_own where the query has a (nonzero) prototype, else u_support; u: unit
    vectors (zero stays zero), shapes ... x C."""
    unit_support = F.normalize(support, dim=-1, eps=grid.EPS)
    unit_own = F.normalize(own, dim=-1, eps=grid.EPS)
    present = own.abs().sum(dim=-1, keepdim=True) > 0
    return torch.where(present, (1.0 - weight) * unit_support + weight * unit_own, unit_support)


class LSLPNPlusHead(Head):
    """Local prototype heads at several grid scales (`heads`: same vote, resolution, min_pixels and
    scale), fused, with query-informed prototype rounds; shapes as LocalPrototypeHead's."""

    def __init__(self, heads: list[LocalPrototypeHead], fusion: str = "mean", query_rounds: int = 0,
                 query_weight: float = 0.5, query_confidence: float = 0.0):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.fusion, self.query_rounds = fusion, int(query_rounds)
        self.query_weight, self.query_confidence = float(query_weight), float(query_confidence)

    def compute_prototypes(self, support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                           image_size: tuple[int, int]) -> ScalePrototypes:
        return ScalePrototypes([head.compute_prototypes(support_features, support_fg, support_bg, image_size)
                                for head in self.heads], tuple(image_size))

    def score(self, prototypes: ScalePrototypes, query_features: Tensor) -> Tensor:
        """Logits B x Q x (1 + N) x H x W of query features B x Q x C x h x w."""
        logits = fuse([head.score(p, query_features) for head, p in zip(self.heads, prototypes.scales)],
                      self.fusion)
        for _ in range(self.query_rounds):
            logits = self.query_informed(prototypes, query_features, logits)
        return logits

    def query_informed(self, prototypes: ScalePrototypes, query_features: Tensor, logits: Tensor) -> Tensor:
        """One round: every query scored against its own mixed prototypes (module docstring)."""
        B, Q, C, h, w = query_features.shape
        L = logits.shape[2]
        # class masks: c where c is the argmax and its softmax probability >= query_confidence
        top, predicted = logits.detach().float().softmax(dim=2).max(dim=2)  # B x Q x H x W
        classes = torch.arange(L, device=logits.device).view(1, 1, -1, 1, 1)
        masks = ((predicted.unsqueeze(2) == classes) & (top >= self.query_confidence).unsqueeze(2)).float()
        H, W = masks.shape[-2:]
        own_fg = masks[:, :, 1:].flatten(0, 1).unsqueeze(2)             # BQ x N x 1 x H x W
        own_bg = masks[:, :, :1].flatten(0, 1).unsqueeze(2).expand_as(own_fg)
        # each query is an episode of its own: its features are the one shot of every way
        own_features = query_features.flatten(0, 1)[:, None, None].expand(B * Q, L - 1, 1, C, h, w)
        queries = query_features.flatten(0, 1).unsqueeze(1)             # BQ x 1 x C x h x w
        rescored = []
        for head, support in zip(self.heads, prototypes.scales):
            # BQ x L x nr x nc x C
            own = head.compute_prototypes(own_features, own_fg, own_bg, (H, W)).vectors
            per_query = support.vectors.expand(B, *support.vectors.shape[1:])          # B x L x nr x nc x C
            per_query = per_query.unsqueeze(1).expand(B, Q, *per_query.shape[1:]).flatten(0, 1)
            mixed = Prototypes(mix_prototypes(per_query.float(), own, self.query_weight),
                               support.image_size, support.feature_size)
            rescored.append(head.score(mixed, queries).squeeze(1).unflatten(0, (B, Q)))
        return fuse(rescored, self.fusion)                              # B x Q x L x H x W

    def alignment_loss(self, prototypes: ScalePrototypes, query_logits: Tensor, query_features: Tensor,
                       support_features: Tensor, support_fg: Tensor, support_bg: Tensor) -> Tensor:
        """The local head's alignment loss (models/local_prototypes.py) at the first grid scale."""
        return self.heads[0].alignment_loss(prototypes.scales[0], query_logits, query_features,
                                            support_features, support_fg, support_bg)
