"""PANet's global-prototype head and alignment loss (Wang et al., ICCV 2019) as kaixin96/PANet computes
them, without forming the upsampled features; docs/method.md, "Prototype alignment"."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.grid import EPS, interpolation_matrix
from models.local_prototypes import MEAN_EPS, FeatureResolutionHead, Prototypes, support_cross_entropy


class PANetHead(FeatureResolutionHead):
    """Global prototypes (no parameters), LocalPrototypeHead's interface with one cell."""

    def compute_prototypes(self, support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                           image_size: tuple[int, int]) -> Prototypes:
        """Features B x N x K x C x h x w, masks B x N x K x H x W -> vectors B x (1+N) x 1 x 1 x C."""
        with torch.autocast(support_features.device.type, enabled=False):
            feats = support_features.float()
            B, N, K, C, h, w = feats.shape
            A = interpolation_matrix(image_size[0], h).float().to(feats.device)   # H x h
            Bm = interpolation_matrix(image_size[1], w).float().to(feats.device)  # W x w
            masks = torch.stack([support_bg, support_fg], dim=3).float()        # B x N x K x 2 x H x W
            pulled = A.T @ masks @ Bm                                            # B x N x K x 2 x h x w
            sums = torch.einsum("bnklxy,bnkcxy->bnklc", pulled, feats)           # B x N x K x 2 x C
            means = sums / (masks.sum((-2, -1)) + MEAN_EPS).unsqueeze(-1)
            bg = means[:, :, :, 0].sum((1, 2)) / (N * K)                          # B x C
            fg = means[:, :, :, 1].sum(2) / K                                    # B x N x C
            vectors = torch.cat([bg.unsqueeze(1), fg], dim=1)[:, :, None, None]  # B x (1+N) x 1 x 1 x C
            return Prototypes(vectors, tuple(image_size), (h, w))

    def score_features(self, prototypes: Prototypes, query_features: Tensor) -> Tensor:
        """Scores B x Q x (1 + N) x h x w at feature resolution (prototype batch 1 broadcasts)."""
        with torch.autocast(query_features.device.type, enabled=False):
            query = query_features.float()                                       # B x Q x C x h x w
            protos = prototypes.vectors[:, :, 0, 0]                              # Bp x L x C
            return self.scale * F.cosine_similarity(query.unsqueeze(2), protos[:, None, :, :, None, None],
                                                    dim=3, eps=EPS)

    def alignment_loss(self, prototypes: Prototypes, query_logits: Tensor, query_features: Tensor,
                       support_features: Tensor, support_fg: Tensor, support_bg: Tensor) -> Tensor:
        """PANet's alignLoss per episode, averaged over the batch: the query prediction is the argmax of
        the FEATURE-resolution scores (query_logits unused); a way with an empty prediction is skipped;
        sum over ways and shots / (K * N); an image with no labelled pixel adds 0 (PANet: NaN)."""
        with torch.autocast(query_features.device.type, enabled=False):
            B, N, K, C = support_features.shape[:4]
            L = 1 + N
            with torch.no_grad():  # only the argmax is used
                pred = self.score_features(prototypes, query_features).argmax(dim=2)  # B x Q x h x w
            onehot = F.one_hot(pred, L).permute(0, 1, 4, 2, 3).float()               # B x Q x L x h x w
            sums = torch.einsum("bqlxy,bqcxy->blc", onehot, query_features.float())
            q_protos = sums / (onehot.sum((1, 3, 4)) + MEAN_EPS).unsqueeze(-1)       # B x L x C
            used = onehot[:, :, 1:].sum((1, 3, 4)) > 0                               # B x N: way not skipped
            pair = torch.stack([q_protos[:, :1].expand(B, N, C), q_protos[:, 1:]], dim=2)  # B x N x 2 x C
            supp = support_features.float()                                          # B x N x K x C x h x w
            scores = self.scale * F.cosine_similarity(supp.unsqueeze(3), pair[:, :, None, :, :, None, None],
                                                      dim=4, eps=EPS)               # B x N x K x 2 x h x w
            per_image = support_cross_entropy(scores, support_fg, support_bg)       # B x N x K
            per_image = per_image * used.unsqueeze(-1)
            return (per_image.sum((1, 2)) / (K * N)).mean()
