"""Location-sensitive local prototypes (Yu et al., ISBI 2021): the method in one file.

The paper in four steps (method.md section 1), each a function or method below:

1. `grid_cells`: each image axis is covered by cells of `size // n_grid` pixels; with `overlap` the
   cell stride is half a cell (2 * n_grid - 1 cells per side when the size divides), otherwise a
   full cell. When the cells do not reach the far border, one last cell flush with it is added.
   A 2D cell is a (row cell, column cell) pair, numbered row-major.
2. `LocalPrototypeHead.compute_prototypes`: the local prototype of class c in cell g is the masked
   average of the support features over the pixels of g that belong to c, averaged over the shots
   whose mask has more than `min_pixels` class pixels in g. Class 0 is the background (mask
   `support_bg` of every support image of the episode, averaged over all of them, as PANet).
   A cell where no shot has more than `min_pixels` class pixels has NO prototype.
3. `LocalPrototypeHead.score`: the score of class c at location (x, y) is `scale * cosine(F_q(x, y),
   p_{c,g})` for every cell g that contains (x, y) and has a prototype, combined by the vote:
   'max' (the paper), 'mean' (average over those cells) or 'cover' (the last such cell in row-major
   cell order wins, as the official code's overwrite loop).
4. Empty-cell rule: a cell without a prototype never takes part in the vote of its class (it can
   neither win the max nor enter the mean, nor be the 'cover' cell); a location that no
   prototype-bearing cell of a class covers gets that class's lowest possible score, `-scale`.
   (The official code uses a zero prototype, whose cosine 0 can win a max vote; we do not.)

Resolution. 'image' (the paper's semantics): support and query features are bilinearly upsampled
(align_corners=False) to the input size before pooling and scoring, and the grid, the pixel
counts and the scores live on image pixels. We never materialise the upsampled features: bilinear
upsampling is linear and separable, F_up = A F B^T with sparse interpolation matrices A (H x h) and
B (W x w), so every masked cell sum, every dot product and every per-pixel norm is computed on the
small feature window each cell depends on, and equals the upsample-then-pool result exactly (up to
float rounding). 'feature' (fast): masks are area-downsampled to the feature map (soft masks), the
grid lives on feature cells (`grid_cells(h, n_grid, overlap)`), a cell's pixel count is its soft
mask sum times the image pixels per feature cell, and the logits are bilinearly upsampled at the end.

Vectorisation: no Python loop over cells, pixels, shots, classes or batch items on the forward
path; a cell's window is gathered with `index_select`, pooled and scored with batched `einsum`, and
each location gathers only the (at most 2-3 per axis) cells that cover it. The head computes in
float32 even under autocast (it is cheap and the cosine needs the precision).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.errors import UserError

VOTES = ("max", "mean", "cover")
RESOLUTIONS = ("image", "feature")
_EPS = 1e-8  # norm floor of the cosine, as torch.nn.functional.cosine_similarity


def grid_cells(size: int, n_grid: int, overlap: bool) -> list[tuple[int, int]]:
    """Cells along one axis of `size` pixels: a list of (start, stop), stop exclusive.

    Cell length `size // n_grid`; stride half a cell (at least 1) with `overlap`, else a cell;
    one extra cell `(size - length, size)` when the regular cells stop short of the border.
    """
    if n_grid < 1:
        raise UserError(f"model.n_grid = {n_grid}: must be >= 1")
    length = size // n_grid
    if length < 1:
        raise UserError(f"model.n_grid = {n_grid}: larger than the map it divides ({size} pixels): "
                        "use a smaller n_grid or a larger input")
    stride = max(length // 2, 1) if overlap else length
    cells = [(start, start + length) for start in range(0, size - length + 1, stride)]
    if cells[-1][1] < size:
        cells.append((size - length, size))
    return cells


def interpolation_matrix(out_size: int, in_size: int) -> Tensor:
    """out_size x in_size float64 weights of 1D bilinear resizing (align_corners=False)."""
    eye = torch.eye(in_size, dtype=torch.float64).view(1, in_size, in_size, 1)
    resized = F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=False)
    return resized[0, :, :, 0].T.contiguous()  # out_size x in_size


@dataclass(frozen=True)
class _Axis:
    """Precomputed geometry of one axis: `size` scoring pixels over `in_size` feature cells."""
    n_cells: int
    length: int            # pixels per cell
    window: int            # feature rows each cell depends on
    pixel_index: Tensor    # (n_cells * length,) long: pixel of (cell, offset)
    window_index: Tensor   # (n_cells * window,) long: feature row of (cell, window offset)
    interp: Tensor         # n_cells x length x window: bilinear weights restricted to the window
    cover_slot: Tensor     # (size * k_cover,) long: row of (cell, offset) in n_cells * length
    cover_cell: Tensor     # size x k_cover long: covering cell id, -1 where none
    norm_coef: Tensor      # band x in_size x size: coefficients of the per-pixel squared norm


def _build_axis(size: int, in_size: int, n_grid: int, overlap: bool) -> _Axis:
    cells = grid_cells(size, n_grid, overlap)
    n_cells, length = len(cells), cells[0][1] - cells[0][0]
    starts = torch.tensor([c[0] for c in cells])
    pixel_index = (starts[:, None] + torch.arange(length)).reshape(-1)     # n*L
    interp = interpolation_matrix(size, in_size)                            # size x in_size
    used = interp[pixel_index].view(n_cells, length, in_size).abs().sum(1) > 0  # n x in_size
    cols = torch.arange(in_size)
    first = torch.where(used, cols, in_size).amin(1)
    last = torch.where(used, cols, -1).amax(1)
    window = int((last - first + 1).max())
    win_start = first.clamp(max=in_size - window)
    window_index = (win_start[:, None] + torch.arange(window)).reshape(-1)  # n*window
    cell_interp = interp[pixel_index].view(n_cells, length, in_size)
    cell_interp = torch.gather(cell_interp, 2, window_index.view(n_cells, 1, window).expand(-1, length, -1))
    # Covering cells of every pixel, padded with -1.
    pix = torch.arange(size)
    covers = (pix[:, None] >= starts[None]) & (pix[:, None] < starts[None] + length)  # size x n
    k_cover = int(covers.sum(1).max())
    cell_ids = torch.where(covers, torch.arange(n_cells), -1)
    cover_cell = cell_ids.sort(dim=1, descending=True).values[:, :k_cover]  # size x k
    offset = pix[:, None] - starts[cover_cell.clamp(min=0)]
    cover_slot = torch.where(cover_cell >= 0, cover_cell * length + offset, 0).reshape(-1)
    # Squared norm of the column-interpolated features: sum_j sum_d coef[d, j, y] g_d[j], with
    # g_d[j] = <f_j, f_{j+d}>; band = nonzero weights per output pixel.
    nz = interp != 0
    band = int((torch.where(nz, cols, -1).amax(1) - torch.where(nz, cols, in_size).amin(1)).max()) + 1
    coef = torch.zeros(band, in_size, size, dtype=torch.float64)
    for d in range(band):  # geometry is built once and cached; band is 1 or 2
        prod = interp[:, : in_size - d] * interp[:, d:]
        coef[d, : in_size - d] = (prod if d == 0 else 2 * prod).T
    return _Axis(n_cells, length, window, pixel_index, window_index, cell_interp.float(),
                 cover_slot, cover_cell, coef.float())


@functools.lru_cache(maxsize=64)
def _axis(size: int, in_size: int, n_grid: int, overlap: bool, device: str) -> _Axis:
    axis = _build_axis(size, in_size, n_grid, overlap)
    return _Axis(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(axis).items()})


@dataclass
class Prototypes:
    """Local prototypes of an episode batch (output of `compute_prototypes`).

    vectors  B x (1 + N) x n_rows x n_cols x C  masked averages (class 0 = background)
    present  B x (1 + N) x n_rows x n_cols      bool: the cell has a prototype for the class
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
                  scale: float) -> None:
    """UserError naming the model.* key for an invalid head option."""
    if not isinstance(n_grid, int) or isinstance(n_grid, bool) or n_grid < 1:
        raise UserError(f"model.n_grid = {n_grid!r}: must be an integer >= 1")
    if vote not in VOTES:
        raise UserError(f"model.vote = {vote!r}: unknown vote: use one of {', '.join(VOTES)}")
    if resolution not in RESOLUTIONS:
        raise UserError(f"model.resolution = {resolution!r}: unknown: use 'image' or 'feature'")
    if min_pixels < 0:
        raise UserError(f"model.min_pixels = {min_pixels}: must be >= 0")
    if not scale > 0:
        raise UserError(f"model.scale = {scale}: must be > 0")
    if not isinstance(overlap, bool):
        raise UserError(f"model.overlap = {overlap!r}: must be true or false")


class LocalPrototypeHead(nn.Module):
    """Local prototypes and voting (no parameters). See the module docstring for the method.

    forward(support_features B x N x K x C x h x w, support_fg B x N x K x H x W,
            support_bg B x N x K x H x W, query_features B x Q x C x h x w, image_size (H, W))
        -> logits B x Q x (1 + N) x H x W (channel 0 background).
    """

    def __init__(self, n_grid: int = 8, overlap: bool = True, vote: str = "max",
                 resolution: str = "image", min_pixels: float = 10, scale: float = 20.0):
        super().__init__()
        check_options(n_grid, overlap, vote, resolution, min_pixels, scale)
        self.n_grid, self.overlap, self.vote = n_grid, overlap, vote
        self.resolution, self.min_pixels, self.scale = resolution, float(min_pixels), float(scale)

    def extra_repr(self) -> str:
        return (f"n_grid={self.n_grid}, overlap={self.overlap}, vote={self.vote!r}, "
                f"resolution={self.resolution!r}, min_pixels={self.min_pixels}, scale={self.scale}")

    def forward(self, support_features: Tensor, support_fg: Tensor, support_bg: Tensor,
                query_features: Tensor, image_size: tuple[int, int]) -> Tensor:
        check_episode(support_features, support_fg, support_bg, image_size)
        if query_features.dim() != 5 or query_features.shape[0] != support_features.shape[0]:
            raise UserError(f"query_features: shape {tuple(query_features.shape)}: expected "
                            f"B x Q x C x h x w with B = {support_features.shape[0]} as the support")
        prototypes = self.compute_prototypes(support_features, support_fg, support_bg, image_size)
        return self.score(prototypes, query_features)

    # ---- geometry -------------------------------------------------------------------------
    def _axes(self, image_size, feature_size, device) -> tuple[_Axis, _Axis]:
        (H, W), (h, w) = image_size, feature_size
        if self.n_grid > min(h, w):
            raise UserError(f"model.n_grid = {self.n_grid}: larger than the feature map ({h} x {w}): "
                            "use a smaller n_grid or a larger input")
        size = (H, W) if self.resolution == "image" else (h, w)
        return (_axis(size[0], h, self.n_grid, self.overlap, str(device)),
                _axis(size[1], w, self.n_grid, self.overlap, str(device)))

    @staticmethod
    def _windows(features: Tensor, rows: _Axis, cols: _Axis) -> Tensor:
        """M x C x h x w -> M x C x n_rows x win_r x n_cols x win_c (each cell's feature window)."""
        win = features.index_select(2, rows.window_index).index_select(3, cols.window_index)
        return win.unflatten(3, (cols.n_cells, cols.window)).unflatten(2, (rows.n_cells, rows.window))

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
        masks = torch.stack([bg, fg], dim=3).flatten(0, 2)        # BNK x 2 x H x W
        pixels_per_cell = 1.0
        if self.resolution == "feature":
            pixels_per_cell = image_size[0] * image_size[1] / (h * w)
            masks = F.interpolate(masks, size=(h, w), mode="area")  # BNK x 2 x h x w (soft)
        # Cell sums of the masks (pixel counts) and their bilinear pull-back onto feature windows.
        m_rows = masks.index_select(2, rows.pixel_index).unflatten(2, (rows.n_cells, rows.length))
        counts = m_rows.sum(3).index_select(3, cols.pixel_index)  # BNK x 2 x nr x (nc*Lc)
        counts = counts.unflatten(3, (cols.n_cells, cols.length)).sum(4) * pixels_per_cell
        pulled = torch.einsum("rxi,mtrxy->mtriy", rows.interp, m_rows)  # BNK x 2 x nr x wr x W
        pulled = pulled.index_select(4, cols.pixel_index).unflatten(4, (cols.n_cells, cols.length))
        weights = torch.einsum("nyj,mtriny->mtrinj", cols.interp, pulled)  # .. nr x wr x nc x wc
        win = self._windows(feats.flatten(0, 2), rows, cols)     # BNK x C x nr x wr x nc x wc
        sums = torch.einsum("mcrinj,mtrinj->mtrnc", win, weights) * pixels_per_cell
        # Masked averages; shots (and, for the background, ways) with too few pixels drop out.
        valid = counts > self.min_pixels                           # BNK x 2 x nr x nc
        means = sums / counts.clamp_min(1e-6).unsqueeze(-1)
        means = torch.where(valid.unsqueeze(-1), means, torch.zeros_like(means))
        means = means.unflatten(0, (B, N, K))                      # B x N x K x 2 x nr x nc x C
        valid = valid.unflatten(0, (B, N, K)).to(means.dtype)
        fg_sum, fg_n = means[:, :, :, 1].sum(2), valid[:, :, :, 1].sum(2)   # B x N x nr x nc (x C)
        bg_sum, bg_n = means[:, :, :, 0].sum((1, 2)), valid[:, :, :, 0].sum((1, 2))
        total = torch.cat([bg_sum.unsqueeze(1), fg_sum], dim=1)    # B x (1+N) x nr x nc x C
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
        B, Q, C, h, w = query.shape
        rows, cols = self._axes(prototypes.image_size, (h, w), query.device)
        vectors = F.normalize(prototypes.vectors.float(), dim=-1, eps=_EPS).expand(B, -1, -1, -1, -1)
        present = prototypes.present.expand(B, -1, -1, -1)        # B x L x nr x nc
        win = self._windows(query.flatten(0, 1), rows, cols).unflatten(0, (B, Q))
        dots = torch.einsum("bqcrinj,blrnc->bqlrinj", win, vectors)  # cell windows . prototypes
        dots = torch.einsum("rxi,bqlrinj->bqlrxnj", rows.interp, dots)
        dots = torch.einsum("nyj,bqlrxnj->bqlrxny", cols.interp, dots)  # .. nr x Lr x nc x Lc
        dots = dots.flatten(5, 6).flatten(3, 4)                     # B x Q x L x (nr Lr) x (nc Lc)
        # Every location gathers the cells that cover it: B x Q x L x S_r x k_r x S_c x k_c.
        kr, kc = rows.cover_cell.shape[1], cols.cover_cell.shape[1]
        dots = dots.index_select(3, rows.cover_slot).index_select(4, cols.cover_slot)
        dots = dots.unflatten(4, (-1, kc)).unflatten(3, (-1, kr))
        norm = self._query_norm(query.flatten(0, 1), rows, cols).unflatten(0, (B, Q))
        scores = self.scale * dots / norm.clamp_min(_EPS)[:, :, None, :, None, :, None]
        cell_r, cell_c = rows.cover_cell, cols.cover_cell        # S_r x k_r, S_c x k_c
        covered = (cell_r >= 0)[:, :, None, None] & (cell_c >= 0)[None, None]
        has = present.index_select(2, cell_r.clamp(min=0).flatten()).index_select(
            3, cell_c.clamp(min=0).flatten())
        has = has.unflatten(3, (-1, kc)).unflatten(2, (-1, kr))   # B x L x S_r x k_r x S_c x k_c
        valid = (has & covered).unsqueeze(1)                      # B x 1 x L x ...
        low = torch.full_like(scores[..., 0, :, 0], -self.scale)
        any_valid = valid.any(-1).any(-2)
        if self.vote == "max":
            best = scores.masked_fill(~valid, float("-inf")).amax(dim=(-3, -1))
            voted = torch.where(any_valid, best, low)
        elif self.vote == "mean":
            total = torch.where(valid, scores, torch.zeros_like(scores)).sum(dim=(-3, -1))
            voted = torch.where(any_valid, total / valid.sum(dim=(-3, -1)).clamp_min(1), low)
        else:  # 'cover': the last prototype-bearing covering cell in row-major order wins
            order = cell_r[:, :, None, None] * cols.n_cells + cell_c[None, None]
            key = torch.where(valid, order, -1).movedim(-3, -2).flatten(-2)  # .. S_r x S_c x kr*kc
            flat = scores.movedim(-3, -2).flatten(-2)           # B x Q x L x S_r x S_c x kr*kc
            pick = key.argmax(-1, keepdim=True).expand(*flat.shape[:-1], 1)
            voted = torch.where(any_valid, flat.gather(-1, pick).squeeze(-1), low)
        if self.resolution == "feature":
            voted = F.interpolate(voted.flatten(0, 1), size=prototypes.image_size, mode="bilinear",
                                  align_corners=False).unflatten(0, (B, Q))
        return voted                                               # B x Q x L x H x W

    @staticmethod
    def _query_norm(features: Tensor, rows: _Axis, cols: _Axis) -> Tensor:
        """Norm of the (upsampled) features at every scoring pixel: M x C x h x w -> M x S_r x S_c.

        Rows are interpolated explicitly (M x C x S_r x w, small); the column interpolation enters
        through the band Gram terms g_d[j] = <f_j, f_{j+d}> so that nothing of size C x S_r x S_c
        is formed.
        """
        size_r = rows.cover_cell.shape[0]
        h, w = features.shape[-2:]
        f_rows = features if size_r == h else F.interpolate(
            features, size=(size_r, w), mode="bilinear", align_corners=False)
        sq = 0
        for d in range(cols.norm_coef.shape[0]):  # band of the interpolation: 1 or 2 terms
            g = (f_rows[..., : w - d] * f_rows[..., d:]).sum(1)  # M x S_r x (w - d)
            sq = sq + g @ cols.norm_coef[d, : w - d]
        return sq.clamp_min(0).sqrt()


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
