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

`alpnet_view`: SSL-ALPNet's own augmentation with its fixed parameters (its dataloaders/augutils.py
sabs_aug and image_transforms.py): affine (rotation and shear U(-5, 5) degrees, shift U(-5, 5) px,
isotropic scale U(0.9, 1.2)), elastic (alpha 10, sigma 5), labels rint + argmax, gamma U(0.5, 1.5) on
the image. Its shear matrix has determinant cos(a) > 0, so it never flips either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.ndimage import gaussian_filter

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
        """The `selfsup.warp` config (its ranges: selfsup_episodes.SELFSUP_OPTIONS, checked once)."""
        return options_from_mapping(cls, {k: (tuple(v) if k == "scale" else v) for k, v in values.items()},
                                    "config selfsup.warp")


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
    coords = (torch.arange(size, dtype=torch.float64) * 2 + 1) / size - 1    # pixel centres, no align_corners
    y, x = torch.meshgrid(coords, coords, indexing="ij")                      # H x W each
    points = torch.stack([x, y], dim=-1)                                      # H x W x 2
    grid = points @ torch.from_numpy(linear.T) + torch.from_numpy(shift)      # H x W x 2
    if params.elastic_alpha > 0:  # Simard et al.: alpha x Gaussian-smoothed U(-1, 1) noise, in pixels
        smooth = [gaussian_filter(noise[k], params.elastic_sigma) for k in range(2)]
        field = params.elastic_alpha * np.stack(smooth)                       # 2 x H x W
        grid = grid + torch.from_numpy(field.transpose(1, 2, 0) * 2 / size)   # pixels -> normalised
    return grid[None].float()


def warp(image: np.ndarray, mask: np.ndarray, grid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Resample image H x W, or a 2.5D stack C x H x W (every channel through the same grid), bilinearly
    (zeros outside) and mask H x W with nearest neighbour through `grid`; the image keeps its shape."""
    planes = image[None] if image.ndim == 2 else image                                 # C x H x W
    stack = np.concatenate([planes, mask[None]]).astype(np.float32)                    # C+1 x H x W
    stack = torch.from_numpy(stack)[:, None]                                           # C+1 x 1 x H x W
    image_out = F.grid_sample(stack[:-1], grid.expand(len(planes), -1, -1, -1), mode="bilinear",
                              padding_mode="zeros", align_corners=False)              # C x 1 x H x W
    mask_out = F.grid_sample(stack[-1:], grid, mode="nearest", padding_mode="zeros", align_corners=False)
    image_out = image_out[0, 0] if image.ndim == 2 else image_out[:, 0]
    return image_out.numpy(), mask_out[0, 0].numpy().astype(mask.dtype)


# ------------------------------------------------------------------ SSL-ALPNet's augmentation
ALPNET_ROTATE = 5.0            # degrees, U(-5, 5)
ALPNET_SHIFT = 5.0             # pixels per axis, U(-5, 5)
ALPNET_SHEAR = 5.0             # degrees, U(-5, 5)
ALPNET_SCALE = (0.9, 1.2)      # isotropic, about the centre (> 1 enlarges)
ALPNET_ELASTIC = (10.0, 5.0)   # alpha (pixels), sigma of the 21 x 21 Gaussian
ALPNET_GAMMA = (0.5, 1.5)


def _rotation_about(center: tuple[float, float], degrees: float, scale: float) -> np.ndarray:
    """3 x 3 (x, y) matrix of OpenCV's getRotationMatrix2D(center, degrees, scale)."""
    a, b = scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))
    cx, cy = center
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy], [0.0, 0.0, 1.0]])


def alpnet_affine_matrix(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """SSL-ALPNet's random affine map (RandomAffine.build_M): 3 x 3 on (x = column, y = row) pixel
    coordinates, forward (source -> output), M = Scale . Shear . Trans . Rot; draws rotation, shift x,
    shift y, shear, scale in that order. The centre is (H / 2, W // 2) as the official code."""
    center = (size[0] / 2, float(size[1] // 2))
    rotation = _rotation_about(center, rng.uniform(-ALPNET_ROTATE, ALPNET_ROTATE), 1.0)
    tx, ty = rng.uniform(-ALPNET_SHIFT, ALPNET_SHIFT), rng.uniform(-ALPNET_SHIFT, ALPNET_SHIFT)
    translation = np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
    angle = math.radians(rng.uniform(-ALPNET_SHEAR, ALPNET_SHEAR))
    shear = np.array([[1.0, -math.sin(angle), 0.0], [0.0, math.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    zoom = _rotation_about(center, 0.0, rng.uniform(*ALPNET_SCALE))
    return zoom @ shear @ translation @ rotation


def apply_affine(stack: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """C x H x W through a forward (x, y) 3 x 3 map, bilinear, constant border 0 (OpenCV's
    warpAffine with INTER_LINEAR and BORDER_CONSTANT: output(p) = input(M^-1 p))."""
    inverse = np.linalg.inv(matrix)
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])                                # (x, y) <-> (row, col)
    linear = swap @ inverse[:2, :2] @ swap
    offset = swap @ inverse[:2, 2]
    return np.stack([ndimage.affine_transform(channel, linear, offset=offset, order=1, mode="grid-constant",
                                              cval=0.0) for channel in stack])


def alpnet_elastic(stack: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSL-ALPNet's elastic_transform_nd on C x H x W: dx, dy = GaussianBlur(U(-1, 1) noise, 21 x 21,
    sigma 5) x 10 pixels (dx drawn first; reflect-101 border as OpenCV's blur), output(r, c) =
    input(r + dy, c + dx), linear interpolation, 'reflect' border."""
    alpha, sigma = ALPNET_ELASTIC
    size = stack.shape[1:]
    # truncate 2.0: radius int(2 * 5 + 0.5) = 10, a 21-tap kernel; 'mirror' is OpenCV's BORDER_REFLECT_101
    dx = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, size), sigma, truncate=2.0, mode="mirror") * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, size), sigma, truncate=2.0, mode="mirror") * alpha
    rows, cols = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")   # H x W each
    coordinates = np.stack([rows + dy, cols + dx])                                    # 2 x H x W
    return np.stack([ndimage.map_coordinates(channel, coordinates, order=1, mode="reflect")
                     for channel in stack])


def alpnet_gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x' = r ((x - m + 1e-5) / r)^g + m, g ~ U(0.5, 1.5), m = min, r = max - m + 1e-5 (image only).
    image H x W, or a 2.5D stack C x H x W: one draw of g for every channel, m and r of each channel."""
    gamma = rng.uniform(*ALPNET_GAMMA)
    low = image.min(axis=(-2, -1), keepdims=True)                                    # (C x) 1 x 1
    spread = image.max(axis=(-2, -1), keepdims=True) - low + 1e-5
    return spread * np.power((image - low + 1e-5) / spread, gamma) + low


def alpnet_view(image: np.ndarray, fg: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One SSL-ALPNet view of a slice H x W (or a 2.5D stack C x H x W) and its binary foreground H x W:
    the stack [image channels, one-hot bg, one-hot fg] through the affine then the elastic warp (the same
    draws for every channel), label channels rounded (rint) and argmax'ed (pixels that leave the field
    become background), then gamma on the image. Returns (image float32 of the input's shape, fg uint8
    H x W)."""
    fg = (np.asarray(fg) > 0).astype(np.float64)
    planes = np.asarray(image, dtype=np.float64)
    planes = planes[None] if planes.ndim == 2 else planes                            # C x H x W
    stack = np.concatenate([planes, (1.0 - fg)[None], fg[None]])                     # C+2 x H x W
    stack = alpnet_elastic(apply_affine(stack, alpnet_affine_matrix(fg.shape, rng)), rng)
    label = np.argmax(np.rint(stack[-2:]), axis=0).astype(np.uint8)                  # H x W, 1 = fg
    views = alpnet_gamma(stack[:-2], rng).astype(np.float32)                         # C x H x W
    return (views[0] if np.ndim(image) == 2 else views), label
