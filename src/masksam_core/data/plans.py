"""``plans.json`` and its typed form :class:`Plans`, following nnU-Net v2's planning rules.

The plans are made from the data set's fingerprint (:mod:`.fingerprint`). They
fix everything preprocessing, training and prediction must agree on: the target
spacing (nnU-Net's rule, see :func:`determine_target_spacing`), the
normalisation per channel, the resampling orders, the preset's patch size and
the class names. Arrays are (Z, Y, X) and spacings (sz, sy, sx) throughout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MaskSAMError
from ..files import atomic_write_json

if TYPE_CHECKING:
    from .dataset import DatasetSpec

PLANS_VERSION = 1
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD
# resampling orders as in nnU-Net's default planner: images 3rd-order spline, labels
# one-hot linear, probabilities linear; order 0 (nearest) along a separate (anisotropic) axis
RESAMPLING: dict[str, Any] = {
    "threshold": ANISOTROPY_THRESHOLD,
    "image_order": 3, "image_order_z": 0,
    "label_order": 1, "label_order_z": 0,
    "probability_order": 1, "probability_order_z": 0,
}
REQUIRED_KEYS = (
    "version", "dataset_name", "preset", "target_spacing", "patch_size", "normalization",
    "class_names", "num_classes", "in_channels", "channel_names", "separate_z",
)
STATS_KEYS = ("median_spacing", "median_shape", "anisotropic", "anisotropy_axis", "num_cases")


class PlansError(MaskSAMError):
    """A plans file or the data it is made from cannot be used."""


# --------------------------------------------------------------------------- the plans


@dataclass(frozen=True)
class Normalization:
    """How one channel is normalised: ``ct`` (clip to [lower, upper], then (x - mean) / std with the
    data set's foreground statistics) or ``zscore`` (each image's own mean and std; no statistics)."""

    channel: int
    channel_name: str
    scheme: str
    mean: float | None = None
    std: float | None = None
    lower: float | None = None
    upper: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plans.json entry: the statistics only where the scheme has them."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Resampling:
    """Spline orders of the resampling (``separate_z`` in plans.json): images, labels (one-hot) and
    probabilities, in plane and along an axis whose spacing is ``threshold`` times the others'."""

    threshold: float
    image_order: int
    image_order_z: int
    label_order: int
    label_order_z: int
    probability_order: int
    probability_order_z: int


@dataclass(frozen=True)
class DataStats:
    """What planning found in the data set: median spacing, median shape at the target spacing,
    anisotropy (and its axis) and the number of cases. It feeds the patch-size hint and the check that a
    resumed run's data set is the same; plans written by hand (tests, benchmarks) may lack it."""

    median_spacing: tuple[float, ...]
    median_shape: tuple[float, ...]
    anisotropic: bool
    anisotropy_axis: int | None
    num_cases: int


@dataclass(frozen=True)
class Plans:
    """The contents of ``plans.json`` (also stored in checkpoints), typed.

    :meth:`from_dict` and :meth:`to_dict` convert exactly: ``Plans.from_dict(d).to_dict() == d``
    for every plans dict this package writes, so files and checkpoints keep their format.
    ``mirror_axes`` (the axes training mirrored, hence the test-time mirroring) is absent from
    plans made before augmentation levels existed.
    """

    version: int
    dataset_name: str
    preset: str
    patch_size: tuple[int, ...]
    target_spacing: tuple[float, ...]
    separate_z: Resampling
    normalization: tuple[Normalization, ...]
    channel_names: dict[str, str]
    in_channels: int
    class_names: tuple[str, ...]
    num_classes: int
    stats: DataStats | None = None
    mirror_axes: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plans:
        """Plans from a plans.json or checkpoint dict; :class:`PlansError` when entries are missing or unknown."""
        missing = [k for k in REQUIRED_KEYS if k not in data]
        unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(STATS_KEYS) - {"mirror_axes"})
        if missing or unknown:
            raise PlansError(f"the plans lack {missing} or hold unknown entries {unknown}; plan again")
        has_stats = [k in data for k in STATS_KEYS]
        if any(has_stats) and not all(has_stats):
            raise PlansError(f"the plans hold only part of {list(STATS_KEYS)}; plan again")
        stats = DataStats(
            median_spacing=tuple(data["median_spacing"]), median_shape=tuple(data["median_shape"]),
            anisotropic=data["anisotropic"], anisotropy_axis=data["anisotropy_axis"], num_cases=data["num_cases"],
        ) if all(has_stats) else None
        mirror = data.get("mirror_axes")
        try:
            return cls(
                version=data["version"], dataset_name=data["dataset_name"], preset=data["preset"],
                patch_size=tuple(data["patch_size"]), target_spacing=tuple(data["target_spacing"]),
                separate_z=Resampling(**data["separate_z"]),
                normalization=tuple(Normalization(**n) for n in data["normalization"]),
                channel_names=dict(data["channel_names"]), in_channels=data["in_channels"],
                class_names=tuple(data["class_names"]), num_classes=data["num_classes"],
                stats=stats, mirror_axes=None if mirror is None else tuple(mirror),
            )
        except TypeError as error:  # a nested entry with missing or unknown keys
            raise PlansError(f"the plans' resampling or normalisation entries are malformed ({error}); plan again") \
                from None

    def to_dict(self) -> dict[str, Any]:
        """The plans.json dict (JSON-able, key order as :func:`make_plans` writes it)."""
        data: dict[str, Any] = {
            "version": self.version, "dataset_name": self.dataset_name, "preset": self.preset,
            "patch_size": list(self.patch_size), "target_spacing": list(self.target_spacing),
        }
        if self.stats is not None:
            data.update(median_spacing=list(self.stats.median_spacing), median_shape=list(self.stats.median_shape),
                        anisotropic=self.stats.anisotropic, anisotropy_axis=self.stats.anisotropy_axis)
        data.update(separate_z=asdict(self.separate_z), normalization=[n.to_dict() for n in self.normalization],
                    channel_names=dict(self.channel_names), in_channels=self.in_channels,
                    class_names=list(self.class_names), num_classes=self.num_classes)
        if self.stats is not None:
            data["num_cases"] = self.stats.num_cases
        if self.mirror_axes is not None:
            data["mirror_axes"] = list(self.mirror_axes)
        return data


# --------------------------------------------------------------------------- planning


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling, nnU-Net's rounding: ``round(shape * spacing / target)`` per axis."""
    return tuple(round(float(n) * float(s) / float(t)) for n, s, t in zip(shape, spacing, target, strict=True))


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


def _class_names(spec: DatasetSpec) -> list[str]:
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


def _normalization(channel: int, name: str, stats: dict[str, Any] | None) -> Normalization:
    """Normalisation of one channel: ``ct`` (clip + global z-score) for CT, else per-image ``zscore``."""
    if name.strip().lower() != "ct":
        return Normalization(channel, name, "zscore")
    if not stats or not stats.get("num_samples"):
        raise PlansError(f"channel {channel} ({name}) is CT but no case has foreground labels to take its "
                         f"intensity statistics from; add label files with at least one labelled voxel")
    return Normalization(channel, name, "ct", mean=stats["mean"], std=stats["std"],
                         lower=stats["percentile_00_5"], upper=stats["percentile_99_5"])


def make_plans(spec: DatasetSpec, fingerprint: dict[str, Any], preset: str, *,
               in_channels: int | None = None) -> Plans:
    """The plans for training ``preset`` on the data set (see the module docstring).

    Args:
        spec: the data set.
        fingerprint: from :func:`~masksam_core.data.fingerprint.fingerprint_dataset`.
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
    new_shapes = [compute_new_shape(sh, sp, target) for sh, sp in zip(shapes, spacings, strict=True)]
    stats = fingerprint.get("foreground_intensity", {})
    class_names = _class_names(spec)
    data_stats = DataStats(
        median_spacing=tuple(float(v) for v in np.median(np.asarray(spacings, float), axis=0)),
        median_shape=tuple(float(v) for v in np.median(np.asarray(new_shapes, float), axis=0)),
        anisotropic=axis is not None, anisotropy_axis=axis, num_cases=len(spacings),
    )
    return Plans(
        version=PLANS_VERSION, dataset_name=spec.name, preset=p.name,
        patch_size=tuple(int(v) for v in p.patch_size), target_spacing=tuple(target),
        separate_z=Resampling(**RESAMPLING),
        normalization=tuple(_normalization(int(c), n, stats.get(c)) for c, n in channel_names.items()),
        channel_names=channel_names, in_channels=in_channels,
        class_names=tuple(class_names), num_classes=len(class_names), stats=data_stats,
    )


# --------------------------------------------------------------------------- files


def save_plans(plans: Plans, path: str | Path) -> None:
    """Save plans as JSON, atomically."""
    atomic_write_json(path, plans.to_dict(), indent=1, newline=False, allow_nan=False)


def load_plans(path: str | Path) -> Plans:
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
    return Plans.from_dict(plans)


def preprocessing_key(plans: Plans) -> str:
    """Hash of the plans entries that change preprocessed data (spacing, normalisation, resampling, classes)."""
    keys = ("version", "target_spacing", "normalization", "separate_z", "in_channels", "num_classes")
    data = plans.to_dict()
    blob = json.dumps({k: data[k] for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
