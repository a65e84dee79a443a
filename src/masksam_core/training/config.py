"""The settings of a training run (:class:`TrainConfig`), one per ``masksam-core train`` flag.

How ``None`` values are filled (new run or resumed one) and checked: :func:`.checkpoint.resolve_config`
and :func:`.checkpoint.check_ranges`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Every training setting; each is a ``masksam-core train`` flag. ``None``: the run's value when
    resuming, else :data:`~.checkpoint.NEW_RUN_DEFAULTS` (``epochs``: the preset's; resuming: the run's)."""

    dataset: str
    out: str
    preset: str | None = None
    epochs: int | None = None
    iters_per_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    device: str = "auto"
    amp: str = "auto"
    prompt_mode: str | None = None
    val_cases: tuple[str, ...] | None = None
    val_fraction: float | None = None
    val_every: int | None = None
    seed: int | None = None
    resume: bool = False
    base_checkpoint: str | None = None
    time_limit: float | None = None
    num_workers: int = 2
    grad_checkpointing: bool | None = None  # None: on for CPUs whose memory the step would crowd, else off
    compile: bool = False
    patch_size: tuple[int, int, int] | None = None
    num_queries: int | None = None
    sam_image_size: int | None = None  # None: the preset's, scaled with patch_size (see modeling.presets.slice_size)
    augmentation: str | None = None
    cache_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
