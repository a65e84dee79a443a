"""The frozen 2D image encoder run over the slices of a 3D patch, with adapters.

The adapter modules here hold only the new, trainable parameters (depth
embedding, two :class:`~.adapters.DConvAdapter` per transformer block); the
frozen encoder is passed to ``forward`` so that its weights live once, under
the backbone's own names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from segment_anything.modeling.image_encoder import (
    Block,
    ImageEncoderViT,
    window_partition,
    window_unpartition,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import DConvAdapter

if TYPE_CHECKING:
    from .tiny_vit import TinyViT

EncoderOutput = tuple[torch.Tensor, list[torch.Tensor]]


class ViTAdapters(nn.Module):
    """Depth embedding and per-block DConvAdapters for segment-anything's ViT.

    ``forward(encoder, x, depth)`` with x (N*T, 3, S, S) returns the neck output
    (N*T, C_neck, s, s) and the outputs of ``feature_blocks`` as channel-first
    maps (N*T, D, s, s), deepest first.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_blocks: int,
        depth: int,
        bottleneck: int,
        feature_blocks: tuple[int, ...],
        mlp_adapter_scale: float = 0.5,
        adapter_layer: type[DConvAdapter] = DConvAdapter,
    ) -> None:
        super().__init__()
        self.depth_embed = nn.Parameter(torch.zeros(1, depth, 1, 1, embed_dim))
        self.attn_adapters = nn.ModuleList(adapter_layer(embed_dim, bottleneck) for _ in range(num_blocks))
        self.mlp_adapters = nn.ModuleList(adapter_layer(embed_dim, bottleneck) for _ in range(num_blocks))
        self.feature_blocks = feature_blocks
        self.mlp_adapter_scale = mlp_adapter_scale
        self.grad_checkpointing = False

    def _block(self, i: int, block: Block, x: torch.Tensor, depth: int) -> torch.Tensor:
        shortcut = x
        h = block.norm1(x)
        if block.window_size > 0:
            size = (h.shape[1], h.shape[2])
            h, pad = window_partition(h, block.window_size)
            h = block.attn(h)
            h = window_unpartition(h, block.window_size, pad, size)
        else:
            h = block.attn(h)
        x = shortcut + h
        x = x + self.attn_adapters[i](x, depth)
        n = block.norm2(x)
        return x + block.mlp(n) + self.mlp_adapter_scale * self.mlp_adapters[i](n, depth)

    def forward(
        self, encoder: ImageEncoderViT, x: torch.Tensor, depth: int, *, enabled: bool = True
    ) -> EncoderOutput:
        x = encoder.patch_embed(x)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        if enabled:
            nt, h, w, c = x.shape
            x = (x.reshape(nt // depth, depth, h, w, c) + self.depth_embed).reshape(nt, h, w, c)
        features = []
        for i, block in enumerate(encoder.blocks):
            if not enabled:
                x = block(x)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._block, i, block, x, depth, use_reentrant=False)
            else:
                x = self._block(i, block, x, depth)
            if i in self.feature_blocks:
                features.append(x.permute(0, 3, 1, 2))
        neck = encoder.neck(x.permute(0, 3, 1, 2))
        return neck, features[::-1]


class TinyViTAdapters(nn.Module):
    """Depth embedding and DConvAdapters for the attention blocks of LiteMedSAM's TinyViT.

    The depth embedding is added to the input of the first attention stage; each
    attention block gets an adapter after attention and one beside its MLP.
    Returns the neck output and the four stage outputs, deepest first.
    With ``grad_checkpointing`` set, a module in training mode keeps only the inputs of the
    encoder's blocks for the backward pass and recomputes the blocks there.
    """

    def __init__(
        self,
        *,
        stage_dims: tuple[int, ...],
        stage_depths: tuple[int, ...],
        depth: int,
        bottleneck_ratio: int = 4,
        mlp_adapter_scale: float = 0.5,
        adapter_layer: type[DConvAdapter] = DConvAdapter,
    ) -> None:
        super().__init__()
        self.keys: list[tuple[int, int]] = [
            (layer, block)
            for layer in range(1, len(stage_dims))
            for block in range(stage_depths[layer])
        ]
        self.depth_embed = nn.Parameter(torch.zeros(1, depth, stage_dims[1]))
        self.attn_adapters = nn.ModuleList(
            adapter_layer(stage_dims[layer], stage_dims[layer] // bottleneck_ratio) for layer, _ in self.keys
        )
        self.mlp_adapters = nn.ModuleList(
            adapter_layer(stage_dims[layer], stage_dims[layer] // bottleneck_ratio) for layer, _ in self.keys
        )
        self.mlp_adapter_scale = mlp_adapter_scale
        self.grad_checkpointing = False

    def forward(
        self, encoder: TinyViT, x: torch.Tensor, depth: int, *, enabled: bool = True
    ) -> EncoderOutput:
        if not enabled:
            neck, stages = encoder.forward_features(x)
            return neck, stages[::-1]

        def bind(adapter: nn.Module, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
            if scale == 1.0:
                return lambda t: adapter(t, depth)
            return lambda t: scale * adapter(t, depth)

        adapters = {
            key: (bind(a, 1.0), bind(m, self.mlp_adapter_scale))
            for key, a, m in zip(self.keys, self.attn_adapters, self.mlp_adapters, strict=True)
        }

        def add_depth(tokens: torch.Tensor) -> torch.Tensor:
            nt, h, w, c = tokens.shape
            vol = tokens.reshape(nt // depth, depth, h, w, c) + self.depth_embed[:, :, None, None]
            return vol.reshape(nt, h, w, c)

        recompute = self.grad_checkpointing and self.training
        neck, stages = encoder.forward_features(x, adapters=adapters, stage_input_hook=add_depth,
                                                checkpoint_blocks=recompute)
        return neck, stages[::-1]
