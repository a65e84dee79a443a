"""The settings of a training run (:class:`TrainConfig`), one per ``masksam-core train`` flag.

Each field is declared once with :func:`~.settings.setting`: its flag and help, its default for a new
run, its range rule and, where the napari Train widget shows it, its spin box's limits. The
``masksam-core train`` options (:func:`add_arguments`, :meth:`TrainConfig.from_args`), the new-run
defaults (:data:`NEW_RUN_DEFAULTS`, :func:`resolve_config`), the range checks (:func:`check_ranges`) and
the widget's defaults (:func:`widget_options`) all come from these declarations.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from ..errors import MaskSAMError
from . import settings
from .settings import AT_LEAST_0, AT_LEAST_1, POSITIVE, Limits, in_range, one_of, setting

__all__ = [
    "NEW_RUN_DEFAULTS",
    "ResolvedConfig",
    "TrainConfig",
    "add_arguments",
    "check_ranges",
    "resolve_config",
    "widget_options",
]


def _presets() -> list[str]:
    from ..modeling.presets import PRESETS

    return list(PRESETS)


def _augmentations() -> list[str]:
    from ..data.augment import AUGMENTATIONS

    return list(AUGMENTATIONS)


def _augmentation_help() -> str:
    from ..data.augment import AUGMENTATIONS

    return "training augmentation: " + "; ".join(f"{k}: {v}" for k, v in AUGMENTATIONS.items())


def _amp_choices() -> tuple[str, ...]:
    from ..devices import AMP_CHOICES

    return AMP_CHOICES


def _device_help() -> str:
    from ..devices import DEVICE_CHOICES

    return f"{', '.join(DEVICE_CHOICES)} or cuda:N"


@dataclass
class TrainConfig:
    """Every training setting; each is a ``masksam-core train`` flag. ``None``: the run's value when
    resuming, else :data:`NEW_RUN_DEFAULTS` (``epochs``: the preset's; resuming: the run's)."""

    dataset: str = setting("dataset", "data set folder with dataset.json, imagesTr, labelsTr", metavar="DATASET_DIR")
    out: str = setting("--out", "run folder to write (created if missing)", metavar="RUN_DIR")
    preset: str | None = setting("--preset", "model preset", choices=_presets, kept=True, new_run="lite")
    epochs: int | None = setting("--epochs", "epochs; with --resume, extends a run", default=None, type=int,
                                 shown_default="the preset's", rule=AT_LEAST_1, widget=Limits(1, 100_000))
    iters_per_epoch: int | None = setting("--iters-per-epoch", "iterations per epoch", type=int, kept=True,
                                          new_run=250, rule=AT_LEAST_1, widget=Limits(1, 1_000_000))
    batch_size: int | None = setting("--batch-size", "patches per iteration and GPU", type=int, kept=True,
                                     new_run=2, rule=AT_LEAST_1, widget=Limits(1, 1024))
    lr: float | None = setting("--lr", "initial learning rate of AdamW", type=float, kept=True, new_run=1e-3,
                               rule=POSITIVE, widget=Limits(1e-5, 1.0, 1e-5))
    weight_decay: float | None = setting("--weight-decay", "AdamW weight decay", type=float, kept=True,
                                         new_run=1e-2, rule=AT_LEAST_0)
    device: str = setting("--device", _device_help, default="auto")
    amp: str = setting("--amp", "mixed precision", default="auto", choices=_amp_choices,
                       shown_default="auto = bf16 on CUDA, off elsewhere")
    prompt_mode: str | None = setting(
        "--prompt-mode", "auto: learned prompt generator (MaskSAM); gt: prompts from the labels (box-prompt model)",
        choices=("auto", "gt"), kept=True, new_run="auto")
    val_cases: tuple[str, ...] | None = setting("--val-cases", "case ids held out for validation", nargs="+",
                                                metavar="CASE", kept=True, new_run=())
    val_fraction: float | None = setting(
        "--val-fraction", "without --val-cases: fraction of cases held out, or for a single-case data set the "
        "fraction of its slices (a slab at the end); 0 = no validation", type=float, kept=True, new_run=0.2,
        rule=in_range(lambda v: 0 <= v < 1,
                      "must be at least 0 (no validation) and below 1 (some data must be left to train on)"),
        widget=Limits(0.0, 0.9, 0.05))
    val_every: int | None = setting("--val-every", "validate every N epochs", type=int, kept=True, new_run=1,
                                    rule=AT_LEAST_1)
    seed: int | None = setting("--seed", "random seed", type=int, kept=True, new_run=0)
    resume: bool = setting(
        "--resume", "continue the run in RUN_DIR from checkpoint_last.pt, with its settings (the model, data and "
        "optimisation flags may be left out; a different value is an error); a larger --epochs extends it",
        default=False, type=bool)
    base_checkpoint: str | None = setting("--base-checkpoint", "local file with the base SAM weights (skips the "
                                          "download)", default=None, metavar="PATH")
    time_limit: float | None = setting(
        "--time-limit", "save and stop after this many minutes", default=None, type=float, metavar="MINUTES",
        rule=in_range(lambda v: v > 0, "must be positive (minutes)"), widget=Limits(0, 1e6))
    num_workers: int = setting("--num-workers", "background data-loading processes", default=2, type=int,
                               rule=AT_LEAST_0, widget=Limits(0, 64))
    grad_checkpointing: bool | None = setting(
        "--grad-checkpointing", "recompute the frozen encoder's blocks, the prompt generator's stages and the mask "
        "decoder (4 queries at a time) in the backward pass: the same gradients for about a third more time per "
        "step and a fraction of the memory (lite, batch 2, CPU: 9 instead of 23 GiB)", default=None, type=bool,
        shown_default="on for CPUs when a step's activations would take more than half the free memory, else off")
    compile: bool = setting("--compile", "torch.compile the network: a slow first step, then faster ones on GPUs "
                            "(on CPUs it does not pay)", default=False, type=bool)
    patch_size: tuple[int, int, int] | None = setting(
        "--patch-size", "override the preset's patch size", type=int, nargs=3, metavar=("T", "H", "W"), kept=True,
        rule=in_range(lambda v: min(v) >= 1, "must be 3 positive sizes T H W"))
    sam_image_size: int | None = setting(
        "--sam-image-size", "side of each slice as SAM sees it", type=int, metavar="S", kept=True, rule=POSITIVE,
        shown_default="the preset's, scaled with --patch-size: lite with --patch-size 4 128 128 runs LiteMedSAM "
        "at 128x128")
    num_queries: int | None = setting("--num-queries", "override the preset's number of queries", type=int,
                                      kept=True, rule=AT_LEAST_1, widget=Limits(0, 1024))
    augmentation: str | None = setting("--augmentation", _augmentation_help, choices=_augmentations, kept=True,
                                       new_run="full", rule=one_of(_augmentations))
    cache_dir: str | None = setting("--cache-dir", "preprocessed-data cache", default=None, metavar="DIR",
                                    shown_default="RUN_DIR/preprocessed")
    overrides: dict[str, Any] = field(default_factory=dict)  # preset fields beyond the flags (tests, benchmarks)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The settings parsed by a parser that :func:`add_arguments` filled."""
        config: TrainConfig = settings.from_args(cls, args)
        return config


if TYPE_CHECKING:

    class ResolvedConfig(TrainConfig):
        """A :class:`TrainConfig` after :func:`resolve_config`: the kept settings with a new-run default
        are filled (the model overrides ``patch_size``, ``sam_image_size``, ``num_queries`` may stay None)."""

        preset: str
        iters_per_epoch: int
        batch_size: int
        lr: float
        weight_decay: float
        prompt_mode: str
        val_cases: tuple[str, ...]
        val_fraction: float
        val_every: int
        seed: int
        augmentation: str
else:
    ResolvedConfig = TrainConfig


# Settings a resumed run takes from its checkpoint when left None (a different value is an error).
NEW_RUN_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {f.name: s.new_run for f, s in settings.settings(TrainConfig) if s.kept})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``masksam-core train`` arguments, one per setting."""
    settings.add_arguments(parser, TrainConfig)


def widget_options(name: str) -> dict[str, Any]:
    """``min``, ``max``, ``step`` and ``value`` (the new run's) of the spin box for setting ``name``."""
    return settings.widget_options(TrainConfig, name)


def _norm(value: Any) -> Any:
    return [_norm(v) for v in value] if isinstance(value, (list, tuple)) else value


def resolve_config(config: TrainConfig, saved: dict[str, Any] | None = None) -> ResolvedConfig:
    """``config`` with every ``None`` of :data:`NEW_RUN_DEFAULTS` filled: from ``saved`` (the checkpoint's
    config) when resuming, else with the defaults. A value given that differs from the run's raises
    :class:`MaskSAMError`: a resumed run trains on exactly as it began."""
    values: dict[str, Any] = {}
    for f, s in settings.settings(TrainConfig):
        if not s.kept:
            continue
        given = getattr(config, f.name)
        was = s.new_run if saved is None else saved.get(f.name, s.new_run)
        if saved is not None and given is not None and _norm(given) != _norm(was):
            raise MaskSAMError(f"{config.out} was trained with {s.flag} {_norm(was)}, not {_norm(given)}: resume "
                               f"with the same value (or leave {s.flag} out), or start a new run with another --out")
        value = was if given is None else given
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cast(ResolvedConfig, dataclasses.replace(config, **values))


def check_ranges(config: TrainConfig, epochs: int) -> None:
    """Raise :class:`MaskSAMError` naming the flag and its rule for a resolved value (or ``epochs``, the
    run's resolved number of epochs) out of range."""
    settings.check(dataclasses.replace(config, epochs=epochs))
