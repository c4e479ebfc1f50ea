"""Provenance of results: the code's git commit and a digest of a model's weights."""
from __future__ import annotations

import hashlib
import os
import subprocess

import torch


def git_commit() -> str | None:
    """HEAD commit of the code's repository ('+dirty' when modified), None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of all parameters and buffers, in state_dict order."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
