"""SENet (Roy et al., MedIA 2020), the paper's comparison method: conditioner and segmenter joined by 9
squeeze & excitation gates, 1-way, FewShotSegNet's interface; docs/method.md, "SENet"."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.local_prototypes import IGNORE
from util.errors import UserError

METHOD = "senet"
N_POINTS = 9                     # interaction points: e1 e2 e3 e4 bn d4 d3 d2 d1
_DEPTH = 4                       # encoder/decoder levels; H and W must be divisible by 2**_DEPTH


class ConvBlock(nn.Module):
    """conv (5x5, stride 1, same padding) -> PReLU (one slope) -> BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=1, padding=kernel // 2)
        self.prelu = nn.PReLU()
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.prelu(self.conv(x)))


class EncoderBlock(ConvBlock):
    """ConvBlock then 2x2 max-pool: (pooled, pre-pool map, pool indices)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = super().forward(x)                                   # M x C x h x w
        pooled, indices = F.max_pool2d(features, 2, 2, return_indices=True)
        return pooled, features, indices


class DecoderBlock(ConvBlock):
    """Max-unpool with the encoder's indices -> [cat(skip, unpooled)] -> ConvBlock."""

    def forward(self, x: Tensor, indices: Tensor, skip: Tensor | None = None) -> Tensor:
        unpooled = F.max_unpool2d(x, indices, 2, 2)                     # M x C x 2h x 2w
        if skip is not None:
            unpooled = torch.cat([skip, unpooled], dim=1)
        return super().forward(unpooled)


class Conditioner(nn.Module):
    """Support image + mask (M x 2 x H x W) -> 9 spatial gates M x 1 x h x w (e1..e4, bn, d4..d1)."""

    def __init__(self, width: int = 16, official_bug: bool = False):
        super().__init__()
        self.official_bug = bool(official_bug)
        n_encoders = _DEPTH - 1 if self.official_bug else _DEPTH
        self.encoders = nn.ModuleList(EncoderBlock(2 if i == 0 else width, width) for i in range(n_encoders))
        self.bottleneck = ConvBlock(width, width)
        self.decoders = nn.ModuleList(DecoderBlock(width, width) for _ in range(_DEPTH))  # [i]: level i+1
        self.squeeze = nn.ModuleList(nn.Conv2d(width, 1, 1) for _ in range(N_POINTS))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features, indices = [], []
        h = x
        for level in range(_DEPTH):
            # official_bug: level 3 reuses level 2's block (encode3 called twice)
            h, _, idx = self.encoders[min(level, len(self.encoders) - 1)](h)
            features.append(h)
            indices.append(idx)
        h = self.bottleneck(h)
        features.append(h)
        for level in reversed(range(_DEPTH)):
            h = self.decoders[level](h, indices[level])
            features.append(h)
        return tuple(torch.sigmoid(conv(f)) for conv, f in zip(self.squeeze, features))


class Segmenter(nn.Module):
    """Query image M x 1 x H x W and 9 gates -> class scores M x 2 x H x W."""

    def __init__(self, width: int = 64, n_classes: int = 2):
        super().__init__()
        self.encoders = nn.ModuleList(EncoderBlock(1 if i == 0 else width, width) for i in range(_DEPTH))
        self.bottleneck = ConvBlock(width, width)
        # decoders[i] decodes level i+1; only the deepest one (decode4) takes the skip.
        self.decoders = nn.ModuleList(DecoderBlock(2 * width if i == _DEPTH - 1 else width, width)
                                      for i in range(_DEPTH))
        self.classifier = nn.Conv2d(width, n_classes, 1)

    def forward(self, x: Tensor, gates: tuple[Tensor, ...]) -> Tensor:
        indices, deepest = [], None
        h = x
        for level in range(_DEPTH):
            h, pre_pool, idx = self.encoders[level](h)
            h = h * gates[level]                                       # M x C x h x w * M x 1 x h x w
            indices.append(idx)
            deepest = pre_pool                                          # out4: before pooling and gating
        h = self.bottleneck(h) * gates[_DEPTH]
        for point, level in enumerate(reversed(range(_DEPTH)), start=_DEPTH + 1):
            skip = deepest if level == _DEPTH - 1 else None
            h = self.decoders[level](h, indices[level], skip) * gates[point]
        return self.classifier(h)


@dataclass
class SupportGates:
    """`encode_support`'s output: the 9 gates, each B x 1 x h x w, and the image size."""
    gates: tuple[Tensor, ...]
    image_size: tuple[int, int]


class SENet(nn.Module):
    """forward(support_images B x 1 x K x 1 x H x W, support_fg and support_bg B x 1 x K x H x W,
    query_images B x Q x 1 x H x W) -> (logits B x Q x 2 x H x W, zero aux loss)."""

    def __init__(self, official_bug: bool = False):
        super().__init__()
        self.config = {"method": METHOD, "official_bug": bool(official_bug)}
        self.conditioner = Conditioner(16, official_bug)
        self.segmenter = Segmenter(64, 2)

    # ---- evaluation API ---------------------------------------------------------------------
    def encode_support(self, support_images: Tensor, support_fg: Tensor,
                       support_bg: Tensor | None = None) -> SupportGates:
        """Gates of support images B x 1 x K x 1 x H x W with foreground masks B x 1 x K x H x W, averaged
        over the K shots (support_bg unused: the conditioner sees the foreground mask only)."""
        _check_support(support_images, support_fg)
        B, _, K, _, H, W = support_images.shape
        inputs = torch.cat([support_images[:, 0], support_fg[:, 0, :, None].to(support_images.dtype)],
                           dim=2)                                       # B x K x 2 x H x W
        gates = self.conditioner(inputs.flatten(0, 1))                  # 9 x (BK x 1 x h x w)
        gates = tuple(g.unflatten(0, (B, K)).mean(dim=1) for g in gates)  # 9 x (B x 1 x h x w)
        return SupportGates(gates, (H, W))

    def segment(self, support: SupportGates, query_images: Tensor) -> Tensor:
        """Logits B x Q x 2 x H x W of query images B x Q x 1 x H x W; gates of batch 1 broadcast."""
        assert query_images.dim() == 5 and query_images.shape[2:] == (1, *support.image_size)
        B, Q = query_images.shape[:2]
        assert support.gates[0].shape[0] in (1, B), "the support batch is 1 or the query batch"
        gates = tuple(g.expand(B, *g.shape[1:]).repeat_interleave(Q, dim=0) for g in support.gates)
        logits = self.segmenter(query_images.flatten(0, 1), gates)      # BQ x 2 x H x W
        return logits.unflatten(0, (B, Q))

    # ---- training forward -------------------------------------------------------------------
    def forward(self, support_images: Tensor, support_fg: Tensor, support_bg: Tensor,
                query_images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.segment(self.encode_support(support_images, support_fg, support_bg), query_images)
        return logits, logits.new_zeros(())


def _check_support(support_images: Tensor, support_fg: Tensor) -> None:
    """One way, one channel (the config checker refuses n_ways > 1); sides a multiple of 16 (one line:
    an evaluation's input size may be any)."""
    B, N, K, C, H, W = support_images.shape
    assert N == C == 1 and support_fg.shape == (B, N, K, H, W), tuple(support_images.shape)
    if H % 2 ** _DEPTH or W % 2 ** _DEPTH:
        raise UserError(f"input size {H} x {W}: SENet needs sides divisible by {2 ** _DEPTH}: "
                        "choose input_size accordingly")


# ---- loss -------------------------------------------------------------------------------------
def dice_loss(probabilities: Tensor, labels: Tensor, eps: float = 1e-4) -> Tensor:
    """SENet's Dice loss, mean over classes c of 1 - 2 sum(p_c g_c) / (sum(p_c + g_c) + eps), sums over
    batch and pixels: probabilities M x C x H x W, labels M x H x W (0..C-1; 255 takes no part)."""
    labels = labels.long()
    valid = (labels != IGNORE).unsqueeze(1).to(probabilities.dtype)  # M x 1 x H x W
    target = F.one_hot(labels.where(labels != IGNORE, 0), probabilities.shape[1])
    target = target.permute(0, 3, 1, 2).to(probabilities.dtype) * valid  # M x C x H x W
    probabilities = probabilities * valid
    dims = (0, 2, 3)
    numerator = 2 * (probabilities * target).sum(dims)                  # C
    denominator = (probabilities + target).sum(dims) + eps              # C
    return (1 - numerator / denominator).mean()


def senet_loss(logits: Tensor, labels: Tensor, double_softmax: bool = False) -> Tensor:
    """Dice loss on softmax(logits B x Q x 2 x H x W), labels B x Q x H x W; double_softmax applies it
    twice as the official training did (Softmax2d in the model, F.softmax before the loss)."""
    probabilities = torch.softmax(logits.float().flatten(0, 1), dim=1)  # BQ x 2 x H x W
    if double_softmax:
        probabilities = torch.softmax(probabilities, dim=1)
    return dice_loss(probabilities, labels.flatten(0, 1))
