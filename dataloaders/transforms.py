"""Slice transforms shared by training and evaluation: resizing and intensity augmentation.

Images are float32 slices scaled to [0, 1] (`dataloaders/intensity.py`), labels are uint8/int maps.
Both resize functions take one slice `H x W` or a stack `N x H x W`, as numpy arrays or torch
tensors, and return the same kind (numpy in -> numpy out) at `size x size`.

Augmentation (docs/method.md, "Training setup"): brightness, contrast and gamma, each applied with
probability `p`, with a factor drawn uniformly from its [low, high] range. No flips (left and right organs
differ) and no geometric change, so labels are untouched. Randomness comes only from the numpy
Generator passed in, so an episode is a deterministic function of its seed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor

AUGMENTATIONS = ("brightness", "contrast", "gamma")


def _as_stack(array: ArrayLike) -> tuple[torch.Tensor, bool, bool]:
    """View `H x W` or `N x H x W` as a `N x 1 x H x W` tensor; also report numpy-ness and 2D-ness."""
    is_numpy = isinstance(array, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if is_numpy else array
    if tensor.ndim not in (2, 3):
        raise ValueError(f"expected a slice H x W or a stack N x H x W, got shape {tuple(tensor.shape)}")
    is_2d = tensor.ndim == 2
    stack = tensor[None, None] if is_2d else tensor[:, None]  # N x 1 x H x W
    return stack, is_numpy, is_2d


def _restore(stack: torch.Tensor, is_numpy: bool, is_2d: bool) -> ArrayLike:
    """Undo `_as_stack`: `N x 1 x S x S` -> `S x S` or `N x S x S`, numpy when the input was."""
    out = stack[0, 0] if is_2d else stack[:, 0]
    return out.numpy() if is_numpy else out


def resize_image(image: ArrayLike, size: int) -> ArrayLike:
    """Bilinear resize of an image slice `H x W` or stack `N x H x W` to `size x size` (float32).

    Antialiased when shrinking (like PIL's bilinear resize); identity when already at `size`.
    """
    stack, is_numpy, is_2d = _as_stack(image)
    stack = stack.float()
    if tuple(stack.shape[-2:]) != (size, size):
        stack = F.interpolate(stack, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
    return _restore(stack, is_numpy, is_2d)


def resize_label(label: ArrayLike, size: int) -> ArrayLike:
    """Nearest-neighbour resize of a label slice `H x W` or stack `N x H x W` to `size x size`.

    Keeps the input dtype (values are copied, never interpolated); pixel centres are aligned
    ('nearest-exact'), so a label and its image stay registered.
    """
    stack, is_numpy, is_2d = _as_stack(label)
    if tuple(stack.shape[-2:]) != (size, size):
        dtype = stack.dtype
        # float32 represents every label index exactly; interpolate does not take integer input.
        stack = F.interpolate(stack.float(), size=(size, size), mode="nearest-exact").to(dtype)
    return _restore(stack, is_numpy, is_2d)


def augment_intensity(image: np.ndarray, params: Mapping[str, Sequence[float] | float],
                      rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and gamma of one image `H x W` in [0, 1], or of a 2.5D stack `C x H x W`
    (dataloaders/neighbours.py); returns float32 of the same shape.

    params: {"p": probability of each transform, "brightness": [low, high], "contrast": [low, high],
             "gamma": [low, high]}; a missing transform is skipped. In this order, each applied
             with probability p and a factor f ~ U[low, high]:
      brightness  x * f
      contrast    (x - mean(x)) * f + mean(x)
      gamma       x ** f
    The result is clipped to [0, 1] after each transform. Exactly the same draws are taken from
    `rng` whatever the outcome (one uniform for the coin and one for the factor per transform), so
    the stream stays aligned across episodes. A stack gets ONE draw, applied to every channel as to a
    single image (contrast about each channel's own mean), so its centre channel equals the single
    slice's augmentation and the stream takes the same draws as for one slice.
    """
    draws = []                                                  # (transform, factor) to apply, in order
    p = float(params.get("p", 0.0))
    for name in AUGMENTATIONS:
        if name not in params:
            continue
        low, high = (float(v) for v in params[name])
        coin, factor = rng.random(), rng.uniform(low, high)
        if coin < p:
            draws.append((name, factor))
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        channels = [np.ascontiguousarray(channel) for channel in image]                # C x (H x W)
        return np.stack([_apply_intensity(channel, draws) for channel in channels])    # C x H x W
    return _apply_intensity(image, draws)


def _apply_intensity(image: np.ndarray, draws: list[tuple[str, float]]) -> np.ndarray:
    """`augment_intensity`'s drawn transforms applied to one image H x W (float32)."""
    out = np.asarray(image, dtype=np.float32)
    for name, factor in draws:
        if name == "brightness":
            out = out * np.float32(factor)
        elif name == "contrast":
            mean = out.mean(dtype=np.float64)
            out = (out - np.float32(mean)) * np.float32(factor) + np.float32(mean)
        else:  # gamma
            out = np.power(np.clip(out, 0.0, 1.0), np.float32(factor))
        out = np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
    return out
