"""Test-time adaptation on the support (an LSLPN+ option, docs/lslpn_plus.md): before a support slice
segments its queries, a copy of the model is fine-tuned on pairs of SSL-ALPNet views of that slice
(`selfsup_episodes.alpnet_view`); the model passed in is never changed."""
from __future__ import annotations

import copy
import time
import zlib
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.selfsup_episodes import alpnet_view
from dataloaders.transforms import resize_image, resize_label
from models.fewshot import PLUS_DEFAULTS, PROTOTYPE, method_of, with_head_options

MAX_VIEW_DRAWS = 20   # a view whose foreground left the field is redrawn, at most this often per view


def slice_seed(seed: int, image: np.ndarray, mask: np.ndarray) -> int:
    """A seed of (seed, the slice's bytes): the same support slice always gets the same episodes."""
    data = np.ascontiguousarray(image, np.float32).tobytes() + np.ascontiguousarray(mask, bool).tobytes()
    return (int(seed) * 1_000_003 + zlib.crc32(data)) % (2 ** 32)


def support_views(image: np.ndarray, mask: np.ndarray, count: int, input_size: int,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` views of a slice H x W (or stack C x H x W) and its mask H x W, resized to S = input_size:
    images count (x C) x S x S, masks count x S x S (float 0/1). A view whose mask lost its foreground
    at size S is redrawn (after MAX_VIEW_DRAWS, the unwarped slice)."""
    images, masks = [], []
    for _ in range(count):
        for _ in range(MAX_VIEW_DRAWS):
            view_image, view_mask = alpnet_view(image, mask, rng)
            small_mask = resize_label(torch.from_numpy(view_mask.astype(np.float32)), input_size)
            if float(small_mask.sum()) > 0:
                break
        else:
            view_image = np.asarray(image, np.float32)
            small_mask = resize_label(torch.from_numpy(np.asarray(mask, np.float32)), input_size)
        view = torch.from_numpy(np.ascontiguousarray(view_image, np.float32))
        images.append(resize_image(view, input_size))
        masks.append(small_mask)
    return torch.stack(images), torch.stack(masks)


def adapt_to_support(model: nn.Module, image: np.ndarray, mask: np.ndarray, input_size: int, steps: int,
                     lr: float = 1e-2, batch_size: int = 2, seed: int = 0,
                     device: str | torch.device = "cpu") -> nn.Module:
    """A copy of `model` (eval mode) fine-tuned for `steps` steps on views of one support slice: image
    H x W (C x H x W for a 2.5D model, scaled as the model's input), mask H x W (bool)."""
    # outside inference mode even when called under it: the copy's weights must be trainable tensors
    with torch.inference_mode(False), torch.enable_grad():
        adapted = copy.deepcopy(model).to(device).eval()     # BatchNorm statistics stay as trained
        optimiser = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=lr, momentum=0.9)
        rng = np.random.default_rng(slice_seed(seed, image, mask))
        for _ in range(steps):
            images, masks = support_views(image, mask, 2 * batch_size, input_size, rng)  # 2B (x C) x S x S
            images = images if images.dim() == 4 else images[:, None]                  # 2B x C x S x S
            images, masks = images.to(device), masks.to(device)
            support_fg = masks[:batch_size, None, None]                                # B x 1 x 1 x S x S
            logits, _ = adapted(images[:batch_size, None, None], support_fg, 1.0 - support_fg,
                                images[batch_size:, None])                             # B x 1 x 2 x S x S
            loss = F.cross_entropy(logits[:, 0].float(), masks[batch_size:].long())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return adapted.eval()


class SupportAdaptedModel(nn.Module):
    """A prototype model that segments with a copy of itself adapted to each support slice it is given
    (`adapt_to_support`; the model interface of evaluation/inference.run_chunks), one copy per distinct
    slice (`slice_seed`), at most `max_copies` kept. Views come from the middle shot at the input size,
    or with `stored_views` from the slice at the stored resolution that run_chunks passes."""

    def __init__(self, model: nn.Module, steps: int, lr: float = 1e-2, batch_size: int = 2, seed: int = 0,
                 stored_views: bool = False, max_copies: int = 96):
        super().__init__()
        self.model, self.config, self.stored_views = model, model.config, stored_views
        self.steps, self.lr, self.batch_size, self.seed = int(steps), float(lr), int(batch_size), int(seed)
        self.max_copies = int(max_copies)
        self._copies: dict[int, nn.Module] = {}
        self._adapted: nn.Module | None = None
        self.seconds_adapting, self.adaptations = 0.0, 0

    def encode_support(self, support_images, support_fg, support_bg, stored=None):
        """As FewShotSegNet.encode_support (B x N x K x C x S x S), with the copy adapted to the shot;
        stored: (image H x W or C x H x W, mask H x W) of the shot at the stored resolution."""
        B, N, K = support_images.shape[:3]
        assert B == 1 and N == 1, "test-time adaptation segments one way of one episode at a time"
        if stored is None:
            shot = support_images[0, 0, K // 2]                                    # C x S x S
            image = (shot[0] if shot.shape[0] == 1 else shot).float().cpu().numpy()  # S x S, or C x S x S
            stored = (image, support_fg[0, 0, K // 2].float().cpu().numpy() > 0.5)
        key = slice_seed(self.seed, *stored)
        if key not in self._copies:
            start = time.perf_counter()
            self._copies[key] = adapt_to_support(self.model, *stored, support_images.shape[-1], self.steps,
                                                 self.lr, self.batch_size, self.seed, support_images.device)
            self.seconds_adapting += time.perf_counter() - start
            self.adaptations += 1
            if len(self._copies) > self.max_copies:
                self._copies.pop(next(iter(self._copies)))
        self._adapted = self._copies[key]
        return self._adapted.encode_support(support_images, support_fg, support_bg)

    def segment(self, prototypes, query_images):
        assert self._adapted is not None, "encode_support first"
        return self._adapted.segment(prototypes, query_images)


def test_time_head_options(eval_settings: Mapping) -> dict | None:
    """The LSLPN+ head options a test run applies: the entries of eval.head_options that differ from
    the plain head's (PLUS_DEFAULTS), or None (the snapshots' own heads)."""
    given = {key: value for key, value in (eval_settings.get("head_options") or {}).items()
             if value != PLUS_DEFAULTS[key]}
    return given or None


def test_time_model(model: nn.Module, head_options: dict | None = None, adapt_steps: int = 0,
                    adapt_lr: float = 1e-2, stored_views: bool = False) -> nn.Module:
    """The model a test run evaluates with LSLPN+ options: its head rebuilt with `head_options`
    (models.fewshot.with_head_options), then wrapped for test-time adaptation when adapt_steps > 0.
    SENet and heads other than 'local' are returned unchanged."""
    if method_of(model.config) != PROTOTYPE or model.config.get("head", "local") != "local":
        return model
    if head_options:
        model = with_head_options(model, head_options).eval()
    return SupportAdaptedModel(model, adapt_steps, adapt_lr, stored_views=stored_views) if adapt_steps > 0 \
        else model
