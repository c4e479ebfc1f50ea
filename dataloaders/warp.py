"""Random geometric warps for self-supervised episodes: a small affine map plus an elastic field.

Never a flip: the affine part is rotation x shear x positive scale, whose determinant is > 0, so
left stays left (left and right organs differ). The image is resampled bilinearly, the mask with
nearest neighbour, through the SAME sampling grid, so they stay registered. Randomness comes only
from the numpy Generator passed in (a fixed number of draws per call), so an episode is a
deterministic function of its seed.

Parameters (`WarpParams`, the `selfsup.warp` config): rotation in degrees (+-), scale range,
shear in degrees (+-), translation as a fraction of the image side (+-), elastic displacement
(Simard et al. 2003) `alpha` x (U(-1, 1) noise smoothed by a Gaussian of `sigma` pixels), in pixels of
the warped image: alpha 30, sigma 5 move pixels by about 1 pixel (rarely 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from util.errors import UserError
from util.options import options_from_mapping


@dataclass(frozen=True)
class WarpParams:
    rotate: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 5.0
    translate: float = 0.05
    elastic_alpha: float = 30.0
    elastic_sigma: float = 5.0

    @classmethod
    def from_mapping(cls, values: Mapping) -> "WarpParams":
        params = options_from_mapping(cls, {k: (tuple(v) if k == "scale" else v) for k, v in values.items()},
                                      "config selfsup.warp")
        low, high = params.scale
        if not (0 < low <= high) or not 0 <= params.rotate < 90 or not 0 <= params.shear < 45 \
                or not 0 <= params.translate < 0.5 or params.elastic_alpha < 0 or params.elastic_sigma <= 0:
            raise UserError(f"config selfsup.warp={dict(values)} is out of range: use 0 < scale low <= high, "
                            "0 <= rotate < 90, 0 <= shear < 45, 0 <= translate < 0.5, elastic_alpha >= 0, "
                            "elastic_sigma > 0")
        return params


def affine_matrix(angle: float, scale: float, shear: float) -> np.ndarray:
    """2 x 2 linear part: rotation(angle) @ shear(shear) @ scale (radians); determinant scale**2 > 0."""
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shearing = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    return rotation @ shearing * scale


def random_grid(size: int, params: WarpParams, rng: np.random.Generator) -> torch.Tensor:
    """A sampling grid 1 x H x W x 2 (grid_sample coordinates, H = W = size) of one random warp.

    Output pixel p samples the input at A p + t + d(p) (normalised coordinates), A from
    `affine_matrix`, t the translation, d the elastic displacement field.
    """
    angle = math.radians(rng.uniform(-params.rotate, params.rotate))
    scale = rng.uniform(*params.scale)
    shear = math.radians(rng.uniform(-params.shear, params.shear))
    shift = rng.uniform(-params.translate, params.translate, size=2) * 2     # normalised units (side = 2)
    noise = rng.uniform(-1.0, 1.0, size=(2, size, size))                     # 2 x H x W
    linear = affine_matrix(angle, scale, shear)
    # grid_sample's (x, y) = (column, row); the matrix acts on (x, y) pairs.
    coords = (torch.arange(size, dtype=torch.float64) * 2 + 1) / size - 1    # pixel centres, align_corners False
    y, x = torch.meshgrid(coords, coords, indexing="ij")                      # H x W each
    points = torch.stack([x, y], dim=-1)                                      # H x W x 2
    grid = points @ torch.from_numpy(linear.T) + torch.from_numpy(shift)      # H x W x 2
    if params.elastic_alpha > 0:  # Simard et al.: alpha x Gaussian-smoothed U(-1, 1) noise, in pixels
        field = params.elastic_alpha * np.stack([gaussian_filter(noise[k], params.elastic_sigma) for k in range(2)])
        grid = grid + torch.from_numpy(field.transpose(1, 2, 0) * 2 / size)   # pixels -> normalised
    return grid[None].float()


def warp(image: np.ndarray, mask: np.ndarray, grid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Resample image H x W (bilinear, zeros outside) and mask H x W (nearest) through `grid`."""
    stack = torch.from_numpy(np.stack([image, mask]).astype(np.float32))[:, None]   # 2 x 1 x H x W
    image_out = F.grid_sample(stack[:1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask_out = F.grid_sample(stack[1:], grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return image_out[0, 0].numpy(), mask_out[0, 0].numpy().astype(mask.dtype)
