"""Slow, literal references of the local prototype head (image resolution), for tests and benchmarks.

Written to be obviously correct, not fast. Depends on torch only; float64 by default.

`official_cell_loop`: the authors' head as method.md section 6 describes it, a Python loop over
cells in row-major order (the official code's structure), used for the 'zero' empty-cell rule:
  1. support and query features bilinearly upsampled (align_corners=False) to the image size;
  2. per cell, per support image: sum(F_up * m) / (sum(m) + 1e-5), or the zero vector when
     sum(m) <= min_pixels; a way's prototype is the sum over its shots / K, the background's the
     sum over all ways and shots / (K * ways);
  3. per cell, scale * cosine(F_q_up, p) (torch.nn.functional.cosine_similarity) on the cell's
     pixels; 'max': a running maximum initialised to -1; 'mean': sum over covering cells / their
     number (zero prototypes count); 'cover': the last covering cell overwrites.

`literal_reference` / `cellwise_reference`: the 'skip' rule (method.md section 1 read literally:
a shot with <= min_pixels class pixels in a cell contributes nothing, a cell without any
contributing shot has no prototype and never takes part in the vote, a location that no such
cell covers gets -scale), the first with loops down to single pixels, the second with a loop
over cells only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def literal_grid(size: int, n_grid: int, overlap: bool) -> list[tuple[int, int]]:
    """Cells along one axis: length size // n_grid, stride half a cell or a cell, border cell."""
    length = size // n_grid
    stride = max(length // 2, 1) if overlap else length
    cells = []
    start = 0
    while start + length <= size:
        cells.append((start, start + length))
        start += stride
    if cells[-1][1] < size:
        cells.append((size - length, size))
    return cells


def _upsample(features, size, dtype):
    """... x C x h x w -> ... x C x H x W, bilinear, align_corners=False."""
    lead = features.shape[:-3]
    up = F.interpolate(features.reshape(-1, *features.shape[-3:]).to(dtype), size=size,
                       mode="bilinear", align_corners=False)
    return up.view(*lead, *up.shape[-3:])


def official_cell_loop(support_features, support_fg, support_bg, query_features, image_size,
                       n_grid, overlap, vote, min_pixels=10, scale=20.0, dtype=torch.float64):
    """Logits B x Q x (1 + N) x H x W of the authors' head (method.md section 6), cell by cell."""
    B, N, K = support_features.shape[:3]
    Q = query_features.shape[1]
    H, W = image_size
    cells = [(r, c) for r in literal_grid(H, n_grid, overlap) for c in literal_grid(W, n_grid, overlap)]
    out = torch.empty(B, Q, 1 + N, H, W, dtype=dtype)
    for b in range(B):
        supp = _upsample(support_features[b], (H, W), dtype)           # N x K x C x H x W
        query = _upsample(query_features[b], (H, W), dtype)            # Q x C x H x W
        running = torch.full((Q, 1 + N, H, W), -1.0, dtype=dtype)      # 'max'
        total = torch.zeros(Q, 1 + N, H, W, dtype=dtype)               # 'mean'
        count = torch.zeros(Q, 1 + N, H, W, dtype=dtype)
        last = torch.zeros(Q, 1 + N, H, W, dtype=dtype)                # 'cover'
        for (r0, r1), (c0, c1) in cells:                               # row-major cell order
            def pooled(n, k, mask):
                m = mask[r0:r1, c0:c1].to(dtype)
                if m.sum() <= min_pixels:
                    return torch.zeros(supp.shape[2], dtype=dtype)
                return (supp[n, k, :, r0:r1, c0:c1] * m).sum((1, 2)) / (m.sum() + 1e-5)
            prototypes = [sum(pooled(n, k, support_bg[b, n, k]) for n in range(N) for k in range(K)) / (K * N)]
            prototypes += [sum(pooled(n, k, support_fg[b, n, k]) for k in range(K)) / K for n in range(N)]
            for c, p in enumerate(prototypes):
                s = scale * F.cosine_similarity(query[:, :, r0:r1, c0:c1], p[None, :, None, None],
                                                dim=1, eps=EPS)           # Q x Lr x Lc
                running[:, c, r0:r1, c0:c1] = torch.maximum(running[:, c, r0:r1, c0:c1], s)
                total[:, c, r0:r1, c0:c1] += s
                count[:, c, r0:r1, c0:c1] += 1
                last[:, c, r0:r1, c0:c1] = s
        out[b] = {"max": running, "mean": total / count, "cover": last}[vote]
    return out


def _cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(0) / (u.norm(dim=0).clamp_min(EPS) * v.norm().clamp_min(EPS))


def literal_prototypes(support_features, support_fg, support_bg, image_size, n_grid, overlap,
                       min_pixels=10, dtype=torch.float64):
    """'skip' rule. Per episode b: dict {(class, row cell, col cell): prototype (C,) or None}."""
    B, N, K = support_features.shape[:3]
    H, W = image_size
    rows, cols = literal_grid(H, n_grid, overlap), literal_grid(W, n_grid, overlap)
    result = []
    for b in range(B):
        up = _upsample(support_features[b], (H, W), dtype)              # N x K x C x H x W
        protos = {}
        for c in range(1 + N):
            if c == 0:
                shots = [(n, k, support_bg[b, n, k]) for n in range(N) for k in range(K)]
            else:
                shots = [(c - 1, k, support_fg[b, c - 1, k]) for k in range(K)]
            for a, (r0, r1) in enumerate(rows):
                for g, (c0, c1) in enumerate(cols):
                    averages = []
                    for n, k, mask in shots:
                        cell_mask = mask[r0:r1, c0:c1].to(dtype)
                        count = cell_mask.sum()
                        if count > min_pixels:
                            cell_feats = up[n, k][:, r0:r1, c0:c1]
                            averages.append((cell_feats * cell_mask).sum((1, 2)) / count)
                    protos[(c, a, g)] = torch.stack(averages).mean(0) if averages else None
        result.append(protos)
    return result, rows, cols


def literal_reference(support_features, support_fg, support_bg, query_features, image_size,
                      n_grid, overlap, vote, min_pixels=10, scale=20.0, dtype=torch.float64):
    """'skip' rule: logits B x Q x (1 + N) x H x W by loops down to single pixels."""
    B, N = support_features.shape[:2]
    Q = query_features.shape[1]
    H, W = image_size
    all_protos, rows, cols = literal_prototypes(support_features, support_fg, support_bg,
                                                image_size, n_grid, overlap, min_pixels, dtype)
    out = torch.empty(B, Q, 1 + N, H, W, dtype=dtype)
    for b in range(B):
        protos = all_protos[b]
        up = _upsample(query_features[b], (H, W), dtype)                # Q x C x H x W
        for q in range(Q):
            for c in range(1 + N):
                for x in range(H):
                    for y in range(W):
                        # every cell (a, g) that contains (x, y), in row-major cell order
                        covering = [(a, g) for a, (r0, r1) in enumerate(rows) if r0 <= x < r1
                                    for g, (c0, c1) in enumerate(cols) if c0 <= y < c1]
                        scores = []
                        for a, g in covering:
                            p = protos[(c, a, g)]
                            if p is not None:
                                scores.append(scale * float(_cosine(up[q, :, x, y], p)))
                        if not scores:
                            out[b, q, c, x, y] = -scale
                        elif vote == "max":
                            out[b, q, c, x, y] = max(scores)
                        elif vote == "mean":
                            out[b, q, c, x, y] = sum(scores) / len(scores)
                        else:  # 'cover': the last covering cell in row-major order
                            out[b, q, c, x, y] = scores[-1]
    return out


def cellwise_reference(support_features, support_fg, support_bg, query_features, image_size,
                       n_grid, overlap, vote, min_pixels=10, scale=20.0, dtype=torch.float64):
    """As `literal_reference` ('skip' rule), but each cell is scored as one tensor (loop over cells)."""
    B, N = support_features.shape[:2]
    Q = query_features.shape[1]
    H, W = image_size
    all_protos, rows, cols = literal_prototypes(support_features, support_fg, support_bg,
                                                image_size, n_grid, overlap, min_pixels, dtype)
    out = torch.empty(B, Q, 1 + N, H, W, dtype=dtype)
    for b in range(B):
        up = _upsample(query_features[b], (H, W), dtype)                # Q x C x H x W
        for q in range(Q):
            for c in range(1 + N):
                best = torch.full((H, W), float("-inf"), dtype=dtype)
                total = torch.zeros(H, W, dtype=dtype)
                count = torch.zeros(H, W, dtype=dtype)
                last = torch.full((H, W), -scale, dtype=dtype)
                for a, (r0, r1) in enumerate(rows):
                    for g, (c0, c1) in enumerate(cols):
                        p = all_protos[b][(c, a, g)]
                        if p is None:
                            continue
                        s = scale * _cosine(up[q, :, r0:r1, c0:c1], p[:, None, None])
                        best[r0:r1, c0:c1] = torch.maximum(best[r0:r1, c0:c1], s)
                        total[r0:r1, c0:c1] += s
                        count[r0:r1, c0:c1] += 1
                        last[r0:r1, c0:c1] = s
                if vote == "max":
                    score = best
                elif vote == "mean":
                    score = total / count.clamp_min(1)
                else:
                    score = last
                out[b, q, c] = torch.where(count > 0, score, torch.full_like(score, -scale))
    return out
