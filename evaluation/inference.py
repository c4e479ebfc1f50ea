"""The one chunk runner: `run_chunks` segments a query volume with a few-shot model along a plan of
`evaluation.protocols.chunk_plan`, slices scaled and resized as in training, logits resized back
bilinearly, foreground = argmax == 1; a 2.5D model gets (z - 1, z, z + 1) stacks. docs/DESIGN.md.
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
from models.fewshot import model_input_slices
from util.device import resolve_device


def images_to_input(slices_hu: np.ndarray, intensity: dict, input_size: int,
                    device: torch.device) -> torch.Tensor:
    """N x X x Y slices -> N x 1 x S x S, or N x C x X x Y stacks -> N x C x S x S, float on `device`:
    scaled and resized as the training slices, each channel as a slice."""
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


def support_prototypes(model, supports: Sequence[tuple[np.ndarray, np.ndarray]], support_z, input_size: int,
                       scales: dict, device, slices: int, **stored):
    """The model's prototypes of slice support_z[j] of each shot j (image, mask); scales: {id(image):
    its `volume_intensity`}; stored: the adaptation's stored view (run_chunks)."""
    shots = torch.cat([images_to_input(neighbour_stack(image, [z], slices), scales[id(image)], input_size,
                                       device)
                       for (image, _), z in zip(supports, support_z)])                 # K x C x S x S
    fg = torch.cat([masks_to_input(mask[:, :, z][None], input_size, device)
                    for (_, mask), z in zip(supports, support_z)])                 # K x S x S
    fg, bg = fg[None, None], 1.0 - fg[None, None]                                  # 1 x 1 x K x S x S
    return model.encode_support(shots[None, None], fg, bg, **stored)


def run_chunks(model, supports: Sequence[tuple[np.ndarray, np.ndarray]], plan, query_image: np.ndarray,
               input_size: int, intensity: dict, device: str | torch.device = "cpu", batch_size: int = 16,
               progress: bool = False) -> np.ndarray:
    """X x Y x Z bool prediction of a query, 0 outside the plan's slices. supports: per shot j, (image,
    organ mask) of its volume (k shots of one volume repeat the arrays); plan: (support z (k,), query z
    (m,)) per chunk. Per chunk the prototypes are computed once, the queries go in batches. A model with
    `stored_views` (evaluation/adaptation.py) is also given the first shot at the stored resolution."""
    device = resolve_device(device)
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
            stored = {}
            if getattr(model, "stored_views", False):     # test-time adaptation on the stored slice
                (image, mask), z = supports[0], support_z[0]
                stack = scale_intensity(neighbour_stack(image, [z], slices)[0],
                                        by_volume[id(image)])                          # C x X x Y
                stored = {"stored": (stack[0] if slices == 1 else stack, mask[:, :, z].astype(bool))}
            prototypes = support_prototypes(model, supports, support_z, input_size, by_volume, device, slices,
                                            **stored)
            for start in range(0, len(query_z), batch_size):
                batch_z = query_z[start:start + batch_size]
                queries = neighbour_stack(query_image, batch_z, slices)          # Q x C x X x Y
                logits = model.segment(prototypes, images_to_input(queries, by_volume[id(query_image)],
                                                                   input_size, device)[None])
                logits = (logits[0] if isinstance(logits, (tuple, list)) else logits)[0]   # Q x 2 x S x S
                logits = F.interpolate(logits.float(), size=out_size, mode="bilinear",
                                       align_corners=False)                      # Q x 2 x X x Y
                foreground = logits.argmax(dim=1) == 1                           # Q x X x Y
                prediction[:, :, batch_z] = foreground.permute(1, 2, 0).cpu().numpy()
                bar.update(len(batch_z))
    bar.close()
    return prediction
