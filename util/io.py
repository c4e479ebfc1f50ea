"""File input helpers shared by the packages: weights-only torch.load."""
from __future__ import annotations

import os

import torch

from util.errors import UserError


def safe_torch_load(path: str, map_location: str | torch.device = "cpu", what: str = "checkpoint"):
    """torch.load with weights_only=True: tensors and plain data only; nothing of the file runs.

    One generic UserError line for a file torch cannot read that way (pickled code, corrupt, truncated).
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist: give the path of a best.pth/last.pth "
                        "written by train.py")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001  (every failure means the same: not plain tensors and data)
        raise UserError(f"{what} '{path}' is unreadable or refused ({type(error).__name__}): cannot read it "
                        "as tensors and plain data only (corrupt, truncated, not a torch file, or it holds "
                        "pickled code, which was not run): use a snapshot written by train.py from a "
                        "source you trust") from None
