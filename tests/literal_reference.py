"""Slow, literal reference of the local prototype head ('image' resolution), method.md section 1.

Written to be obviously correct, not fast: Python loops over episodes, classes, cells, shots,
queries and PIXELS, following the method word by word:
  1. upsample the features bilinearly to the image size;
  2. per cell, per class: masked average of each shot's features over the cell's class pixels;
     a shot with <= min_pixels class pixels in the cell contributes nothing; the prototype is the
     mean over contributing shots (background: over every support image of the episode), and a
     cell without any contributing shot has no prototype;
  3. per pixel, per class: scale * cosine(query feature, prototype) for every cell that contains
     the pixel and has a prototype; vote 'max' / 'mean' / 'cover' (last such cell, row-major);
     no such cell -> -scale.
`cellwise_reference` is the same computation with the pixel loop replaced by tensor operations
over each cell (the official code's structure: a Python loop over cells). Depends on torch only.
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


def _cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(0) / (u.norm(dim=0).clamp_min(EPS) * v.norm().clamp_min(EPS))


def literal_prototypes(support_features, support_fg, support_bg, image_size, n_grid, overlap,
                       min_pixels=10, dtype=torch.float64):
    """Per episode b: dict {(class, row cell, col cell): prototype (C,) or None} and the cells."""
    B, N, K = support_features.shape[:3]
    H, W = image_size
    rows, cols = literal_grid(H, n_grid, overlap), literal_grid(W, n_grid, overlap)
    result = []
    for b in range(B):
        up = F.interpolate(support_features[b].flatten(0, 1).to(dtype), size=(H, W), mode="bilinear",
                           align_corners=False).unflatten(0, (N, K))    # N x K x C x H x W
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
    """Logits B x Q x (1 + N) x H x W (`dtype`, float64 by default) by loops down to single pixels."""
    B, N = support_features.shape[:2]
    Q = query_features.shape[1]
    H, W = image_size
    all_protos, rows, cols = literal_prototypes(support_features, support_fg, support_bg,
                                                image_size, n_grid, overlap, min_pixels, dtype)
    out = torch.empty(B, Q, 1 + N, H, W, dtype=dtype)
    for b in range(B):
        protos = all_protos[b]
        up = F.interpolate(query_features[b].to(dtype), size=(H, W), mode="bilinear",
                           align_corners=False)                          # Q x C x H x W
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
    """As `literal_reference`, but each cell is scored as one tensor (loop over cells only)."""
    B, N = support_features.shape[:2]
    Q = query_features.shape[1]
    H, W = image_size
    all_protos, rows, cols = literal_prototypes(support_features, support_fg, support_bg,
                                                image_size, n_grid, overlap, min_pixels, dtype)
    out = torch.empty(B, Q, 1 + N, H, W, dtype=dtype)
    for b in range(B):
        up = F.interpolate(query_features[b].to(dtype), size=(H, W), mode="bilinear",
                           align_corners=False)                          # Q x C x H x W
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
