"""Self-supervised superpixel episodes (dataloaders/selfsup_episodes.py) and their warps (dataloaders/warp.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataloaders.episodes import EpisodeDataset
from dataloaders.prepare import prepare_dataset
from dataloaders.selfsup_episodes import SelfSupEpisodeDataset
from dataloaders.superpixels import SuperpixelParams, make_superpixels, open_superpixels
from dataloaders.warp import WarpParams, affine_matrix, random_grid, warp
from util.errors import UserError

AUGMENT = {"p": 0.5, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0], "gamma": [0.5, 2.0]}
IDENTITY = {"rotate": 0.0, "scale": [1.0, 1.0], "shear": 0.0, "translate": 0.0, "elastic_alpha": 0.0}
MIN_PIXELS = 40


@pytest.fixture(scope="module")
def unlabeled_prep(tiny_phantom, tmp_path_factory):
    """The tiny phantom's silver volumes, images only, 64 px, with superpixels."""
    prep = tmp_path_factory.mktemp("selfsup") / "prep"
    prepare_dataset(tiny_phantom / "SilverCorpus" / "Volumes", prep, "images-only", size=64,
                    intensity={"mode": "window", "window": [-125, 275]}, workers=1)
    make_superpixels(prep, SuperpixelParams(min_size=30), workers=1, progress=False)
    return prep


def dataset(prep, warp_params=None, augment=AUGMENT, shots=1, queries=1, seed=5, min_pixels=MIN_PIXELS):
    return SelfSupEpisodeDataset(str(prep), 1, shots, queries, 64, augment, warp_params or {}, min_pixels, seed)


def test_item_has_the_supervised_layout(unlabeled_prep, tiny_prepared):
    item = dataset(unlabeled_prep, shots=2, queries=3)[0]
    supervised = EpisodeDataset(str(tiny_prepared), [1, 2, 3], 1, 2, 3, 64, None, 0)[0]
    assert set(item) == set(supervised)
    for key in item:
        assert item[key].shape == supervised[key].shape and item[key].dtype == supervised[key].dtype, key
    assert torch.equal(item["support_bg"], 1 - item["support_fg"])
    assert set(torch.unique(item["query_labels"]).tolist()) <= {0, 1}


def test_foreground_is_one_superpixel(unlabeled_prep):
    """Without warp and augmentation the support and query are the slice and one whole superpixel."""
    data = dataset(unlabeled_prep, IDENTITY, augment=None)
    for i in range(6):
        item = data[i]
        fg = item["support_fg"][0, 0].numpy().astype(bool)
        assert torch.equal(item["query_labels"][0].bool(), item["support_fg"][0, 0].bool())
        assert torch.equal(item["query_images"][0], item["support_images"][0, 0])
        matches = []
        for pid, row, ids in data.candidates:
            labels = np.asarray(open_superpixels(unlabeled_prep, pid)[row])
            image = np.load(unlabeled_prep / "train" / f"{pid}_image.npy")[row]
            if np.allclose(image, item["query_images"][0, 0].numpy(), atol=1e-6):
                values = np.unique(labels[fg])
                if values.size == 1 and values[0] > 0 and np.array_equal(labels == values[0], fg):
                    matches.append(values[0])
                    assert (labels == values[0]).sum() >= MIN_PIXELS
        assert matches, f"item {i}: foreground is not one superpixel of its slice"


def test_views_are_transformed_independently(unlabeled_prep):
    data = dataset(unlabeled_prep, shots=1, queries=1)
    plain = dataset(unlabeled_prep, IDENTITY, augment=None)
    for i in range(4):
        item, original = data[i], plain[i]   # same seed and index: same slice and superpixel
        support, query = item["support_images"][0, 0, 0], item["query_images"][0, 0]
        assert not torch.equal(support, query)
        assert not torch.equal(support, original["support_images"][0, 0, 0])
        assert not torch.equal(item["support_fg"][0, 0], item["query_labels"][0].float())
        # the warp is small: each view's foreground still overlaps the unwarped superpixel
        fg = original["support_fg"][0, 0].bool()
        for view in (item["support_fg"][0, 0].bool(), item["query_labels"][0].bool()):
            assert (view & fg).sum() > 0.3 * fg.sum()


def test_episodes_are_deterministic(unlabeled_prep):
    a, b = dataset(unlabeled_prep), dataset(unlabeled_prep)
    for key, value in a[3].items():
        assert torch.equal(value, b[3][key])
    assert not torch.equal(a[3]["query_images"], a[4]["query_images"])
    assert not torch.equal(a[3]["query_images"], dataset(unlabeled_prep, seed=6)[3]["query_images"])


def test_affine_part_never_flips():
    rng = np.random.default_rng(0)
    params = WarpParams(rotate=89, scale=(0.5, 2.0), shear=44)
    for _ in range(200):
        matrix = affine_matrix(math.radians(rng.uniform(-89, 89)), rng.uniform(0.5, 2.0),
                               math.radians(rng.uniform(-44, 44)))
        assert np.linalg.det(matrix) > 0
    # behaviour: a mark in the left half stays in the left half under the default warps
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 4:20] = 1                               # columns 4..19: the left side of the image
    for _ in range(50):
        _, out = warp(np.zeros((64, 64), np.float32), mask, random_grid(64, WarpParams(), rng))
        assert np.flatnonzero(out.any(axis=0)).max() < 32
    with pytest.raises(UserError, match="out of range"):
        WarpParams.from_mapping({"scale": [-1.0, 1.0]})


def test_bad_inputs(unlabeled_prep, tiny_prepared, tmp_path):
    with pytest.raises(UserError, match="no slice has a superpixel"):
        dataset(unlabeled_prep, min_pixels=10 ** 6)
    with pytest.raises(UserError, match="has no superpixels.*make_superpixels.py --images"):
        dataset(tiny_prepared)
    with pytest.raises(UserError, match="n_ways=1"):
        SelfSupEpisodeDataset(str(unlabeled_prep), 2, 1, 1, 64, None, {}, MIN_PIXELS, 0)
    with pytest.raises(UserError, match="unknown keys"):
        dataset(unlabeled_prep, {"flip": True})
