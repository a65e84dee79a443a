"""Data set fingerprint: what planning (:mod:`.plans`) needs to know about the cases.

The fingerprint holds every case's spacing and shape and, per image channel,
statistics of the intensities inside the labels (foreground = label > 0). As in
nnU-Net, a fixed number of foreground voxels is drawn per case (with
replacement, seed 1234 for every case, so the result does not depend on the
order or parallelism of the cases) and the statistics are taken over all draws
pooled, so that every case weighs the same. Unlike nnU-Net the images are not
cropped to their non-zero region first: the shapes are the full image shapes.
Arrays are (Z, Y, X) and spacings (sz, sy, sx) throughout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .plans import PlansError

if TYPE_CHECKING:
    from .dataset import Case, DatasetSpec

FOREGROUND_SAMPLES_PER_CASE = 10_000
FINGERPRINT_SEED = 1234


# --------------------------------------------------------------------------- reading


def read_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One image file as an array (Z, Y, X) and its spacing (sz, sy, sx) in mm."""
    from ..io import read_image

    array, geometry = read_image(path)
    sz, sy, sx = (float(s) for s in geometry.spacing)
    return np.asarray(array), (sz, sy, sx)


def read_case(case: Case) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """A case's channels stacked to (C, Z, Y, X) float32, its labels (Z, Y, X) int16 or None, its spacing.

    The spacing is the first channel's. Raises :class:`PlansError` when channels
    or labels do not share one shape, or the labels are not integers.
    """
    arrays: list[np.ndarray] = []
    spacing: tuple[float, float, float] | None = None
    for path in case.images:
        array, spc = read_volume(Path(path))
        if array.ndim != 3:
            raise PlansError(f"{path}: expected a 3D volume, got shape {array.shape}; store one 3D volume per file")
        if arrays and array.shape != arrays[0].shape:
            raise PlansError(f"case {case.id}: channel {path} has shape {array.shape}, channel 0 has "
                             f"{arrays[0].shape}; all channels of a case must share one voxel grid")
        spacing = spacing or spc
        arrays.append(array.astype(np.float32, copy=False))
    if not arrays or spacing is None:
        raise PlansError(f"case {case.id} has no image files; check imagesTr and dataset.json channel_names")
    image = np.stack(arrays)
    if not np.isfinite(image).all():
        raise PlansError(f"case {case.id}: the image has NaN or infinite voxels; fix or remove them "
                         f"(masksam-core check lists such files)")
    labels = None
    if case.label is not None:
        raw, _ = read_volume(Path(case.label))
        if raw.shape != image.shape[1:]:
            raise PlansError(f"case {case.id}: labels {case.label} have shape {raw.shape} but the image has "
                             f"{image.shape[1:]}; labels must lie on the image's voxel grid")
        if not np.issubdtype(raw.dtype, np.integer) and not np.array_equal(raw, np.rint(raw)):
            raise PlansError(f"{case.label}: label values are not integers; save labels as integer classes")
        if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.int16).max):
            raise PlansError(f"{case.label}: label values must lie in 0..32767, found {raw.min()}..{raw.max()}")
        labels = raw.astype(np.int16)
    return image, labels, spacing


# --------------------------------------------------------------------------- fingerprint


def _intensity_stats(samples: np.ndarray) -> dict[str, float | int | None]:
    """Statistics of pooled foreground samples (1D); all None when there are none."""
    names = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
    if samples.size == 0:
        return {**dict.fromkeys(names), "num_samples": 0}
    s = samples.astype(np.float64)
    values = (s.mean(), s.std(), np.median(s), s.min(), s.max(), np.percentile(s, 0.5), np.percentile(s, 99.5))
    return {**{n: float(v) for n, v in zip(names, values, strict=True)}, "num_samples": int(s.size)}


def foreground_samples(image: np.ndarray, labels: np.ndarray | None, num_samples: int, seed: int) -> np.ndarray:
    """``num_samples`` foreground intensities per channel, drawn with replacement: (C, num_samples) or (C, 0)."""
    if labels is None or not (mask := labels > 0).any():
        return np.zeros((image.shape[0], 0), np.float32)
    rng = np.random.RandomState(seed)
    return np.stack([rng.choice(channel[mask], num_samples, replace=True) for channel in image])


def fingerprint_dataset(spec: DatasetSpec, *, progress: bool = True,
                        samples_per_case: int = FOREGROUND_SAMPLES_PER_CASE,
                        seed: int = FINGERPRINT_SEED) -> dict[str, Any]:
    """The data set's fingerprint (JSON-able).

    Keys: ``dataset_name``, ``case_ids``, ``spacings`` [[sz, sy, sx], ...], ``shapes``
    [[Z, Y, X], ...], ``samples_per_case``, ``seed`` and
    ``foreground_intensity`` {channel index (str): {mean, std, median, min, max,
    percentile_00_5, percentile_99_5, num_samples}} (None values when no case has
    foreground). Cases without a label file count for spacing and shape only.
    """
    from tqdm.auto import tqdm

    if not spec.cases:
        raise PlansError(f"data set {spec.name!r} has no cases; put images in imagesTr (see dataset.json)")
    spacings, shapes, samples = [], [], []
    for case in tqdm(spec.cases, desc=f"fingerprint {spec.name}", disable=not progress, unit="case"):
        image, labels, spacing = read_case(case)
        spacings.append([float(s) for s in spacing])
        shapes.append([int(s) for s in image.shape[1:]])
        samples.append(foreground_samples(image, labels, samples_per_case, seed))
    pooled = np.concatenate(samples, axis=1)
    return {
        "dataset_name": spec.name,
        "case_ids": [case.id for case in spec.cases],
        "spacings": spacings,
        "shapes": shapes,
        "samples_per_case": samples_per_case,
        "seed": seed,
        "foreground_intensity": {str(c): _intensity_stats(pooled[c]) for c in range(pooled.shape[0])},
    }
