"""Slice transforms shared by training and evaluation: intensity scaling, 2.5D neighbours, resizing and
intensity augmentation (docs/method.md, "Training setup"; `intensity` as in docs/DESIGN.md). Randomness
comes only from the Generator passed in.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from util.errors import UserError

DEFAULT_INTENSITY = {"mode": "minmax"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def validate_intensity(intensity: dict) -> dict:
    """The intensity dict if it is well formed (canonical numbers); a one-line UserError otherwise."""
    mode = intensity.get("mode") if isinstance(intensity, dict) else None
    if mode == "minmax":
        return {"mode": "minmax"}
    if mode == "window":
        window = intensity.get("window")
        if (not isinstance(window, (list, tuple)) or len(window) != 2
                or not all(_number(v) for v in window) or not window[0] < window[1]):
            raise UserError(f"intensity window {window!r} is invalid: give two numbers lo < hi, "
                            "e.g. [-125, 275]")
        return {"mode": "window", "window": [float(window[0]), float(window[1])]}
    if mode == "zscore":
        checked = dict(intensity)
        given = [key for key in ("mean", "std") if key in intensity]
        if given and (len(given) != 2 or not _number(intensity["mean"]) or not _number(intensity["std"])
                      or not intensity["std"] > 0):
            raise UserError(f"intensity {intensity!r} is invalid: a zscore with fixed statistics needs both "
                            "'mean' and 'std' (numbers, std > 0); leave both out for per-volume statistics")
        if given:
            checked.update(mean=float(intensity["mean"]), std=float(intensity["std"]))
        return checked
    raise UserError(f"intensity {intensity!r} is invalid: use {{'mode': 'minmax'}}, "
                    "{'mode': 'window', 'window': [lo, hi]} or {'mode': 'zscore'}")


def needs_hounsfield(intensity: dict) -> bool:
    """True when the scaling assumes CT in Hounsfield units (a fixed HU window)."""
    return validate_intensity(intensity)["mode"] == "window"


def volume_intensity(volume: np.ndarray, intensity: dict, name: str = "volume") -> dict:
    """The scaling of one volume X x Y x Z's slices: a per-volume zscore gets the volume's mean and std;
    other modes (and a zscore with fixed statistics) come back as given."""
    intensity = validate_intensity(intensity)
    if intensity["mode"] != "zscore" or "mean" in intensity:
        return intensity
    values = np.asarray(volume, dtype=np.float64)
    std = float(values.std())
    if not std > 0:
        raise UserError(f"{name}: the volume is constant (std 0): z-scoring is undefined; check the "
                        "image file")
    return dict(intensity, mean=float(values.mean()), std=std)


def scale_intensity(slice_hu: np.ndarray, intensity: dict) -> np.ndarray:
    """Scale one slice H x W or a stack N x H x W to float32. minmax: (x - min) / (max - min) per slice (a
    constant slice -> 0); window: clip(x, lo, hi) mapped to [0, 1]; zscore: (x - mean) / std with the dict's
    statistics, else those of the whole array given (resolve them first with `volume_intensity`)."""
    intensity = validate_intensity(intensity)
    array = np.asarray(slice_hu, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise ValueError(f"scale_intensity expects H x W or N x H x W, got shape {array.shape}")
    if intensity["mode"] == "window":
        lo, hi = intensity["window"]
        return ((np.clip(array, lo, hi) - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
    if intensity["mode"] == "zscore":
        resolved = volume_intensity(array, intensity, "slices")
        return ((array.astype(np.float64) - resolved["mean"]) / resolved["std"]).astype(np.float32)
    stack = array[None] if array.ndim == 2 else array                       # N x H x W
    low = stack.min(axis=(1, 2), keepdims=True)
    span = stack.max(axis=(1, 2), keepdims=True) - low
    scaled = np.where(span > 0, (stack - low) / np.where(span > 0, span, 1), 0).astype(np.float32)
    return scaled[0] if array.ndim == 2 else scaled


# ------------------------------------------------------------------------------ 2.5D input
def neighbour_indices(zs: np.ndarray, n_slices: int, available: np.ndarray | None = None) -> np.ndarray:
    """The slices (z - 1, z, z + 1) that stand for each slice z of `zs` (n,), as an n x 3 int64 array.

    A neighbour outside the volume is the centre itself (edge replicate); so is one that `available` (bool,
    n_slices) marks unavailable (a slice Setting 2 dropped: no excluded image enters training)."""
    zs = np.asarray(zs, dtype=np.int64).reshape(-1)                                  # n
    assert zs.size == 0 or (zs.min() >= 0 and zs.max() < n_slices), (zs, n_slices)
    around = zs[:, None] + np.array([-1, 0, 1])                                      # n x 3
    inside = (around >= 0) & (around < n_slices)                                     # n x 3
    if available is not None:
        available = np.asarray(available, dtype=bool).reshape(-1)
        assert available.shape == (n_slices,) and available[zs].all(), "a centre slice is not available"
        inside &= available[np.clip(around, 0, n_slices - 1)]
    return np.where(inside, around, zs[:, None])                                     # n x 3


def neighbour_stack(volume: np.ndarray, zs: np.ndarray, input_slices: int = 3,
                    available: np.ndarray | None = None) -> np.ndarray:
    """Model-input stacks n x C x X x Y of slices `zs` (n,) of a volume X x Y x Z: channels (z - 1, z, z + 1)
    by `neighbour_indices` (input_slices 3) or the slice alone (1); same dtype as `volume`."""
    zs = np.asarray(zs, dtype=np.int64).reshape(-1)
    index = zs[:, None] if input_slices == 1 else neighbour_indices(zs, volume.shape[2], available)   # n x C
    return np.moveaxis(np.asarray(volume[:, :, index]), (2, 3), (0, 1))             # n x C x X x Y


# ------------------------------------------------------------------------------ resize and augmentation
ArrayLike = np.ndarray | torch.Tensor

AUGMENTATIONS = ("brightness", "contrast", "gamma")


def _resize(array: ArrayLike, size: int, label: bool) -> ArrayLike:
    """A slice H x W or stack N x H x W at size x size, as `resize_image` / `resize_label` say."""
    is_numpy = isinstance(array, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if is_numpy else array
    if tensor.ndim not in (2, 3):
        raise ValueError(f"expected a slice H x W or a stack N x H x W, got shape {tuple(tensor.shape)}")
    stack = tensor[None, None] if tensor.ndim == 2 else tensor[:, None]                 # N x 1 x H x W
    if not label:
        stack = stack.float()
    if tuple(stack.shape[-2:]) != (size, size):
        # labels: float32 represents every label index exactly; interpolate does not take integer input
        mode = dict(mode="nearest-exact") if label else dict(mode="bilinear", align_corners=False,
                                                              antialias=True)
        stack = F.interpolate(stack.float(), size=(size, size), **mode).to(stack.dtype)
    out = stack[0, 0] if tensor.ndim == 2 else stack[:, 0]
    return out.numpy() if is_numpy else out


def resize_image(image: ArrayLike, size: int) -> ArrayLike:
    """Bilinear resize to size x size (float32); antialiased when shrinking (like PIL), identity at `size`."""
    return _resize(image, size, label=False)


def resize_label(label: ArrayLike, size: int) -> ArrayLike:
    """Nearest-neighbour resize to size x size, same dtype; pixel centres aligned ('nearest-exact'), so a
    label and its image stay registered."""
    return _resize(label, size, label=True)


def augment_intensity(image: np.ndarray, params: Mapping[str, Sequence[float] | float],
                      rng: np.random.Generator) -> np.ndarray:
    """Brightness x * f, contrast (x - mean) * f + mean, gamma x ** f (in this order, each with probability
    params["p"], f ~ U(params[name]), clipped to [0, 1]) of an image H x W or a 2.5D stack C x H x W. Two
    draws per transform (coin, factor) whatever the outcome; ONE draw for every channel of a stack."""
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
    channels = [np.ascontiguousarray(channel) for channel in image] if image.ndim == 3 else [image]
    for c, out in enumerate(channels):                                                  # C x (H x W)
        for name, factor in draws:
            if name == "brightness":
                out = out * np.float32(factor)
            elif name == "contrast":
                mean = out.mean(dtype=np.float64)
                out = (out - np.float32(mean)) * np.float32(factor) + np.float32(mean)
            else:  # gamma
                out = np.power(np.clip(out, 0.0, 1.0), np.float32(factor))
            out = np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
        channels[c] = out
    return np.stack(channels) if image.ndim == 3 else channels[0]
