"""Whole-volume prediction time: MaskSAM presets through ``Predictor`` and nnU-Net's 3d_fullres network.

MaskSAM: a run folder holding a randomly initialised model of the preset (``build_model(...,
pretrained=False)``, its random base weights stored in the checkpoint as ``tiny`` runs do; the speed
does not depend on the weights), loaded with ``Predictor(run_dir, device=..., amp=...)``. Its plans
say the volume is already at the target spacing, so ``Predictor.predict_iter`` runs its full path:
normalisation, the half-overlapping Gaussian-weighted sliding window (8 mirrored passes per window
with TTA), the window sums on the device they fit, the return to the input grid and the argmax. Its
phases are timed: ``preprocess_s`` (until the first progress report), ``windows_s`` (until the last
window, device synchronised) and ``postprocess_s`` (resampling back and labels).

nnU-Net: ``PlainConvUNet`` in its default 3d_fullres configuration (:mod:`._bench_nnunet`) runs through
the same :func:`~masksam_core.inference.sliding_window.sliding_window` (overlap 0.5, Gaussian weights,
the same mirroring), on the same normalised volume and device, under the same autocast.
``windows_s`` is directly comparable with MaskSAM's.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._bench_common import autocast, free_memory, peak_memory, reset_peak_memory, synchronize

HU_WINDOW = (-1000.0, 1000.0)


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like volume (Z, Y, X) float32 in HU: air, an elliptic body of fat and soft tissue, a few
    brighter ellipsoidal "organs", a spine, and Gaussian noise (sigma 20 HU)."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    zz = np.linspace(-1, 1, z, dtype=np.float32)[:, None, None]
    yy = np.linspace(-1, 1, y, dtype=np.float32)[None, :, None]
    xx = np.linspace(-1, 1, x, dtype=np.float32)[None, None, :]
    body = (yy / 0.7) ** 2 + (xx / 0.9) ** 2 < 1.0
    volume = np.where(body, np.float32(-100.0), np.float32(-1000.0)) * np.ones((z, 1, 1), np.float32)
    volume[np.broadcast_to((yy / 0.6) ** 2 + (xx / 0.8) ** 2 < 1.0, volume.shape)] = 40.0
    organs = [((0.1, -0.2, 0.3), (0.5, 0.25, 0.3), 60.0), ((-0.2, 0.0, -0.4), (0.4, 0.2, 0.15), 150.0),
              ((0.3, 0.1, 0.0), (0.3, 0.15, 0.2), 90.0), ((0.0, 0.4, 0.0), (1.2, 0.12, 0.1), 700.0)]
    for (cz, cy, cx), (rz, ry, rx), hu in organs:
        inside = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
        volume[np.broadcast_to(inside, volume.shape)] = hu
    volume += rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    return volume


def identity_plans(spacing: tuple[float, float, float], class_names: list[str], preset: str,
                   patch_size: Sequence[int]) -> dict[str, Any]:
    """Plans (plans.json's dict) of a one-channel CT run of ``preset`` whose target spacing is ``spacing``
    (no resampling)."""
    return {
        "version": 1, "dataset_name": "Dataset000_Benchmark", "preset": preset,
        "patch_size": [int(p) for p in patch_size], "target_spacing": [float(s) for s in spacing],
        "separate_z": {"threshold": 3.0, "image_order": 3, "image_order_z": 0, "label_order": 1,
                       "label_order_z": 0, "probability_order": 1, "probability_order_z": 0},
        "normalization": [{"channel": 0, "channel_name": "CT", "scheme": "ct", "mean": 40.0, "std": 200.0,
                           "lower": HU_WINDOW[0], "upper": HU_WINDOW[1]}],
        "channel_names": {"0": "CT"}, "in_channels": 1, "class_names": class_names,
        "num_classes": len(class_names),
    }


def write_run(preset: str, folder: Path, spacing: tuple[float, float, float],
              build_device: torch.device | str = "cpu") -> Path:
    """A run folder like ``masksam-core train`` writes, for a random model of ``preset``: its trainable
    weights, its random base SAM weights (stored in the checkpoint, as for ``tiny`` runs) and plans
    whose target spacing is ``spacing``. The model is initialised on ``build_device`` (fast on a GPU)."""
    from masksam_core.files import atomic_save
    from masksam_core.modeling import build_model
    from masksam_core.modeling.presets import get_preset
    from masksam_core.runs import FORMAT

    p = get_preset(preset)
    names = ["background"] + [f"class{i}" for i in range(1, p.num_classes)]
    torch.manual_seed(0)
    with torch.device(build_device):
        model = build_model(preset, pretrained=False)
    atomic_save({
        "kind": "masksam-run", "format": FORMAT,
        "model": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
        "build": {"preset": preset, "overrides": {}, "num_classes": p.num_classes, "in_channels": 1,
                  "prompt_mode": "auto"},
        "base_weights": {"name": p.backbone, "sha256": None, "path": None},
        "sam": {k: v.cpu() for k, v in model.sam.state_dict().items()},
        "plans": identity_plans(spacing, names, preset, p.patch_size), "class_names": names,
    }, folder / "checkpoint_last.pt")
    return folder


class Predictors:
    """``Predictor(run_dir)`` of each preset's random run, loaded once and kept for its next item.

    Holds one predictor at a time (asking for another preset drops the previous one); the runs
    live in a temporary folder removed by :meth:`close`.
    """

    def __init__(self, device: torch.device, amp_mode: str, spacing: tuple[float, float, float], *,
                 compile: bool = False) -> None:
        self.device, self.amp_mode, self.spacing, self.compile = device, amp_mode, spacing, compile
        self._tmp = tempfile.TemporaryDirectory(prefix="masksam-bench-")
        self._current: tuple[str, Any, float] | None = None

    def get(self, preset: str) -> tuple[Any, float]:
        """(the preset's Predictor, seconds its construction took: reading the run and building the model)."""
        from masksam_core.inference.predictor import Predictor

        if self._current is None or self._current[0] != preset:
            self._current = None
            free_memory(self.device)
            folder = Path(self._tmp.name) / preset
            folder.mkdir(exist_ok=True)
            run = write_run(preset, folder, self.spacing, self.device)
            start = time.perf_counter()
            predictor = Predictor(run, device=self.device, amp=self.amp_mode, compile=self.compile)
            self._current = (preset, predictor, time.perf_counter() - start)
            (folder / "checkpoint_last.pt").unlink()
        return self._current[1], self._current[2]

    def close(self) -> None:
        self._current = None
        self._tmp.cleanup()


def _drive(gen: Generator[Any, None, Any], device: torch.device, start: float | None = None) -> tuple[float, Any]:
    """Run a progress generator to its end: (seconds from ``start`` (default: now) until its last window,
    device synchronised; the generator's result)."""
    start = time.perf_counter() if start is None else start
    windows_s = float("nan")
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            return windows_s, stop.value
        if progress.total and progress.done == progress.total:
            synchronize(device)
            windows_s = time.perf_counter() - start


def _row(patch: tuple[int, ...], shape: tuple[int, ...], tta: bool, device: torch.device, total_s: float,
         preprocess_s: float, windows_s: float, baseline: float | None) -> dict[str, Any]:
    from masksam_core.inference.predictor import count_windows

    windows = count_windows(shape, patch, 0.5)
    passes = windows * (8 if tta else 1)
    peak, kind = peak_memory(device)
    return {
        "patch_size": list(patch), "windows": windows, "network_passes": passes, "seconds": total_s,
        "preprocess_s": preprocess_s, "windows_s": windows_s, "postprocess_s": total_s - preprocess_s - windows_s,
        "ms_per_pass": 1000 * windows_s / passes, "peak_memory_gib": peak, "memory_at_start_gib": baseline,
        "memory_kind": kind,
    }


def masksam_item(predictors: Predictors, preset: str, volume: np.ndarray, *, tta: bool,
                 window_batch: int) -> dict[str, Any]:
    """Whole-volume prediction of ``volume`` with a random ``preset`` run through ``Predictor``."""
    predictor, load_s = predictors.get(preset)
    device, spacing = predictors.device, predictors.spacing
    patch = predictor.patch_size
    start = time.perf_counter()
    predictor._scores(torch.zeros(window_batch, 1, *patch, device=device))  # kernels, allocator, compilation
    synchronize(device)
    first_call_s = time.perf_counter() - start
    baseline = reset_peak_memory(device)
    start = time.perf_counter()
    gen = predictor.predict_iter(volume, spacing, tta=tta, batch_size=window_batch)
    next(gen)  # Progress(0, total): preprocessing done
    preprocess_s = time.perf_counter() - start
    windows_s, prediction = _drive(gen, device)
    total_s = time.perf_counter() - start
    assert prediction.labels.shape == volume.shape
    row = _row(patch, volume.shape, tta, device, total_s, preprocess_s, windows_s, baseline)
    precision = str(predictor.amp or torch.float32).removeprefix("torch.")  # what auto chose on this device
    return {**row, "predictor_load_s": load_s, "compiled": predictor.compiled, "first_call_s": first_call_s,
            "precision": precision}


def nnunet_item(plan: Any, volume: np.ndarray, spacing: tuple[float, float, float], device: torch.device,
                amp: torch.dtype | None, *, tta: bool, window_batch: int, num_classes: int = 14) -> dict[str, Any]:
    """nnU-Net's 3d_fullres ``PlainConvUNet`` over the normalised ``volume`` with the same sliding window."""
    from masksam_core.data.plans import Plans
    from masksam_core.data.preprocess import preprocess_image
    from masksam_core.inference.predictor import accumulation_device
    from masksam_core.inference.sliding_window import sliding_window

    from ._bench_nnunet import build_plain_unet

    torch.manual_seed(0)
    net = build_plain_unet(plan, 1, num_classes, device=device).eval()
    patch = tuple(plan.patch_size)

    def logits(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, amp):
            return net(batch)

    logits(torch.zeros(window_batch, 1, *patch, device=device))
    synchronize(device)
    names = ["background"] + [f"class{i}" for i in range(1, num_classes)]
    baseline = reset_peak_memory(device)
    start = time.perf_counter()
    plans = Plans.from_dict(identity_plans(spacing, names, "nnunet-3d_fullres", patch))
    pre = torch.from_numpy(preprocess_image(volume[None], spacing, plans))
    preprocess_s = time.perf_counter() - start
    padded = [max(n, p) for n, p in zip(pre.shape[1:], patch, strict=True)]
    on = accumulation_device(device, num_classes + 1, padded)
    windows_start = time.perf_counter()  # like Predictor: the copy to the accumulation device counts
    gen = sliding_window(pre.to(on), logits, patch, overlap=0.5, batch_size=window_batch,
                         mirror_axes=(0, 1, 2) if tta else (), device=device, accumulate_on=on)
    windows_s, scores = _drive(gen, device, windows_start)
    labels = scores.argmax(0).cpu().numpy().astype(np.uint8)
    total_s = time.perf_counter() - start
    assert labels.shape == volume.shape
    return _row(patch, volume.shape, tta, device, total_s, preprocess_s, windows_s, baseline)
