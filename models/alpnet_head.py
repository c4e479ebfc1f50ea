"""SSL-ALPNet's adaptive local prototype head (Ouyang et al., ECCV 2020), vectorised over batches, ways
and queries (for 1 of each, the official computation); its rules: docs/method.md, "SSL-ALPNet's head"."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.local_prototypes import (
    IGNORE,
    MEAN_EPS,
    FeatureResolutionHead,
    check_query_features,
    query_as_support,
    support_cross_entropy,
    way_pairs,
)
from util.errors import UserError

THRESHOLD = 0.95        # FG_THRESH = BG_THRESH of the official code
TRAIN_WINDOW = 4        # pooling window of the candidates in training
TEST_WINDOW = 2         # ... at test time (val_wsize)
MODE_WINDOW = 4         # window of the 'gridconv+' / 'mask' decision, training and test
NORM_EPS = 1e-4         # safe_norm's clamp
BG_WEIGHT = 0.05        # query cross-entropy class weight of the background (foreground 1.0)


@dataclass
class ALPPrototypes:
    """Prototype candidates of an episode batch (`ALPNetHead.compute_prototypes`): vectors
    B x (1 + N) x P x C (class 0 = background, zero-padded), present B x (1 + N) x P (bool: the candidate
    takes part in its class's score), image_size (H, W) and feature_size (h, w) of the support."""
    vectors: Tensor
    present: Tensor
    image_size: tuple[int, int]
    feature_size: tuple[int, int]


def query_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits B x Q x (1 + N) x H x W, labels B x Q x H x W (255 ignored), class weights
    background 0.05, every way 1.0."""
    n_classes = logits.shape[2]
    weight = torch.ones(n_classes, dtype=torch.float32, device=logits.device)
    weight[0] = BG_WEIGHT
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(0, 1), weight=weight,
                           ignore_index=IGNORE)


def _unit(x: Tensor, dim: int) -> Tensor:
    """x / max(||x||_2, 1e-4) along `dim` (the official safe_norm)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(NORM_EPS)


class ALPNetHead(FeatureResolutionHead):
    """ALPNet's head (no parameters). Candidate window: TRAIN_WINDOW in train(), TEST_WINDOW in eval()."""

    # ---- prototypes -----------------------------------------------------------------------
    def compute_prototypes(self, support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                           image_size: tuple[int, int]) -> ALPPrototypes:
        """Candidates of every class from support features and image-resolution masks."""
        with torch.autocast(support_features.device.type, enabled=False):
            feats = support_features.float()                                    # B x N x K x C x h x w
            h, w = feats.shape[-2:]
            masks = torch.stack([support_bg, support_fg], dim=3).float()         # B x N x K x 2 x H x W
            small = F.interpolate(masks.flatten(0, 2), size=(h, w), mode="bilinear",
                                  align_corners=False).unflatten(0, masks.shape[:3])  # B x N x K x 2 x h x w
            return self.prototypes_from_feature_masks(feats, small[:, :, :, 1], small[:, :, :, 0],
                                                      tuple(image_size),
                                                      TRAIN_WINDOW if self.training else TEST_WINDOW)

    def prototypes_from_feature_masks(self, feats: Tensor, fg: Tensor, bg: Tensor,
                                      image_size: tuple[int, int], window: int) -> ALPPrototypes:
        """feats B x N x K x C x h x w, soft masks fg / bg B x N x K x h x w at feature resolution."""
        B, N, K, C, h, w = feats.shape
        if min(h, w) < max(window, MODE_WINDOW):
            raise UserError(f"feature map {h} x {w}: the alpnet head pools windows of "
                            f"{max(window, MODE_WINDOW)} feature cells: use a larger input_size")
        cells = F.avg_pool2d(feats.flatten(0, 2), window)                       # BNK x C x h' x w'
        local = cells.flatten(2).transpose(1, 2).unflatten(0, (B, N, K))        # B x N x K x c x C
        pooled = F.avg_pool2d(torch.stack([bg, fg], dim=3).flatten(0, 2), window)  # BNK x 2 x h' x w'
        kept = (pooled.flatten(2) > THRESHOLD).unflatten(0, (B, N, K))          # B x N x K x 2 x c
        sums = torch.einsum("bnkxy,bnkcxy->bnkc", fg, feats)                    # B x N x K x C
        glob = sums / (fg.sum((-2, -1)) + MEAN_EPS).unsqueeze(-1)               # per-shot global prototypes
        mode_cells = F.avg_pool2d(fg.flatten(0, 2).unsqueeze(1), MODE_WINDOW)   # BNK x 1 x . x .
        plus = mode_cells.flatten(1).amax(1).view(B, N, K).amax(2) >= THRESHOLD  # B x N: 'gridconv+'
        n_cells = local.shape[3]
        # foreground slots: K * c local, K global (gridconv+), 1 mean global ('mask')
        fg_vectors = torch.cat([local.flatten(2, 3), glob, glob.mean(2, keepdim=True)], dim=2)
        fg_present = torch.cat([kept[:, :, :, 1].flatten(2) & plus.unsqueeze(-1),
                                plus.unsqueeze(-1).expand(B, N, K), ~plus.unsqueeze(-1)], dim=2)
        # background slots: the local candidates of every way and shot
        bg_vectors = local.flatten(1, 3)                                        # B x NKc x C
        bg_present = kept[:, :, :, 0].flatten(1)                                # B x NKc
        slots = max(N * K * n_cells, K * n_cells + K + 1)
        vectors = feats.new_zeros(B, 1 + N, slots, C)
        present = torch.zeros(B, 1 + N, slots, dtype=torch.bool, device=feats.device)
        vectors[:, 0, : bg_vectors.shape[1]] = bg_vectors
        present[:, 0, : bg_present.shape[1]] = bg_present
        vectors[:, 1:, : fg_vectors.shape[2]] = fg_vectors
        present[:, 1:, : fg_present.shape[2]] = fg_present
        return ALPPrototypes(vectors, present, tuple(image_size), (h, w))

    # ---- scoring --------------------------------------------------------------------------
    def score_features(self, prototypes: ALPPrototypes, query_features: Tensor) -> Tensor:
        """Scores B x Q x (1 + N) x h x w at feature resolution (prototype batch 1 broadcasts)."""
        check_query_features(prototypes, query_features)
        Bq = query_features.shape[0]
        with torch.autocast(query_features.device.type, enabled=False):
            query = _unit(query_features.float(), dim=2)                        # B x Q x C x h x w
            protos = _unit(prototypes.vectors.float(), dim=-1).expand(Bq, -1, -1, -1)  # B x L x P x C
            present = prototypes.present.expand(Bq, -1, -1)                    # B x L x P
            present = present[:, None, :, :, None, None]                        # B x 1 x L x P x 1 x 1
            sims = self.scale * torch.einsum("blpc,bqcxy->bqlpxy", protos, query)  # B x Q x L x P x h x w
            # absent candidates get the lowest finite value (not -inf: a class without any candidate
            # would give NaN weights and NaN gradients), then weight 0: no candidate scores 0
            lowest = torch.finfo(sims.dtype).min
            weights = torch.softmax(sims.masked_fill(~present, lowest), dim=3)
            weights = torch.where(present, weights, torch.zeros_like(weights))
            return (weights * sims).sum(3)                                      # B x Q x L x h x w

    # ---- alignment loss -------------------------------------------------------------------
    def alignment_loss(self, prototypes: ALPPrototypes, query_logits: Tensor, query_features: Tensor,
                       support_features: Tensor, support_fg: Tensor, support_bg: Tensor) -> Tensor:
        """ALPNet's alignLoss averaged over the batch (docs/method.md): the query mask is the argmax of
        the feature-resolution scores (`query_logits` unused), the queries act as shots (window 4), each
        support image (n, k) is scored against the background and way n; mean over ways and shots."""
        with torch.autocast(query_features.device.type, enabled=False):
            N, K = support_features.shape[1:3]
            pred = self.score_features(prototypes, query_features).argmax(dim=2)  # B x Q x h x w
            qfeats, query_fg, query_bg = query_as_support(pred, query_features.float(), N)
            prototypes = self.prototypes_from_feature_masks(qfeats, query_fg, query_bg, support_fg.shape[-2:],
                                                            TRAIN_WINDOW)
            support = support_features.float().flatten(1, 2)                   # B x NK x C x h x w
            scores = self.score_features(prototypes, support)                   # B x NK x L x h x w
            return support_cross_entropy(way_pairs(scores, N, K), support_fg, support_bg).mean()
