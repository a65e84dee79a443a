"""SAM's ViT image encoder with fused attention, and the 2D → smaller-input weight filter.

The encoder is segment-anything's own :class:`ImageEncoderViT`; only its attention
modules are switched to :class:`FusedAttention`, a subclass that holds exactly the
same parameters and computes the same function with
:func:`torch.nn.functional.scaled_dot_product_attention`, the decomposed
relative-position bias passed as the additive mask.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention as SamAttention,
)
from segment_anything.modeling.image_encoder import (
    ImageEncoderViT,
    get_rel_pos,
)
from torch import nn


class FusedAttention(SamAttention):
    """SAM's windowed/global attention computed with fused SDPA kernels.

    Same parameters as :class:`segment_anything.modeling.image_encoder.Attention`
    (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``), same result to fp32 rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) → (B, H, W, C)."""
        B, H, W, C = x.shape
        # (3, B, heads, H*W, head_dim)
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias of SAM's decomposed relative positions.

    q: (B, heads, H*W, head_dim) unscaled queries; rel_pos_h: (2H-1, head_dim);
    rel_pos_w: (2W-1, head_dim). Returns (B, heads, H*W, H*W) in q's dtype.
    """
    B, nh, _, dim = q.shape
    H, W = size
    Rh = get_rel_pos(H, H, rel_pos_h).to(q.dtype)  # (H, H, dim)
    Rw = get_rel_pos(W, W, rel_pos_w).to(q.dtype)  # (W, W, dim)
    r_q = q.reshape(B, nh, H, W, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)  # (B, nh, H, W, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)  # (B, nh, H, W, W)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, nh, H, W, H, W)
    return bias.reshape(B, nh, H * W, H * W)


def build_vit_encoder(
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: tuple[int, ...],
    image_size: int,
    patch_size: int = 16,
    window_size: int = 14,
    out_chans: int = 256,
    fused_attention: bool = True,
) -> ImageEncoderViT:
    """segment-anything's ViT image encoder for ``image_size``² slices.

    With ``fused_attention`` every block's attention is a :class:`FusedAttention`
    (the subclass adds no state, so the module's parameters and state-dict keys
    are segment-anything's own).
    """
    encoder = ImageEncoderViT(
        img_size=image_size,
        patch_size=patch_size,
        in_chans=3,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        out_chans=out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=window_size,
        global_attn_indexes=global_attn_indexes,
    )
    if fused_attention:
        for block in encoder.blocks:
            block.attn.__class__ = FusedAttention
    return encoder


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a (L, dim) relative-position table to (length, dim)."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(
        table.float().T[None], size=length, mode="linear", align_corners=False
    )[0].T
    return resized.to(table.dtype).contiguous()


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Adapt SAM's 1024²-input weights to a model built for another input size.

    For every key of ``state_dict`` that ``model`` also has, but with another
    shape: the absolute position embedding ``*.pos_embed`` (1, 64, 64, D) is
    resized bicubically to the model's token grid, and relative-position tables
    ``*.rel_pos_h`` / ``*.rel_pos_w`` (2S-1, head_dim) are interpolated linearly.
    Every other key passes unchanged; a shape mismatch elsewhere is left for
    ``load_state_dict`` to report. The input dict is not modified.
    """
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            out[key] = value
        elif key.endswith("pos_embed") and value.ndim == 4:
            grid = value.permute(0, 3, 1, 2).float()  # (1, D, S, S)
            grid = F.interpolate(grid, size=tuple(want.shape[1:3]), mode="bicubic", align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(value.dtype).contiguous()
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2:
            out[key] = _resize_rel_pos(value, want.shape[0])
        else:
            out[key] = value
    return out
