"""Intensity scaling of CT and MR slices for model input (the same function for training and inference).

`intensity` is meta.json's dict:
- {"mode": "minmax"} scales every slice to [0, 1] by its own minimum and maximum (the official LSLPN
  rule); any modality, any units.
- {"mode": "window", "window": [lo, hi]} clips Hounsfield units to [lo, hi] and maps them linearly to
  [0, 1] (e.g. the abdominal window [-125, 275]). CT in HU only: `needs_hounsfield` says so, and
  the callers refuse a volume that is not in HU (dataloaders/plausibility.py `hounsfield_problem`).
- {"mode": "zscore"} is SSL-ALPNet's MR normalisation: (x - mean) / std with the mean and standard
  deviation of the WHOLE 3D volume (no eps). Per-slice callers first resolve a volume's statistics
  with `volume_intensity`, which returns {"mode": "zscore", "mean": m, "std": s}; a dict that carries
  "mean" and "std" (SSL-ALPNet's CT rule: one mean and std over the training scans) is applied as it
  is. Values are not in [0, 1].
"""
from __future__ import annotations

import numpy as np

from util.errors import UserError

DEFAULT_INTENSITY = {"mode": "minmax"}
MODES = ("minmax", "window", "zscore")


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
    """The scaling of one volume's slices: per-volume zscore gets that volume's mean and std.

    volume: X x Y x Z (any dtype). Other modes (and a zscore with fixed statistics) come back as given.
    A constant volume cannot be z-scored: one-line UserError.
    """
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
    """Scale one slice H x W or a stack N x H x W to float32 (minmax and window: in [0, 1]).

    minmax: (x - min) / (max - min) per slice; a constant slice becomes all zeros.
    window: clip(x, lo, hi) mapped linearly to [0, 1].
    zscore: (x - mean) / std with the dict's statistics; without them, those of the whole array given
    (give the whole volume, or resolve them first with `volume_intensity`).
    """
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
