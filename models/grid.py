"""The local head's windowed cell geometry (`grid_cells`, as the official code) and its vectorised kernels:
cell sums, dots and norms of the upsampled features computed on each cell's feature window, never forming a
C x H x W tensor; docs/method.md, "Vectorised cell kernels"."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def grid_cells(size: int, n_grid: int, overlap: bool) -> list[tuple[int, int]]:
    """Cells (start, stop exclusive) along one axis of `size` pixels: length `size // n_grid`, stride half a
    cell (at least 1) with `overlap`, else a cell; one extra cell `(size - length, size)` at the border."""
    # the config check and LocalPrototypeHead._axes refuse other n_grid in one line
    assert 1 <= n_grid <= size, f"n_grid {n_grid} over {size} pixels"
    length = size // n_grid
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
class Axis:
    """Precomputed geometry of one axis: `size` scoring pixels over `in_size` feature rows; a cell of
    `length` pixels depends on `window` consecutive feature rows (nonzero bilinear weights on it)."""
    n_cells: int
    length: int
    window: int
    identity: bool         # scoring at feature resolution (no interpolation)
    pixel_index: Tensor    # (n_cells * length,) long: pixel of (cell, offset)
    window_index: Tensor   # n_cells x window long: feature row of (cell, window offset)
    interp: Tensor         # n_cells x length x window: bilinear weights restricted to the window
                           # (float64, as sq0 and sq1: see cell_cosines)
    cover_slot: Tensor     # (size * k,) long: (cell, offset) slot of each covering cell; the pad
                           # slot n_cells * length where fewer than k cells cover the pixel
    cover_cell: Tensor     # size x k long: covering cell ids, -1 for none
    sq0: Tensor            # size x in_size: A[x, i]^2 (A: size x in_size bilinear weights)
    sq1: Tensor            # size x (in_size - 1): A[x, i] * A[x, i + 1]


def _build_axis(size: int, in_size: int, n_grid: int, overlap: bool) -> Axis:
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
    return Axis(n_cells, length, window, identity, pixel_index, window_index, cell_interp,
                cover_slot.reshape(-1), cover_cell, interp ** 2, interp[:, :-1] * interp[:, 1:])


@functools.lru_cache(maxsize=64)
def axis(size: int, in_size: int, n_grid: int, overlap: bool, device: str) -> Axis:
    """Cached `Axis` of `size` scoring pixels over `in_size` feature rows on `device`."""
    # outside inference mode: cached tensors made under it could not be saved for a later backward
    with torch.inference_mode(False), torch.no_grad():
        built = _build_axis(size, in_size, n_grid, overlap)
        return Axis(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(built).items()})


def indicator(ax: Axis, size: int) -> Tensor:
    """n_cells x size 0/1 matrix: pixel p lies in cell a."""
    ind = torch.zeros(ax.n_cells, size, device=ax.pixel_index.device)
    return ind.scatter_(1, ax.pixel_index.view(ax.n_cells, ax.length), 1.0)


def take(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """`x.index_select(dim, index)` through advanced indexing (much faster on CPU)."""
    return x[(slice(None),) * dim + (index,)]


def windows(features: Tensor, rows: Axis, cols: Axis) -> Tensor:
    """M x C x h x w -> M x n_rows x n_cols x (win_r * win_c) x C: each cell's feature window."""
    M, C, h, w = features.shape
    index = rows.window_index[:, None, :, None] * w + cols.window_index[None, :, None, :]
    flat = features.flatten(2).transpose(1, 2)                 # M x hw x C
    win = flat[:, index.reshape(-1)]                           # M x (nr nc wr wc) x C
    return win.view(M, rows.n_cells, cols.n_cells, rows.window * cols.window, C)


def cell_counts(masks: Tensor, rows: Axis, cols: Axis) -> Tensor:
    """Mask sums of every cell: M x L x S_r x S_c -> M x L x n_rows x n_cols."""
    M, L = masks.shape[:2]
    m_rows = take(masks, 2, rows.pixel_index).view(M, L, rows.n_cells, rows.length, -1)
    return take(m_rows.sum(3), 3, cols.pixel_index).view(M, L, rows.n_cells, cols.n_cells, cols.length).sum(4)


def cell_sums(masks: Tensor, features: Tensor, rows: Axis, cols: Axis) -> Tensor:
    """Sum over each cell of mask * (upsampled) features: masks M x L x S_r x S_c (on the scoring
    pixels), features M x C x h x w -> M x L x n_rows x n_cols x C."""
    M, L = masks.shape[:2]
    nr, nc = rows.n_cells, cols.n_cells
    h, w = features.shape[-2:]
    if rows.identity and cols.identity:
        # Feature resolution: cell sums of mask * features = R (m F) C^T with 0/1 cell
        # indicator matrices R (nr x h) and C (nc x w).
        masked = masks.unsqueeze(2) * features.unsqueeze(1)   # M x L x C x h x w
        sums = indicator(rows, h) @ (masked @ indicator(cols, w).T)   # M x L x C x nr x nc
        return sums.permute(0, 1, 3, 4, 2)
    # Image resolution: the cell masks pulled back through the bilinear upsampling onto each
    # cell's feature window: sum_cell m * F_up = <F_window, weights>.
    m_rows = take(masks, 2, rows.pixel_index).view(M, L, nr, rows.length, -1)   # M x L x nr x Lr x S_c
    pulled = rows.interp.to(masks.dtype).transpose(1, 2) @ m_rows   # M x L x nr x wr x S_c
    pulled = take(pulled, 4, cols.pixel_index).view(M, L, nr, rows.window, nc, cols.length)
    weights = pulled.transpose(3, 4) @ cols.interp.to(masks.dtype)  # M x L x nr x nc x wr x wc
    weights = weights.flatten(4).permute(0, 2, 3, 1, 4)        # M x nr x nc x L x (wr wc)
    win = windows(features, rows, cols)                        # M x nr x nc x (wr wc) x C
    return (weights @ win).permute(0, 3, 1, 2, 4)              # M x L x nr x nc x C


def cell_cosines(unit_vectors: Tensor, query: Tensor, rows: Axis, cols: Axis) -> Tensor:
    """cosine(F_q_up(x, y), p_{c,g}) on every pixel of every cell: unit_vectors Bp x L x nr x nc x C (unit
    or zero prototypes), query B x Q x C x h x w -> B x Q x nr x nc x L x Lr x Lc, clamped to [-1, 1]."""
    B, Q, C, h, w = query.shape
    nr, nc, Lr, Lc, wr, wc = rows.n_cells, cols.n_cells, rows.length, cols.length, rows.window, cols.window
    L = unit_vectors.shape[1]
    dtype = query.dtype
    if not (rows.identity and cols.identity):
        # float64 (weights included): where the upsampled query vector is short (its bilinear
        # neighbours nearly cancel, signed features), float32 dot products and norms drift by
        # ~1e-4 * scale; the Gram expansion of the norm amplifies rounding of the weights too
        unit_vectors, query = unit_vectors.double(), query.double()
    # Dot products on each cell's feature window, then bilinearly upsampled onto the cell.
    win = windows(query.flatten(0, 1), rows, cols).unflatten(0, (B, Q))  # B x Q x nr x nc x ww x C
    dots = unit_vectors.permute(0, 2, 3, 1, 4).unsqueeze(1) @ win.transpose(-1, -2)  # B Q nr nc L ww
    dots = dots.view(B, Q, nr, nc, L, wr, wc)
    dots = rows.interp.to(dots.dtype).view(1, 1, nr, 1, 1, Lr, wr) @ dots
    dots = dots @ cols.interp.to(dots.dtype).transpose(1, 2).view(1, 1, 1, nc, 1, wc, Lc)  # .. x L x Lr x Lc
    norm = query_norm(query.flatten(0, 1), rows, cols)         # BQ x S_r x S_c
    norm = take(take(norm, 1, rows.pixel_index), 2, cols.pixel_index)
    norm = norm.view(B, Q, nr, Lr, nc, Lc).permute(0, 1, 2, 4, 3, 5).unsqueeze(4)
    # clamped to [-1, 1]: the Gram expansion of the norm loses digits where the upsampled feature
    # vector nearly cancels (found by tests/test_properties.py)
    return (dots / norm.clamp_min(EPS)).clamp(-1.0, 1.0).to(dtype)


EPS = 1e-8  # norm floor of the cosine, as torch.nn.functional.cosine_similarity


def query_norm(features: Tensor, rows: Axis, cols: Axis) -> Tensor:
    """Norm of the upsampled features at every scoring pixel: M x C x h x w -> M x S_r x S_c. With
    F_up(x, y) = sum_ij A[x, i] B[y, j] f_ij and at most two neighbouring rows (columns) per pixel,
    |F_up|^2 needs only Gram terms of neighbouring feature vectors: nothing of size C x H x W is formed."""
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


# ---- votes: reductions over the cells covering each location ------------------------------
def _by_rows(cell_values: Tensor, pad: float, rows: Axis) -> Tensor:
    """B x Q x nr x nc x L x Lr x Lc -> B x Q x L x S_r x kr x (nc Lc): the row cells covering each row."""
    B, Q, nr, nc, L, Lr, Lc = cell_values.shape
    flat = cell_values.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Q, L, nr * Lr, nc * Lc)
    flat = F.pad(flat, (0, 0, 0, 1), value=pad)                 # pad slot: row nr * Lr
    return take(flat, 3, rows.cover_slot).unflatten(3, (-1, rows.cover_cell.shape[1]))


def _by_cols(values: Tensor, pad: float, cols: Axis) -> Tensor:
    """... x S_r x (nc Lc) -> ... x S_r x S_c x kc (covering column cells, `pad` if fewer)."""
    values = F.pad(values, (0, 1), value=pad)
    return values[..., cols.cover_slot].unflatten(-1, (-1, cols.cover_cell.shape[1]))


def reduce_covering(cell_values: Tensor, pad: float, rows: Axis, cols: Axis, reduce) -> Tensor:
    """`reduce(values, dim)` (torch.amax, ...) over the covering row cells, then columns: B x Q x nr x nc x
    L x Lr x Lc -> B x Q x L x S_r x S_c. Slot 0 is the last covering cell; `pad` (neutral for `reduce`)
    fills the slots of locations covered by fewer cells."""
    return reduce(_by_cols(reduce(_by_rows(cell_values, pad, rows), 4), pad, cols), -1)


def covering_count(rows: Axis, cols: Axis) -> Tensor:
    """S_r x S_c float: the number of cells covering each location."""
    return (rows.cover_cell >= 0).sum(1).float()[:, None] * (cols.cover_cell >= 0).sum(1).float()[None]
