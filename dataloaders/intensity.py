"""Intensity scaling of CT slices for model input (the same function for training and inference).

`intensity` is meta.json's dict: {"mode": "minmax"} scales every slice to [0, 1] by its own minimum
and maximum (the official LSLPN rule); {"mode": "window", "window": [lo, hi]} clips Hounsfield units
to [lo, hi] and maps them linearly to [0, 1] (e.g. the abdominal window [-125, 275]).
"""
from __future__ import annotations

import numpy as np

from util.errors import UserError

DEFAULT_INTENSITY = {"mode": "minmax"}


def validate_intensity(intensity: dict) -> dict:
    """The intensity dict if it is well formed; a one-line UserError otherwise."""
    mode = intensity.get("mode") if isinstance(intensity, dict) else None
    if mode == "minmax":
        return {"mode": "minmax"}
    if mode == "window":
        window = intensity.get("window")
        if (not isinstance(window, (list, tuple)) or len(window) != 2
                or not all(isinstance(v, (int, float)) for v in window) or not window[0] < window[1]):
            raise UserError(f"intensity window {window!r} is invalid: give two numbers lo < hi, e.g. [-125, 275]")
        return {"mode": "window", "window": [float(window[0]), float(window[1])]}
    raise UserError(f"intensity {intensity!r} is invalid: use {{'mode': 'minmax'}} or "
                    "{'mode': 'window', 'window': [lo, hi]}")


def scale_intensity(slice_hu: np.ndarray, intensity: dict) -> np.ndarray:
    """Scale one slice H x W or a stack N x H x W (each slice on its own) to float32 in [0, 1].

    minmax: (x - min) / (max - min) per slice; a constant slice becomes all zeros.
    window: clip(x, lo, hi) mapped linearly to [0, 1].
    """
    intensity = validate_intensity(intensity)
    array = np.asarray(slice_hu, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise ValueError(f"scale_intensity expects H x W or N x H x W, got shape {array.shape}")
    if intensity["mode"] == "window":
        lo, hi = intensity["window"]
        return ((np.clip(array, lo, hi) - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
    stack = array[None] if array.ndim == 2 else array                       # N x H x W
    low = stack.min(axis=(1, 2), keepdims=True)
    span = stack.max(axis=(1, 2), keepdims=True) - low
    scaled = np.where(span > 0, (stack - low) / np.where(span > 0, span, 1), 0).astype(np.float32)
    return scaled[0] if array.ndim == 2 else scaled
