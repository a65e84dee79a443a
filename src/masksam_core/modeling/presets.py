"""Named MaskSAM configurations and ``build_model``.

A preset is a frozen dataclass; ``build_model`` composes the network from it
with explicit keyword arguments. The paper's presets (acdc, synapse, amos)
follow its Table 5; ``lite`` and ``tiny`` are this project's own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError
from .backbone import PRETRAINED, build_backbone, load_sam_backbone
from .masksam import DECODER_WIDTHS, PROMPT_MODES, MaskSAM


@dataclass(frozen=True)
class Preset:
    """One MaskSAM configuration.

    Attributes:
        name: registry name.
        backbone: base SAM backbone (``vit_b``, ``vit_h``, ``lite``, ``tiny``, ...).
        patch_size: (T, H, W) of a training/inference patch, in voxels.
        sam_image_size: side of each slice as SAM sees it (> H means CNN upsampling).
        num_queries: Q, masks predicted per slice.
        num_classes: default number of classes, background included.
        epochs: training epochs (250 iterations each).
        decoder_stages: stages of the prompt generator.
        decoder_widths: their widths, deepest first.
        mask_loss_weight: weight of the mask BCE and Dice losses.
        num_points: points sampled per mask for the mask losses.
        description: one line for ``masksam-core info``.
    """

    name: str
    backbone: str
    patch_size: tuple[int, int, int]
    sam_image_size: int
    num_queries: int
    num_classes: int
    epochs: int
    decoder_stages: int
    decoder_widths: tuple[int, ...] = DECODER_WIDTHS
    mask_loss_weight: float = 1.5
    num_points: int = 128 * 128 * 2
    description: str = ""


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


register_preset(Preset(
    name="acdc", backbone="vit_b", patch_size=(4, 256, 256), sam_image_size=1024, num_queries=8,
    num_classes=4, epochs=500, decoder_stages=4,
    description="cardiac MR (paper: ACDC); SAM ViT-B at 1024² after CNN upsampling",
))
register_preset(Preset(
    name="synapse", backbone="vit_h", patch_size=(26, 256, 256), sam_image_size=256, num_queries=24,
    num_classes=14, epochs=1000, decoder_stages=6,
    description="abdominal CT (paper: Synapse); SAM ViT-H at 256²",
))
register_preset(Preset(
    name="amos", backbone="vit_h", patch_size=(9, 512, 512), sam_image_size=512, num_queries=24,
    num_classes=16, epochs=1000, decoder_stages=6, mask_loss_weight=1.2, num_points=256 * 256 * 2,
    description="abdominal CT/MR (paper: AMOS22); SAM ViT-H at 512²",
))
register_preset(Preset(
    name="lite", backbone="lite", patch_size=(4, 256, 256), sam_image_size=256, num_queries=16,
    num_classes=9, epochs=250, decoder_stages=4, decoder_widths=(96, 96, 64, 32),
    description="LiteMedSAM (TinyViT, 5.7M) at 256²; 4 slices, 16 queries, a slim prompt generator "
                "(6.5M trainable, 13 MB in fp16); fast on small GPUs and CPUs",
))
register_preset(Preset(
    name="tiny", backbone="tiny", patch_size=(4, 64, 64), sam_image_size=64, num_queries=10,
    num_classes=3, epochs=20, decoder_stages=4, decoder_widths=(32, 32, 16, 16), num_points=32 * 32 * 2,
    description="small random ViT for tests and quick CPU runs (no pretrained weights)",
))


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ModelError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def resolve_preset(preset: str | Preset, **overrides: Any) -> Preset:
    """The preset with ``overrides`` applied (unknown names are a clear error)."""
    base = get_preset(preset)
    fields = {f.name for f in dataclasses.fields(Preset)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    if "patch_size" in overrides:
        overrides["patch_size"] = tuple(int(v) for v in overrides["patch_size"])
    return dataclasses.replace(base, **overrides)


def build_model(
    preset: str | Preset,
    base_checkpoint: str | os.PathLike[str] | None = None,
    *,
    num_classes: int | None = None,
    in_channels: int = 1,
    prompt_mode: str = "auto",
    pretrained: bool = True,
    progress: bool = True,
    **overrides: object,
) -> MaskSAM:
    """Build MaskSAM from a preset.

    Args:
        preset: a name in :data:`PRESETS` or a :class:`Preset`.
        base_checkpoint: local file with the base SAM weights; ``None`` fetches
            the published weights (cached after the first download).
        num_classes: classes including background (default: the preset's).
        in_channels: image channels (modalities) of the data.
        prompt_mode: ``auto`` (prompt generator) or ``gt`` (prompts from labels).
        pretrained: ``False`` builds with random base weights and reads no file.
        overrides: any :class:`Preset` field, e.g. ``patch_size=(4, 128, 128)``.
    """
    p = resolve_preset(preset, **overrides)
    if prompt_mode not in PROMPT_MODES:
        raise ModelError(f"prompt mode must be one of {', '.join(PROMPT_MODES)}, not {prompt_mode!r}")
    if pretrained and p.backbone in PRETRAINED:
        sam = load_sam_backbone(p.backbone, base_checkpoint, image_size=p.sam_image_size, progress=progress)
    else:
        sam = build_backbone(p.backbone, image_size=p.sam_image_size)
    try:
        return MaskSAM(
            sam=sam,
            in_channels=in_channels,
            num_classes=num_classes or p.num_classes,
            patch_size=p.patch_size,
            num_queries=p.num_queries,
            prompt_mode=prompt_mode,
            decoder_stages=p.decoder_stages,
            decoder_widths=p.decoder_widths,
        )
    except ValueError as error:
        raise ModelError(f"preset {p.name!r} cannot be built with these settings: {error}") from None


def slice_size(preset: Preset, patch_size: Sequence[int] | None, sam_image_size: int | None) -> int:
    """The side of each slice as SAM sees it: ``sam_image_size`` when given, else the preset's,
    scaled by the patch's in-plane size over the preset's (a smaller patch keeps the preset's
    upsampling: ``lite`` with 4x128x128 patches runs LiteMedSAM at 128x128, ``acdc`` with
    128x128 patches runs SAM at 512x512)."""
    if sam_image_size is not None:
        return int(sam_image_size)
    if patch_size is None:
        return int(preset.sam_image_size)
    return round(preset.sam_image_size * int(patch_size[1]) / preset.patch_size[1])
