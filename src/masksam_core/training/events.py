"""What the trainer reports while it runs (:class:`TrainEvent`), and how the command line and the napari
Train widget put an epoch into words (:func:`epoch_line`, :func:`format_duration`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TrainEvent", "epoch_line", "format_duration"]


@dataclass
class TrainEvent:
    """What the trainer reports: ``kind`` is setup, epoch_start, iteration, validation (``iteration``
    windows done of ``iterations``), epoch, stopped or done."""

    kind: str
    epoch: int = 0
    epochs: int = 0
    iteration: int = 0
    iterations: int = 0
    loss: float = float("nan")
    lr: float = float("nan")
    metrics: dict[str, Any] | None = None
    message: str = ""


def format_duration(seconds: float) -> str:
    """'42 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def epoch_line(event: TrainEvent, eta_seconds: float | None) -> str:
    """One line per finished epoch: 'epoch 3/20: loss 1.2345, lr 8.71e-04, val mean Dice 0.812 (41 s, ...)'."""
    m = event.metrics or {}
    dice = f", val mean Dice {m['val_mean_dice']:.3f}" if "val_mean_dice" in m else ""
    left = (f", about {format_duration(eta_seconds)} left"
            if eta_seconds is not None and event.epoch < event.epochs else "")
    return (f"epoch {event.epoch}/{event.epochs}: loss {event.loss:.4f}, lr {event.lr:.2e}{dice} "
            f"({format_duration(m.get('seconds', 0.0))}{left})")
