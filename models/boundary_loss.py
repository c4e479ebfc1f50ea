"""Kervadec et al.'s boundary loss (MIDL 2019), beyond the paper, off by default (`boundary_weight`): the
mean of phi_c * softmax_c, phi_c the class's signed distance map / H; docs/method.md, "Boundary loss"."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def signed_distance_maps(masks: np.ndarray) -> np.ndarray:
    """masks M x H x W (bool) -> phi M x H x W float64, each slice's signed distance map in pixels (empty
    and full slices 0). One exact transform for all slices: the slice axis is sampled at H + W pixels
    per step (more than any in-slice distance), so the nearest pixel is always in the own slice."""
    masks = np.asarray(masks, dtype=bool)
    n_slices, height, width = masks.shape
    phi = np.zeros(masks.shape, dtype=np.float64)                             # M x H x W
    inside_count = masks.reshape(n_slices, -1).sum(axis=1)                     # M
    has_boundary = (inside_count > 0) & (inside_count < height * width)        # M
    if has_boundary.any():
        inside = masks[has_boundary]                                           # K x H x W
        sampling = (float(height + width), 1.0, 1.0)
        to_inside = ndimage.distance_transform_edt(~inside, sampling=sampling)   # 0 inside
        to_outside = ndimage.distance_transform_edt(inside, sampling=sampling)   # 0 outside
        phi[has_boundary] = np.where(inside, 1.0 - to_outside, to_inside)
    return phi


def class_distance_maps(labels: Tensor, n_ways: int) -> Tensor:
    """labels B x Q x H x W (0 background, 1..n_ways) -> phi B x Q x N x H x W float32 on the labels'
    device: each way's signed distance map / the image side H (computed on the CPU by scipy)."""
    ways = torch.arange(1, n_ways + 1, device=labels.device).view(1, 1, n_ways, 1, 1)
    masks = labels.unsqueeze(2) == ways                                        # B x Q x N x H x W
    phi = signed_distance_maps(masks.flatten(0, 2).cpu().numpy())              # (B*Q*N) x H x W
    phi = torch.from_numpy(phi / labels.shape[-2]).to(torch.float32)
    return phi.view(masks.shape).to(labels.device)


def boundary_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_B: logits B x Q x (1 + N) x H x W, labels B x Q x H x W -> float32 scalar (phi is a constant)."""
    phi = class_distance_maps(labels, logits.shape[2] - 1)                    # B x Q x N x H x W
    foreground = logits.float().softmax(dim=2)[:, :, 1:]                       # B x Q x N x H x W
    return (phi * foreground).mean()
