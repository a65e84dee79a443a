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
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from .adapters import DConvAdapter, DMLPAdapter


class DecoderAdapters(nn.Module):
    """Trainable parts of the 3D mask decoder; ``forward`` runs the frozen decoder.

    Inputs (N = B*Q*T prompts in (volume, query, slice) order): image_embeddings (B*T, D, h, w),
    one per slice and shared by its Q queries; image_pe (T, D, h, w) per slice, or (1, D, h, w);
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
        bt, c, h, w = image_embeddings.shape
        if bt % depth or n % bt or image_pe.shape[0] not in (1, depth):
            raise ValueError(f"{n} prompts, {bt} slice embeddings and {image_pe.shape[0]} positional "
                             f"encodings do not fit a depth of {depth}")
        b, q, hw = bt // depth, n // bt, h * w
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        if with_classifier:
            cls = self.cls_token.expand(n, -1, -1)
            if cls_tokens is not None:
                cls = cls + cls_tokens.unsqueeze(1)
            tokens = torch.cat([tokens, cls.to(tokens.dtype)], dim=1)

        # Image tokens token-major (N, h*w, D) and contiguous: the adds and projections below run on
        # contiguous rows (several times faster on the CPU than on permuted views). The slice
        # embeddings and positional encodings are broadcast over the queries, never copied Q times;
        # the contiguous operand first makes the sum contiguous.
        def token_major(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2).contiguous()

        slices = token_major(image_embeddings).reshape(b, 1, depth, hw, c)
        keys = (slices + dense.flatten(2).transpose(1, 2).reshape(b, q, depth, hw, c)).reshape(n, hw, c)
        key_pe = token_major(image_pe)  # (T or 1, hw, D)

        def with_pe(x: torch.Tensor) -> torch.Tensor:
            return (x.reshape(b * q, depth, hw, c) + key_pe).reshape(n, hw, c)

        queries, query_pe = tokens, tokens
        transformer = decoder.transformer

        def adapt(adapter: nn.Module, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return x + scale * adapter(x, depth) if enabled else x

        for i, layer in enumerate(transformer.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q_in = queries + query_pe
                queries = queries + layer.self_attn(q=q_in, k=q_in, v=queries)
            queries = layer.norm1(adapt(self.self_attn_adapters[i], queries))

            # keys do not change until image→token attention: one sum with the PE (and one cast to
            # autocast's dtype, which both attentions would otherwise repeat) serves both
            k = _autocast_input(with_pe(keys))
            queries = queries + layer.cross_attn_token_to_image(q=queries + query_pe, k=k, v=keys)
            queries = layer.norm2(adapt(self.cross_attn_adapters[i], queries))

            mlp_out = layer.mlp(queries)
            if enabled:
                mlp_out = mlp_out + self.mlp_adapter_scale * self.mlp_adapters[i](queries, depth)
            queries = layer.norm3(queries + mlp_out)

            keys = keys + layer.cross_attn_image_to_token(q=k, k=queries + query_pe, v=queries)
            if enabled:
                grid = keys.reshape(n, h, w, c)
                keys = keys + self.image_adapters[i](grid, depth).reshape(n, hw, c)
            keys = layer.norm4(keys)

        queries = queries + transformer.final_attn_token_to_image(q=queries + query_pe, k=with_pe(keys), v=keys)
        queries = transformer.norm_final_attn(adapt(self.final_adapter, queries))

        hyper = decoder.output_hypernetworks_mlps[0](queries[:, 1])  # mask token 0 only
        masks = upscale_masks(decoder.output_upscaling, keys, hyper, h, w)
        logits = self.class_head(queries[:, -1]) if with_classifier else None
        return masks, logits


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the current autocast dtype of its device (what autocast's matmuls cast it to), else ``x``."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(kind))
    return x


def _conv2x2(conv: nn.Module) -> nn.ConvTranspose2d:
    if not isinstance(conv, nn.ConvTranspose2d) or tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2):
        raise ValueError(f"expected 2x2 transposed convolutions of stride 2, got {conv}")
    return conv


def upscale_masks(upscaling: nn.Sequential, keys: torch.Tensor, hyper: torch.Tensor, h: int, w: int,
                  ) -> torch.Tensor:
    """SAM's mask head for one mask token, on token-major image tokens.

    upscaling: SAM's ``output_upscaling`` (ConvTranspose2d k2 s2, LayerNorm2d, act,
    ConvTranspose2d k2 s2, act); keys (N, h*w, D); hyper (N, C) the mask token's hypernetwork
    output → mask logits (N, 1, 4h, 4w), what SAM computes as ``hyper @ upscaling(keys as NCHW)``.

    A stride-2 transposed convolution with a 2×2 kernel maps every input pixel to its own 2×2
    block, so each is a linear layer to 4 sub-pixels × channels on channel-last tokens; the norm and
    activations act per pixel, and the mask token's dot product runs before the sub-pixels are put in
    place, so only the final (N, 4h, 4w) map is rearranged.
    """
    up1, norm, act1, up2, act2 = upscaling
    up1, up2 = _conv2x2(up1), _conv2x2(up2)
    assert isinstance(norm, LayerNorm2d)
    n, hw, _ = keys.shape

    def as_linear(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
        weight = conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.weight.shape[0])  # (dy dx Cout, Cin)
        assert conv.bias is not None  # SAM's upscaling convolutions have biases
        return weight, conv.bias.repeat(4)

    x = F.linear(keys, *as_linear(up1)).reshape(n, hw, 2, 2, -1)
    x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    x = act2(F.linear(x, *as_linear(up2)))  # (N, hw, dy, dx, dy2 dx2 C)
    c = hyper.shape[-1]
    m = (x.reshape(n, -1, c) @ hyper.to(x.dtype).unsqueeze(-1)).reshape(n, h, w, 2, 2, 2, 2)
    return m.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 1, 4 * h, 4 * w)
