"""The boundary loss of Kervadec et al., "Boundary loss for highly unbalanced segmentation", MIDL 2019
(extended in Medical Image Analysis 67, 2021): beyond the paper, off by default (config `boundary_weight`,
used by training/objective.py for the prototype methods).

For every foreground class c (way c = logit channel c, 1..N; channel 0 is the background) of a query
with label map L:

    L_B = mean over queries, classes c and pixels p of  phi_c(p) * softmax(logits)_c(p)

phi_c is the signed Euclidean distance map of the mask M_c = (L == c), the convention of the authors'
reference code (`one_hot2dist` of LIVIA-ETS/boundary-loss), distances in pixels between pixel centres:

    p outside M_c:  phi_c(p) = distance from p to the nearest pixel of M_c           (>= 1)
    p inside M_c:   phi_c(p) = -(distance from p to the nearest pixel outside M_c - 1)  (<= 0; the
                    mask's own boundary pixels are 0)

An empty mask or one that fills the whole slice has phi_c = 0 (it has no boundary). A pixel labelled
255 ("ignore") counts as outside every class. `class_distance_maps` divides phi by the image side H, so
that the loss (and the weight that multiplies it) does not grow with the input size. The loss is
minimised by putting the foreground probability inside the mask, most of all deep inside it, and
none outside, most of all far from it.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def signed_distance_maps(masks: np.ndarray) -> np.ndarray:
    """masks M x H x W (bool) -> phi M x H x W float64, each slice's signed distance map in pixels
    (the module docstring's convention; empty and full slices 0).

    One exact Euclidean distance transform for all slices at once: the slice axis is sampled at H + W
    pixels per step, more than any distance within a slice (the diagonal), so the nearest pixel of the
    other kind is always found in the pixel's own slice. That holds only for slices that have both
    kinds of pixel; empty and full slices are left out of the transform (their phi is 0).
    """
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
    """labels B x Q x H x W (int: 0 background, 1..n_ways the ways) -> phi B x Q x N x H x W float32
    on the labels' device: the signed distance map of each way's mask divided by the image side H.

    The transform runs on the CPU (scipy): labels on a GPU are copied there and phi back."""
    ways = torch.arange(1, n_ways + 1, device=labels.device).view(1, 1, n_ways, 1, 1)
    masks = labels.unsqueeze(2) == ways                                        # B x Q x N x H x W
    phi = signed_distance_maps(masks.flatten(0, 2).cpu().numpy())              # (B*Q*N) x H x W
    phi = torch.from_numpy(phi / labels.shape[-2]).to(torch.float32)
    return phi.view(masks.shape).to(labels.device)


def boundary_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_B of the module docstring: logits B x Q x (1 + N) x H x W, labels B x Q x H x W (int) ->
    scalar float32 tensor (gradient into the logits; phi is a constant)."""
    phi = class_distance_maps(labels, logits.shape[2] - 1)                    # B x Q x N x H x W
    foreground = logits.float().softmax(dim=2)[:, :, 1:]                       # B x Q x N x H x W
    return (phi * foreground).mean()
