"""Evaluation library: validate(), evaluate() outputs, baselines, bad input.

The tiny prepared folder and the stand-in model here are shared by the other evaluation tests
(`from test_evaluate import make_prepared, IntensityModel`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from util.errors import UserError

SHAPE = (24, 20, 16)            # X x Y x Z, canonical
LPS_AFFINE = np.diag([-1.5, -1.5, 2.5, 1.0])


def _box(shape, x, y, z):
    mask = np.zeros(shape, dtype=bool)
    mask[x[0]:x[1], y[0]:y[1], z[0]:z[1]] = True
    return mask


def make_volume(shift: int, organs=("liver", "spleen", "kidney_left")) -> dict:
    """A canonical phantom volume: bright boxes (organs) on a dark body; shift moves them in z and x."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    if "liver" in organs:
        label[_box(SHAPE, (2 + shift, 12 + shift), (3, 15), (3 + shift, 12 + shift))] = 1
    if "spleen" in organs:
        label[_box(SHAPE, (15, 21), (8, 16), (6, 10 + shift))] = 2
    if "kidney_left" in organs:
        label[_box(SHAPE, (14, 20), (2, 6), (1, 4))] = 14
    image = np.full(SHAPE, -400, dtype=np.int16)
    image[label > 0] = 60
    image[label == 2] = 120
    image[0, 0, :] = -1000                      # air corner: fixes the min-max range of every slice
    image[-1, -1, :] = 400
    return {"image": image, "label": label, "affine": np.diag([1.5, 1.5, 2.5, 1.0]),
            "original_affine": LPS_AFFINE, "original_shape": np.array(SHAPE),
            "original_axcodes": np.array("LPS"), "spacing": np.array([1.5, 1.5, 2.5])}


def make_prepared(root: Path, split: str = "gold", pids=("10000100", "10000104", "10000105"),
                  absent: dict | None = None) -> Path:
    """PREP folder with meta.json and volumes/<split>/<pid>.npz; absent = {pid: organs kept}."""
    prep = Path(root) / "prep"
    folder = prep / "volumes" / split
    folder.mkdir(parents=True, exist_ok=True)
    for shift, pid in enumerate(pids):
        organs = (absent or {}).get(pid, ("liver", "spleen", "kidney_left"))
        np.savez(folder / f"{pid}.npz", **make_volume(shift, organs))
    meta = {"format_version": 1, "intensity": {"mode": "minmax"}, "prep_size": 32,
            "splits": {"train": [], "val": [], "gold": []} | {split: list(pids)}}
    (prep / "meta.json").write_text(json.dumps(meta))
    return prep


class IntensityModel(torch.nn.Module):
    """Stand-in few-shot model with the FewShotSegNet evaluation API: prototypes are the mean
    scaled intensities of support foreground and background; logits = -|query - prototype|."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))
        self.calls = {"encode": 0, "segment": 0}

    def encode_support(self, images, fg, bg):          # B x N x K x 1 x H x W, B x N x K x H x W
        self.calls["encode"] += 1
        images = images[:, :, :, 0]
        fg_mean = (images * fg).sum((2, 3, 4)) / fg.sum((2, 3, 4)).clamp(min=1)    # B x N
        bg_mean = (images * bg).sum((2, 3, 4)) / bg.sum((2, 3, 4)).clamp(min=1)    # B x N
        return torch.stack([bg_mean[:, 0], fg_mean[:, 0]], dim=1)                  # B x 2

    def segment(self, prototypes, query_images):       # B x Q x 1 x H x W -> B x Q x 2 x H x W
        self.calls["segment"] += 1
        return -self.scale * (query_images - prototypes[:, None, :, None, None]).abs()


def test_validate_returns_mean_and_per_organ_and_restores_mode(tmp_path):
    from util.evaluate import validate
    prep = make_prepared(tmp_path, split="val")
    model = IntensityModel().train()
    result = validate(model, prep, split="val", organs=["liver", "spleen"], preset="alpnet",
                      input_size=32, device="cpu", batch_size=4)
    assert model.training
    assert set(result["per_organ"]) == {"liver", "spleen"}
    assert result["preset"] == "alpnet"
    # the stand-in separates the bright organs from the dark body, but liver and spleen are both bright
    assert 0.0 < result["per_organ"]["liver"] <= 1.0
    assert result["mean_dice"] == pytest.approx(np.mean(list(result["per_organ"].values())))


def test_validate_needs_prepared_data(tmp_path):
    from util.evaluate import validate
    with pytest.raises(UserError, match="prepare_visceral"):
        validate(IntensityModel(), tmp_path / "nothing", organs=["liver"], input_size=32)
