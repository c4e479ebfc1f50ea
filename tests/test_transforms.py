"""Resizing and intensity augmentation (dataloaders/transforms.py) against slow references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataloaders.transforms import augment_intensity, resize_image, resize_label


def bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Upsampling with half-pixel centres, edge-clamped, one output pixel at a time."""
    h, w = image.shape
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            y = min(max((i + 0.5) * h / size - 0.5, 0), h - 1)
            x = min(max((j + 0.5) * w / size - 0.5, 0), w - 1)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = (image[y0, x0] * (1 - dy) * (1 - dx) + image[y0, x1] * (1 - dy) * dx
                         + image[y1, x0] * dy * (1 - dx) + image[y1, x1] * dy * dx)
    return out


def nearest_reference(label: np.ndarray, size: int) -> np.ndarray:
    """Output pixel i takes source pixel floor((i + 0.5) * n / size)."""
    h, w = label.shape
    out = np.zeros((size, size), dtype=label.dtype)
    for i in range(size):
        for j in range(size):
            out[i, j] = label[min(int((i + 0.5) * h / size), h - 1), min(int((j + 0.5) * w / size), w - 1)]
    return out


def test_resize_image_matches_bilinear_reference_when_upsampling():
    image = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    out = resize_image(image, 9)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (9, 9)
    np.testing.assert_allclose(out, bilinear_reference(image, 9), atol=1e-5)


def test_resize_image_stacks_tensors_identity_and_constants():
    stack = torch.rand(3, 10, 10)
    out = resize_image(stack, 4)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 4, 4)
    for k in range(3):  # a stack is resized slice by slice
        torch.testing.assert_close(out[k], resize_image(stack[k], 4))
    assert torch.equal(resize_image(stack, 10), stack)
    constant = np.full((16, 16), 0.25, dtype=np.float32)
    np.testing.assert_allclose(resize_image(constant, 5), 0.25, atol=1e-6)
    with pytest.raises(ValueError):
        resize_image(np.zeros((1, 2, 3, 4)), 2)


@pytest.mark.parametrize("source, size", [((7, 7), 3), ((3, 5), 8), ((6, 6), 6)])
def test_resize_label_is_nearest_with_centred_pixels(source, size):
    label = np.random.default_rng(1).integers(0, 21, size=source).astype(np.uint8)
    out = resize_label(label, size)
    assert out.dtype == np.uint8 and out.shape == (size, size)
    np.testing.assert_array_equal(out, nearest_reference(label, size))
    as_tensor = resize_label(torch.from_numpy(label.astype(np.int64)), size)
    assert as_tensor.dtype == torch.int64
    np.testing.assert_array_equal(as_tensor.numpy(), out)


def test_augmentation_formulas_with_fixed_factors():
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(augment_intensity(image, {"p": 1, "brightness": [2, 2]}, rng),
                               np.clip(image * 2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(augment_intensity(image, {"p": 1, "gamma": [2, 2]}, rng), image ** 2,
                               atol=1e-6)
    mean = image.mean()
    np.testing.assert_allclose(augment_intensity(image, {"p": 1, "contrast": [0.5, 0.5]}, rng),
                               (image - mean) * 0.5 + mean, atol=1e-6)
    np.testing.assert_array_equal(augment_intensity(image, {"p": 0, "brightness": [0.5, 2.0]}, rng), image)


def test_augmentation_is_seeded_bounded_and_draws_a_fixed_amount():
    image = np.random.default_rng(3).random((16, 16)).astype(np.float32)
    params = {"p": 0.5, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0], "gamma": [0.5, 2.0]}
    outs = [augment_intensity(image, params, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert outs[0].dtype == np.float32 and outs[0].min() >= 0 and outs[0].max() <= 1
    changed = sum(not np.array_equal(augment_intensity(image, params, np.random.default_rng(s)), image)
                  for s in range(20))
    assert 10 <= changed < 20  # P(unchanged) = 1/8 per seed
    # The stream advances by the same amount whatever p is, so later draws stay aligned.
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    augment_intensity(image, dict(params, p=0.0), a)
    augment_intensity(image, dict(params, p=1.0), b)
    assert a.random() == b.random()
