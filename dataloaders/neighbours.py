"""2.5D model input (`model.input_slices` = 3): an axial slice with its two neighbours as 3 channels.

The one place of the neighbour rule (`neighbour_indices`) and of the stack built from a volume
(`neighbour_stack`): the prepared-folder writers (dataloaders/prepare.py, dataloaders/alpnet_prepare.py)
use them for the stored training neighbours, the evaluation paths (evaluation/inference.py,
evaluation/protocols.py) for whole volumes. Channel order: (z - 1, z, z + 1), the centre in the
middle; with input_slices = 1 the stack is the slice alone (one channel), as before 2.5D existed.
"""
from __future__ import annotations

import numpy as np

INPUT_SLICES = (1, 3)        # model.input_slices: one slice, or the slice and its two neighbours
CENTRE = 1                   # channel of the slice itself in a 3-slice stack


def neighbour_indices(zs: np.ndarray, n_slices: int, available: np.ndarray | None = None) -> np.ndarray:
    """The slices (z - 1, z, z + 1) that stand for each slice z of `zs` (n,), as an n x 3 int64 array.

    The neighbour rule: a neighbour outside the volume (below slice 0, above slice n_slices - 1) is the
    centre slice itself (edge replicate); so is a neighbour that `available` (bool, n_slices) marks as not
    available, e.g. a training slice dropped because it shows a test organ (SSL-ALPNet's Setting 2), so
    that no excluded image enters training. Evaluation volumes are whole (available None): only the edge
    rule applies there. Every z of `zs` must itself be available.
    """
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
    """The model-input stacks of slices `zs` (n,) of a volume X x Y x Z (axial slices volume[:, :, z]):
    n x C x X x Y with C = input_slices, channels (z - 1, z, z + 1) after `neighbour_indices`' rule
    (input_slices 3) or the slice alone (input_slices 1). Same dtype as `volume` (memory maps are read)."""
    assert input_slices in INPUT_SLICES, input_slices
    zs = np.asarray(zs, dtype=np.int64).reshape(-1)
    index = zs[:, None] if input_slices == 1 else neighbour_indices(zs, volume.shape[2], available)   # n x C
    return np.moveaxis(np.asarray(volume[:, :, index]), (2, 3), (0, 1))             # n x C x X x Y
