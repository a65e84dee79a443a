"""Training MaskSAM: per-slice targets, the Hungarian matcher, the set criterion and the training loop.

The settings (:class:`TrainConfig`) and the trainer's progress events (:class:`TrainEvent`, with
:func:`epoch_line` and :func:`format_duration` to show them) import without torch.
"""

from .config import TrainConfig
from .events import TrainEvent, epoch_line, format_duration

__all__ = ["TrainConfig", "TrainEvent", "epoch_line", "format_duration"]
