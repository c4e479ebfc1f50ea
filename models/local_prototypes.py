"""LSLPN's head (Yu et al., ISBI 2021): `official_cell_loop`, the method as the authors' code loops, and
`LocalPrototypeHead`, the same logits vectorised (models/grid.py); the tests hold the two equal."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import grid
from models.grid import grid_cells
from util.errors import UserError

RESOLUTIONS = ("image", "feature")
MAX_VOTE_FLOOR = -1.0         # the official running maximum starts at -1
MEAN_EPS = 1e-5               # masked averages divide by (pixel count + 1e-5), as PANet's and SSL-ALPNet's
IGNORE = 255                  # label of pixels that take no part in a loss (PANet's, SSL-ALPNet's, SENet's)


# ---- the method, plainly (the reference the fast head equals) ------------------------------
def official_cell_loop(support_features, support_fg, support_bg, query_features, image_size,
                       n_grid, overlap, vote, min_pixels=10, scale=20.0, dtype=torch.float64):
    """Logits B x Q x (1 + N) x H x W, cell by cell in row-major order as the official code loops (shapes
    as `LocalPrototypeHead.forward`). <= min_pixels class pixels: a zero prototype (cosine 0, the cell
    still votes); averages / (pixels + 1e-5); a way's prototype is the sum over shots / K, the
    background's / (K * ways); the 'max' vote is a running maximum from -1."""
    B, N, K = support_features.shape[:3]
    H, W = image_size

    def upsample(features):  # ... x C x h x w -> ... x C x H x W
        flat = features.flatten(0, -4).to(dtype)
        up = F.interpolate(flat, size=(H, W), mode="bilinear", align_corners=False)
        return up.unflatten(0, features.shape[:-3])

    cells = [(r, c) for r in grid_cells(H, n_grid, overlap) for c in grid_cells(W, n_grid, overlap)]
    out = []
    for b in range(B):
        supp, query = upsample(support_features[b]), upsample(query_features[b])  # N x K x C x H x W
        Q = query.shape[0]
        running = torch.full((Q, 1 + N, H, W), MAX_VOTE_FLOOR, dtype=dtype)    # 'max'
        total, count, last = (torch.zeros(Q, 1 + N, H, W, dtype=dtype) for _ in range(3))
        for (r0, r1), (c0, c1) in cells:
            def average(n, k, mask):
                m = mask[r0:r1, c0:c1].to(dtype)
                if m.sum() <= min_pixels:
                    return torch.zeros(supp.shape[2], dtype=dtype)
                return (supp[n, k, :, r0:r1, c0:c1] * m).sum((1, 2)) / (m.sum() + MEAN_EPS)
            background = sum(average(n, k, support_bg[b, n, k]) for n in range(N) for k in range(K)) / (K * N)
            prototypes = [background] + [sum(average(n, k, support_fg[b, n, k]) for k in range(K)) / K
                                         for n in range(N)]
            for c, p in enumerate(prototypes):
                s = scale * F.cosine_similarity(query[:, :, r0:r1, c0:c1], p[None, :, None, None],
                                                dim=1, eps=grid.EPS)                 # Q x Lr x Lc
                running[:, c, r0:r1, c0:c1] = torch.maximum(running[:, c, r0:r1, c0:c1], s)
                total[:, c, r0:r1, c0:c1] += s
                count[:, c, r0:r1, c0:c1] += 1
                last[:, c, r0:r1, c0:c1] = s
        out.append({"max": running, "mean": total / count, "cover": last}[vote])
    return torch.stack(out)


# ---- the vectorised head --------------------------------------------------------------------
@dataclass
class Prototypes:
    """A head's `compute_prototypes`: vectors B x (1 + N) x n_rows x n_cols x C (class 0 = background),
    image_size (H, W) and feature_size (h, w) of the support it was computed from."""
    vectors: Tensor
    image_size: tuple[int, int]
    feature_size: tuple[int, int]


# ---- votes: cell scores B x Q x nr x nc x L x Lr x Lc -> B x Q x L x S_r x S_c -------------
def max_vote(scores: Tensor, rows: grid.Axis, cols: grid.Axis, scale: float) -> Tensor:
    """The paper's vote: the maximum over the covering cells, floored at -1 as the official code."""
    return grid.reduce_covering(scores, -scale, rows, cols, torch.amax).clamp_min(MAX_VOTE_FLOOR)


def mean_vote(scores: Tensor, rows: grid.Axis, cols: grid.Axis, scale: float) -> Tensor:
    """The average over the covering cells."""
    return grid.reduce_covering(scores, 0.0, rows, cols, torch.sum) / grid.covering_count(rows, cols)


def cover_vote(scores: Tensor, rows: grid.Axis, cols: grid.Axis, scale: float) -> Tensor:
    """The last covering cell in row-major order (covering slot 0 on both axes) wins."""
    return grid.reduce_covering(scores, 0.0, rows, cols, lambda values, dim: values.select(dim, 0))


VOTES = {"max": max_vote, "mean": mean_vote, "cover": cover_vote}


def check_query_features(prototypes, query_features: Tensor) -> None:
    """query_features B x Q x C x h x w fit the prototypes: batch 1 or B, C channels, the h x w map."""
    C, Bp = prototypes.vectors.shape[-1], prototypes.vectors.shape[0]
    assert query_features.shape[2:] == (C, *prototypes.feature_size) and Bp in (1, query_features.shape[0])


class Head(nn.Module):
    """A parameter-free head: `compute_prototypes` of the support, then `score` of the queries. forward(
    support_features B x N x K x C x h x w, support_fg / support_bg B x N x K x H x W, query_features
    B x Q x C x h x w, image_size (H, W)) -> logits B x Q x (1 + N) x H x W."""

    def forward(self, support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                query_features: Tensor, image_size: tuple[int, int]) -> Tensor:
        check_episode(support_features, support_fg, support_bg, image_size)
        prototypes = self.compute_prototypes(support_features, support_fg, support_bg, image_size)
        return self.score(prototypes, query_features)


class FeatureResolutionHead(Head):
    """A head that scores at feature resolution (`score_features`) and upsamples (PANet's, ALPNet's)."""

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = float(scale)

    def score(self, prototypes, query_features: Tensor) -> Tensor:
        """Logits B x Q x (1 + N) x H x W: the feature-resolution scores upsampled bilinearly."""
        return upsample(self.score_features(prototypes, query_features), prototypes.image_size)


class LocalPrototypeHead(Head):
    """The logits of `official_cell_loop`, fast, in float32 even under autocast. resolution 'image' (the
    authors'): cells on image pixels, computed on feature windows (models/grid.py); 'feature' (fast): masks
    area-downsampled, cells on the feature map, logits upsampled at the end."""

    def __init__(self, n_grid: int = 8, overlap: bool = True, vote: str = "max",
                 resolution: str = "image", min_pixels: float = 10, scale: float = 20.0):
        super().__init__()
        self.n_grid, self.overlap, self.vote = n_grid, overlap, vote
        self.resolution, self.min_pixels, self.scale = resolution, float(min_pixels), float(scale)

    def _axes(self, image_size, feature_size, device) -> tuple[grid.Axis, grid.Axis]:
        (H, W), (h, w) = image_size, feature_size
        if self.n_grid > min(h, w):
            raise UserError(f"model.n_grid = {self.n_grid}: larger than the feature map ({h} x {w}): "
                            "use a smaller n_grid or a larger input")
        size = (H, W) if self.resolution == "image" else (h, w)
        return (grid.axis(size[0], h, self.n_grid, self.overlap, str(device)),
                grid.axis(size[1], w, self.n_grid, self.overlap, str(device)))

    def compute_prototypes(self, support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                           image_size: tuple[int, int]) -> Prototypes:
        """Local prototypes of every class and cell; shapes as `forward`."""
        with torch.autocast(support_features.device.type, enabled=False):
            feats, fg, bg = support_features.float(), support_fg.float(), support_bg.float()
            B, N, K, C, h, w = feats.shape
            rows, cols = self._axes(image_size, (h, w), feats.device)
            masks = torch.stack([bg, fg], dim=3).flatten(0, 2)        # M=BNK x 2 x H x W
            pixels_per_cell = 1.0
            if self.resolution == "feature":
                pixels_per_cell = image_size[0] * image_size[1] / (h * w)
                masks = F.interpolate(masks, size=(h, w), mode="area")  # M x 2 x h x w (soft)
            counts = grid.cell_counts(masks, rows, cols) * pixels_per_cell               # M x 2 x nr x nc
            sums = grid.cell_sums(masks, feats.flatten(0, 2), rows, cols) * pixels_per_cell  # .. x C
            means = sums / (counts + MEAN_EPS).unsqueeze(-1)
            means = torch.where((counts > self.min_pixels).unsqueeze(-1), means, torch.zeros_like(means))
            means = means.unflatten(0, (B, N, K))                      # B x N x K x 2 x nr x nc x C
            total = torch.cat([means[:, :, :, 0].sum((1, 2)).unsqueeze(1), means[:, :, :, 1].sum(2)],
                              dim=1)                                   # B x (1+N) x nr x nc x C
            divisor = torch.tensor([N * K] + [K] * N, dtype=total.dtype, device=total.device)
            return Prototypes(total / divisor.view(1, -1, 1, 1, 1), tuple(image_size), (h, w))

    def score(self, prototypes: Prototypes, query_features: Tensor) -> Tensor:
        """Logits B x Q x (1 + N) x H x W of query features B x Q x C x h x w (prototypes of batch 1 or B)."""
        check_query_features(prototypes, query_features)
        with torch.autocast(query_features.device.type, enabled=False):
            query = query_features.float()
            B, Q = query.shape[:2]
            rows, cols = self._axes(prototypes.image_size, query.shape[-2:], query.device)
            # cosine with a unit prototype; a zero prototype stays zero (cosine 0)
            unit = F.normalize(prototypes.vectors.float(), dim=-1, eps=grid.EPS)  # Bp x L x nr x nc x C
            scores = self.scale * grid.cell_cosines(unit, query, rows, cols)  # B x Q x nr x nc x L x Lr x Lc
            voted = VOTES[self.vote](scores, rows, cols, self.scale)        # B x Q x L x S_r x S_c
            if self.resolution == "feature":
                voted = upsample(voted, prototypes.image_size)
            return voted                                               # B x Q x L x H x W

    def alignment_loss(self, prototypes: Prototypes, query_logits: Tensor, query_features: Tensor,
                       support_features: Tensor, support_fg: Tensor, support_bg: Tensor) -> Tensor:
        """This project's alignment loss (PANet's idea, not its rule): the argmax of the query logits
        builds local prototypes from the query features (queries as the shots of every way); support
        image (n, k) is scored against the background and way n; cross-entropy on its labelled pixels."""
        N, K = support_features.shape[1:3]
        qfeats, query_fg, query_bg = query_as_support(query_logits.argmax(dim=2), query_features, N)
        query_prototypes = self.compute_prototypes(qfeats, query_fg, query_bg, query_logits.shape[-2:])
        logits = self.score(query_prototypes, support_features.flatten(1, 2))  # B x NK x (1+N) x H x W
        return support_cross_entropy(way_pairs(logits, N, K).float(), support_fg, support_bg).mean()


# ---- shared by the heads' alignment losses --------------------------------------------------
def query_as_support(pred: Tensor, query_features: Tensor, n_ways: int) -> tuple[Tensor, Tensor, Tensor]:
    """The queries as the shots of every way: predicted labels B x Q x h x w, features B x Q x C x h' x w'
    -> features B x N x Q x C x h' x w', foreground (pred = way) and background masks B x N x Q x h x w."""
    ways = torch.arange(1, n_ways + 1, device=pred.device).view(1, n_ways, 1, 1, 1)
    fg = (pred.unsqueeze(1) == ways).float()
    bg = (pred == 0).float().unsqueeze(1).expand_as(fg)
    return query_features.unsqueeze(1).expand(-1, n_ways, *query_features.shape[1:]), fg, bg


def way_pairs(scores: Tensor, n_ways: int, n_shots: int) -> Tensor:
    """Scores B x NK x (1 + N) x h x w of the support images -> B x N x K x 2 x h x w: background and the
    image's own way."""
    scores = scores.unflatten(1, (n_ways, n_shots))                  # B x N x K x (1+N) x h x w
    B, h, w = scores.shape[0], *scores.shape[-2:]
    own = torch.arange(1, n_ways + 1, device=scores.device).view(1, n_ways, 1, 1, 1, 1)
    return torch.cat([scores[:, :, :, :1], scores.gather(3, own.expand(B, n_ways, n_shots, 1, h, w))], dim=3)


def support_cross_entropy(scores: Tensor, support_fg: Tensor, support_bg: Tensor) -> Tensor:
    """Mean cross-entropy B x N x K per support image of scores B x N x K x 2 x h x w (background, way),
    upsampled to the masks' B x N x K x H x W; pixels in neither mask are ignored."""
    B, N, K, H, W = support_fg.shape
    logits = scores.flatten(0, 2)
    if tuple(logits.shape[-2:]) != (H, W):
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    label = torch.full((B, N, K, H, W), IGNORE, dtype=torch.long, device=logits.device)
    label[support_fg > 0.5] = 1
    label[support_bg > 0.5] = 0
    label = label.flatten(0, 2)                                                      # BNK x H x W
    per_pixel = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")
    counted = (label != IGNORE).flatten(1).sum(1).clamp_min(1)
    return (per_pixel.flatten(1).sum(1) / counted).view(B, N, K)


def upsample(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """B x Q x L x h x w -> B x Q x L x H x W, bilinear, align_corners=False."""
    return F.interpolate(scores.flatten(0, 1), size=size, mode="bilinear",
                         align_corners=False).unflatten(0, scores.shape[:2])


def check_episode(support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                  image_size: tuple[int, int]) -> None:
    """UserError for a way whose support masks are all empty (a tiny organ resized away)."""
    want = (*support_features.shape[:3], *image_size)                # B x N x K x H x W
    assert support_features.dim() == 6 and support_fg.shape == support_bg.shape == want
    empty = support_fg.flatten(2).sum(-1) <= 0                   # B x N
    if bool(empty.any()):
        b, n = (int(i) for i in empty.nonzero()[0])
        raise UserError(f"support_fg: episode {b}, way {n} has an empty mask in every shot: "
                        "give each way at least one shot with foreground pixels")
