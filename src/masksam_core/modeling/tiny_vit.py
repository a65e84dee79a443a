"""TinyViT image encoder of LiteMedSAM, written for this project.

The module tree mirrors the parameter names of the published LiteMedSAM checkpoint, so the
``image_encoder.*`` part of ``lite_medsam.pth`` loads with ``strict=True`` after the prefix is removed.

Architecture (LiteMedSAM settings, input 256x256)::

    patch_embed   two 1x1 Conv+BN (GELU between), stride 1       (N,   3, 256, 256) -> (N,  64, 256, 256)
    layers[0]     2 MBConv blocks                                (N,  64, 256, 256)
      downsample  stride 2                                       -> (N, 128, 128, 128)
    layers[1]     2 attention blocks, window 7                    (N, 128, 128, 128)
      downsample  stride 2                                       -> (N, 160,  64,  64)
    layers[2]     6 attention blocks, window 14                   (N, 160,  64,  64)
      downsample  stride 1 (the last one keeps the resolution)   -> (N, 320,  64,  64)
    layers[3]     2 attention blocks, window 7                    (N, 320,  64,  64)
    neck          1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d   -> (N, 256,  64,  64)

Attention blocks work on channel-last tokens ``(N, H, W, C)``: LayerNorm, window attention (the map is
zero-padded at the bottom/right to whole windows *before* the norm, padded tokens take part as keys), a
depthwise 3x3 Conv+BN ("local conv"), then a LayerNorm-first MLP. Each head has a learned bias per
absolute 2D offset ``(|dy|, |dx|)`` inside the window; the bias table is gathered on every forward call
(never cached), so ``eval()`` before ``load_state_dict`` is safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Adapter", "AdapterMap", "TinyViT", "build_lite_image_encoder"]

#: A per-block adapter: channel-last tokens (N, H, W, C) -> same shape.
Adapter = Callable[[Tensor], Tensor]
#: ``{(layer_index, block_index): (attn_adapter, mlp_adapter)}`` for attention layers (index >= 1).
AdapterMap = Mapping[tuple[int, int], tuple[Adapter | None, Adapter | None]]


class ConvBN(nn.Module):
    """Bias-free Conv2d (``c``) followed by BatchNorm2d (``bn``); 'same' padding for odd kernels.

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=kernel_size // 2,
                           groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.c(x))


class PatchEmbed(nn.Module):
    """LiteMedSAM stem: 1x1 ConvBN -> GELU -> 1x1 ConvBN, no downsampling. (N, C_in, H, W) -> (N, D, H, W)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, embed_dim // 2), nn.GELU(), ConvBN(embed_dim // 2, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project, residual add, GELU. (N, C, H, W) -> same."""

    def __init__(self, dim: int, expand_ratio: float, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Stage transition: 1x1 ConvBN, GELU, depthwise 3x3 ConvBN (stride), GELU, 1x1 ConvBN.

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def _offset_index(window: int) -> Tensor:
    """(w*w, w*w) long tensor: bias column ``|dy| * w + |dx|`` for every query/key pair in a w x w window."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with pre-norm and learned offset biases.

    Tokens (B, w*w, C) -> (B, w*w, C), B = batch * windows. ``qkv`` output is laid out per head as
    ``[q | k | v]`` (each C / heads wide). ``attention_biases`` is (heads, w*w), indexed by the
    non-persistent ``bias_index`` buffer (w*w, w*w).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("bias_index", _offset_index(window_size), persistent=False)
        self.bias_index: Tensor

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, n, head_dim)
        # gathered every call: (1, heads, n, n); 4-D, as the fused CPU kernel needs (a 3-D mask takes the slow path)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear on channel-last tokens (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def body(self, h: Tensor) -> Tensor:
        """The MLP after its norm: ``forward(x) == body(norm(x))``."""
        return self.fc2(F.gelu(self.fc1(h)))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.norm(x))


class TinyViTBlock(nn.Module):
    """Window attention + local depthwise conv + MLP on channel-last tokens (N, H, W, C) -> same.

    With adapters::

        x = x + attention(x);  x = x + attn_adapter(x)
        x = local_conv(x)
        h = mlp.norm(x);       x = x + mlp.body(h) + mlp_adapter(h)
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)

    def _window_attention(self, x: Tensor) -> Tensor:
        """Zero-pad (N, H, W, C) to whole windows, attend per window, crop back to (N, H, W, C)."""
        n, h, w, c = x.shape
        ws = self.window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        gh, gw = (h + pad_h) // ws, (w + pad_w) // ws
        t = x.reshape(n, gh, ws, gw, ws, c).transpose(2, 3).reshape(n * gh * gw, ws * ws, c)
        t = self.attn(t)
        t = t.reshape(n, gh, gw, ws, ws, c).transpose(2, 3).reshape(n, gh * ws, gw * ws, c)
        return t[:, :h, :w]

    def forward(self, x: Tensor, attn_adapter: Adapter | None = None,
                mlp_adapter: Adapter | None = None) -> Tensor:
        x = x + self._window_attention(x)
        if attn_adapter is not None:
            x = x + attn_adapter(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        h = self.mlp.norm(x)
        if mlp_adapter is None:
            return x + self.mlp.body(h)
        return x + self.mlp.body(h) + mlp_adapter(h)


class ConvStage(nn.Module):
    """Stage 0: MBConv ``blocks`` on channel-first maps, then ``downsample``."""

    blocks: nn.ModuleList
    downsample: PatchMerging | None

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample


class AttentionStage(nn.Module):
    """Stages 1..: TinyViT ``blocks`` on channel-last tokens, then an optional ``downsample``."""

    blocks: nn.ModuleList
    downsample: PatchMerging | None

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth))
        self.downsample = downsample


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a channel-first map (N, C, H, W) -> same (eps 1e-6, as in SAM)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class TinyViT(nn.Module):
    """TinyViT image encoder with a SAM neck. ``forward``: (N, in_chans, H, W) -> (N, out_chans, H', W').

    With the LiteMedSAM settings (``build_lite_image_encoder``) H = W = 256 gives (N, 256, 64, 64).
    ``downsample_strides[i]`` is the stride of the transition after stage i (LiteMedSAM: 2, 2, 1).
    """

    def __init__(self, *, img_size: int = 256, in_chans: int = 3,
                 embed_dims: Sequence[int] = (64, 128, 160, 320), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (2, 4, 5, 10), window_sizes: Sequence[int] = (7, 7, 14, 7),
                 mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3,
                 downsample_strides: Sequence[int] = (2, 2, 1), out_chans: int = 256) -> None:
        super().__init__()
        n = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(window_sizes) == n and len(downsample_strides) == n - 1):
            raise ValueError("embed_dims, depths, num_heads, window_sizes need one entry per stage and "
                             "downsample_strides one per transition")
        self.img_size = img_size
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        layers: list[nn.Module] = []
        for i in range(n):
            down = PatchMerging(embed_dims[i], embed_dims[i + 1], downsample_strides[i]) if i < n - 1 else None
            if i == 0:
                layers.append(ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, down))
            else:
                layers.append(AttentionStage(embed_dims[i], depths[i], num_heads[i], window_sizes[i],
                                             mlp_ratio, local_conv_size, down))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def _stage(self, i: int) -> ConvStage | AttentionStage:
        stage = self.layers[i]
        assert isinstance(stage, (ConvStage, AttentionStage))
        return stage

    def _check_adapters(self, adapters: AdapterMap) -> None:
        for key in adapters:
            layer, block = key
            if not 1 <= layer < len(self.layers):
                raise KeyError(f"adapter key {key}: layer index must be in 1..{len(self.layers) - 1} "
                               "(layer 0 is the conv stage)")
            blocks = len(self._stage(layer).blocks)
            if not 0 <= block < blocks:
                raise KeyError(f"adapter key {key}: layer {layer} has {blocks} blocks")

    def forward_features(
        self,
        x: Tensor,
        adapters: AdapterMap | None = None,
        stage_input_hook: Adapter | None = None,
        *,
        checkpoint_blocks: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Encode images and expose per-stage features.

        Args:
            x: images (N, in_chans, H, W), LiteMedSAM: (N, 3, 256, 256) in [0, 1].
            adapters: optional ``{(layer, block): (attn_adapter, mlp_adapter)}`` for attention layers
                (1..3). Either callable may be None. Each maps channel-last tokens (N, H_i, W_i, C_i) to the
                same shape; see ``TinyViTBlock`` for where they are added (no scaling applied here).
            stage_input_hook: optional callable applied to the channel-last tokens (N, H_1, W_1, C_1)
                entering the first attention stage (MaskSAM adds its depth embedding there).
            checkpoint_blocks: keep only the input of every block, downsample, the patch embedding
                and the neck for the backward pass and recompute the rest there (gradient
                checkpointing: the same gradients for a second forward pass, and a fraction of the
                activation memory; only matters when gradients are recorded).

        Returns:
            ``(neck, stages)``: neck (N, 256, H/4, W/4); ``stages[i]`` is the output of ``layers[i]``'s blocks
            *before* its downsample, channel-first (N, C_i, H_i, W_i); LiteMedSAM at 256x256:
            (N,64,256,256), (N,128,128,128), (N,160,64,64), (N,320,64,64). Stages 1.. are permuted views
            of channel-last tensors (not contiguous).
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (N, {self.in_chans}, H, W) images, got {tuple(x.shape)}")
        if adapters:
            self._check_adapters(adapters)

        def run(module: Callable[..., Tensor], *args: object) -> Tensor:
            if checkpoint_blocks and torch.is_grad_enabled():
                return checkpoint(module, *args, use_reentrant=False)
            return module(*args)

        stages: list[Tensor] = []
        x = run(self.patch_embed, x)
        conv_stage = self._stage(0)
        for mb in conv_stage.blocks:
            x = run(mb, x)
        stages.append(x)
        assert conv_stage.downsample is not None  # stage 0 always downsamples
        x = run(conv_stage.downsample, x).permute(0, 2, 3, 1)
        if stage_input_hook is not None:
            x = stage_input_hook(x)
        for i in range(1, len(self.layers)):
            layer = self._stage(i)
            for j, blk in enumerate(layer.blocks):
                pair = adapters.get((i, j)) if adapters else None
                x = run(blk, x) if pair is None else run(blk, x, pair[0], pair[1])
            stages.append(x.permute(0, 3, 1, 2))
            if layer.downsample is not None:
                x = run(layer.downsample, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return run(self.neck, x.permute(0, 3, 1, 2)), stages

    def forward(self, x: Tensor) -> Tensor:
        """Image embedding: (N, 3, 256, 256) -> (N, 256, 64, 64) with the LiteMedSAM settings."""
        return self.forward_features(x)[0]


def build_lite_image_encoder(*, img_size: int = 256) -> TinyViT:
    """The LiteMedSAM image encoder (5.74M parameters, random init); load ``image_encoder.*`` weights strictly.

    ``img_size``: slice side (LiteMedSAM was trained at 256; the weights fit any side, see
    :func:`masksam_core.modeling.backbone.build_lite_backbone`).

    Its convolution weights are channel-last (``torch.channels_last``; loading weights keeps that):
    the attention stages hand their convolutions channel-last tokens, and oneDNN's CPU kernels then
    skip the layout conversions (a faster encoder on the CPU, docs/benchmarks.md; same results to
    float rounding, tested).
    """
    return TinyViT(img_size=img_size, in_chans=3, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                   num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), mlp_ratio=4.0,
                   mbconv_expand_ratio=4.0, local_conv_size=3, downsample_strides=(2, 2, 1),
                   ).to(memory_format=torch.channels_last)
