"""SSL-ALPNet's augmentation for self-supervised episodes (dataloaders/selfsup_episodes.py alpnet_*) against
slow literal versions written here from its rules (its pseudo-label draw: tests/test_selfsup_episodes.py)."""
from __future__ import annotations

import math

import numpy as np

from dataloaders.selfsup_episodes import (
    alpnet_affine_matrix,
    alpnet_elastic,
    alpnet_gamma,
    alpnet_view,
    apply_affine,
)


def _reflect(index, n):
    """scipy's 'reflect' (half-sample symmetric: d c b a | a b c d | d c b a)."""
    period = 2 * n
    index = index % period
    return index if index < n else period - 1 - index


def _bilinear(image, r, c, reflect=False):
    """image[r, c] at a real position, bilinear; outside: 0 (OpenCV's BORDER_CONSTANT) or `_reflect`."""
    r0, c0 = math.floor(r), math.floor(c)
    total = 0.0
    for rr, wr in ((r0, 1 - (r - r0)), (r0 + 1, r - r0)):
        for cc, wc in ((c0, 1 - (c - c0)), (c0 + 1, c - c0)):
            if reflect:
                total += wr * wc * image[_reflect(rr, image.shape[0]), _reflect(cc, image.shape[1])]
            elif 0 <= rr < image.shape[0] and 0 <= cc < image.shape[1]:
                total += wr * wc * image[rr, cc]
    return total


def test_affine_matrix_is_the_official_composition():
    """M = Scale . Shear . Trans . Rot, OpenCV's rotation about (H/2, W//2); draws rot, tx, ty, shear, s."""
    size = (20, 20)
    rng, replay = np.random.default_rng(7), np.random.default_rng(7)
    got = alpnet_affine_matrix(size, rng)
    rot, tx, ty, shear, s = (replay.uniform(-5, 5), replay.uniform(-5, 5), replay.uniform(-5, 5),
                             replay.uniform(-5, 5), replay.uniform(0.9, 1.2))
    cx, cy = 10.0, 10.0
    a, b = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    R = np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy], [0, 0, 1]])
    T = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    t = math.radians(shear)
    Sh = np.array([[1, -math.sin(t), 0], [0, math.cos(t), 0], [0, 0, 1]])
    Z = np.array([[s, 0, (1 - s) * cx], [0, s, (1 - s) * cy], [0, 0, 1]])
    np.testing.assert_allclose(got, Z @ Sh @ T @ R, atol=1e-12)
    assert np.linalg.det(got[:2, :2]) > 0                        # never a flip


def test_affine_warp_matches_a_pixel_loop():
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(12, 14))
    matrix = alpnet_affine_matrix(image.shape, rng)
    got = apply_affine(image[None], matrix)[0]
    inverse = np.linalg.inv(matrix)
    want = np.zeros_like(image)
    for r in range(12):
        for c in range(14):
            x, y, _ = inverse @ np.array([c, r, 1.0])            # OpenCV: dst(p) = src(M^-1 p), p = (x, y)
            want[r, c] = _bilinear(image, y, x)
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_elastic_matches_a_pixel_loop():
    rng, replay = np.random.default_rng(2), np.random.default_rng(2)
    image = np.random.default_rng(9).uniform(size=(16, 18))
    got = alpnet_elastic(image[None], rng)[0]
    # dx first, then dy: a 21 x 21 Gaussian (sigma 5) of U(-1, 1) noise, border reflect-101, x 10
    taps = np.exp(-0.5 * (np.arange(-10, 11) / 5.0) ** 2)
    taps /= taps.sum()

    def blur(noise):
        padded = np.pad(noise, 10, mode="reflect")               # numpy 'reflect' = OpenCV REFLECT_101
        out = np.zeros_like(noise)
        for r in range(noise.shape[0]):
            for c in range(noise.shape[1]):
                out[r, c] = taps @ padded[r:r + 21, c:c + 21] @ taps
        return out
    dx = blur(replay.uniform(-1, 1, image.shape)) * 10
    dy = blur(replay.uniform(-1, 1, image.shape)) * 10
    want = np.array([[_bilinear(image, r + dy[r, c], c + dx[r, c], True) for c in range(18)]
                     for r in range(16)])
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert np.abs(dx).max() > 0.05                               # the field does move pixels


def test_gamma_formula_and_labels():
    rng, replay = np.random.default_rng(3), np.random.default_rng(3)
    image = np.linspace(-2.0, 3.0, 30).reshape(5, 6)
    got = alpnet_gamma(image, rng)
    g = replay.uniform(0.5, 1.5)
    m, r = image.min(), image.max() - image.min() + 1e-5
    np.testing.assert_allclose(got, r * ((image - m + 1e-5) / r) ** g + m)
    # a view: labels are rint + argmax of the warped one-hot stack; a mark at the border can leave the field
    fg = np.zeros((32, 32), np.uint8)
    fg[10:20, 12:22] = 1
    views = [alpnet_view(np.random.default_rng(4).uniform(size=(32, 32)), fg, np.random.default_rng(s))
             for s in range(6)]
    for view_image, label in views:
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        assert 0.5 * fg.sum() < label.sum() < 2 * fg.sum()
        assert view_image.dtype == np.float32
    assert not np.array_equal(views[0][1], views[1][1])          # fresh parameters per view
    edge = np.zeros((32, 32), np.uint8)
    edge[0, :] = 1                                               # one row on the border
    lost = sum(int(alpnet_view(np.ones((32, 32)), edge, np.random.default_rng(s))[1].sum() == 0)
               for s in range(20))
    assert lost > 0                                              # why episodes are redrawn
