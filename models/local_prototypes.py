"""Location-sensitive local prototypes (Yu et al., ISBI 2021), method.md section 1, in three steps.

1. Cells (models/grid.py): each axis is covered by cells of `size // n_grid` pixels, stride half
   a cell with `overlap` (else a cell), plus one cell flush with the far border when needed.
2. `LocalPrototypeHead.compute_prototypes`: the local prototype of class c in cell g is the masked
   average of the support features over the pixels of g that belong to c, averaged over the
   shots. Class 0 is the background (mask `support_bg` of every support image of the episode).
3. `LocalPrototypeHead.score`: the score of class c at location (x, y) is `scale * cosine(F_q(x, y),
   p_{c,g})` for the cells g that contain (x, y), combined by the vote: 'max' (the paper), 'mean'
   (average over the covering cells) or 'cover' (the last covering cell in row-major order wins).

Empty cells (`empty_cell`): a shot whose cell holds <= `min_pixels` class pixels gives no average.
- 'zero' (the authors' code, method.md section 6): the shot's cell prototype is the zero vector;
  the prototype is (sum over shots) / K (background: / (K * ways)), and every cell takes part in
  every vote, a zero prototype with cosine 0. Averages divide by (pixel count + 1e-5). The 'max'
  vote is a running maximum that starts at -1, so no logit is below -1.
- 'skip' (this project's earlier rule): only shots with enough pixels are averaged; a cell where
  no shot qualifies has NO prototype and never takes part in the vote of its class; a location
  that no prototype-bearing cell covers gets the lowest score, -scale.
With ReLU features (the official ResNet) the two rules rarely change the argmax; on random signed
features they disagree on many pixels (method.md section 6), yet on the phantom's trained cnn_small
and vgg16 snapshots switching the rule changed no Dice digit (REPRODUCTION.md, measured).

Resolution. 'image' (the authors' semantics): support and query features are bilinearly upsampled
(align_corners=False) to the input size before pooling and scoring; the grid, the pixel counts and
the scores live on image pixels. The upsampled features are never formed (models/grid.py). 'feature'
(fast): masks are area-downsampled to the feature map (soft masks), the grid lives on feature cells,
a cell's pixel count is its soft mask sum times the image pixels per feature cell, and the logits are
bilinearly upsampled at the end. The head computes in float32 even under autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import grid
from models.grid import grid_cells  # noqa: F401  (re-exported: the cell geometry of the head)
from util.errors import UserError

VOTES = ("max", "mean", "cover")
RESOLUTIONS = ("image", "feature")
EMPTY_CELL_RULES = ("zero", "skip")
MAX_VOTE_FLOOR = -1.0   # 'zero' rule: the official running maximum starts at -1
MEAN_EPS = 1e-5         # 'zero' rule: masked averages divide by (pixel count + 1e-5)


@dataclass
class Prototypes:
    """Local prototypes of an episode batch (output of `compute_prototypes`).

    vectors  B x (1 + N) x n_rows x n_cols x C  prototypes (class 0 = background)
    present  B x (1 + N) x n_rows x n_cols      bool: the cell takes part in the vote of the class
    image_size (H, W) and feature_size (h, w) of the support it was computed from.
    """
    vectors: Tensor
    present: Tensor
    image_size: tuple[int, int]
    feature_size: tuple[int, int]

    def to(self, device) -> "Prototypes":
        return Prototypes(self.vectors.to(device), self.present.to(device), self.image_size,
                          self.feature_size)


def check_options(n_grid: int, overlap: bool, vote: str, resolution: str, min_pixels: float,
                  scale: float, empty_cell: str = "skip") -> None:
    """UserError naming the model.* key for an invalid head option."""
    if not isinstance(n_grid, int) or isinstance(n_grid, bool) or n_grid < 1:
        raise UserError(f"model.n_grid = {n_grid!r}: must be an integer >= 1")
    if vote not in VOTES:
        raise UserError(f"model.vote = {vote!r}: unknown vote: use one of {', '.join(VOTES)}")
    if resolution not in RESOLUTIONS:
        raise UserError(f"model.resolution = {resolution!r}: unknown: use 'image' or 'feature'")
    if empty_cell not in EMPTY_CELL_RULES:
        raise UserError(f"model.empty_cell = {empty_cell!r}: unknown rule: use 'zero' (the official "
                        "code) or 'skip'")
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, (int, float)) or min_pixels < 0:
        raise UserError(f"model.min_pixels = {min_pixels!r}: must be a number >= 0")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise UserError(f"model.scale = {scale!r}: must be a number > 0")
    if not isinstance(overlap, bool):
        raise UserError(f"model.overlap = {overlap!r}: must be true or false")


class LocalPrototypeHead(nn.Module):
    """Local prototypes and voting (no parameters). See the module docstring for the method.

    forward(support_features B x N x K x C x h x w, support_fg B x N x K x H x W,
            support_bg B x N x K x H x W, query_features B x Q x C x h x w, image_size (H, W))
        -> logits B x Q x (1 + N) x H x W (channel 0 background).
    """

    def __init__(self, n_grid: int = 8, overlap: bool = True, vote: str = "max",
                 resolution: str = "image", min_pixels: float = 10, scale: float = 20.0,
                 empty_cell: str = "skip"):
        super().__init__()
        check_options(n_grid, overlap, vote, resolution, min_pixels, scale, empty_cell)
        self.n_grid, self.overlap, self.vote = n_grid, overlap, vote
        self.resolution, self.min_pixels, self.scale = resolution, float(min_pixels), float(scale)
        self.empty_cell = empty_cell

    def extra_repr(self) -> str:
        return (f"n_grid={self.n_grid}, overlap={self.overlap}, vote={self.vote!r}, "
                f"resolution={self.resolution!r}, min_pixels={self.min_pixels}, scale={self.scale}, "
                f"empty_cell={self.empty_cell!r}")

    def forward(self, support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                query_features: Tensor, image_size: tuple[int, int]) -> Tensor:
        check_episode(support_features, support_fg, support_bg, image_size)
        if query_features.dim() != 5 or query_features.shape[0] != support_features.shape[0]:
            raise UserError(f"query_features: shape {tuple(query_features.shape)}: expected "
                            f"B x Q x C x h x w with B = {support_features.shape[0]} as the support")
        prototypes = self.compute_prototypes(support_features, support_fg, support_bg, image_size)
        return self.score(prototypes, query_features)

    def _axes(self, image_size, feature_size, device) -> tuple[grid.Axis, grid.Axis]:
        (H, W), (h, w) = image_size, feature_size
        if self.n_grid > min(h, w):
            raise UserError(f"model.n_grid = {self.n_grid}: larger than the feature map ({h} x {w}): "
                            "use a smaller n_grid or a larger input")
        size = (H, W) if self.resolution == "image" else (h, w)
        return (grid.axis(size[0], h, self.n_grid, self.overlap, str(device)),
                grid.axis(size[1], w, self.n_grid, self.overlap, str(device)))

    # ---- step 2: prototypes ---------------------------------------------------------------
    def compute_prototypes(self, support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                           image_size: tuple[int, int]) -> Prototypes:
        """Local prototypes of every class and cell; shapes as `forward`. Returns `Prototypes`."""
        with torch.autocast(support_features.device.type, enabled=False):
            return self._prototypes(support_features.float(), support_fg.float(),
                                    support_bg.float(), tuple(image_size))

    def _prototypes(self, feats: Tensor, fg: Tensor, bg: Tensor, image_size) -> Prototypes:
        B, N, K, C, h, w = feats.shape
        rows, cols = self._axes(image_size, (h, w), feats.device)
        masks = torch.stack([bg, fg], dim=3).flatten(0, 2)        # M=BNK x 2 x H x W
        pixels_per_cell = 1.0
        if self.resolution == "feature":
            pixels_per_cell = image_size[0] * image_size[1] / (h * w)
            masks = F.interpolate(masks, size=(h, w), mode="area")  # M x 2 x h x w (soft)
        counts = grid.cell_counts(masks, rows, cols) * pixels_per_cell               # M x 2 x nr x nc
        sums = grid.cell_sums(masks, feats.flatten(0, 2), rows, cols) * pixels_per_cell  # .. x C
        valid = counts > self.min_pixels                           # M x 2 x nr x nc
        if self.empty_cell == "zero":
            means = sums / (counts + MEAN_EPS).unsqueeze(-1)
        else:
            means = sums / counts.clamp_min(1e-6).unsqueeze(-1)
        means = torch.where(valid.unsqueeze(-1), means, torch.zeros_like(means))
        means = means.unflatten(0, (B, N, K))                      # B x N x K x 2 x nr x nc x C
        valid = valid.unflatten(0, (B, N, K)).to(means.dtype)
        fg_sum, fg_n = means[:, :, :, 1].sum(2), valid[:, :, :, 1].sum(2)   # B x N x nr x nc (x C)
        bg_sum, bg_n = means[:, :, :, 0].sum((1, 2)), valid[:, :, :, 0].sum((1, 2))
        total = torch.cat([bg_sum.unsqueeze(1), fg_sum], dim=1)    # B x (1+N) x nr x nc x C
        if self.empty_cell == "zero":  # every shot counts, zero prototypes included
            divisor = torch.tensor([N * K] + [K] * N, dtype=total.dtype, device=total.device)
            vectors = total / divisor.view(1, -1, 1, 1, 1)
            present = torch.ones(total.shape[:-1], dtype=torch.bool, device=total.device)
            return Prototypes(vectors, present, tuple(image_size), (h, w))
        n_valid = torch.cat([bg_n.unsqueeze(1), fg_n], dim=1)      # B x (1+N) x nr x nc
        vectors = total / n_valid.clamp_min(1).unsqueeze(-1)
        return Prototypes(vectors, n_valid > 0, tuple(image_size), (h, w))

    # ---- step 3: scoring and voting -------------------------------------------------------
    def score(self, prototypes: Prototypes, query_features: Tensor) -> Tensor:
        """Logits B x Q x (1 + N) x H x W of query features B x Q x C x h x w.

        Prototypes with batch 1 are broadcast over a larger query batch.
        """
        Bq, Bp = query_features.shape[0], prototypes.vectors.shape[0]
        if query_features.dim() != 5 or tuple(query_features.shape[-2:]) != prototypes.feature_size \
                or query_features.shape[2] != prototypes.vectors.shape[-1] or Bp not in (1, Bq):
            raise UserError(f"query_features: shape {tuple(query_features.shape)} does not match the "
                            f"prototypes (batch {Bp}, {prototypes.vectors.shape[-1]} channels, "
                            f"feature map {prototypes.feature_size}): expected B x Q x C x h x w")
        with torch.autocast(query_features.device.type, enabled=False):
            return self._score(prototypes, query_features.float())

    def _score(self, prototypes: Prototypes, query: Tensor) -> Tensor:
        B, Q = query.shape[:2]
        rows, cols = self._axes(prototypes.image_size, query.shape[-2:], query.device)
        # cosine with a unit prototype; a zero prototype stays zero (cosine 0)
        unit = F.normalize(prototypes.vectors.float(), dim=-1, eps=grid.EPS)  # Bp x L x nr x nc x C
        scores = self.scale * grid.cell_cosines(unit, query, rows, cols)  # B x Q x nr x nc x L x Lr x Lc
        has = prototypes.present.permute(0, 2, 3, 1)[:, None, :, :, :, None, None]  # Bp x 1 x nr x nc x L x 1 x 1
        low = -self.scale
        if self.vote == "max":     # cells without a prototype score the lowest possible value
            voted = grid.reduce_covering(scores.masked_fill(~has, low), low, rows, cols, "amax")
            if self.empty_cell == "zero":
                voted = voted.clamp_min(MAX_VOTE_FLOOR)
        elif self.vote == "mean":  # average over the covering cells that take part
            total = grid.reduce_covering(scores.masked_fill(~has, 0.0), 0.0, rows, cols, "sum")
            ones = has.expand(-1, -1, -1, -1, -1, rows.length, cols.length).float()
            count = grid.reduce_covering(ones, 0.0, rows, cols, "sum")
            voted = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, low))
        else:  # 'cover': the last covering cell that takes part, in row-major cell order, wins
            voted = grid.last_covering(scores, has, low, rows, cols)
        if self.resolution == "feature":
            voted = F.interpolate(voted.flatten(0, 1), size=prototypes.image_size, mode="bilinear",
                                  align_corners=False).unflatten(0, (B, Q))
        return voted                                               # B x Q x L x H x W


def check_episode(support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                  image_size: tuple[int, int]) -> None:
    """UserError for inconsistent episode tensors or a way whose support masks are all empty."""
    if support_features.dim() != 6:
        raise UserError(f"support_features: shape {tuple(support_features.shape)}: expected "
                        "B x N x K x C x h x w")
    B, N, K = support_features.shape[:3]
    want = (B, N, K, *image_size)
    for name, mask in (("support_fg", support_fg), ("support_bg", support_bg)):
        if tuple(mask.shape) != want:
            raise UserError(f"{name}: shape {tuple(mask.shape)}: expected B x N x K x H x W = {want}")
    empty = support_fg.flatten(2).sum(-1) <= 0                   # B x N
    if bool(empty.any()):
        b, n = (int(i) for i in empty.nonzero()[0])
        raise UserError(f"support_fg: episode {b}, way {n} has an empty mask in every shot: "
                        "give each way at least one shot with foreground pixels")
