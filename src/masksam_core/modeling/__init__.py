"""MaskSAM's network: backbones, adapters, prompt generator, decoder and presets."""

from .backbone import SamBackbone, backbone_names, build_backbone, load_sam_backbone, register_backbone
from .heads import semantic_scores
from .masksam import MaskSAM, gt_prompts
from .presets import PRESETS, Preset, build_model, get_preset, register_preset
from .vit import checkpoint_filter_fn

__all__ = [
    "PRESETS",
    "MaskSAM",
    "Preset",
    "SamBackbone",
    "backbone_names",
    "build_backbone",
    "build_model",
    "checkpoint_filter_fn",
    "get_preset",
    "gt_prompts",
    "load_sam_backbone",
    "register_backbone",
    "register_preset",
    "semantic_scores",
]
