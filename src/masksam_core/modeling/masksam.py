"""The MaskSAM network: frozen SAM + 3D adapters, prompt generator and mask classification.

Data flow for a patch x (B, C, T, H, W), N = B*Q*T prompts:

    first_conv → (B, 3, T, S, S) → slices (B*T, 3, S, S)
    image encoder (frozen) + depth embedding + DConvAdapters → neck, 4 features
    prompt generator (``auto``) or labels (``gt``) → per query and slice: a mask
        prompt, a box prompt and (``auto``) a classifier token
    prompt encoder (frozen) → sparse and dense embeddings; dense PE + depth PE
    mask decoder (frozen) + classifier token + adapters → low-res mask, class logits
    final_conv → mask logits (B, Q, T, H, W)

Only the modules outside ``self.sam`` are trainable; ``self.sam`` stays frozen
and in eval mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import SamBackbone
from .decoder3d import DecoderAdapters
from .encoder3d import TinyViTAdapters, ViTAdapters
from .heads import FinalConv, FirstConv, mask_boxes, order_box, semantic_scores
from .prompt_generator import PromptGenerator

PROMPT_MODES = ("auto", "gt")
DECODER_WIDTHS = (256, 256, 128, 128, 64, 64)  # deepest first (docs/method.md, "Prompt generator")
CHECKPOINT_QUERY_CHUNK = 4  # queries per recomputed decoder call under gradient checkpointing


def decoder_sizes(embedding_size: int, patch_size: int, stages: int) -> tuple[int, ...]:
    """In-plane size of each prompt-generator stage: constant, then doubling to the patch size."""
    ups = round(math.log2(patch_size / embedding_size))
    if 2**ups * embedding_size != patch_size or ups < 0:
        raise ValueError(f"patch size {patch_size} is not embedding size {embedding_size} times a power of 2")
    if stages < ups + 1:
        raise ValueError(f"{stages} decoder stages cannot upsample {embedding_size} to {patch_size}")
    return (embedding_size,) * (stages - ups) + tuple(embedding_size * 2 ** (i + 1) for i in range(ups))


class MaskSAM(nn.Module):
    """MaskSAM for patches of ``patch_size`` = (T, H, W) with ``in_channels`` channels.

    ``forward`` returns a dict (Q queries, C = ``num_classes`` incl. background):
    ``pred_logits`` (B, Q, T, C+1), ``pred_masks`` (B, Q, T, H, W) and, in ``auto``
    mode, ``aux_masks`` (B, Q, T, H, W) and ``aux_boxes`` (B, Q, T, 4) in [0, 1];
    ``prompt_boxes`` (B, Q, T, 4) are the boxes given to the prompt encoder.
    """

    def __init__(
        self,
        *,
        sam: SamBackbone,
        in_channels: int,
        num_classes: int,
        patch_size: tuple[int, int, int],
        num_queries: int,
        prompt_mode: str = "auto",
        decoder_stages: int = 6,
        decoder_widths: tuple[int, ...] = DECODER_WIDTHS,
        adapter_ratio: int = 4,
    ) -> None:
        super().__init__()
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, not {prompt_mode!r}")
        depth, height, width = patch_size
        if height != width:
            raise ValueError(f"patches must be square in-plane, got {height}x{width}")
        upsample = round(math.log2(sam.image_size / height))
        if upsample < 0 or height * 2**upsample != sam.image_size:
            raise ValueError(f"SAM input {sam.image_size} is not patch size {height} times a power of 2")
        self.sam = sam.requires_grad_(False).eval()
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.prompt_mode = prompt_mode
        dim = sam.prompt_dim
        h = sam.embedding_size

        self.first_conv = FirstConv(in_channels, upsample=upsample)
        encoder: Any = sam.image_encoder  # segment-anything's ImageEncoderViT (untyped) or TinyViT, by sam.kind
        if sam.kind == "vit":
            embed_dim = encoder.patch_embed.proj.out_channels
            self.encoder_adapters: ViTAdapters | TinyViTAdapters = ViTAdapters(
                embed_dim=embed_dim,
                num_blocks=len(encoder.blocks),
                depth=depth,
                bottleneck=embed_dim // adapter_ratio,
                feature_blocks=sam.feature_blocks,
            )
        else:
            self.encoder_adapters = TinyViTAdapters(
                stage_dims=tuple(encoder.embed_dims),
                stage_depths=tuple(encoder.depths),
                depth=depth,
                bottleneck_ratio=adapter_ratio,
            )
        if prompt_mode == "auto":
            sizes = decoder_sizes(h, height, decoder_stages)
            self.prompt_generator: PromptGenerator | None = PromptGenerator(
                neck_channels=dim,
                feature_channels=sam.feature_channels,
                feature_sizes=sam.feature_sizes,
                image_channels=in_channels,
                widths=tuple(decoder_widths[:decoder_stages]),
                sizes=sizes,
                depth=depth,
                num_queries=num_queries,
                token_dim=dim,
            )
        else:
            self.prompt_generator = None
        self.depth_pe = nn.Parameter(torch.zeros(depth, dim, h, h))
        self.decoder_adapters = DecoderAdapters(
            dim=dim, depth=depth, num_classes=num_classes, bottleneck_ratio=adapter_ratio
        )
        self.final_conv = FinalConv(in_size=sam.prompt_encoder.mask_input_size[0], out_size=height)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> MaskSAM:
        """Trade compute for memory in training: keep fewer activations and recompute the rest.

        With ``enable``, a training forward keeps for the backward pass only the inputs of the
        image encoder's blocks, of the prompt generator's stages, and of the prompt encoder, mask
        decoder and final_conv, which then run ``CHECKPOINT_QUERY_CHUNK`` queries at a time
        (unless ``query_chunk`` says otherwise); backward recomputes each piece. The outputs and
        gradients are those of the plain forward (tested); it costs about one more forward pass.
        """
        self.grad_checkpointing = enable
        for part in (self.encoder_adapters, self.prompt_generator):
            if part is not None:
                part.grad_checkpointing = enable
        return self

    def train(self, mode: bool = True) -> MaskSAM:
        super().train(mode)
        self.sam.eval()  # frozen SAM: BatchNorm statistics (TinyViT) must not move
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer outside the frozen SAM (what a checkpoint stores)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("sam.")}

    def forward(self, x: torch.Tensor, prompts: dict[str, torch.Tensor] | None = None, *,
                query_chunk: int | None = None) -> dict[str, torch.Tensor]:
        """x: (B, C, T, H, W). In ``gt`` mode ``prompts["masks"]`` (B, Q, T, H, W) bool
        holds one ground-truth mask per query (see :func:`gt_prompts`).

        ``query_chunk``: run the prompt encoder and mask decoder for this many queries at a
        time (``None``: all at once). The results are the same; small chunks keep
        the decoder's B*chunk*T per-prompt image tokens small (less memory). Chunks of
        one query with B = 1 are slow on the CPU (PyTorch's fallback 3D convolution).
        """
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk must be at least 1, got {query_chunk}")
        b, _, t, hh, ww = x.shape
        if (t, hh, ww) != tuple(self.patch_size):
            raise ValueError(f"expected patches of {tuple(self.patch_size)}, got {(t, hh, ww)}")
        sam = self.sam
        img = self.first_conv(x)
        s = img.shape[-1]
        slices = img.transpose(1, 2).reshape(b * t, 3, s, s)
        neck, features = self.encoder_adapters(sam.image_encoder, slices, t)

        def volume(f: torch.Tensor) -> torch.Tensor:
            return f.reshape(b, t, *f.shape[1:]).transpose(1, 2)

        out: dict[str, torch.Tensor] = {}
        if self.prompt_generator is not None:
            gen = self.prompt_generator(volume(neck), [volume(f) for f in features], x)
            out["aux_masks"], out["aux_boxes"] = gen["aux_masks"], gen["aux_boxes"]
            with torch.no_grad():
                binary = gen["aux_masks"].detach() > 0  # sigmoid > 0.5
                mbox, present = mask_boxes(binary)
            pbox = order_box(gen["aux_boxes"])
            boxes = torch.where(present[..., None], (pbox + mbox) / 2, pbox)
            cls_tokens = gen["cls_tokens"]
        else:
            if prompts is None or "masks" not in prompts:
                raise ValueError("gt prompt mode needs prompts={'masks': (B, Q, T, H, W)}")
            binary = prompts["masks"].bool()
            boxes, _ = mask_boxes(binary)
            cls_tokens = None
        q = binary.shape[1]
        out["prompt_boxes"] = boxes
        pe = sam.prompt_encoder.get_dense_pe() + self.depth_pe  # (T, D, h, w)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            step = min(query_chunk or CHECKPOINT_QUERY_CHUNK, q)
            parts = [
                checkpoint(self._decode_masks, neck, pe, binary[:, i : i + step], boxes[:, i : i + step],
                           None if cls_tokens is None else cls_tokens[:, i : i + step], s, img.dtype,
                           use_reentrant=False)
                for i in range(0, q, step)
            ]
            out["pred_masks"] = torch.cat([m for m, _ in parts], dim=1)
            out["pred_logits"] = torch.cat([lg for _, lg in parts], dim=1)
            return out
        step = q if query_chunk is None else min(query_chunk, q)
        parts = [
            self._decode(neck, pe, binary[:, i : i + step], boxes[:, i : i + step],
                         None if cls_tokens is None else cls_tokens[:, i : i + step], s, img.dtype)
            for i in range(0, q, step)
        ]
        low = parts[0][0] if len(parts) == 1 else torch.cat([m for m, _ in parts], dim=1)
        out["pred_masks"] = self.final_conv(low)  # all queries at once: CPU convolutions are slow on one
        out["pred_logits"] = parts[0][1] if len(parts) == 1 else torch.cat([lg for _, lg in parts], dim=1)
        return out

    def _decode_masks(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_decode` followed by final_conv: mask logits at the patch size and class logits."""
        low, logits = self._decode(*args)
        return self.final_conv(low), logits

    def _decode(self, neck: torch.Tensor, pe: torch.Tensor, binary: torch.Tensor, boxes: torch.Tensor,
                cls_tokens: torch.Tensor | None, image_size: int, dtype: torch.dtype,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder and mask decoder for q queries.

        neck (B*T, D, h, w); pe (T, D, h, w) dense positional encodings of the slices;
        binary (B, q, T, H, W) mask prompts; boxes (B, q, T, 4) in [0, 1];
        cls_tokens (B, q, T, D) or None; image_size: SAM's input side S; dtype: of the mask
        prompts (the first_conv output's) → low-resolution mask logits (B, q, T, 4h, 4w) and
        class logits (B, q, T, C+1).
        """
        sam = self.sam
        b, q, t, hh, ww = binary.shape
        n = b * q * t
        mask_in = F.interpolate(
            binary.reshape(n, 1, hh, ww).to(dtype), size=sam.prompt_encoder.mask_input_size, mode="bilinear"
        )
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes.reshape(n, 4) * image_size, masks=mask_in)

        masks, logits = self.decoder_adapters(
            sam.mask_decoder,
            neck,
            pe,
            sparse,
            dense,
            None if cls_tokens is None else cls_tokens.reshape(n, -1),
            t,
        )
        return masks.reshape(b, q, t, *masks.shape[-2:]), logits.reshape(b, q, t, -1)

    @torch.no_grad()
    def segment(self, x: torch.Tensor, prompts: dict[str, torch.Tensor] | None = None, *,
                query_chunk: int | None = None) -> torch.Tensor:
        """Per-class scores (B, C, T, H, W) by MaskFormer semantic inference."""
        out = self(x, prompts, query_chunk=query_chunk)
        return semantic_scores(out["pred_logits"], out["pred_masks"])

    def zero_shot(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Base SAM with every adapter off: box prompts on single slices.

        images (N, 3, S, S), already normalised as the backbone expects;
        boxes (N, K, 4) in pixels of S (x0, y0, x1, y1) → low-resolution mask
        logits (N, K, 4h, 4h) of mask token 0. This is :meth:`SamBackbone.zero_shot`
        on the frozen ``self.sam``, so it returns exactly what the base model returns.
        """
        return self.sam.zero_shot(images, boxes)


def gt_prompts(labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Ground-truth prompts for ``gt`` mode: one query per class id.

    labels (B, T, H, W) int → {"masks": (B, C, T, H, W) bool}.
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1, 1)
    return {"masks": labels.unsqueeze(1) == classes}
