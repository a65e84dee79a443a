"""Small run folders for tests: plans and a random-weight ``tiny`` MaskSAM checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch


def make_plans(target_spacing, num_classes=2, mean=300.0, std=100.0):
    """Plans with CT normalisation (x - mean) / std after clipping to [0, 1000]."""
    names = ["background", "object", "other"][:num_classes]
    return {
        "version": 1, "dataset_name": "Dataset999_Test", "preset": "tiny", "patch_size": [4, 16, 16],
        "target_spacing": [float(s) for s in target_spacing],
        "separate_z": {"threshold": 3.0, "image_order": 3, "image_order_z": 0, "label_order": 1,
                       "label_order_z": 0, "probability_order": 1, "probability_order_z": 0},
        "normalization": [{"channel": 0, "channel_name": "CT", "scheme": "ct", "mean": mean, "std": std,
                           "lower": 0.0, "upper": 1000.0}],
        "channel_names": {"0": "CT"}, "in_channels": 1, "class_names": names, "num_classes": num_classes,
    }



def write_tiny_run(root: Path, prompt_mode: str = "auto") -> Path:
    """A run folder: random-weight ``tiny`` MaskSAM (patch 2×32×32, 3 queries, 3 classes), trainer format."""
    from masksam_core.files import atomic_save
    from masksam_core.modeling import build_model
    from masksam_core.runs import FORMAT

    torch.manual_seed(0)
    overrides = {"patch_size": [2, 32, 32], "num_queries": 3}
    model = build_model("tiny", None, num_classes=3, in_channels=1, prompt_mode=prompt_mode, pretrained=False,
                        **overrides)
    atomic_save({
        "kind": "masksam-run", "format": FORMAT, "model": model.trainable_state_dict(),
        "build": {"preset": "tiny", "overrides": overrides, "num_classes": 3, "in_channels": 1,
                  "prompt_mode": prompt_mode},
        "base_weights": {"name": "tiny", "sha256": None, "path": None},
        "sam": model.sam.state_dict(), "plans": make_plans((2.0, 1.5, 1.5), num_classes=3),
        "class_names": ["background", "object", "other"],
    }, root / "checkpoint_last.pt")
    return root


