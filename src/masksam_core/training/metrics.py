"""Training metrics: Dice per class, validation by sliding window, and the loss/Dice curves of a run."""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..files import atomic_path
from ..progress import drive, relay

if TYPE_CHECKING:
    from ..modeling.masksam import MaskSAM


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each label value 0..C-1 between two label maps of the same shape.

    Returns (C,) float64; NaN where the class is absent from both (nothing to score).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    p = pred.reshape(-1).astype(np.int64)
    t = truth.reshape(-1).astype(np.int64)
    inter = np.bincount(p[p == t], minlength=num_classes)[:num_classes].astype(np.float64)
    sizes = (np.bincount(p, minlength=num_classes)[:num_classes] + np.bincount(t, minlength=num_classes)[:num_classes])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, 2 * inter / sizes, np.nan)


@torch.no_grad()
def validate(model: MaskSAM, volumes: Sequence[tuple[Any, Any]], class_names: Sequence[str],
             device: torch.device, amp: torch.dtype | None) -> dict[str, Any]:
    """Segment each (image (C, Z, Y, X), labels (Z, Y, X)) pair with ``model`` (half-overlapping
    windows, accumulated on the CPU; a ``gt``-mode model gets its prompts from the labels) and score it.

    Returns ``val_dice`` (foreground class name -> Dice averaged over the volumes holding the class,
    None where none does) and ``val_mean_dice`` (their mean; 0.0 when no class was present). Leaves
    ``model`` in eval mode. :func:`validate_iter` is the same with progress and a way to stop.
    """
    scores = drive(validate_iter(model, volumes, class_names, device, amp))
    assert scores is not None  # without should_stop the validation is never cut short
    return scores


def validate_on_main(model: MaskSAM, volumes: Sequence[tuple[Any, Any]], class_names: Sequence[str],
                     device: torch.device, amp: torch.dtype | None,
                     should_stop: Callable[[], bool]) -> Generator[tuple[int, int], None, dict | None]:
    """:func:`validate_iter` on rank 0 while the other ranks wait at a barrier (they return {})."""
    from . import distributed as dist

    result: dict | None = {}
    if dist.is_main():
        result = yield from validate_iter(model, volumes, class_names, device, amp, should_stop)
    dist.barrier()
    return result


def validate_iter(model: MaskSAM, volumes: Sequence[tuple[Any, Any]], class_names: Sequence[str],
                  device: torch.device, amp: torch.dtype | None,
                  should_stop: Callable[[], bool] | None = None) -> Generator[tuple[int, int], None, dict | None]:
    """:func:`validate` yielding (windows done, windows in all) after each window; returns None,
    without scoring, as soon as ``should_stop()`` is true (asked before each window and after the last)."""
    from ..inference.predictor import count_windows
    from ..inference.sliding_window import Progress, sliding_window
    from ..modeling import gt_prompts, semantic_scores

    model.eval()
    gt_mode = model.prompt_mode == "gt"
    c = model.num_classes

    def predictor(window: torch.Tensor) -> torch.Tensor:
        image = window[:, :-1] if gt_mode else window
        prompts = gt_prompts(window[:, -1].round().long(), c) if gt_mode else None
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(image, prompts)  # no graph kept: validation runs between training steps
        return semantic_scores(out["pred_logits"], out["pred_masks"])

    counts = [count_windows(np.shape(image)[1:], model.patch_size, 0.5) for image, _ in volumes]
    total = sum(counts)
    dices, done = [], 0
    asked = 0

    def stop_after_a_window() -> bool:
        # relay asks before each window; the first window of a validation always runs, so a stop that came
        # during training still shows the validation started and its grad-free forward, then ends it
        nonlocal asked
        asked += 1
        return asked > 1 and should_stop is not None and bool(should_stop())

    for (image, labels), count in zip(volumes, counts, strict=True):
        volume = torch.from_numpy(np.array(image, dtype=np.float32))
        if gt_mode:
            volume = torch.cat([volume, torch.from_numpy(np.array(labels, dtype=np.float32))[None]])
        windows = sliding_window(volume, predictor, model.patch_size, device=device, accumulate_on="cpu", batch_size=1)
        def counted(progress: Progress, before: int = done) -> tuple[int, int]:
            return before + progress.done, total

        scores = yield from relay(windows, counted, stop_after_a_window)
        if scores is None:  # stopped
            return None
        done += count
        dices.append(dice_per_class(scores.argmax(0).numpy(), np.asarray(labels), c))
    table = np.array(dices, dtype=np.float64)
    present = np.isfinite(table).sum(axis=0)
    per_class = np.where(present > 0, np.nansum(table, axis=0) / np.maximum(present, 1), np.nan)
    result: dict[str, Any] = {
        "val_dice": {class_names[i]: (None if np.isnan(d) else float(d)) for i, d in enumerate(per_class) if i > 0}}
    fg = per_class[1:]
    result["val_mean_dice"] = float(np.nanmean(fg)) if np.isfinite(fg).any() else 0.0
    return result


def _value(x: Any) -> float:
    """A metric for plotting: missing (None) is a gap (NaN); 0.0 stays 0.0."""
    return np.nan if x is None else float(x)


def curve_series(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The curves of ``curves.png`` from ``metrics.jsonl`` rows: (loss terms, validation Dice).

    Loss terms are the keys ``loss`` and ``loss_*`` of the last row; Dice curves are one per
    class that any row names, then ``mean``. A value a row lacks (or records as None, a class
    absent from the validation data) is NaN, a gap in the plot; a Dice of 0.0 stays 0.0.
    """
    losses = {k: [_value(r.get(k)) for r in rows] for k in rows[-1] if k == "loss" or k.startswith("loss_")}
    names = sorted({n for r in rows for n in (r.get("val_dice") or {})})
    dice = {n: [_value((r.get("val_dice") or {}).get(n)) for r in rows] for n in names}
    if any("val_mean_dice" in r for r in rows):
        dice["mean"] = [_value(r.get("val_mean_dice")) for r in rows]
    return losses, dice


def write_curves(metrics_path: Path, png_path: Path) -> None:
    """Plot loss terms and validation Dice per class against epochs (``curves.png``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    losses, dice = curve_series(rows)
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, values in losses.items():
        ax_loss.plot(epochs, values, label=key, lw=2 if key == "loss" else 1)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss: terms unweighted, 'loss' the weighted total", fontsize=9)
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for name, values in dice.items():
        style = {"color": "k", "lw": 2} if name == "mean" else {}
        ax_dice.plot(epochs, values, ".-", label=name, **style)
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_title("validation Dice per class (gaps: class absent)", fontsize=9)
    ax_dice.set_ylim(-0.02, 1.02)
    if dice:
        ax_dice.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
