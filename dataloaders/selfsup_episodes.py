"""Self-supervised training episodes from superpixels (after SSL-ALPNet; docs/DESIGN.md "Training").

An episode needs no label: one random training slice (any volume of PREP's training split), one
superpixel of it (PREP/superpixels, body only) as the foreground "class"; the support shots and the
queries are independent random views of that SAME slice. Background is every other pixel.
Two recipes (`episodes`, config `selfsup.episodes`):

- 'project' (this project's, the default): a superpixel with at least `min_pixels` pixels of the
  prepared slice, drawn uniformly among those; each view is this project's warp (dataloaders/warp.py
  `random_grid`: rotation +-10 deg, scale 0.9-1.1, shear +-5 deg, translation +-5 % of the side,
  elastic alpha 30 / sigma 5, all set by `selfsup.warp`; nearest-neighbour mask) followed by the
  `augment` intensity augmentation (brightness / contrast / gamma with probability p).
- 'alpnet' (SSL-ALPNet's, Ouyang et al. ECCV 2020, GenericSuperDatasetv2 + sabs_aug): the superpixel
  id uniform over {1, ..., max_id - 1} of the slice (its top id is never drawn, no minimum size;
  `min_pixels`, `selfsup.warp` and `augment` are not used); each view is SSL-ALPNet's pipeline
  (dataloaders/warp.py `alpnet_view`: affine rotation/shear U(-5, 5) deg, shift U(-5, 5) px, scale
  U(0.9, 1.2), constant border 0; elastic 21 x 21 Gaussian sigma 5 of U(-1, 1) noise x 10 px; labels
  rint + argmax; gamma U(0.5, 1.5) on the image only). SSL-ALPNet runs 1 way, 1 shot, 1 query.
  Where this still differs from SSL-ALPNet: in a folder made by prepare_visceral.py the slices are
  scaled to [0, 1] per slice or by a window, not z-scored per volume, so the border fill 0 is the
  darkest value instead of the volume mean (a folder in SSL-ALPNet's layout, dataloaders/
  alpnet_prepare.py, is z-scored as SSL-ALPNet); slices are resized to input_size (SSL-ALPNet: the
  stored 256 x 256); superpixels made by make_superpixels.py are this project's (dataloaders/
  superpixels.py: renumbered without empty ids, so every drawn id is a real superpixel); slices
  are drawn uniformly per episode (SSL-ALPNet: shuffled epochs, 1000 draws per epoch on CHAOS), and an
  episode whose support foreground is empty is redrawn (below); SSL-ALPNet trains on it ('mask' mode,
  zero prototype).

Both recipes: a chosen superpixel can vanish from the support under resize or warp (a superpixel on
the image border moves out of the field). The model refuses a way whose support masks are all
empty, so such a draw is redrawn from the same random stream, at most MAX_DRAWS times (then a
one-line error); the item's "redraws" entry counts the extra draws (the training loop reports the
total). An empty query foreground is kept (the model accepts it).

2.5D input (`input_slices` = 3, dataloaders/neighbours.py): every view's image is the stack (z - 1, z,
z + 1) of the slice and its stored neighbours, warped through the same grid (the same random draws) and
augmented with the same draw on every channel; the superpixel comes from the centre slice. The random
stream is that of 1 slice, so the centre channel is the 1-slice view.

The item is the same dict as `dataloaders.episodes.EpisodeDataset` (1-way) plus "redraws", so the
training loop has one path; `classes` holds -1 (a pseudo-class, no organ). Item i is a deterministic
function of (seed, i): its random stream is `numpy.random.default_rng([seed, i])`.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders.prepared import (
    check_training_neighbours,
    open_training_images,
    open_training_neighbours,
    read_meta,
    training_slices,
)
from dataloaders.superpixels import make_hint, open_superpixels, read_superpixel_meta, training_volumes
from dataloaders.transforms import augment_intensity, resize_image, resize_label
from dataloaders.warp import WarpParams, alpnet_view, random_grid, warp
from util.errors import UserError

PSEUDO_CLASS = -1
RECIPES = ("project", "alpnet")
MAX_DRAWS = 50          # draws per item before giving up (an empty support is redrawn)
REDRAWS_KEY = "redraws"


def eligible_superpixels(labels: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """Per slice of a stack N x S x S: the superpixel ids (>= 1) with at least `min_pixels` pixels."""
    out = []
    for row in range(labels.shape[0]):
        sizes = np.bincount(np.asarray(labels[row]).ravel().astype(np.int64))   # index 0 = outside body
        ids = np.flatnonzero(sizes >= min_pixels)
        out.append(ids[ids > 0])
    return out


class SelfSupEpisodeDataset(Dataset):
    """Superpixel episodes; item i is the `EpisodeDataset` dict with N = 1 (H = W = input_size).

    min_pixels: smallest superpixel (pixels of the PREPARED slice, prep_size) that may be a foreground.
    warp: WarpParams fields (`selfsup.warp` config). augment: the intensity augmentation config.
    recipe: 'project' or 'alpnet' (`selfsup.episodes`; the module docstring says what each does).
    input_slices: 1, or 3 for 2.5D images (support_images 1 x K x 3 x H x W, query_images Q x 3 x H x W).
    """

    def __init__(self, prep_dir: str, n_ways: int, n_shots: int, n_queries: int, input_size: int,
                 augment: Mapping | None, warp_params: Mapping, min_pixels: int, seed: int,
                 length: int = 2 ** 31 - 1, recipe: str = "project", input_slices: int = 1):
        assert int(n_ways) == 1, n_ways    # one pseudo-class (training/config_check.py says so first)
        self.recipe, self.input_slices = recipe, int(input_slices)
        self.prep_dir = str(prep_dir)
        self.n_shots, self.n_queries = int(n_shots), int(n_queries)
        self.input_size = int(input_size)
        self.augment = dict(augment) if augment else None
        self.warp = WarpParams.from_mapping(dict(warp_params))
        self.min_pixels = int(min_pixels)
        self.seed, self.length = int(seed), int(length)
        meta = read_superpixel_meta(prep_dir)
        # z-scored slices (SSL-ALPNet layout, dataloaders/alpnet_prepare.py) are not in [0, 1]: no clip
        self.clip = (read_meta(prep_dir).get("intensity") or {}).get("mode") != "zscore"
        self.candidates: list[tuple[str, int, np.ndarray]] = []    # (pid, row, eligible superpixel ids)
        if self.input_slices == 3:     # a folder prepared before neighbours were stored: one line, at once
            check_training_neighbours(prep_dir, training_volumes(prep_dir))
        for pid in training_volumes(prep_dir):
            if pid not in meta.get("volumes", {}):
                raise UserError(f"prepared data '{prep_dir}': volume {pid} has no superpixels (made before "
                                f"it was added?): {make_hint(prep_dir)} --overwrite")
            images, labels = self._open(pid)
            if images.shape != labels.shape:
                raise UserError(f"prepared data '{prep_dir}': superpixels of {pid} {labels.shape} do not "
                                f"match its slices {images.shape}: {make_hint(prep_dir)} --overwrite")
            for row, ids in enumerate(self._eligible(labels)):
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

    def _eligible(self, labels: np.ndarray) -> list[np.ndarray]:
        """Per slice of a superpixel stack N x S x S, the ids a draw picks from (uniformly)."""
        if self.recipe == "alpnet":   # SSL-ALPNet: randint(1, max_id), i.e. {1, ..., max_id - 1}
            return [np.arange(1, int(np.asarray(labels[row]).max()), dtype=np.int64)
                    for row in range(labels.shape[0])]
        return eligible_superpixels(labels, self.min_pixels)

    def _open(self, pid: str) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps (images N x S x S float32, superpixels N x S x S uint16) of one volume."""
        return open_training_images(self.prep_dir, pid), open_superpixels(self.prep_dir, pid)

    def _volume(self, pid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Memory maps (images, superpixels, neighbours N x 2 x S x S with 3 input slices else None)."""
        if pid not in self._arrays:  # opened lazily in each process (fork-safe for DataLoader workers)
            neighbours = open_training_neighbours(self.prep_dir, pid) if self.input_slices == 3 else None
            self._arrays[pid] = (*self._open(pid), neighbours)
        return self._arrays[pid]

    def view(self, image: np.ndarray, mask: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One random view: geometric warp of image (H x W, or the stack C x H x W) and mask (H x W), then
        intensity augmentation."""
        image, mask = warp(image, mask, random_grid(self.input_size, self.warp, rng))
        image = np.clip(image, 0.0, 1.0) if self.clip else image
        if self.augment:
            image = augment_intensity(image, self.augment, rng)
        return image.astype(np.float32), mask

    def draw(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """One draw: a slice, a superpixel, then K + Q views [(image H x W float32 (3 x H x W with 3 input
        slices), fg H x W)]."""
        pid, row, ids = self.candidates[int(rng.integers(len(self.candidates)))]
        superpixel = int(ids[int(rng.integers(ids.size))])
        images, labels, neighbours = self._volume(pid)
        image = training_slices(images, neighbours, row)                                # (C x) S x S
        image = np.asarray(resize_image(image, self.input_size))                        # (C x) H x W
        mask = np.asarray(resize_label((np.asarray(labels[row]) == superpixel).astype(np.uint8),
                                       self.input_size))                                               # H x W
        view = (lambda: alpnet_view(image, mask, rng)) if self.recipe == "alpnet" else \
            (lambda: self.view(image, mask, rng))
        return [view() for _ in range(self.n_shots + self.n_queries)]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, int(i)])
        for redraws in range(MAX_DRAWS):
            views = self.draw(rng)
            if any(mask.any() for _, mask in views[: self.n_shots]):   # the model refuses an empty support
                break
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
            REDRAWS_KEY: torch.tensor(redraws, dtype=torch.int64),   # draws discarded before this one
        }


# ------------------------------------------------------------------------------ the options (selfsup.*)
# config.py's selfsup.* keys, checked once by training/config_check.py (imports kept with the block).
from util.options import PAIR, Option, choice, integer, number  # noqa: E402

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
