"""Overlap metrics on binary masks (numpy, any shape)."""
from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, target: np.ndarray, smooth: float = 0.0, eps: float = 0.0) -> float:
    """Dice = (2|P & T| + smooth) / (|P| + |T| + smooth + eps) of two binary masks of the same shape.

    Both empty gives 1.0 (nothing to find, nothing found). Values are in [0, 1]. `smooth` 0.001
    is the official eval.py's Dice (protocol preset 'official'); `eps` 1e-4 the SENet evaluator's
    (preset 'senet', denominator only).
    """
    prediction = np.asarray(prediction).astype(bool)
    target = np.asarray(target).astype(bool)
    if prediction.shape != target.shape:
        raise ValueError(f"dice: prediction shape {prediction.shape} != target shape {target.shape}")
    denominator = int(prediction.sum()) + int(target.sum())
    if denominator == 0:
        return 1.0
    return (2.0 * int(np.logical_and(prediction, target).sum()) + smooth) / (denominator + smooth + eps)
