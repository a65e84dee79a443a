"""The automatic prompt generator: a U-Net-like 3D decoder over encoder features.

Stage ``s`` of the decoder runs at in-plane size ``sizes[s]`` with ``widths[s]``
channels (deepest first). Stage 0 starts from the encoder's neck; each later
stage upsamples (ConvTranspose3d, stride (1, 2, 2)) when its size doubles. The
encoder's intermediate features join as skips, projected to the stage's width
and upsampled with ConvTranspose3d (1, 2, 2) to the stage's size; a stage at the
full patch size past the last feature takes the first_conv output as its skip.

Three heads give, per query q (Q queries) and slice:

* ``aux_masks`` (B, Q, T, H, W): mask logits (1x1x1 conv on the last stage);
* ``aux_boxes`` (B, Q, T, 4): boxes (x0, y0, x1, y1) in [0, 1] of the patch,
  from every stage pooled to (T, 2, 2), concatenated, 1x1x1 conv, sigmoid;
* ``cls_tokens`` (B, Q, T, D): a D-dim classifier token, from every stage pooled
  to (T, p1, p2) with p1*p2 = D, 3x3x3 conv and GELU.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class ConvBlock3d(nn.Module):
    """``num_convs`` × (conv 3x3x3 → norm → act), nnU-Net style."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_convs: int = 1,
        conv_layer: type[nn.Module] = nn.Conv3d,
        norm_layer: type[nn.Module] = nn.InstanceNorm3d,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [
                conv_layer(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                norm_layer(out_channels, affine=True),
                act_layer(inplace=True),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def up_stack(in_channels: int, out_channels: int, steps: int) -> nn.Module:
    """Project to ``out_channels`` and upsample in-plane by 2**steps (ConvTranspose3d (1,2,2))."""
    if steps == 0:
        return nn.Conv3d(in_channels, out_channels, 1)
    layers: list[nn.Module] = []
    for i in range(steps):
        layers.append(
            nn.ConvTranspose3d(in_channels if i == 0 else out_channels, out_channels, (1, 2, 2), stride=(1, 2, 2))
        )
    return nn.Sequential(*layers)


def _factor_pair(n: int) -> tuple[int, int]:
    """Two factors of n, as close to its square root as possible (256 → (16, 16))."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


class PromptGenerator(nn.Module):
    """Generates mask, box and classifier-token prompts from encoder features."""

    def __init__(
        self,
        *,
        neck_channels: int,
        feature_channels: tuple[int, ...],
        feature_sizes: tuple[int, ...],
        image_channels: int,
        widths: tuple[int, ...],
        sizes: tuple[int, ...],
        depth: int,
        num_queries: int,
        token_dim: int,
        convs_per_stage: int = 1,
        block_layer: type[ConvBlock3d] = ConvBlock3d,
    ) -> None:
        super().__init__()
        if len(widths) != len(sizes):
            raise ValueError("widths and sizes need one entry per stage")
        self.sizes = sizes
        self.num_queries = num_queries
        self.depth = depth
        self.neck_proj = nn.Conv3d(neck_channels, widths[0], 1)
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.skip_sources: list[int | None] = []  # feature index, -1 = image, None = no skip
        for s, (width, size) in enumerate(zip(widths, sizes, strict=True)):
            if s == 0:
                self.ups.append(nn.Identity())
                in_ch = widths[0]
            else:
                step = round(math.log2(size / sizes[s - 1]))
                if step not in (0, 1):
                    raise ValueError("decoder stages must keep or double the in-plane size")
                self.ups.append(
                    nn.ConvTranspose3d(widths[s - 1], width, (1, 2, 2), stride=(1, 2, 2))
                    if step
                    else nn.Conv3d(widths[s - 1], width, 1)
                )
                in_ch = width
            if s < len(feature_channels):
                steps = round(math.log2(size / feature_sizes[s]))
                if steps < 0:
                    raise ValueError(f"feature {s} ({feature_sizes[s]}²) is larger than stage {s} ({size}²)")
                self.skips.append(up_stack(feature_channels[s], width, steps))
                self.skip_sources.append(s)
            elif s == len(sizes) - 1:
                self.skips.append(nn.Conv3d(image_channels, width, 1))
                self.skip_sources.append(-1)
            else:
                self.skips.append(nn.Identity())
                self.skip_sources.append(None)
            skip_ch = width if self.skip_sources[-1] is not None else 0
            self.blocks.append(block_layer(in_ch + skip_ch, width, num_convs=convs_per_stage))
        total = sum(widths)
        self.mask_head = nn.Conv3d(widths[-1], num_queries, 1)
        self.box_pool = nn.AdaptiveAvgPool3d((depth, 2, 2))
        self.box_head = nn.Conv3d(total, num_queries, 1)
        self.token_grid = _factor_pair(token_dim)
        self.token_pool = nn.AdaptiveAvgPool3d((depth, *self.token_grid))
        self.token_head = nn.Sequential(nn.Conv3d(total, num_queries, 3, padding=1), nn.GELU())
        self.grad_checkpointing = False  # training: recompute each stage in backward (less memory)

    def _stage(self, s: int, x: torch.Tensor, skip_input: torch.Tensor | None) -> torch.Tensor:
        """Stage s: upsample x, join the projected skip (if any), conv block."""
        x = self.ups[s](x)
        if skip_input is not None:
            x = torch.cat([x, self.skips[s](skip_input)], dim=1)
        return self.blocks[s](x)

    def forward(
        self, neck: torch.Tensor, features: list[torch.Tensor], image: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """neck: (B, C_n, T, s, s); features: deepest first, (B, C_i, T, s_i, s_i);
        image: (B, C_img, T, H, W) → dict of aux_masks, aux_boxes, cls_tokens."""
        x = self.neck_proj(neck)
        stages = []
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for s in range(len(self.blocks)):
            source = self.skip_sources[s]
            skip_input = None if source is None else image if source == -1 else features[source]
            if recompute:
                x = checkpoint(self._stage, s, x, skip_input, use_reentrant=False)
            else:
                x = self._stage(s, x, skip_input)
            stages.append(x)
        b, _, t = x.shape[:3]
        aux_masks = self.mask_head(x)  # (B, Q, T, H, W)
        boxes = torch.cat([self.box_pool(st) for st in stages], dim=1)
        boxes = torch.sigmoid(self.box_head(boxes))  # (B, Q, T, 2, 2)
        aux_boxes = boxes.reshape(b, self.num_queries, t, 4)
        tokens = torch.cat([self.token_pool(st) for st in stages], dim=1)
        cls_tokens = self.token_head(tokens).reshape(b, self.num_queries, t, -1)
        return {"aux_masks": aux_masks, "aux_boxes": aux_boxes, "cls_tokens": cls_tokens}
