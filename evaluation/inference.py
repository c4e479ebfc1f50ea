"""Segment a query volume with a few-shot model under the volumetric protocol (evaluation/protocol.py).

Volumes are canonical `X x Y x Z` arrays (docs/DESIGN.md); axial slices are `volume[:, :, z]` and
are given to the model unchanged as `H x W = X x Y`, intensity-scaled with
`dataloaders.intensity.scale_intensity` and resized to `input_size x input_size`
(bilinear for images, nearest for masks). For every chunk the support prototypes are computed once
(`model.encode_support`) and all query slices of the chunk go through `model.segment` in batches of
`batch_size`. Logits are resized back to `X x Y` BILINEARLY and the foreground is
`argmax == 1` (1-way) on the resized logits.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dataloaders.intensity import scale_intensity
from dataloaders.transforms import resize_image, resize_label
from util.device import resolve_device as _resolve_device_name
from util.errors import UserError
from evaluation.protocol import chunk_plan


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    return _resolve_device_name(str(device))


def images_to_input(slices_hu: np.ndarray, intensity: dict, input_size: int,
                    device: torch.device) -> torch.Tensor:
    """N x X x Y HU slices -> N x 1 x S x S float tensor in [0, 1] on `device`.

    The same scaling and resize (bilinear, antialiased when shrinking) as the training slices.
    """
    scaled = torch.from_numpy(scale_intensity(slices_hu, intensity)).to(device)  # N x X x Y
    return resize_image(scaled, input_size)[:, None]                              # N x 1 x S x S


def masks_to_input(masks: np.ndarray, input_size: int, device: torch.device) -> torch.Tensor:
    """N x X x Y binary masks -> N x S x S float 0/1 tensor on `device` (nearest resize)."""
    masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)).to(device)  # N x X x Y
    return resize_label(masks, input_size)                                         # N x S x S


def _encode(model, support_images: torch.Tensor, support_fg: torch.Tensor):
    """Prototypes of one 1-way k-shot support. support_images K x 1 x S x S, support_fg K x S x S."""
    images = support_images[None, None]                           # 1 x 1 x K x 1 x S x S
    fg = support_fg[None, None]                                   # 1 x 1 x K x S x S
    return model.encode_support(images, fg, 1.0 - fg)


def _segment(model, prototypes, query_images: torch.Tensor) -> torch.Tensor:
    """Logits Q x 2 x S x S for query_images Q x 1 x S x S against one episode's prototypes."""
    logits = model.segment(prototypes, query_images[None])        # 1 x Q x 2 x S x S
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits[0]


def segment_query_volume(model, support_image: np.ndarray, support_mask: np.ndarray,
                         query_image: np.ndarray, support_range: tuple[int, int],
                         query_range: tuple[int, int], n_chunks: int, input_size: int,
                         intensity: dict, device: str | torch.device = "cpu", batch_size: int = 16,
                         n_shots: int = 1) -> np.ndarray:
    """Protocol prediction for one organ on one query volume; X x Y x Z bool, 0 outside query_range.

    support_image, query_image: canonical HU volumes (X x Y x Z); support_mask: X x Y x Z binary mask
    of the organ in the support volume. The model must be in eval mode on `device`.
    """
    device = resolve_device(device)
    if batch_size < 1:
        raise UserError(f"eval batch_size {batch_size} must be >= 1")
    prediction = np.zeros(query_image.shape, dtype=bool)
    out_size = tuple(query_image.shape[:2])
    with torch.inference_mode():
        for support_z, query_z in chunk_plan(support_range, query_range, n_chunks, n_shots):
            shots = np.moveaxis(support_image[:, :, support_z], -1, 0)          # K x X x Y
            shot_masks = np.moveaxis(support_mask[:, :, support_z], -1, 0)     # K x X x Y
            prototypes = _encode(model, images_to_input(shots, intensity, input_size, device),
                                 masks_to_input(shot_masks, input_size, device))
            for start in range(0, len(query_z), batch_size):
                batch_z = query_z[start:start + batch_size]
                queries = np.moveaxis(query_image[:, :, batch_z], -1, 0)         # Q x X x Y
                logits = _segment(model, prototypes, images_to_input(queries, intensity, input_size, device))
                logits = F.interpolate(logits.float(), size=out_size, mode="bilinear",
                                       align_corners=False)                      # Q x 2 x X x Y
                foreground = logits.argmax(dim=1) == 1                           # Q x X x Y
                prediction[:, :, batch_z] = foreground.permute(1, 2, 0).cpu().numpy()
    return prediction
