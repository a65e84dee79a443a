"""Small 3D convolutional parts around SAM: first_conv, final_conv, box helpers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FirstConv(nn.Module):
    """Maps C input channels to SAM's 3 channels; optionally upsamples in-plane.

    x (B, C, T, H, W) → (B, 3, T, H * 2**upsample, W * 2**upsample). With
    ``upsample`` > 0 (the ACDC preset's "CNN-based upsampling") each step is a
    ConvTranspose3d with stride (1, 2, 2).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        hidden: int = 16,
        upsample: int = 0,
        out_channels: int = 3,
        norm_layer: type[nn.Module] = nn.InstanceNorm3d,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, hidden, 3, padding=1),
            norm_layer(hidden, affine=True),
            act_layer(inplace=True),
        )
        ups: list[nn.Module] = []
        for _ in range(upsample):
            ups += [nn.ConvTranspose3d(hidden, hidden, (1, 2, 2), stride=(1, 2, 2)), act_layer(inplace=True)]
        self.upsample = nn.Sequential(*ups) if ups else nn.Identity()
        self.proj = nn.Conv3d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.upsample(self.stem(x)))


class FinalConv(nn.Module):
    """Refines per-query low-resolution mask logits into logits at the patch size.

    x (B, Q, T, h, w) → (B, Q, T, H, W): 3D conv → ConvTranspose3d (1, 2, 2) per
    doubling → 3D conv, added to the input resized to (H, W). The last conv
    starts at zero, so a new model outputs SAM's mask, resized.
    """

    def __init__(
        self,
        *,
        in_size: int,
        out_size: int,
        hidden: int = 16,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        steps = max(0, round(math.log2(out_size / in_size)))
        self.out_size = out_size
        self.conv_in = nn.Sequential(nn.Conv3d(1, hidden, 3, padding=1), act_layer(inplace=True))
        ups: list[nn.Module] = []
        for _ in range(steps):
            ups += [nn.ConvTranspose3d(hidden, hidden, (1, 2, 2), stride=(1, 2, 2)), act_layer(inplace=True)]
        self.upsample = nn.Sequential(*ups) if ups else nn.Identity()
        self.conv_out = nn.Conv3d(hidden, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        if self.conv_out.bias is not None:  # it has one (bias=True): the stub allows None
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, q, t, h, w = x.shape
        v = x.reshape(b * q, 1, t, h, w)
        hidden = self.conv_in(v)
        if hidden.device.type == "cpu":  # channel-last maps: oneDNN's 16 → 1 convolution is faster (docs/benchmarks.md)
            hidden = hidden.contiguous(memory_format=torch.channels_last_3d)
        r = self.conv_out(self.upsample(hidden))
        size = (t, self.out_size, self.out_size)
        if r.shape[2:] != size:
            r = F.interpolate(r, size=size, mode="trilinear", align_corners=False)
        base = v if v.shape[2:] == size else F.interpolate(v, size=size, mode="trilinear", align_corners=False)
        return (base + r).reshape(b, q, t, *size[1:])


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding boxes of binary masks, normalised to [0, 1].

    masks: (..., H, W) bool → boxes (..., 4) as (x0, y0, x1, y1) pixel edges / size,
    and ``present`` (...) bool (False for empty masks, whose box is all zeros).
    """
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1)  # (..., H)
    cols = masks.any(dim=-2)  # (..., W)
    present = rows.any(dim=-1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=-1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=-1) + 1
    x0 = torch.where(cols, ar_w, w).amin(dim=-1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=-1) + 1
    boxes = torch.stack([x0 / w, y0 / h, x1 / w, y1 / h], dim=-1).float()
    return boxes * present[..., None], present


def order_box(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes with corners in any order → (x_min, y_min, x_max, y_max)."""
    x = torch.stack([boxes[..., 0], boxes[..., 2]], dim=-1)
    y = torch.stack([boxes[..., 1], boxes[..., 3]], dim=-1)
    return torch.stack([x.amin(-1), y.amin(-1), x.amax(-1), y.amax(-1)], dim=-1)


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """MaskFormer semantic inference.

    class_logits (B, Q, T, C+1), mask_logits (B, Q, T, H, W) →
    scores (B, C, T, H, W) = sum_q softmax(cls_q)[c] * sigmoid(mask_q), the
    "no object" column dropped. The label map is ``scores.argmax(1)``.
    """
    probs = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqtc,bqthw->bcthw", probs, mask_logits.float().sigmoid())
