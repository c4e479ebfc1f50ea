"""The one chunk loop: segment a query volume with a few-shot model, chunk by chunk.

A plan (`evaluation.protocol.chunk_plan`, the one planner) says which support slices segment which
query slices; `run_chunks` (the one runner) executes any plan, for evaluation (`segment_query_volume`,
k shots of one support volume) and for the user's scans (evaluation/segment.py, one shot per volume).
Volumes are canonical `X x Y x Z` arrays (docs/DESIGN.md); axial slices are `volume[:, :, z]` and
are given to the model unchanged as `H x W = X x Y`, intensity-scaled with
`dataloaders.intensity.scale_intensity` (a per-volume z-score uses the statistics of each whole
volume, `volume_intensity`, never of a slice) and resized to `input_size x input_size`
(bilinear for images, nearest for masks). For every chunk the support prototypes are computed once
(`model.encode_support`) and all query slices of the chunk go through `model.segment` in batches of
`batch_size`. Logits are resized back to `X x Y` BILINEARLY and the foreground is
`argmax == 1` (1-way) on the resized logits.

2.5D input (a model whose config has input_slices 3): every support and query slice z is given as the
stack (z - 1, z, z + 1) of its volume, `dataloaders.neighbours.neighbour_stack` (the edge rule: the
volume's first and last slice stand for their missing neighbour); each channel is scaled and resized as
a slice.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataloaders.transforms import (
    neighbour_stack,
    resize_image,
    resize_label,
    scale_intensity,
    volume_intensity,
)
from evaluation.protocol import chunk_plan
from models.factory import model_input_slices
from util.device import resolve_device
from util.errors import UserError


def images_to_input(slices_hu: np.ndarray, intensity: dict, input_size: int,
                    device: torch.device) -> torch.Tensor:
    """N x X x Y HU slices -> N x 1 x S x S, or N x C x X x Y stacks (`neighbour_stack`) -> N x C x S x S:
    float tensor in [0, 1] on `device`.

    The same scaling and resize (bilinear, antialiased when shrinking) as the training slices, slice by
    slice (a stack's channels each as a slice).
    """
    if slices_hu.ndim == 4 and slices_hu.shape[1] == 1:
        slices_hu = slices_hu[:, 0]                                                 # N x X x Y
    if slices_hu.ndim == 3:
        scaled = torch.from_numpy(scale_intensity(slices_hu, intensity)).to(device)  # N x X x Y
        return resize_image(scaled, input_size)[:, None]                              # N x 1 x S x S
    n, c = slices_hu.shape[:2]
    scaled = scale_intensity(slices_hu.reshape(n * c, *slices_hu.shape[2:]), intensity)   # N*C x X x Y
    resized = resize_image(torch.from_numpy(scaled).to(device), input_size)              # N*C x S x S
    return resized.reshape(n, c, input_size, input_size)                                  # N x C x S x S


def masks_to_input(masks: np.ndarray, input_size: int, device: torch.device) -> torch.Tensor:
    """N x X x Y binary masks -> N x S x S float 0/1 tensor on `device` (nearest resize)."""
    masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)).to(device)  # N x X x Y
    return resize_label(masks, input_size)                                         # N x S x S


def _segment(model, prototypes, query_images: torch.Tensor) -> torch.Tensor:
    """Logits Q x 2 x S x S for query_images Q x C x S x S against one episode's prototypes."""
    logits = model.segment(prototypes, query_images[None])        # 1 x Q x 2 x S x S
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits[0]


def run_chunks(model, supports: Sequence[tuple[np.ndarray, np.ndarray]], plan, query_image: np.ndarray,
               input_size: int, intensity: dict, device: str | torch.device = "cpu", batch_size: int = 16,
               progress: bool = False) -> np.ndarray:
    """The one chunk loop: X x Y x Z bool prediction of a canonical query, 0 outside the plan's slices.

    supports: per shot j, (image X_j x Y_j x Z_j HU, organ mask of the same shape); the k shots of
    one volume repeat the same arrays. plan: `evaluation.protocol.chunk_plan`'s list of
    (support z (k,), query z (m,)); shot j of a chunk is slice support_z[j] of supports[j].
    Per chunk the support prototypes are computed once and the query slices go in batches.
    The model must be in eval mode on `device`. Its images are `neighbour_stack`s of model_input_slices(model)
    slices (1: the slice itself).
    """
    device = resolve_device(device)
    if batch_size < 1:
        raise UserError(f"eval batch_size {batch_size} must be >= 1")
    by_volume: dict[int, dict] = {}                    # id(volume) -> its scaling (k shots share a volume)
    for role, image in [("query", query_image)] + [("support", image) for image, _ in supports]:
        if id(image) not in by_volume:
            by_volume[id(image)] = volume_intensity(image, intensity, f"{role} image")
    prediction = np.zeros(query_image.shape, dtype=bool)
    out_size = tuple(query_image.shape[:2])
    slices = model_input_slices(model)
    bar = tqdm(total=sum(len(z) for _, z in plan), desc="segment", unit="slice", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    with torch.inference_mode():
        for support_z, query_z in plan:
            shots = torch.cat([images_to_input(neighbour_stack(image, [z], slices), by_volume[id(image)],
                                               input_size, device)
                               for (image, _), z in zip(supports, support_z)])     # K x C x S x S
            fg = torch.cat([masks_to_input(mask[:, :, z][None], input_size, device)
                            for (_, mask), z in zip(supports, support_z)])        # K x S x S
            prototypes = model.encode_support(shots[None, None], fg[None, None], 1.0 - fg[None, None])
            for start in range(0, len(query_z), batch_size):
                batch_z = query_z[start:start + batch_size]
                queries = neighbour_stack(query_image, batch_z, slices)          # Q x C x X x Y
                logits = _segment(model, prototypes,
                                  images_to_input(queries, by_volume[id(query_image)], input_size, device))
                logits = F.interpolate(logits.float(), size=out_size, mode="bilinear",
                                       align_corners=False)                      # Q x 2 x X x Y
                foreground = logits.argmax(dim=1) == 1                           # Q x X x Y
                prediction[:, :, batch_z] = foreground.permute(1, 2, 0).cpu().numpy()
                bar.update(len(batch_z))
    bar.close()
    return prediction


def segment_query_volume(model, support_image: np.ndarray, support_mask: np.ndarray,
                         query_image: np.ndarray, support_range: tuple[int, int],
                         query_range: tuple[int, int], n_chunks: int, input_size: int,
                         intensity: dict, device: str | torch.device = "cpu", batch_size: int = 16,
                         n_shots: int = 1, rule: str = "inclusive") -> np.ndarray:
    """Protocol prediction for one organ on one query volume; X x Y x Z bool, 0 outside query_range.

    support_image, query_image: canonical HU volumes (X x Y x Z); support_mask: X x Y x Z binary mask
    of the organ in the support volume; k = n_shots slices of it per chunk (`chunk_plan`).
    """
    plan = chunk_plan(support_range, query_range, n_chunks, n_shots, rule, support_mask)  # the preset's rule
    return run_chunks(model, [(support_image, support_mask)] * n_shots, plan, query_image, input_size,
                      intensity, device, batch_size)
