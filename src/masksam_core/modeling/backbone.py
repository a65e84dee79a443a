"""Base Segment Anything backbones: a registry of builders and ``load_sam_backbone``.

A backbone is the three modules of a SAM-family model (segment-anything's own
``PromptEncoder`` and ``MaskDecoder`` wherever SAM has them) plus the facts the
MaskSAM network needs about them. Backbones are built from explicit keyword
arguments; the registry maps a name to its builder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from ..errors import ModelError
from .vit import build_vit_encoder, checkpoint_filter_fn

# Intensity normalisation SAM expects on 0-255 RGB input (from segment-anything's Sam).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class SamBackbone(nn.Module):
    """A SAM-family model: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

    State-dict keys are those of the published checkpoints (``image_encoder.*``,
    ``prompt_encoder.*``, ``mask_decoder.*``).

    Attributes:
        name: registry name (``vit_b``, ``lite``, ...).
        kind: ``"vit"`` (segment-anything ViT) or ``"tiny_vit"`` (LiteMedSAM).
        image_size: input slice side in pixels.
        embedding_size: side of the image embedding (tokens).
        feature_channels / feature_sizes: channels and side of the four
            intermediate feature maps MaskSAM's prompt generator uses as skips,
            deepest first.
        feature_blocks: (ViT) indexes of the blocks whose outputs are those
            features, in block order (the global-attention blocks).
        pixel_mean / pixel_std: the input normalisation the pretrained weights expect
            (on a 0-255 scale).
        weights: where the loaded weights came from (``None`` for random weights).
    """

    def __init__(
        self,
        *,
        name: str,
        kind: str,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
        embedding_size: int,
        feature_channels: tuple[int, ...],
        feature_sizes: tuple[int, ...],
        feature_blocks: tuple[int, ...] = (),
        pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = SAM_PIXEL_STD,
    ) -> None:
        super().__init__()
        self.name = name
        self.kind = kind
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.embedding_size = embedding_size
        self.feature_channels = feature_channels
        self.feature_sizes = feature_sizes
        self.feature_blocks = feature_blocks
        self.pixel_mean = pixel_mean
        self.pixel_std = pixel_std
        self.weights: dict[str, str] | None = None

    @property
    def prompt_dim(self) -> int:
        return self.prompt_encoder.embed_dim

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The base model with box prompts on single slices (SAM's own inference, no adapters).

        images (N, 3, S, S), already normalised as the backbone expects (``pixel_mean``/``pixel_std``);
        boxes (N, K, 4) in pixels of S (x0, y0, x1, y1) → low-resolution mask logits (N, K, 4h, 4h) of
        mask token 0 (``multimask_output=False``). Each slice is encoded once and decoded for its K
        boxes, so the result is exactly what segment-anything's modules return for it. This is the one
        zero-shot path: ``MaskSAM.zero_shot`` and the box prompter both call it.
        """
        embeddings = self.image_encoder(images)
        pe = self.prompt_encoder.get_dense_pe()
        out = []
        for emb, slice_boxes in zip(embeddings, boxes, strict=True):
            sparse, dense = self.prompt_encoder(points=None, boxes=slice_boxes, masks=None)
            masks, _ = self.mask_decoder(
                image_embeddings=emb[None],
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            out.append(masks[:, 0])
        return torch.stack(out)


def build_prompt_and_decoder(
    *,
    prompt_dim: int,
    embedding_size: int,
    image_size: int,
    mask_in_chans: int = 16,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = 8,
    iou_head_hidden_dim: int = 256,
) -> tuple[PromptEncoder, MaskDecoder]:
    """segment-anything's prompt encoder and mask decoder with SAM's layout."""
    prompt_encoder = PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim, num_heads=decoder_heads
        ),
        transformer_dim=prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    return prompt_encoder, mask_decoder


def build_vit_backbone(
    *,
    name: str,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: tuple[int, ...],
    feature_blocks: tuple[int, ...] | None = None,
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = 8,
    iou_head_hidden_dim: int = 256,
) -> SamBackbone:
    """A segment-anything ViT backbone for ``image_size``² slices (random weights)."""
    if image_size % patch_size:
        raise ModelError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    embedding_size = image_size // patch_size
    encoder = build_vit_encoder(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        global_attn_indexes=global_attn_indexes,
        image_size=image_size,
        patch_size=patch_size,
        window_size=window_size,
        out_chans=prompt_dim,
    )
    prompt_encoder, mask_decoder = build_prompt_and_decoder(
        prompt_dim=prompt_dim,
        embedding_size=embedding_size,
        image_size=image_size,
        mask_in_chans=mask_in_chans,
        decoder_mlp_dim=decoder_mlp_dim,
        decoder_heads=decoder_heads,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    return SamBackbone(
        name=name,
        kind="vit",
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        image_size=image_size,
        embedding_size=embedding_size,
        feature_channels=(embed_dim,) * 4,
        feature_sizes=(embedding_size,) * 4,
        feature_blocks=tuple(feature_blocks if feature_blocks is not None else global_attn_indexes),
    )


def build_lite_backbone(*, image_size: int = 256) -> SamBackbone:
    """LiteMedSAM: a TinyViT image encoder with SAM's prompt encoder and mask decoder.

    LiteMedSAM was trained on 256x256 slices; TinyViT has no absolute position
    embedding (only biases within its attention windows), so the same weights
    run on any slice side that is a multiple of 64 (embedding side ``image_size / 4``).
    Smaller slices pay where scans are small: a 3 mm abdominal CT slice of
    101x122 voxels fits 128x128, a quarter of the work of 256x256.
    """
    from .tiny_vit import build_lite_image_encoder

    if image_size % 64 or image_size < 64:
        raise ModelError(
            f"the lite backbone (LiteMedSAM) takes slices whose side is a multiple of 64 "
            f"(256 as trained, or 64, 128, 192, 320, ...), not {image_size}x{image_size}"
        )
    embedding = image_size // 4
    encoder = build_lite_image_encoder(img_size=image_size)
    prompt_encoder, mask_decoder = build_prompt_and_decoder(
        prompt_dim=256, embedding_size=embedding, image_size=image_size
    )
    # TinyViT stages (deepest first), at 256x256: 320@64², 160@64², 128@128², 64@256².
    return SamBackbone(
        name="lite",
        kind="tiny_vit",
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        image_size=image_size,
        embedding_size=embedding,
        feature_channels=(320, 160, 128, 64),
        feature_sizes=(embedding, embedding, image_size // 2, image_size),
        pixel_mean=(0.0, 0.0, 0.0),
        pixel_std=(255.0, 255.0, 255.0),
    )


BackboneBuilder = Callable[..., SamBackbone]
_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str, builder: BackboneBuilder) -> None:
    """Make ``builder(image_size=...)`` available as backbone ``name``."""
    _BACKBONES[name] = builder


def backbone_names() -> list[str]:
    return list(_BACKBONES)


def _vit(name: str, embed_dim: int, depth: int, num_heads: int, globals_: tuple[int, ...]) -> BackboneBuilder:
    def build(*, image_size: int = 1024) -> SamBackbone:
        return build_vit_backbone(
            name=name,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            global_attn_indexes=globals_,
            image_size=image_size,
        )

    build.__doc__ = f"SAM {name}: ViT with {depth} blocks of width {embed_dim}, {num_heads} heads."
    return build


def build_tiny_backbone(*, image_size: int = 64) -> SamBackbone:
    """A small random ViT SAM for tests and quick CPU runs (no pretrained weights).

    Patch size 4 (a 16² image embedding for 64² slices, so SAM's 4x upscaling gives masks at
    the full 64²), width 48, 4 blocks (windowed attention in blocks 0 and 2, global in 1 and 3;
    every block's output is a skip feature), prompt/decoder width 64.

    The prompt encoder and mask decoder stay frozen like a pretrained SAM's, so they must
    be wide enough to carry a prompt through at random: at width 32 (a 2-channel first
    mask-prompt convolution, 4 output channels per pixel) every query's mask came out
    nearly the same, whatever its prompt, and classes were lost in training. With patch
    size 8 (an 8² embedding, masks at 32²) the final masks were coarser than the prompt
    generator's own (box Dice 0.84 against 0.96 on held-out phantoms) and training took twice
    as many iterations to reach Dice 0.9.
    """
    return build_vit_backbone(
        name="tiny",
        embed_dim=48,
        depth=4,
        num_heads=3,
        global_attn_indexes=(1, 3),
        feature_blocks=(0, 1, 2, 3),
        image_size=image_size,
        patch_size=4,
        window_size=4,
        prompt_dim=64,
        mask_in_chans=16,
        decoder_mlp_dim=128,
        decoder_heads=2,
        iou_head_hidden_dim=32,
    )


register_backbone("vit_b", _vit("vit_b", 768, 12, 12, (2, 5, 8, 11)))
register_backbone("vit_l", _vit("vit_l", 1024, 24, 16, (5, 11, 17, 23)))
register_backbone("vit_h", _vit("vit_h", 1280, 32, 16, (7, 15, 23, 31)))
register_backbone("lite", build_lite_backbone)
register_backbone("tiny", build_tiny_backbone)

# Backbones that have published weights (a name in masksam_core.weights).
PRETRAINED = ("vit_b", "vit_l", "vit_h", "lite")


def build_backbone(name: str, *, image_size: int | None = None) -> SamBackbone:
    """Build backbone ``name`` with random weights (``image_size`` None: its default)."""
    if name not in _BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; known: {', '.join(_BACKBONES)}")
    kwargs = {} if image_size is None else {"image_size": image_size}
    return _BACKBONES[name](**kwargs)


def load_sam_backbone(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    pretrained: bool = True,
    progress: bool = True,
) -> SamBackbone:
    """Build backbone ``name`` and load its pretrained weights.

    Args:
        name: ``vit_b``, ``vit_l``, ``vit_h``, ``lite`` or ``tiny``.
        checkpoint: a local weights file; ``None`` fetches the published weights
            (cached by :mod:`masksam_core.weights`, downloaded once if needed).
        image_size: input slice side (ViT backbones: any multiple of 16; the
            position embeddings are adapted by :func:`checkpoint_filter_fn`).
        pretrained: ``False`` keeps random weights (no file is read).

    Every weight is read with ``torch.load(..., weights_only=True)``. ``tiny``
    has no published weights and is always random.
    """
    from .. import weights

    backbone = build_backbone(name, image_size=image_size)
    if not pretrained or name not in PRETRAINED:
        if checkpoint is not None and name not in PRETRAINED:
            raise ModelError(f"backbone {name!r} has no pretrained weights; do not pass a checkpoint")
        return backbone
    path = weights.fetch(name, checkpoint=checkpoint, progress=progress)
    state = weights.load_state_dict(path)
    sam_parts = ("image_encoder", "prompt_encoder", "mask_decoder")
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in sam_parts}
    weights.check_backbone(state, name)
    state = checkpoint_filter_fn(state, backbone)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelError(f"the weights in {path} do not fit backbone {name!r}: {error}") from None
    backbone.weights = {"name": name, "path": str(Path(path).resolve())}
    return backbone

