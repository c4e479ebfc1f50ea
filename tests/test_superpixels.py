"""Superpixel pseudo-labels (dataloaders/superpixels.py), the images-only layout, make_superpixels.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import load_script

from dataloaders.superpixels import (
    ALPNET_BODY_THRESHOLD,
    SuperpixelParams,
    alpnet_renumber,
    alpnet_superpixels,
    body_mask,
    make_superpixels,
    read_superpixel_meta,
    renumber,
    slice_superpixels,
)
from util.errors import UserError

REAL = Path(os.environ.get("CHAOS_T2_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
            / "chaos_mr_t2")
SMALL = SuperpixelParams(scale=100.0, sigma=0.8, min_size=30)


def reference_renumber(segments: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Slow, obviously correct: walk pixels in raster order, give each new in-body segment the next id."""
    out = np.zeros(segments.shape, dtype=np.int64)
    seen: dict[int, int] = {}
    for r in range(segments.shape[0]):
        for c in range(segments.shape[1]):
            if body[r, c]:
                seen.setdefault(int(segments[r, c]), len(seen) + 1)
                out[r, c] = seen[int(segments[r, c])]
    return out


def phantom_slice(size: int = 64) -> np.ndarray:
    """A disk 'body' with two brighter 'organs' and a dark 'lung' hole, plus a speck of noise outside."""
    y, x = np.mgrid[:size, :size]
    image = np.where((y - size / 2) ** 2 + (x - size / 2) ** 2 < (0.4 * size) ** 2, 0.4, 0.0)
    image[(y - 0.4 * size) ** 2 + (x - 0.4 * size) ** 2 < (0.1 * size) ** 2] = 0.8
    image[(y - 0.6 * size) ** 2 + (x - 0.65 * size) ** 2 < (0.08 * size) ** 2] = 0.6
    image[(y - 0.5 * size) ** 2 + (x - 0.3 * size) ** 2 < (0.05 * size) ** 2] = 0.0    # air inside the body
    image[1:3, 1:3] = 0.9                                                                 # outside the body
    return image.astype(np.float32)


def test_body_mask_is_largest_component_with_holes_filled():
    image = phantom_slice()
    body = body_mask(image, 0.05)
    y, x = np.mgrid[:64, :64]
    disk = (y - 32) ** 2 + (x - 32) ** 2 < (0.4 * 64) ** 2
    assert np.array_equal(body, disk)           # hole filled, the outside speck dropped
    assert not body_mask(np.zeros((8, 8)), 0.05).any()


def test_renumber_matches_reference():
    rng = np.random.default_rng(0)
    segments = rng.integers(0, 7, size=(12, 10)) * 13
    body = rng.random((12, 10)) > 0.3
    assert np.array_equal(renumber(segments, body), reference_renumber(segments, body))


@pytest.mark.parametrize("method", ["felzenszwalb", "slic"])
def test_slice_superpixels_deterministic_and_inside_body(method):
    image = phantom_slice()
    params = SuperpixelParams(method=method, min_size=20, n_segments=20)
    first, second = slice_superpixels(image, params), slice_superpixels(image.copy(), params)
    assert first.dtype == np.uint16 and np.array_equal(first, second)
    body = body_mask(image, params.body_threshold)
    assert np.array_equal(first > 0, body)
    assert np.array_equal(np.unique(first[body]), np.arange(1, first.max() + 1))  # ids 1..M, none skipped
    assert first.max() >= 3                     # the organs are separate superpixels


def test_images_only_layout(unlabeled_prep, tiny_phantom):
    meta = json.loads((unlabeled_prep / "meta.json").read_text())
    assert meta["source"]["layout"] == "images-only"
    assert meta["splits"]["val"] == [] and meta["splits"]["gold"] == [] and len(meta["splits"]["train"]) == 6
    assert not list((unlabeled_prep / "train").glob("*_label.npy"))
    for pid in meta["splits"]["train"]:
        images = np.load(unlabeled_prep / "train" / f"{pid}_image.npy")
        depth = nib.load(str(tiny_phantom / "SilverCorpus" / "Volumes" / f"{pid}.nii.gz")).shape[2]
        assert images.shape == (depth, 64, 64)   # every axial slice, row = z


def test_make_superpixels_deterministic_and_parallel(unlabeled_prep, tmp_path):
    meta = read_superpixel_meta(unlabeled_prep)
    assert meta["params"]["min_size"] == SMALL.min_size
    copy = tmp_path / "copy"
    shutil.copytree(unlabeled_prep, copy)
    make_superpixels(copy, SMALL, workers=2, overwrite=True, progress=False)
    for pid in meta["volumes"]:
        a = (unlabeled_prep / "superpixels" / f"{pid}.npy").read_bytes()
        assert a == (copy / "superpixels" / f"{pid}.npy").read_bytes()
        labels = np.load(copy / "superpixels" / f"{pid}.npy")
        images = np.load(copy / "train" / f"{pid}_image.npy")
        assert labels.shape == images.shape and labels.dtype == np.uint16
        assert np.array_equal(labels[3], slice_superpixels(images[3], SMALL))


# ------------------------------------------------------------------------------ SSL-ALPNet's superpix-MIDDLE
def test_alpnet_renumbering_follows_superpix_masking():
    raw = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5], [4, 4, 5, 5]])
    body = np.ones((4, 4), bool)
    body[1, 0:2] = False
    assert alpnet_renumber(raw, body).tolist() == [[0, 0, 1, 1], [0, 0, 3, 3], [4, 4, 6, 6], [4, 4, 6, 6]]
    assert not alpnet_renumber(np.zeros((3, 3), int), np.ones((3, 3), bool)).any()


def test_make_superpixels_alpnet_writes_the_missing_files_and_classmap(tmp_path):
    from test_alpnet_layout import write_alpnet_folder

    from dataloaders import layouts
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3, 5, 8, 10], size=32, depth=4)
    shipped = layouts.compute_classmap(folder, layouts.CHAOS_T2)
    for path in [*folder.glob("superpix-MIDDLE_*"), folder / "classmap_1.json"]:
        path.unlink()
    script = load_script("make_superpixels")
    with pytest.raises(UserError, match="--alpnet uses SSL-ALPNet's own parameters"):
        script.main(["--alpnet", str(folder), "--min-size", "10"])
    assert not list(folder.glob("superpix-MIDDLE_*"))
    with pytest.raises(UserError, match=r"^--alpnet .*: not a folder with image_<id>"):
        script.main(["--alpnet", str(folder / "image_1.nii.gz")])
    assert script.main(["--alpnet", str(folder), "--workers", "1"]) == 0
    assert json.loads((folder / "classmap_1.json").read_text()) == shipped
    scan = layouts.load_scan(folder, 10, layouts.CHAOS_T2, superpixels=True)
    threshold = ALPNET_BODY_THRESHOLD["chaos_t2"]
    assert np.array_equal(scan.superpixels, alpnet_superpixels(scan.image, threshold))
    stored = nib.load(str(folder / "superpix-MIDDLE_10.nii.gz"))
    assert np.allclose(stored.affine, nib.load(str(folder / "image_10.nii.gz")).affine)
    before = (folder / "superpix-MIDDLE_1.nii.gz").stat().st_mtime_ns
    (folder / "superpix-MIDDLE_2.nii.gz").unlink()
    assert script.main(["--alpnet", str(folder), "--workers", "1"]) == 0      # only the missing one
    assert (folder / "superpix-MIDDLE_1.nii.gz").stat().st_mtime_ns == before
    assert (folder / "superpix-MIDDLE_2.nii.gz").is_file()


@pytest.mark.skipif(not (REAL / "superpix-MIDDLE_1.nii.gz").is_file(),
                    reason=f"CHAOS-T2 in SSL-ALPNet's layout not found at {REAL} (set CHAOS_T2_DIR)")
def test_alpnet_superpixels_equal_the_shipped_chaos_t2_ones():
    from dataloaders import layouts
    threshold = ALPNET_BODY_THRESHOLD["chaos_t2"]
    for sid, zs in ((1, [5, 20, 30]), (2, [0, 15])):      # an empty top slice, organ slices, an edge slice
        scan = layouts.load_scan(REAL, sid, layouts.CHAOS_T2, superpixels=True)
        ours = alpnet_superpixels(scan.image[:, :, zs], threshold)                        # Y x X x 3
        theirs = scan.superpixels[:, :, zs]
        assert np.array_equal(ours, theirs)
