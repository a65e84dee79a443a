"""Depth-aware adapters: the only trainable layers inside SAM's frozen blocks.

Both adapters are bottlenecks whose last linear layer starts at zero, so a
freshly built MaskSAM computes exactly what the frozen SAM computes; training
moves them away from zero. Slices of one patch lie next to each other in the
batch (depth is the fastest-varying index), which is what lets the adapters mix
information across depth.
"""

from __future__ import annotations

import torch
from torch import nn


class DConvAdapter(nn.Module):
    """Linear → act → depthwise 3D conv (+ norm, act, residual) → linear.

    Shapes: x (N*T, h, w, dim) channel-last tokens, N volumes of T slices each
    → (N*T, h, w, dim).
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        *,
        kernel_size: int = 3,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = act_layer()
        self.conv = nn.Conv3d(
            bottleneck, bottleneck, kernel_size, padding=kernel_size // 2, groups=bottleneck
        )
        self.norm = norm_layer(bottleneck)
        self.conv_act = act_layer()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        h = self.act(self.down(x))
        nt, hh, ww, c = h.shape
        vol = h.reshape(nt // depth, depth, hh, ww, c).permute(0, 4, 1, 2, 3)  # (N, c, T, h, w)
        vol = self.conv(vol).permute(0, 2, 3, 4, 1).reshape(nt, hh, ww, c)
        h = h + self.conv_act(self.norm(vol))
        return self.up(h)


class DMLPAdapter(nn.Module):
    """Linear → act → MLP along depth (T → ratio*T → T, residual) → linear.

    Shapes: x (N*T, L, dim) token sequences, N groups of T slices each
    → (N*T, L, dim). ``depth`` is fixed at build time (the patch depth T).
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        depth: int,
        *,
        depth_ratio: int = 4,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.down = nn.Linear(dim, bottleneck)
        self.act = act_layer()
        self.depth_fc1 = nn.Linear(depth, depth_ratio * depth)
        self.depth_act = act_layer()
        self.depth_fc2 = nn.Linear(depth_ratio * depth, depth)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        if depth != self.depth:
            raise ValueError(f"DMLPAdapter built for depth {self.depth}, got {depth}")
        h = self.act(self.down(x))
        nt, length, c = h.shape
        seq = h.reshape(nt // depth, depth, length, c).permute(0, 2, 3, 1)  # (N, L, c, T)
        seq = self.depth_fc2(self.depth_act(self.depth_fc1(seq)))
        h = h + seq.permute(0, 3, 1, 2).reshape(nt, length, c)
        return self.up(h)
