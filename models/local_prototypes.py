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
path. Cell windows are gathered by advanced indexing and pooled and scored by batched matmul; each
location then gathers only the (at most 2-3 per axis) cells that cover it, and the vote reduces
over the covering row cells, then the covering column cells (separable). The head computes in
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
    """Precomputed geometry of one axis: `size` scoring pixels over `in_size` feature rows.

    A cell depends on a window of `window` consecutive feature rows (those with a nonzero
    bilinear weight on its pixels); cells are `length` pixels long.
    """
    n_cells: int
    length: int
    window: int
    identity: bool         # scoring at feature resolution (no interpolation)
    pixel_index: Tensor    # (n_cells * length,) long: pixel of (cell, offset)
    window_index: Tensor   # n_cells x window long: feature row of (cell, window offset)
    interp: Tensor         # n_cells x length x window: bilinear weights restricted to the window
    cover_slot: Tensor     # (size * k,) long: (cell, offset) slot of each covering cell; the pad
                           # slot n_cells * length where fewer than k cells cover the pixel
    cover_cell: Tensor     # size x k long: covering cell ids, -1 for none
    sq0: Tensor            # size x in_size: A[x, i]^2 (A: size x in_size bilinear weights)
    sq1: Tensor            # size x (in_size - 1): A[x, i] * A[x, i + 1]


def _build_axis(size: int, in_size: int, n_grid: int, overlap: bool) -> _Axis:
    cells = grid_cells(size, n_grid, overlap)
    n_cells, length = len(cells), cells[0][1] - cells[0][0]
    starts = torch.tensor([c[0] for c in cells])
    pixel_index = (starts[:, None] + torch.arange(length)).reshape(-1)     # n*L
    interp = interpolation_matrix(size, in_size)                            # size x in_size
    nonzero = interp != 0
    cols = torch.arange(in_size)
    band = torch.where(nonzero, cols, -1).amax(1) - torch.where(nonzero, cols, in_size).amin(1)
    assert int(band.max()) <= 1, "bilinear weights touch at most two neighbouring rows"
    cell_interp = interp[pixel_index].view(n_cells, length, in_size)
    used = cell_interp.abs().sum(1) > 0                                     # n x in_size
    first = torch.where(used, cols, in_size).amin(1)
    last = torch.where(used, cols, -1).amax(1)
    window = int((last - first + 1).max())
    window_index = first.clamp(max=in_size - window)[:, None] + torch.arange(window)  # n x window
    cell_interp = torch.gather(cell_interp, 2, window_index[:, None].expand(-1, length, -1))
    pix = torch.arange(size)
    covers = (pix[:, None] >= starts[None]) & (pix[:, None] < starts[None] + length)  # size x n
    k = int(covers.sum(1).max())
    cover_cell = torch.where(covers, torch.arange(n_cells), -1).sort(1, descending=True).values[:, :k]
    offset = pix[:, None] - starts[cover_cell.clamp(min=0)]
    cover_slot = torch.where(cover_cell >= 0, cover_cell * length + offset, n_cells * length)
    identity = size == in_size and bool((interp == torch.eye(size, dtype=interp.dtype)).all())
    return _Axis(n_cells, length, window, identity, pixel_index, window_index, cell_interp.float(),
                 cover_slot.reshape(-1), cover_cell, (interp ** 2).float(),
                 (interp[:, :-1] * interp[:, 1:]).float())


@functools.lru_cache(maxsize=64)
def _axis(size: int, in_size: int, n_grid: int, overlap: bool, device: str) -> _Axis:
    # Built outside inference mode: the cached tensors are reused by later training steps, and
    # tensors created under torch.inference_mode cannot be saved for backward.
    with torch.inference_mode(False), torch.no_grad():
        axis = _build_axis(size, in_size, n_grid, overlap)
        return _Axis(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(axis).items()})


def _indicator(axis: _Axis, size: int) -> Tensor:
    """n_cells x size 0/1 matrix: pixel p lies in cell a."""
    ind = torch.zeros(axis.n_cells, size, device=axis.pixel_index.device)
    return ind.scatter_(1, axis.pixel_index.view(axis.n_cells, axis.length), 1.0)


def _take(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """`x.index_select(dim, index)` through advanced indexing (much faster on CPU)."""
    return x[(slice(None),) * dim + (index,)]


def _last_valid(key: Tensor, values: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Along `dim` (the k <= 3 covering slots), the largest key and the value of its slot."""
    best_key, best = key.select(dim, 0), values.select(dim, 0)
    for j in range(1, key.shape[dim]):  # k <= 3 covering slots, not cells
        k_j = key.select(dim, j)
        better = k_j > best_key
        best = torch.where(better, values.select(dim, j), best)
        best_key = torch.where(better, k_j, best_key)
    return best_key, best


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
        """M x C x h x w -> M x n_rows x n_cols x (win_r * win_c) x C: each cell's feature window."""
        M, C, h, w = features.shape
        index = rows.window_index[:, None, :, None] * w + cols.window_index[None, :, None, :]
        flat = features.flatten(2).transpose(1, 2)                 # M x hw x C
        win = flat[:, index.reshape(-1)]                           # M x (nr nc wr wc) x C
        return win.view(M, rows.n_cells, cols.n_cells, rows.window * cols.window, C)

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
        nr, nc, Lr, Lc = rows.n_cells, cols.n_cells, rows.length, cols.length
        masks = torch.stack([bg, fg], dim=3).flatten(0, 2)        # M=BNK x 2 x H x W
        pixels_per_cell = 1.0
        if self.resolution == "feature":
            pixels_per_cell = image_size[0] * image_size[1] / (h * w)
            masks = F.interpolate(masks, size=(h, w), mode="area")  # M x 2 x h x w (soft)
        M = masks.shape[0]
        # Pixel counts of every cell.
        m_rows = _take(masks, 2, rows.pixel_index).view(M, 2, nr, Lr, -1)   # M x 2 x nr x Lr x S_c
        counts = _take(m_rows.sum(3), 3, cols.pixel_index).view(M, 2, nr, nc, Lc).sum(4)
        counts = counts * pixels_per_cell                          # M x 2 x nr x nc
        if rows.identity and cols.identity:
            # Feature resolution: cell sums of mask * features = R (m F) C^T with 0/1 cell
            # indicator matrices R (nr x h) and C (nc x w).
            masked = masks.unsqueeze(2) * feats.flatten(0, 2).unsqueeze(1)  # M x 2 x C x h x w
            sums = _indicator(rows, h) @ (masked @ _indicator(cols, w).T)   # M x 2 x C x nr x nc
            sums = sums.permute(0, 1, 3, 4, 2) * pixels_per_cell             # M x 2 x nr x nc x C
        else:
            # Image resolution: the cell masks pulled back through the bilinear upsampling onto
            # each cell's feature window: sum_cell m * F_up = <F_window, weights>.
            pulled = rows.interp.transpose(1, 2) @ m_rows          # M x 2 x nr x wr x S_c
            pulled = _take(pulled, 4, cols.pixel_index).view(M, 2, nr, rows.window, nc, Lc)
            weights = pulled.transpose(3, 4) @ cols.interp         # M x 2 x nr x nc x wr x wc
            weights = weights.flatten(4).permute(0, 2, 3, 1, 4)    # M x nr x nc x 2 x (wr wc)
            win = self._windows(feats.flatten(0, 2), rows, cols)  # M x nr x nc x (wr wc) x C
            sums = (weights @ win).permute(0, 3, 1, 2, 4)          # M x 2 x nr x nc x C
        # Masked averages; shots (and, for the background, ways) with too few pixels drop out.
        valid = counts > self.min_pixels                           # M x 2 x nr x nc
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
        nr, nc, Lr, Lc, wr, wc = rows.n_cells, cols.n_cells, rows.length, cols.length, rows.window, cols.window
        vectors = F.normalize(prototypes.vectors.float(), dim=-1, eps=_EPS)  # Bp x L x nr x nc x C
        present = prototypes.present                               # Bp x L x nr x nc
        L = vectors.shape[1]
        # Dot products on each cell's feature window, then bilinearly upsampled onto the cell.
        win = self._windows(query.flatten(0, 1), rows, cols).unflatten(0, (B, Q))  # B x Q x nr x nc x ww x C
        dots = vectors.permute(0, 2, 3, 1, 4).unsqueeze(1) @ win.transpose(-1, -2)  # B x Q x nr x nc x L x ww
        dots = dots.view(B, Q, nr, nc, L, wr, wc)
        dots = rows.interp.view(1, 1, nr, 1, 1, Lr, wr) @ dots
        dots = dots @ cols.interp.transpose(1, 2).view(1, 1, 1, nc, 1, wc, Lc)  # .. x L x Lr x Lc
        norm = self._query_norm(query.flatten(0, 1), rows, cols)    # BQ x S_r x S_c
        norm = _take(_take(norm, 1, rows.pixel_index), 2, cols.pixel_index)
        norm = norm.view(B, Q, nr, Lr, nc, Lc).permute(0, 1, 2, 4, 3, 5).unsqueeze(4)
        # cosine clamped to [-1, 1]: the Gram expansion of the norm loses digits where the upsampled
        # feature vector nearly cancels (found by tests/test_properties.py)
        scores = self.scale * (dots / norm.clamp_min(_EPS)).clamp(-1.0, 1.0)  # B x Q x nr x nc x L x Lr x Lc
        has = present.permute(0, 2, 3, 1)[:, None, :, :, :, None, None]  # Bp x 1 x nr x nc x L x 1 x 1
        low = -self.scale
        if self.vote == "max":     # cells without a prototype score the lowest possible value
            voted = self._vote(scores.masked_fill(~has, low), low, rows, cols, "amax")
        elif self.vote == "mean":  # average over the covering cells that have a prototype
            total = self._vote(scores.masked_fill(~has, 0.0), 0.0, rows, cols, "sum")
            count = self._vote(has.expand(-1, -1, -1, -1, -1, Lr, Lc).float(), 0.0, rows, cols, "sum")
            voted = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, low))
        else:  # 'cover': the last covering cell with a prototype, in row-major cell order, wins
            voted = self._cover_vote(scores, has, low, rows, cols)
        if self.resolution == "feature":
            voted = F.interpolate(voted.flatten(0, 1), size=prototypes.image_size, mode="bilinear",
                                  align_corners=False).unflatten(0, (B, Q))
        return voted                                               # B x Q x L x H x W

    @staticmethod
    def _by_rows(cell_values: Tensor, pad: float, rows: _Axis) -> Tensor:
        """B x Q x nr x nc x L x Lr x Lc -> B x Q x L x S_r x kr x (nc Lc): per image row, the
        values of the (up to kr) row cells covering it; `pad` where fewer cells cover it."""
        B, Q, nr, nc, L, Lr, Lc = cell_values.shape
        flat = cell_values.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Q, L, nr * Lr, nc * Lc)
        flat = F.pad(flat, (0, 0, 0, 1), value=pad)                 # pad slot: row nr * Lr
        return _take(flat, 3, rows.cover_slot).unflatten(3, (-1, rows.cover_cell.shape[1]))

    @staticmethod
    def _by_cols(values: Tensor, pad: float, cols: _Axis) -> Tensor:
        """... x S_r x (nc Lc) -> ... x S_r x S_c x kc (covering column cells, `pad` if fewer)."""
        values = F.pad(values, (0, 1), value=pad)
        return values[..., cols.cover_slot].unflatten(-1, (-1, cols.cover_cell.shape[1]))

    def _vote(self, cell_values: Tensor, pad: float, rows: _Axis, cols: _Axis, reduce: str) -> Tensor:
        """Reduce ('amax' or 'sum') over all cells covering each location -> B x Q x L x S_r x S_c.

        Separable: reduce over the covering row cells first, then over the covering column cells.
        """
        by_rows = getattr(self._by_rows(cell_values, pad, rows), reduce)(4)   # .. S_r x (nc Lc)
        return getattr(self._by_cols(by_rows, pad, cols), reduce)(-1)

    def _cover_vote(self, scores: Tensor, has: Tensor, low: float, rows: _Axis, cols: _Axis) -> Tensor:
        """Value of the covering prototype-bearing cell (a, b) with the largest a * nc + b."""
        B, Q, nr, nc, L, Lr, Lc = scores.shape
        row_id = torch.arange(nr, device=scores.device).view(1, 1, nr, 1, 1, 1, 1)
        key = torch.where(has, row_id, -1).expand(-1, -1, -1, -1, -1, Lr, Lc)
        key, values = _last_valid(self._by_rows(key, -1, rows), self._by_rows(scores, low, rows), 4)
        col_id = torch.arange(nc, device=scores.device).repeat_interleave(Lc)
        key = torch.where(key >= 0, key * nc + col_id, -1)         # row-major cell order
        key, values = _last_valid(self._by_cols(key, -1, cols), self._by_cols(values, low, cols), -1)
        return torch.where(key >= 0, values, torch.full_like(values, low))

    @staticmethod
    def _query_norm(features: Tensor, rows: _Axis, cols: _Axis) -> Tensor:
        """Norm of the upsampled features at every scoring pixel: M x C x h x w -> M x S_r x S_c.

        With F_up(x, y) = sum_ij A[x, i] B[y, j] f_ij and at most two neighbouring rows (columns)
        per pixel, |F_up|^2 needs only the Gram terms of neighbouring feature vectors (computed at
        feature resolution), so nothing of size C x H x W is formed.
        """
        if rows.identity and cols.identity:
            return features.norm(dim=1)
        f = features
        g00 = (f * f).sum(1)                                         # M x h x w
        g10 = (f[:, :, :-1] * f[:, :, 1:]).sum(1)                    # M x (h-1) x w
        g01 = (f[..., :-1] * f[..., 1:]).sum(1)                      # M x h x (w-1)
        g11 = (f[:, :, :-1, :-1] * f[:, :, 1:, 1:]).sum(1) + (f[:, :, :-1, 1:] * f[:, :, 1:, :-1]).sum(1)
        u0 = rows.sq0 @ g00 + 2 * rows.sq1 @ g10                     # M x S_r x w
        u1 = 2 * (rows.sq0 @ g01 + rows.sq1 @ g11)                   # M x S_r x (w-1)
        sq = u0 @ cols.sq0.T + u1 @ cols.sq1.T                       # M x S_r x S_c
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
