"""Data set fingerprint and ``plans.json``, following nnU-Net v2's planning rules.

The fingerprint holds every case's spacing and shape and, per image channel,
statistics of the intensities inside the labels (foreground = label > 0). As in
nnU-Net, a fixed number of foreground voxels is drawn per case (with
replacement, seed 1234 for every case, so the result does not depend on the
order or parallelism of the cases) and the statistics are taken over all draws
pooled, so that every case weighs the same. Unlike nnU-Net the images are not
cropped to their non-zero region first: the shapes are the full image shapes.

The plans fix everything preprocessing, training and prediction must agree on:
the target spacing (nnU-Net's rule, see :func:`determine_target_spacing`), the
normalisation per channel, the resampling orders, the preset's patch size and
the class names. Arrays are (Z, Y, X) and spacings (sz, sy, sx) throughout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MaskSAMError
from ..files import atomic_write_json

PLANS_VERSION = 1
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD
FOREGROUND_SAMPLES_PER_CASE = 10_000
FINGERPRINT_SEED = 1234
# resampling orders as in nnU-Net's default planner: images 3rd-order spline, labels
# one-hot linear, probabilities linear; order 0 (nearest) along a separate (anisotropic) axis
RESAMPLING = {
    "threshold": ANISOTROPY_THRESHOLD,
    "image_order": 3, "image_order_z": 0,
    "label_order": 1, "label_order_z": 0,
    "probability_order": 1, "probability_order_z": 0,
}
REQUIRED_KEYS = (
    "version", "dataset_name", "preset", "target_spacing", "patch_size", "normalization",
    "class_names", "num_classes", "in_channels", "channel_names", "separate_z",
)


class PlansError(MaskSAMError):
    """A plans file or the data it is made from cannot be used."""


# --------------------------------------------------------------------------- reading


def read_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One image file as an array (Z, Y, X) and its spacing (sz, sy, sx) in mm."""
    from ..io import read_image

    array, geometry = read_image(path)
    return np.asarray(array), tuple(float(s) for s in geometry.spacing)  # type: ignore[return-value]


def read_case(case: Any) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """A case's channels stacked to (C, Z, Y, X) float32, its labels (Z, Y, X) int16 or None, its spacing.

    The spacing is the first channel's. Raises :class:`PlansError` when channels
    or labels do not share one shape, or the labels are not integers.
    """
    arrays = []
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
    return {**{n: float(v) for n, v in zip(names, values)}, "num_samples": int(s.size)}


def foreground_samples(image: np.ndarray, labels: np.ndarray | None, num_samples: int, seed: int) -> np.ndarray:
    """``num_samples`` foreground intensities per channel, drawn with replacement: (C, num_samples) or (C, 0)."""
    if labels is None or not (mask := labels > 0).any():
        return np.zeros((image.shape[0], 0), np.float32)
    rng = np.random.RandomState(seed)
    return np.stack([rng.choice(channel[mask], num_samples, replace=True) for channel in image])


def fingerprint_dataset(spec: Any, *, progress: bool = True,
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


# --------------------------------------------------------------------------- planning


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling, nnU-Net's rounding: ``round(shape * spacing / target)`` per axis."""
    return tuple(int(round(float(n) * float(s) / float(t))) for n, s, t in zip(shape, spacing, target))


def determine_target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                             threshold: float = ANISOTROPY_THRESHOLD) -> tuple[list[float], int | None]:
    """nnU-Net v2's full-resolution target spacing; returns (target [sz, sy, sx], anisotropic axis or None).

    The target is the median spacing per axis. Exception: let ``a`` be the axis with
    the largest median spacing. If its median spacing is more than ``threshold``
    times the LARGEST of the other two axes' median spacings, AND its median shape
    times ``threshold`` is smaller than the SMALLEST of the other two median shapes,
    then the target along ``a`` is the 10th percentile of the spacings along ``a``,
    but never below the largest other-axis spacing (in that case that spacing
    + 1e-5). Example: spacings (5, 0.7, 0.7) with shapes (20, 512, 512): 5 > 3·0.7
    and 20·3 < 512, so the z target is the 10th percentile of the z spacings.
    """
    spc = np.asarray(spacings, dtype=np.float64)
    shp = np.asarray(shapes, dtype=np.float64)
    target = np.percentile(spc, 50, axis=0)
    median_shape = np.percentile(shp, 50, axis=0)
    axis = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != axis]
    max_other_spacing = max(target[i] for i in others)
    aniso_spacing = target[axis] > threshold * max_other_spacing
    aniso_voxels = median_shape[axis] * threshold < min(median_shape[i] for i in others)
    if not (aniso_spacing and aniso_voxels):
        return [float(t) for t in target], None
    value = float(np.percentile(spc[:, axis], 10))
    if value < max_other_spacing:
        value = max(max_other_spacing, value) + 1e-5
    target[axis] = value
    return [float(t) for t in target], axis


def _class_names(spec: Any) -> list[str]:
    """Class names indexed by label value; labels must be the integers 0..N-1."""
    by_value: dict[int, str] = {}
    for name, value in spec.labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlansError(f"dataset.json label {name!r} has value {value!r}; labels must map names to "
                             f"integers (region labels are not supported)")
        by_value[value] = name
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise PlansError(f"dataset.json labels must be consecutive integers 0..N-1 with 0 = background and at "
                         f"least one class, found values {sorted(by_value)}")
    return [by_value[v] for v in range(len(by_value))]


def _normalization(channel: int, name: str, stats: dict[str, Any] | None) -> dict[str, Any]:
    """Normalisation of one channel: ``ct`` (clip + global z-score) for CT, else per-image ``zscore``."""
    if name.strip().lower() != "ct":
        return {"channel": channel, "channel_name": name, "scheme": "zscore"}
    if not stats or not stats.get("num_samples"):
        raise PlansError(f"channel {channel} ({name}) is CT but no case has foreground labels to take its "
                         f"intensity statistics from; add label files with at least one labelled voxel")
    return {
        "channel": channel, "channel_name": name, "scheme": "ct",
        "mean": stats["mean"], "std": stats["std"],
        "lower": stats["percentile_00_5"], "upper": stats["percentile_99_5"],
    }


def make_plans(spec: Any, fingerprint: dict[str, Any], preset: str, *, in_channels: int | None = None) -> dict:
    """The plans for training ``preset`` on the data set (JSON-able; see the module docstring).

    Args:
        spec: the data set (``masksam_core.data.dataset.DatasetSpec``).
        fingerprint: from :func:`fingerprint_dataset`.
        preset: preset name; gives ``patch_size`` (T, H, W).
        in_channels: image channels; must equal the data set's number of channels (default).
    """
    from ..modeling.presets import get_preset

    p = get_preset(preset)
    channel_names = {str(k): str(v) for k, v in sorted(spec.channel_names.items(), key=lambda kv: int(kv[0]))}
    if in_channels is None:
        in_channels = len(channel_names)
    if in_channels != len(channel_names) or in_channels < 1:
        raise PlansError(f"in_channels={in_channels} but data set {spec.name!r} has {len(channel_names)} "
                         f"channel(s) {list(channel_names.values())}; leave in_channels unset or match dataset.json")
    spacings, shapes = fingerprint.get("spacings"), fingerprint.get("shapes")
    if not spacings or not shapes or len(spacings) != len(shapes):
        raise PlansError("the fingerprint has no cases (or spacings and shapes disagree); compute it again")
    if min(min(s) for s in spacings) <= 0:
        raise PlansError("a case has a spacing <= 0; fix the image headers (voxel sizes) and fingerprint again")
    target, axis = determine_target_spacing(spacings, shapes)
    new_shapes = [compute_new_shape(sh, sp, target) for sh, sp in zip(shapes, spacings)]
    stats = fingerprint.get("foreground_intensity", {})
    class_names = _class_names(spec)
    return {
        "version": PLANS_VERSION,
        "dataset_name": spec.name,
        "preset": p.name,
        "patch_size": [int(v) for v in p.patch_size],
        "target_spacing": target,
        "median_spacing": [float(v) for v in np.median(np.asarray(spacings, float), axis=0)],
        "median_shape": [float(v) for v in np.median(np.asarray(new_shapes, float), axis=0)],
        "anisotropic": axis is not None,
        "anisotropy_axis": axis,
        "separate_z": dict(RESAMPLING),
        "normalization": [_normalization(int(c), n, stats.get(c)) for c, n in channel_names.items()],
        "channel_names": channel_names,
        "in_channels": in_channels,
        "class_names": class_names,
        "num_classes": len(class_names),
        "num_cases": len(spacings),
    }


# --------------------------------------------------------------------------- files


def save_plans(plans: dict, path: str | Path) -> None:
    """Save plans as JSON, atomically."""
    atomic_write_json(path, plans, indent=1, newline=False, allow_nan=False)


def load_plans(path: str | Path) -> dict:
    """Read and check a plans file; :class:`PlansError` if missing, corrupt or of another format version."""
    path = Path(path)
    if not path.is_file():
        raise PlansError(f"plans file not found: {path}; plan the data set first (masksam-core train writes "
                         f"plans.json into its run folder)")
    try:
        plans = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlansError(f"plans file {path} is not readable JSON ({error}); delete it and plan again") from None
    if not isinstance(plans, dict):
        raise PlansError(f"plans file {path} does not hold a JSON object; delete it and plan again")
    if plans.get("version") != PLANS_VERSION:
        raise PlansError(f"plans file {path} has format version {plans.get('version')!r}, this masksam reads "
                         f"version {PLANS_VERSION}; delete it and plan again")
    missing = [k for k in REQUIRED_KEYS if k not in plans]
    if missing:
        raise PlansError(f"plans file {path} lacks {', '.join(missing)}; delete it and plan again")
    return plans


def preprocessing_key(plans: dict) -> str:
    """Hash of the plans entries that change preprocessed data (spacing, normalisation, resampling, classes)."""
    keys = ("version", "target_spacing", "normalization", "separate_z", "in_channels", "num_classes")
    blob = json.dumps({k: plans.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
