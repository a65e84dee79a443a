"""SAM's frozen mask decoder with a classifier token and depth adapters.

Token order: [IoU, 4 mask tokens, prompt tokens (2 box corners), classifier].
The classifier token is a learned global token plus, in ``auto`` mode, the
prompt generator's per-query token; its output feeds a linear head with
``num_classes + 1`` logits (the last one is "no object"). The mask comes from
mask token 0. DMLPAdapters sit after token self-attention, after token→image
attention, beside the MLP (scaled by 0.5) in each two-way block, and after the
final token→image attention; a DConvAdapter follows image→token attention.

The decoder batch is N = B*Q*T (volume, query, slice), slice fastest.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder
from torch import nn

from .adapters import DConvAdapter, DMLPAdapter


class DecoderAdapters(nn.Module):
    """Trainable parts of the 3D mask decoder; ``forward`` runs the frozen decoder.

    Inputs (N = B*Q*T): image_embeddings (N, D, h, w), image_pe (N, D, h, w),
    sparse (N, P, D), dense (N, D, h, w), cls_tokens (N, D) or None.
    Returns masks (N, 1, 4h, 4h) from mask token 0 and class logits
    (N, num_classes + 1), or None when ``with_classifier`` is False.
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_classes: int,
        num_layers: int = 2,
        bottleneck_ratio: int = 4,
        mlp_adapter_scale: float = 0.5,
    ) -> None:
        super().__init__()
        b = dim // bottleneck_ratio

        def dmlp() -> nn.ModuleList:
            return nn.ModuleList(DMLPAdapter(dim, b, depth) for _ in range(num_layers))

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.self_attn_adapters = dmlp()
        self.cross_attn_adapters = dmlp()
        self.mlp_adapters = dmlp()
        self.image_adapters = nn.ModuleList(DConvAdapter(dim, b) for _ in range(num_layers))
        self.final_adapter = DMLPAdapter(dim, b, depth)
        self.mlp_adapter_scale = mlp_adapter_scale

    def forward(
        self,
        decoder: MaskDecoder,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        cls_tokens: torch.Tensor | None,
        depth: int,
        *,
        enabled: bool = True,
        with_classifier: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = sparse.shape[0]
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        if with_classifier:
            cls = self.cls_token.expand(n, -1, -1)
            if cls_tokens is not None:
                cls = cls + cls_tokens.unsqueeze(1)
            tokens = torch.cat([tokens, cls.to(tokens.dtype)], dim=1)

        src = image_embeddings + dense
        b, c, h, w = src.shape
        # token-major (N, h*w, D) and contiguous: every add and projection below then runs on
        # contiguous rows (on a permuted view they were several times slower on the CPU)
        keys = src.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries, query_pe = tokens, tokens
        transformer = decoder.transformer

        def adapt(adapter: nn.Module, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return x + scale * adapter(x, depth) if enabled else x

        for i, layer in enumerate(transformer.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(adapt(self.self_attn_adapters[i], queries))

            q = queries + query_pe
            k = keys + key_pe
            queries = queries + layer.cross_attn_token_to_image(q=q, k=k, v=keys)
            queries = layer.norm2(adapt(self.cross_attn_adapters[i], queries))

            mlp_out = layer.mlp(queries)
            if enabled:
                mlp_out = mlp_out + self.mlp_adapter_scale * self.mlp_adapters[i](queries, depth)
            queries = layer.norm3(queries + mlp_out)

            q = queries + query_pe
            k = keys + key_pe
            keys = keys + layer.cross_attn_image_to_token(q=k, k=q, v=queries)
            if enabled:
                grid = keys.reshape(b, h, w, c)
                keys = keys + self.image_adapters[i](grid, depth).reshape(b, h * w, c)
            keys = layer.norm4(keys)

        q = queries + query_pe
        k = keys + key_pe
        queries = queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = transformer.norm_final_attn(adapt(self.final_adapter, queries))

        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        # All mask tokens, as SAM computes them (bit-identical results), then mask token 0.
        hyper = torch.stack(
            [mlp(queries[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        ub, uc, uh, uw = upscaled.shape
        masks = (hyper @ upscaled.view(ub, uc, uh * uw)).view(ub, -1, uh, uw)[:, :1]
        logits = self.class_head(queries[:, -1]) if with_classifier else None
        return masks, logits
