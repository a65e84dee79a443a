"""Sliding-window prediction over a whole volume, as a generator that reports progress.

``sliding_window`` tiles a (C, Z, Y, X) volume with patches that overlap by
``overlap`` (0.5 = half-overlapping, the paper's setting), runs ``predictor``
on batches of patches (optionally also on their mirrored copies, averaging the
un-mirrored outputs: test-time augmentation), weights every patch's output
with a Gaussian importance map (centre voxels count more than border voxels)
and returns the weighted average. It is a generator: it yields a
:class:`Progress` after every batch and returns the result, so a GUI can show
progress and stop it between batches (the protocol of :mod:`masksam_core.progress`, whose
:func:`~masksam_core.progress.drive` runs it to the end).

Invariant (tested): with ``predictor = lambda x: 2 * x`` the result is ``2 * volume``
for any shape, patch size, overlap and mirroring.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass

import torch

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Progress:
    """Windows done of total (each window counts once, whatever the mirroring)."""

    done: int
    total: int
    seconds: float

    @property
    def eta(self) -> float:
        """Estimated seconds left."""
        return self.seconds / self.done * (self.total - self.done) if self.done else float("nan")


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets along one axis: first at 0, last at ``size - patch``, evenly spaced,
    neighbouring windows overlapping by at least ``overlap`` of the patch."""
    if size <= patch:
        return [0]
    step = patch * (1 - overlap)
    n = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Gaussian weights (T, H, W) centred on the patch, sigma = ``sigma_scale`` × side,
    scaled to a maximum of 1 and floored at the smallest positive weight (never 0)."""
    axes = []
    for n in patch:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    w = torch.clamp(w, min=w[w > 0].min().item())
    return w.float()


def mirror_sets(axes: Iterable[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (0 = Z, 1 = Y, 2 = X): 2**len(axes) flips."""
    axes = tuple(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def sliding_window(
    volume: torch.Tensor,
    predictor: Predictor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 1,
    mirror_axes: Sequence[int] = (),
    gaussian: bool = True,
    device: torch.device | str | None = None,
    accumulate_on: torch.device | str | None = None,
) -> Generator[Progress, None, torch.Tensor]:
    """Predict a whole volume window by window.

    Args:
        volume: (C, Z, Y, X) input; where it is shorter than a patch it is zero-padded on both
            sides, centred in the window (as :class:`~masksam_core.data.loader.PatchSampler`
            places it in training patches).
        predictor: maps a batch (B, C, T, H, W) to (B, K, T, H, W).
        patch_size: (T, H, W) window size.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per predictor call.
        mirror_axes: spatial axes to mirror for test-time augmentation; every
            subset is predicted (all 8 flips for (0, 1, 2)) and averaged.
        gaussian: weight each window with :func:`gaussian_importance` (else uniformly).
        device: where the predictor runs (default: the volume's device).
        accumulate_on: where the (K, Z, Y, X) sums live (default: ``device``;
            pass ``"cpu"`` when the output does not fit on the GPU).

    Yields :class:`Progress` after each batch; returns (K, Z, Y, X) float32.
    """
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, Z, Y, X), got shape {tuple(volume.shape)}")
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be three positive sizes (T, H, W), got {patch_size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(a not in (0, 1, 2) for a in mirror_axes):
        raise ValueError(f"mirror_axes are spatial axes 0, 1, 2; got {mirror_axes}")
    device = torch.device(device) if device is not None else volume.device
    accumulate_on = torch.device(accumulate_on) if accumulate_on is not None else device
    start = time.perf_counter()

    shape = volume.shape[1:]
    pads = [max(p - s, 0) for s, p in zip(shape, patch_size, strict=True)]
    before = [d // 2 for d in pads]  # centred, as the training sampler places short volumes (and nnU-Net pads)
    if any(pads):  # the padded region is cropped away at the end
        sides = [(b, d - b) for b, d in zip(before, pads, strict=True)]
        volume = torch.nn.functional.pad(volume, [n for side in reversed(sides) for n in side])
    padded = volume.shape[1:]
    starts = [window_starts(n, p, overlap) for n, p in zip(padded, patch_size, strict=True)]
    windows = list(itertools.product(*starts))
    weight = (gaussian_importance(patch_size) if gaussian else torch.ones(tuple(patch_size))).to(accumulate_on)
    flips = mirror_sets(mirror_axes)

    total: torch.Tensor | None = None
    norm = torch.zeros(padded, device=accumulate_on)
    t, h, w = patch_size
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        batch = torch.stack([volume[:, z : z + t, y : y + h, x : x + w] for z, y, x in chunk]).to(device)
        out = None
        for flip in flips:
            dims = [a + 2 for a in flip]
            pred = predictor(batch.flip(dims) if dims else batch)
            pred = pred.flip(dims) if dims else pred
            out = pred.float() if out is None else out + pred.float()
        assert out is not None
        out = (out / len(flips)).to(accumulate_on)
        if total is None:
            total = torch.zeros((out.shape[1], *padded), device=accumulate_on)
        for (z, y, x), o in zip(chunk, out, strict=True):
            total[:, z : z + t, y : y + h, x : x + w] += o * weight
            norm[z : z + t, y : y + h, x : x + w] += weight
        yield Progress(min(first + batch_size, len(windows)), len(windows), time.perf_counter() - start)
    assert total is not None
    inside = (slice(None), *(slice(b, b + n) for b, n in zip(before, shape, strict=True)))
    return (total / norm)[inside]

