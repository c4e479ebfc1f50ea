"""Self-supervised episodes from superpixels (after SSL-ALPNet; docs/DESIGN.md "Training").

One random training slice, one superpixel of it as the foreground; support shots and queries are random
views of that slice (recipe 'project': `random_grid` warp + intensity augmentation; 'alpnet': SSL-ALPNet's
pipeline, `alpnet_view`). Item i is a function of (seed, i); a 2.5D stack shares one draw.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import Dataset

from dataloaders.episodes import REDRAWS_KEY
from dataloaders.prepared import (
    open_training_images,
    open_training_neighbours,
    read_meta,
    training_slices,
)
from dataloaders.superpixels import make_hint, open_superpixels, read_superpixel_meta, training_volumes
from dataloaders.transforms import augment_intensity, resize_image, resize_label
from util.errors import UserError
from util.options import PAIR, Option, choice, integer, number


# ------------------------------------------------------------------------------ warps
@dataclass(frozen=True)
class WarpParams:
    """`selfsup.warp`: rotate, shear (+- degrees), scale range, translate (+- fraction of the side), elastic
    displacement (Simard et al. 2003) alpha x U(-1, 1) noise smoothed by a Gaussian of sigma px."""
    rotate: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 5.0
    translate: float = 0.05
    elastic_alpha: float = 30.0
    elastic_sigma: float = 5.0


def affine_matrix(angle: float, scale: float, shear: float) -> np.ndarray:
    """2 x 2 linear part: rotation(angle) @ shear(shear) @ scale (radians); determinant scale**2 > 0."""
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shearing = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    return rotation @ shearing * scale


def random_grid(size: int, params: WarpParams, rng: np.random.Generator) -> torch.Tensor:
    """A sampling grid 1 x H x W x 2 (grid_sample coordinates, H = W = size) of one random warp: output pixel
    p samples the input at A p + t + d(p), A from `affine_matrix`, t the shift, d the elastic field."""
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
        smooth = [ndimage.gaussian_filter(noise[k], params.elastic_sigma) for k in range(2)]
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
    """One SSL-ALPNet view (its augutils sabs_aug) of a slice H x W (or stack C x H x W) and its foreground
    H x W: [image channels, one-hot bg, fg] through the affine then the elastic warp (same draws for every
    channel), labels rint + argmax, then gamma on the image. Returns (image float32, fg uint8 H x W)."""
    fg = (np.asarray(fg) > 0).astype(np.float64)
    planes = np.asarray(image, dtype=np.float64)
    planes = planes[None] if planes.ndim == 2 else planes                            # C x H x W
    stack = np.concatenate([planes, (1.0 - fg)[None], fg[None]])                     # C+2 x H x W
    stack = alpnet_elastic(apply_affine(stack, alpnet_affine_matrix(fg.shape, rng)), rng)
    label = np.argmax(np.rint(stack[-2:]), axis=0).astype(np.uint8)                  # H x W, 1 = fg
    views = alpnet_gamma(stack[:-2], rng).astype(np.float32)                         # C x H x W
    return (views[0] if np.ndim(image) == 2 else views), label


# ------------------------------------------------------------------------------ episodes
PSEUDO_CLASS = -1
RECIPES = ("project", "alpnet")
MAX_DRAWS = 50          # draws per item before giving up (an empty support is redrawn)
REDRAW_REASONS = ("its id is empty in that slice", "lost when resized to input_size",
                  "lost under the warp")   # why a draw's support views hold no superpixel pixel


class SelfSupEpisodeDataset(Dataset):
    """Superpixel episodes; item i is the `EpisodeDataset` dict with N = 1 (C = input_slices) plus
    "redraws"; `classes` holds PSEUDO_CLASS. min_pixels: smallest foreground superpixel (pixels of the
    prepared slice); warp_params: `selfsup.warp`; recipe: `selfsup.episodes`."""

    def __init__(self, prep_dir: str, n_ways: int, n_shots: int, n_queries: int, input_size: int,
                 augment: Mapping | None, warp_params: Mapping, min_pixels: int, seed: int,
                 length: int = 2 ** 31 - 1, recipe: str = "project", input_slices: int = 1):
        # checked by the config check: one of the recipes, one pseudo-class
        assert recipe in RECIPES and int(n_ways) == 1, (recipe, n_ways)
        self.recipe, self.input_slices = recipe, int(input_slices)
        self.prep_dir = str(prep_dir)
        self.n_shots, self.n_queries = int(n_shots), int(n_queries)
        self.input_size = int(input_size)
        self.augment = dict(augment) if augment else None
        self.warp = WarpParams(**{k: (tuple(v) if k == "scale" else v) for k, v in warp_params.items()})
        self.min_pixels = int(min_pixels)
        self.seed, self.length = int(seed), int(length)
        meta = read_superpixel_meta(prep_dir)
        # z-scored slices (SSL-ALPNet layout, prepare.prepare_alpnet) are not in [0, 1]: no clip
        self.clip = (read_meta(prep_dir).get("intensity") or {}).get("mode") != "zscore"
        self.candidates: list[tuple[str, int, np.ndarray]] = []    # (pid, row, eligible superpixel ids)
        pids = training_volumes(prep_dir)
        for pid in pids:
            if pid not in meta.get("volumes", {}):
                raise UserError(f"prepared data '{prep_dir}': volume {pid} has no superpixels (made before "
                                f"it was added?): {make_hint(prep_dir)} --overwrite")
            images, labels = open_training_images(prep_dir, pid), open_superpixels(prep_dir, pid)
            if images.shape != labels.shape:
                raise UserError(f"prepared data '{prep_dir}': superpixels of {pid} {labels.shape} do not "
                                f"match its slices {images.shape}: {make_hint(prep_dir)} --overwrite")
            for row in range(labels.shape[0]):      # the ids a draw picks from (uniformly)
                superpixels = np.asarray(labels[row])                                          # S x S
                if recipe == "alpnet":   # SSL-ALPNet: randint(1, max_id), i.e. {1, ..., max_id - 1}
                    ids = np.arange(1, int(superpixels.max()), dtype=np.int64)
                else:                    # ids >= 1 of >= min_pixels pixels (bincount's 0: outside the body)
                    ids = np.flatnonzero(np.bincount(superpixels.ravel().astype(np.int64)) >= self.min_pixels)
                    ids = ids[ids > 0]
                if ids.size:
                    self.candidates.append((pid, row, ids))
        if not self.candidates and recipe == "alpnet":
            raise UserError(f"prepared data '{prep_dir}': no slice has 2 or more superpixels (SSL-ALPNet "
                            "draws an id below the slice's top one): re-make the superpixels with a smaller "
                            f"--min-size ({make_hint(prep_dir)} --overwrite ...)")
        if not self.candidates:
            raise UserError(f"prepared data '{prep_dir}': no slice has a superpixel of >= {self.min_pixels} "
                            "pixels inside the body: lower selfsup.min_pixels, or re-make the superpixels "
                            f"with a smaller --min-size / --body-threshold ({make_hint(prep_dir)} "
                            "--overwrite ...)")
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return self.length

    def _volume(self, pid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Memory maps (images, superpixels, neighbours N x 2 x S x S with 3 input slices else None)."""
        if pid not in self._arrays:  # opened lazily in each process (fork-safe for DataLoader workers)
            neighbours = open_training_neighbours(self.prep_dir, pid) if self.input_slices == 3 else None
            images, labels = open_training_images(self.prep_dir, pid), open_superpixels(self.prep_dir, pid)
            self._arrays[pid] = (images, labels, neighbours)
        return self._arrays[pid]

    def view(self, image: np.ndarray, mask: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One random view of image ((C x) H x W) and mask H x W: SSL-ALPNet's (`alpnet_view`), or a warp
        then intensity augmentation."""
        if self.recipe == "alpnet":
            return alpnet_view(image, mask, rng)
        image, mask = warp(image, mask, random_grid(self.input_size, self.warp, rng))
        image = np.clip(image, 0.0, 1.0) if self.clip else image
        if self.augment:
            image = augment_intensity(image, self.augment, rng)
        return image.astype(np.float32), mask

    def draw(self, rng: np.random.Generator) -> tuple[list[tuple[np.ndarray, np.ndarray]], int | None]:
        """One draw: a slice, a superpixel, then K + Q views [(image (C x) H x W float32, fg H x W)], and
        why it is discarded (an index of REDRAW_REASONS; None: kept, a support view holds the superpixel)."""
        pid, row, ids = self.candidates[int(rng.integers(len(self.candidates)))]
        superpixel = int(ids[int(rng.integers(ids.size))])
        images, labels, neighbours = self._volume(pid)
        image = training_slices(images, neighbours, row)                                # (C x) S x S
        image = np.asarray(resize_image(image, self.input_size))                        # (C x) H x W
        fg = np.asarray(labels[row]) == superpixel                                      # S x S
        mask = np.asarray(resize_label(fg.astype(np.uint8), self.input_size))           # H x W
        views = [self.view(image, mask, rng) for _ in range(self.n_shots + self.n_queries)]
        if any(m.any() for _, m in views[: self.n_shots]):    # the model refuses an empty support
            return views, None
        return views, (0 if not fg.any() else 1 if not mask.any() else 2)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        redraws = np.zeros(len(REDRAW_REASONS), dtype=np.int64)
        for _ in range(MAX_DRAWS):
            views, reason = self.draw(rng)
            if reason is None:
                break
            redraws[reason] += 1
        else:
            raise UserError(f"self-supervised episode {i}: {MAX_DRAWS} draws in a row lost the superpixel "
                            f"from every support view (prepared data '{self.prep_dir}'): raise "
                            "selfsup.min_pixels or make the superpixels with a larger --min-size")
        K, Q, C, size = self.n_shots, self.n_queries, self.input_slices, self.input_size
        support_images = np.stack([v for v, _ in views[:K]]).reshape(1, K, C, size, size)
        support_fg = np.stack([m for _, m in views[:K]]).astype(np.float32).reshape(1, K, size, size)
        return {
            "support_images": torch.from_numpy(support_images),                            # 1 x K x C x H x W
            "support_fg": torch.from_numpy(support_fg),                                    # 1 x K x H x W
            "support_bg": torch.from_numpy(1.0 - support_fg),
            "query_images": torch.from_numpy(np.stack([v for v, _ in views[K:]]).reshape(Q, C, size, size)),
            "query_labels": torch.from_numpy(np.stack([m for _, m in views[K:]]).astype(np.int64)),
            "classes": torch.tensor([PSEUDO_CLASS], dtype=torch.int64),
            REDRAWS_KEY: torch.from_numpy(redraws),   # draws discarded before this one, by REDRAW_REASONS
        }


# ------------------------------------------------------------------------------ the options (selfsup.*)
# config.py's selfsup.* keys, checked once by training/config_check.py
WARP_DEFAULTS = {name: list(value) if isinstance(value, tuple) else value   # config.py's selfsup.warp
                 for name, value in asdict(WarpParams()).items()}
SELFSUP_OPTIONS = {
    "episodes": choice(*RECIPES),
    "min_pixels": integer(1, example="400"),
    "warp.rotate": number(0, 90, high_open=True, example="10.0"),
    "warp.scale": Option(PAIR, 0, low_open=True),
    "warp.shear": number(0, 45, high_open=True, example="5.0"),
    "warp.translate": number(0, 0.5, high_open=True, example="0.05"),
    "warp.elastic_alpha": number(0, example="30.0"),
    "warp.elastic_sigma": number(0, low_open=True, example="5.0"),
}
