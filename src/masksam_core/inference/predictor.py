"""Whole-volume prediction with a trained run: :class:`Predictor`.

One call runs the run's own preprocessing, the sliding windows and the way back to
the input grid::

    volume (C, Z, Y, X) at spacing (sz, sy, sx)
      → normalise + resample to the plans' target spacing   (data.preprocess.preprocess_image)
      → windows of the model's patch size, step = step_size × patch (0.5: half overlap),
        Gaussian importance weighting, 8 mirrored passes per window when ``tta``
        (flips of every subset of the Z, Y, X axes, averaged; only the axes the run was
        trained to mirror, none after ``--augmentation no-mirror``), ``batch_size`` windows per call
      → per-class scores (C, Z', Y', X'): MaskFormer semantic inference per window,
        scores[c] = Σ_q softmax(class_q)[c] · sigmoid(mask_q)            (modeling.heads.semantic_scores)
      → resampled back to (Z, Y, X), linear (order 0 along a separate anisotropic axis,
        as the plans say)                                               (data.preprocess.resample_to_shape)
      → labels = argmax over classes (ties: the smaller class id).

Probabilities are the scores divided by their sum over classes at each voxel, so
they sum to 1 (the scores of MaskFormer's semantic inference do not); the argmax
of the two is the same. The window sums (C, Z', Y', X') live on the GPU when they
take at most half of its free memory, else on the CPU. On CUDA the network runs
under bf16 autocast (``amp="auto"``); scores are accumulated in float32.

Cancelling: :meth:`Predictor.predict_iter` is a generator. Closing it
(``gen.close()``, or simply dropping it) stops it at the next window batch; a
``threading.Event`` passed as ``cancel`` is checked before the first batch,
after every batch and between the resampling of classes, and raises
:class:`Cancelled` once set. A napari worker runs exactly this generator.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.plans import Plans
from ..devices import compile_errors, reuse_freed_memory
from ..errors import MaskSAMError
from ..progress import drive, relay
from .sliding_window import Progress, sliding_window, window_starts

__all__ = ["Cancelled", "Prediction", "Predictor", "Progress", "accumulation_device"]

ACCUMULATE_FRACTION = 0.5  # the window sums may take this much of the GPU's free memory
CPU_QUERY_CHUNK = 4  # queries per mask-decoder call on the CPU: same speed, about half the memory


class Cancelled(MaskSAMError):
    """The prediction was cancelled through its ``cancel`` event."""


@dataclass
class Prediction:
    """The result of :meth:`Predictor.predict`, on the input's voxel grid.

    labels: (Z, Y, X) uint8 (int16 for more than 256 classes), values 0..C-1.
    probabilities: (C, Z, Y, X) float32 summing to 1 over classes, or None when not asked for.
    class_names: C names, index = label value (0 = background).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    class_names: list[str]


def accumulation_device(device: torch.device, channels: int, shape: Sequence[int], *,
                        fraction: float = ACCUMULATE_FRACTION) -> torch.device:
    """Where the window sums of ``channels`` classes over ``shape`` (Z, Y, X) live.

    CUDA: ``device`` when (channels + 1) × Z·Y·X × 4 bytes (input, scores and weights, float32)
    is at most ``fraction`` of the free memory (``torch.cuda.mem_get_info``), else the CPU.
    Other devices: the CPU.
    """
    if device.type != "cuda":
        return torch.device("cpu")
    needed = (channels + 1) * math.prod(int(s) for s in shape) * 4
    free, _ = torch.cuda.mem_get_info(device)
    return device if needed <= fraction * free else torch.device("cpu")


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Windows :func:`sliding_window` visits on a (Z, Y, X) ``shape`` (padded up to ``patch``)."""
    return math.prod(len(window_starts(max(n, p), p, overlap)) for n, p in zip(shape, patch, strict=True))


def training_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The ``masksam-core train`` settings of a run checkpoint (``config``) or model file
    (``summary.config``); empty when the file has none."""
    return dict(ckpt.get("config") or (ckpt.get("summary") or {}).get("config") or {})


def tta_mirror_axes(ckpt: dict[str, Any]) -> tuple[int, ...]:
    """The axes test-time augmentation may mirror for a run or model file: those it was trained to be
    mirror-invariant on (its plans' ``mirror_axes``; else its training config's ``--augmentation``;
    else all three). None after ``--augmentation no-mirror``, whose labels name a side."""
    from ..data.augment import AUGMENTATIONS, augmentation_settings

    if "mirror_axes" in ckpt["plans"]:
        return tuple(int(a) for a in ckpt["plans"]["mirror_axes"])
    level = training_config(ckpt).get("augmentation")
    return augmentation_settings(level)[1] if level in AUGMENTATIONS else (0, 1, 2)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("prediction cancelled")


class Predictor:
    """A trained MaskSAM run, ready to segment whole volumes.

    Args:
        run_dir_or_checkpoint: a run folder (``checkpoint_best.pt``, else ``checkpoint_last.pt``)
            or a checkpoint file made by ``masksam-core train``.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.
        base_checkpoint: local file with the frozen base SAM weights the run was trained on.
        amp: autocast dtype: ``auto`` (bf16 on CUDA and on CPUs with native bf16, AVX512-BF16 or
            AMX, where it is faster for ``lite``: docs/benchmarks.md; fp32 elsewhere), ``bf16``, ``fp16`` or
            ``off`` (fp32). bf16 probabilities stay within about 1e-2 (relative L2) of fp32 (tested).
        query_chunk: queries per mask-decoder call (see :meth:`MaskSAM.forward`); ``auto``:
            :data:`CPU_QUERY_CHUNK` on the CPU (about half the peak memory of a ``lite`` window at the
            same speed: docs/benchmarks.md), all at once elsewhere. The results do not depend on it.
        compile: run the network through ``torch.compile`` (inductor). The first window batch
            then waits for the compilation (tens of seconds to minutes); later ones can be faster
            on GPUs (on the CPU it did not pay: docs/benchmarks.md). The results equal the plain
            network's within float rounding (tested). Needs a C++ compiler on the CPU (Triton on
            CUDA); a failure is a clear error.

    Attributes: ``class_names`` (C names), ``plans`` (the run's :class:`~masksam_core.data.plans.Plans`), ``model``,
    ``device``, ``patch_size`` (T, H, W), ``in_channels``, ``mirror_axes`` (what ``tta`` mirrors),
    ``training_config`` (the run's ``masksam-core train`` settings; empty when unknown).
    """

    def __init__(self, run_dir_or_checkpoint: str | os.PathLike[str], *, device: str | torch.device = "auto",
                 base_checkpoint: str | os.PathLike[str] | None = None, amp: str = "auto",
                 query_chunk: int | str | None = "auto", compile: bool = False) -> None:
        from ..devices import autocast_dtype, select_device
        from ..runs import load_run

        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.model, run = load_run(run_dir_or_checkpoint, base_checkpoint=base_checkpoint, device=self.device)
        if getattr(self.model, "prompt_mode", "auto") == "gt":
            raise MaskSAMError(
                f"{run_dir_or_checkpoint} is a gt-mode run (trained with --prompt-mode gt): it segments from "
                "prompts and cannot predict without them; use `masksam-core prompt` (box prompts) with it, or "
                "train with --prompt-mode auto for automatic prediction"
            )
        self.plans = Plans.from_dict(run.plans)
        self.class_names: list[str] = [str(n) for n in run.class_names]
        ckpt = run.to_dict()  # the saved dict, as tta_mirror_axes and training_config read it
        self.amp = autocast_dtype(self.device, amp, cpu_bf16=True)
        self.patch_size = tuple(int(p) for p in self.model.patch_size)
        self.mirror_axes = tta_mirror_axes(ckpt)
        self.training_config: dict[str, Any] = training_config(ckpt)  # how the run was trained, if known
        self.in_channels = self.plans.in_channels
        if query_chunk == "auto":
            query_chunk = CPU_QUERY_CHUNK if self.device.type == "cpu" else None
        if query_chunk is not None and (not isinstance(query_chunk, int) or query_chunk < 1):
            raise MaskSAMError(f"query_chunk must be a positive number of queries, None or 'auto', not {query_chunk!r}")
        self.query_chunk: int | None = query_chunk
        self.compiled = bool(compile)
        self._network = torch.compile(self.model) if compile else self.model

    # ------------------------------------------------------------------ the network on one batch
    def _scores(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-class scores (B, C, T, H, W) float32 of windows (B, C_in, T, H, W)."""
        from ..modeling.heads import semantic_scores

        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                              enabled=self.amp is not None), \
                compile_errors(self.device, "predict without --compile (same results)"):
            out = self._network(batch, query_chunk=self.query_chunk)
        return semantic_scores(out["pred_logits"], out["pred_masks"])

    # ------------------------------------------------------------------ public API
    def predict(self, volume: Any, spacing: Sequence[float], *, tta: bool = True, step_size: float = 0.5,
                batch_size: int = 1, return_probabilities: bool = False,
                cancel: threading.Event | None = None) -> Prediction:
        """Segment ``volume`` (Z, Y, X) or (C, Z, Y, X) at ``spacing`` (sz, sy, sx) mm.

        See :meth:`predict_iter` for the arguments; this runs it to the end.
        """
        return drive(self.predict_iter(volume, spacing, tta=tta, step_size=step_size, batch_size=batch_size,
                                       return_probabilities=return_probabilities, cancel=cancel))

    def predict_iter(self, volume: Any, spacing: Sequence[float], *, tta: bool = True, step_size: float = 0.5,
                     batch_size: int = 1, return_probabilities: bool = False,
                     cancel: threading.Event | None = None) -> Generator[Progress, None, Prediction]:
        """Segment a volume, yielding :class:`Progress` (windows done of total, seconds, eta).

        Args:
            volume: (Z, Y, X) or (C, Z, Y, X) intensities as read (not normalised), C = the run's channels.
            spacing: (sz, sy, sx) in mm.
            tta: average each window's mirrored copies along :attr:`mirror_axes`, the axes the run
                was trained to mirror (all three: 8 passes, 8× slower; none after ``--augmentation
                no-mirror``, whose labels name a side: then one pass).
            step_size: window step as a fraction of the patch, in (0, 1]; 0.5 = half-overlapping windows.
            batch_size: windows per network call.
            return_probabilities: also return per-class probabilities (C, Z, Y, X).
            cancel: an event checked between window batches; once set, :class:`Cancelled` is raised.

        Yields Progress(0, total) after preprocessing, then one after every batch; returns a
        :class:`Prediction` on the input grid. Closing the generator stops it between batches.
        """
        image, spacing = self._check_input(volume, spacing)
        if not 0 < step_size <= 1:
            raise MaskSAMError(f"step size {step_size} must be in (0, 1]: 0.5 = half-overlapping windows "
                               "(default), 1 = no overlap")
        if batch_size < 1:
            raise MaskSAMError(f"batch size {batch_size} must be at least 1")
        from ..data.preprocess import preprocess_image

        _check_cancel(cancel)
        pre = torch.from_numpy(preprocess_image(image, spacing, self.plans))
        overlap = 1.0 - step_size
        total = count_windows(pre.shape[1:], self.patch_size, overlap)
        padded = [max(n, p) for n, p in zip(pre.shape[1:], self.patch_size, strict=True)]
        on = accumulation_device(self.device, len(self.class_names) + self.in_channels, padded)
        _check_cancel(cancel)
        yield Progress(0, total, 0.0)
        windows = sliding_window(pre.to(on), self._scores, self.patch_size, overlap=overlap, batch_size=batch_size,
                                 mirror_axes=self.mirror_axes if tta else (), device=self.device, accumulate_on=on)
        # CPU: keep freed memory for the next window (see reuse_freed_memory), handed back at the end
        with reuse_freed_memory(self.device.type == "cpu"):
            try:  # _check_cancel raises Cancelled once cancel is set, before the next batch
                scores = yield from relay(windows, cancel=lambda: _check_cancel(cancel))
            except torch.cuda.OutOfMemoryError:
                raise MaskSAMError(f"out of GPU memory on {self.device}: use --batch-size 1, --device cpu, "
                                   "or a smaller preset") from None
        del pre
        assert scores is not None  # _check_cancel raises rather than returning a stop
        labels, probabilities = self._to_input_grid(scores.cpu().numpy(), image.shape[1:], spacing,
                                                    return_probabilities, cancel)
        return Prediction(labels, probabilities, list(self.class_names))

    # ------------------------------------------------------------------ helpers
    def _check_input(self, volume: Any, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
        """The volume as (C, Z, Y, X) and the spacing as three floats, or a clear error."""
        array = np.asarray(volume)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise MaskSAMError(f"expected a volume (Z, Y, X) or (C, Z, Y, X), got shape {array.shape}")
        if array.shape[0] != self.in_channels:
            raise MaskSAMError(f"the volume has {array.shape[0]} channel(s) but the run was trained on "
                               f"{self.in_channels} ({self.plans.channel_names}); give (C, Z, Y, X) with "
                               "those channels, in that order")
        if min(array.shape[1:]) < 1:
            raise MaskSAMError(f"the volume of shape {array.shape} is empty")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise MaskSAMError(f"the volume has dtype {array.dtype}; give numbers")
        if not np.isfinite(array).all():
            raise MaskSAMError("the volume has NaN or infinite voxels; replace them (e.g. np.nan_to_num) first")
        try:
            spacing = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            raise MaskSAMError(f"spacing {spacing!r} must be three numbers (sz, sy, sx) in mm") from None
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise MaskSAMError(f"spacing {spacing} must be three positive numbers (sz, sy, sx) in mm")
        return array, spacing

    def _to_input_grid(self, scores: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
                       return_probabilities: bool, cancel: threading.Event | None,
                       ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (C, Z', Y', X') on the plans' grid → labels (Z, Y, X) and optional probabilities (C, Z, Y, X).

        Resampled one class at a time, so that without probabilities only three (Z, Y, X)
        arrays are held besides the scores.
        """
        from ..data.preprocess import resample_to_shape

        r = self.plans.separate_z
        shape = tuple(int(s) for s in shape)
        dtype = np.uint8 if scores.shape[0] <= 256 else np.int16
        labels = np.zeros(shape, dtype)
        best = np.full(shape, -np.inf, np.float32)
        probabilities = np.empty((scores.shape[0], *shape), np.float32) if return_probabilities else None
        for c in range(scores.shape[0]):
            _check_cancel(cancel)
            channel = resample_to_shape(scores[c : c + 1], shape, current_spacing=self.plans.target_spacing,
                                        new_spacing=spacing, order=r.probability_order,
                                        order_z=r.probability_order_z, threshold=r.threshold)[0]
            better = channel > best
            labels[better] = c
            np.maximum(best, channel, out=best)
            if probabilities is not None:
                probabilities[c] = channel
        if probabilities is not None:
            total = probabilities.sum(0)
            empty = total <= 0  # every class scored 0: no information, uniform
            probabilities /= np.where(empty, 1.0, total)
            probabilities[:, empty] = 1.0 / scores.shape[0]
        return labels, probabilities
