"""SSL-ALPNet's evaluation protocol (Ouyang et al., ECCV 2020; its validation.py and data loaders), exactly.

Per fold (dataloaders.alpnet_layout.fold_scans): the fold's test scans are the queries, the next
scan in sorted order is the support. Per test organ c:
  support slices  Z_c = the support's slices holding c (ascending); part p of n_part = 3 uses
                  Z_c[int(pct_p * |Z_c|)] with pct = 1/6, 1/2, 5/6 (n_part 1: 1/2);
  query parts     over the query's OWN ground-truth range [z_min, z_max] (its first and last slice
                  holding c): part(z) = int((z - z_min) // ((z_max - z_min) / 3)) clipped to [0, 2]
                  (part 0 when z_max = z_min); every slice of that range is predicted against the
                  support slice of its part, slices outside it are not scored;
  Dice            TP, FP, FN summed over a scan's scored slices, 2 TP / (2 TP + FP + FN), no smoothing;
  per organ       mean (and std) over the fold's query scans; over folds: mean and std of the fold means.
All at the stored 256 x 256 resolution. Volumes here are Y x X x Z arrays (SSL-ALPNet's order,
dataloaders/alpnet_layout.py), already normalised.
A Predictor with an `input_slices` attribute of 3 (a 2.5D model's `model_predictor`) is given every
support and query slice as the stack (z - 1, z, z + 1) of its volume (dataloaders/neighbours.py
`neighbour_stack`, edge rule); any other Predictor gets the slices alone, as before.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.transforms import neighbour_stack, resize_image, resize_label
from models.factory import model_input_slices
from util.errors import UserError

N_PART = 3

# predict(support image H x W, support mask H x W, query images N x H x W) -> N x H x W bool; a Predictor
# whose `input_slices` is 3 gets support C x H x W and queries N x C x H x W (C = 3: z - 1, z, z + 1)
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def predictor_slices(predict: Predictor) -> int:
    """Slices per image a Predictor takes: its `input_slices` attribute, 1 where it has none."""
    return int(getattr(predict, "input_slices", 1))


def percentiles(n_part: int = N_PART) -> np.ndarray:
    """SSL-ALPNet's support percentiles: (2i + 1) / (2 n_part), i = 0..n_part-1 (n_part must be odd)."""
    if n_part < 1 or n_part % 2 == 0:
        raise UserError(f"n_part {n_part}: SSL-ALPNet's support parts must be an odd number (3)")
    if n_part == 1:
        return np.array([0.5])
    return (2 * np.arange(n_part) + 1) / (2 * n_part)


def support_positions(n_slices: int, n_part: int = N_PART) -> list[int]:
    """Positions int(pct * n) in the support's organ-slice list (14 -> 2, 7, 11; 24 -> 4, 12, 20;
    2 -> 0, 1, 1)."""
    if n_slices < 1:
        raise UserError("support scan does not hold the organ (no slice): pick another support scan")
    return [int(p * n_slices) for p in percentiles(n_part)]


def support_slices(organ_slices: Sequence[int], n_part: int = N_PART) -> list[int]:
    """The support z of each part: organ_slices[int(pct * |organ_slices|)]."""
    zs = list(organ_slices)
    return [int(zs[i]) for i in support_positions(len(zs), n_part)]


def query_parts(z_min: int, z_max: int, n_part: int = N_PART) -> np.ndarray:
    """Part of every z in z_min..z_max (inclusive): int((z - z_min) // ((z_max - z_min) / n)), clipped."""
    z = np.arange(z_min, z_max + 1)
    if z_max == z_min:
        return np.zeros(1, dtype=int)
    width = (z_max - z_min) / n_part
    return np.clip(((z - z_min) // width).astype(int), 0, n_part - 1)


def alpnet_plan(support_organ_slices: Sequence[int], query_organ_slices: Sequence[int],
                n_part: int = N_PART) -> list[tuple[int, np.ndarray]]:
    """[(support z, query z of that part (m,))] over the query's scored range, in part order."""
    if len(query_organ_slices) == 0:
        return []
    shots = support_slices(support_organ_slices, n_part)
    z_min, z_max = int(min(query_organ_slices)), int(max(query_organ_slices))
    parts = query_parts(z_min, z_max, n_part)
    zs = np.arange(z_min, z_max + 1)
    return [(shots[p], zs[parts == p]) for p in range(n_part) if (parts == p).any()]


def dice_3d(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2 TP / (2 TP + FP + FN) over all voxels given (no smoothing); NaN when both are empty."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    tp = float(np.logical_and(prediction, truth).sum())
    denominator = (2 * tp + float(np.logical_and(prediction, ~truth).sum())
                   + float(np.logical_and(~prediction, truth).sum()))
    return 2 * tp / denominator if denominator > 0 else float("nan")


def organ_slice_list(mask: np.ndarray) -> np.ndarray:
    """Ascending z of a Y x X x Z binary mask's slices with >= 1 voxel (classmap_1's rule)."""
    return np.flatnonzero(np.asarray(mask, bool).any(axis=(0, 1)))


def evaluate_query(predict: Predictor, support_image: np.ndarray, support_mask: np.ndarray,
                   query_image: np.ndarray, query_mask: np.ndarray, n_part: int = N_PART
                   ) -> tuple[float, np.ndarray]:
    """(3D Dice over the query's scored range, Y x X x Z bool prediction, 0 outside it) for one organ."""
    support_list = organ_slice_list(support_mask)
    if support_list.size == 0:
        raise UserError("support scan does not hold the organ: pick a support scan that does")
    query_list = organ_slice_list(query_mask)
    prediction = np.zeros(query_mask.shape, dtype=bool)
    if query_list.size == 0:
        return float("nan"), prediction
    slices = predictor_slices(predict)
    for support_z, query_z in alpnet_plan(support_list, query_list, n_part):
        if slices == 1:
            shot = support_image[:, :, support_z]                                    # H x W
            queries = np.moveaxis(query_image[:, :, query_z], -1, 0)                 # m x H x W
        else:   # 2.5D: the slices with their neighbours in their whole volumes (edge rule)
            shot = neighbour_stack(support_image, [support_z], slices)[0]            # C x H x W
            queries = neighbour_stack(query_image, query_z, slices)                  # m x C x H x W
        prediction[:, :, query_z] = np.moveaxis(
            predict(shot, support_mask[:, :, support_z], queries), 0, -1)
    scored = slice(int(query_list[0]), int(query_list[-1]) + 1)
    return dice_3d(prediction[:, :, scored], np.asarray(query_mask, bool)[:, :, scored]), prediction


def mask_copy_predictor(support_image: np.ndarray, support_mask: np.ndarray,
                        queries: np.ndarray) -> np.ndarray:
    """The no-model baseline: the support slice's mask for every query slice of its part."""
    return np.repeat(np.asarray(support_mask, bool)[None], queries.shape[0], axis=0)


def model_predictor(model, input_size: int, device: str | torch.device = "cpu",
                    batch_size: int = 16) -> Predictor:
    """Predictor of a few-shot model (eval mode): slices resized to input_size, logits resized back
    bilinearly to the stored size, foreground = argmax == 1. Its `input_slices` is the model's (2.5D
    models take support C x H x W and queries N x C x H x W, each channel resized as a slice)."""
    device = torch.device(device)
    slices = model_input_slices(model)

    def as_input(images: np.ndarray) -> torch.Tensor:
        """Resized to S x S per slice: H x W -> S x S, C x H x W (one stack) or N x H x W -> C or N x S x S,
        N x C x H x W -> N x C x S x S."""
        array = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        if array.dim() == 4:
            n, c = array.shape[:2]
            return resize_image(array.flatten(0, 1), input_size).unflatten(0, (n, c))
        return resize_image(array, input_size)

    def predict(support_image: np.ndarray, support_mask: np.ndarray, queries: np.ndarray) -> np.ndarray:
        out_size = tuple(queries.shape[-2:])
        shot = as_input(support_image).to(device)                                  # (C x) S x S
        fg = resize_label(torch.from_numpy(np.ascontiguousarray(support_mask, np.float32)), input_size)
        shot = shot.reshape(1, 1, 1, slices, input_size, input_size)               # 1 x 1 x 1 x C x S x S
        fg = fg.to(device)[None, None, None]                                       # 1 x 1 x 1 x S x S
        result = np.zeros((queries.shape[0], *out_size), dtype=bool)
        with torch.inference_mode():
            prototypes = model.encode_support(shot, fg, 1.0 - fg)
            for start in range(0, queries.shape[0], batch_size):
                batch = as_input(queries[start:start + batch_size]).to(device)     # Q (x C) x S x S
                batch = batch.reshape(1, -1, slices, input_size, input_size)       # 1 x Q x C x S x S
                logits = model.segment(prototypes, batch)
                logits = (logits[0] if isinstance(logits, (tuple, list)) else logits)[0]  # Q x 2 x S x S
                logits = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
                result[start:start + batch.shape[1]] = (logits.argmax(dim=1) == 1).cpu().numpy()
        return result

    predict.input_slices = slices
    return predict


def summarise_folds(per_fold: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{organ: {"mean", "std", "n_folds"}} over folds of per-fold organ means (std: population, ddof 0)."""
    organs = sorted({organ for values in per_fold.values() for organ in values})
    out = {}
    for organ in organs:
        values = np.array([per_fold[f][organ] for f in sorted(per_fold) if organ in per_fold[f]], float)
        values = values[np.isfinite(values)]
        out[organ] = {"mean": float(values.mean()) if values.size else float("nan"),
                      "std": float(values.std()) if values.size else float("nan"),
                      "n_folds": int(values.size)}
    return out
