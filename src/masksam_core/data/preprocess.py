"""nnU-Net-style preprocessing: normalise, resample, and a reusable on-disk cache.

Order as in nnU-Net's preprocessor: each channel is normalised on its original
grid, then resampled to the plans' target spacing. Shapes follow nnU-Net's
rounding, ``round(shape * spacing / target)``.

Resampling (``scipy.ndimage.zoom`` with ``grid_mode=True``, i.e. voxel centres
aligned as in nnU-Net's ``skimage.transform.resize``, edges repeated):

* images: third-order spline;
* labels: one-hot, each label map resampled linearly, then the label with the
  largest interpolated value wins (argmax; ties go to the smaller label). This
  equals nnU-Net's "threshold at 0.5" wherever one label reaches 0.5 and leaves no
  voxel unassigned; it never creates a label value that was not in the input;
* probabilities (:func:`resample_to_shape`, for prediction): linear.

"Separate z" as in nnU-Net: when the current or the target spacing is
anisotropic (largest / smallest spacing > 3) and exactly one axis has the largest
spacing, resampling is done in two steps: in-plane (the two other axes) with the
order above, then along that axis with order 0 (nearest neighbour).

Cache layout (``cache_dir``): ``{case}_image.npy`` float32 (C, Z, Y, X),
``{case}_labels.npy`` int16 (Z, Y, X), ``{case}.json`` (original spacing and
shape, class locations) and ``cache.json`` ({case: key}). A case's key hashes the
preprocessing-relevant plans entries and each source file's path, size and
mtime_ns; a case is rebuilt only when its key changes or a file is missing.
A case's entry is removed from ``cache.json`` before its files are rewritten and
added after all of them are in place (each written to a temporary file, then
renamed), so a killed run never leaves a half-written case that looks valid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from ..files import atomic_save_npy, atomic_write_json
from .fingerprint import read_case
from .plans import ANISOTROPY_THRESHOLD, Plans, PlansError, compute_new_shape, preprocessing_key

if TYPE_CHECKING:
    from .dataset import Case, DatasetSpec

CACHE_VERSION = 1
CLASS_LOCATIONS_PER_CLASS = 4_000
CLASS_LOCATIONS_SEED = 1234


@dataclass(frozen=True)
class PreprocessedCase:
    """A preprocessed case: ``image`` .npy float32 (C, Z, Y, X), ``labels`` .npy int16 (Z, Y, X).

    Both load with ``np.load(path, mmap_mode="r")``; :attr:`meta` is the case's JSON.
    """

    id: str
    image: Path
    labels: Path

    @property
    def meta(self) -> Path:
        """``{case}.json``: original spacing and shape, preprocessed shape, ``class_locations``."""
        return self.image.with_name(f"{self.id}.json")

    @property
    def files(self) -> tuple[Path, Path, Path]:
        """The three files that make up the case."""
        return self.image, self.labels, self.meta


# --------------------------------------------------------------------------- normalisation


def normalize_image(image: np.ndarray, plans: Plans) -> np.ndarray:
    """Normalise each channel of ``image`` (C, Z, Y, X) as the plans say; returns float32 (C, Z, Y, X).

    ``ct``: clip to the foreground [0.5, 99.5] percentiles, subtract the foreground
    mean, divide by the foreground std. ``zscore``: subtract this image's mean and
    divide by its std, over all voxels of the channel.
    """
    schemes = plans.normalization
    if image.ndim != 4 or image.shape[0] != len(schemes):
        raise PlansError(f"image has shape {image.shape}; expected (C, Z, Y, X) with C = {len(schemes)} channels "
                         f"as in the plans ({plans.channel_names})")
    out = np.empty(image.shape, np.float32)
    for c, norm in enumerate(schemes):
        channel = image[c].astype(np.float32)
        if norm.scheme == "ct":
            np.clip(channel, norm.lower, norm.upper, out=channel)
            mean, std = norm.mean, norm.std
            if mean is None or std is None:
                raise PlansError(f"the plans' ct normalisation of channel {c} lacks its mean and std; plan again")
        elif norm.scheme == "zscore":
            mean, std = channel.mean(dtype=np.float64), channel.std(dtype=np.float64)
        else:
            raise PlansError(f"unknown normalisation scheme {norm.scheme!r} in the plans; plan again")
        out[c] = (channel - np.float32(mean)) / np.float32(max(float(std), 1e-8))
    return out


# --------------------------------------------------------------------------- resampling


def separate_axis(current_spacing: Sequence[float] | None, new_spacing: Sequence[float] | None,
                  threshold: float = ANISOTROPY_THRESHOLD) -> int | None:
    """The axis to resample separately with order 0 (nnU-Net's "separate z"), or None.

    Checked on the current spacing first, then the new one: anisotropic when the
    largest / smallest spacing > ``threshold``; the axis is the one with the
    largest spacing, and there is none when two or three axes share it.
    """
    for spacing in (current_spacing, new_spacing):
        if spacing is None:
            continue
        s = np.asarray(spacing, dtype=np.float64)
        if s.max() / s.min() > threshold:
            axes = np.flatnonzero(s == s.max())
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _zoom(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``volume`` (Z, Y, X) resampled to ``shape`` with a spline of ``order``; float32."""
    if tuple(volume.shape) == tuple(shape):
        return volume.astype(np.float32, copy=False)
    factors = [n / o for n, o in zip(shape, volume.shape, strict=True)]
    out = ndimage.zoom(volume.astype(np.float32, copy=False), factors, order=order, mode="nearest",
                       grid_mode=True, prefilter=order > 1, output=np.float32)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def resample_volume(volume: np.ndarray, shape: Sequence[int], order: int, axis: int | None,
                    order_z: int = 0) -> np.ndarray:
    """``volume`` (Z, Y, X) to ``shape``; with ``axis`` set: in-plane at ``order``, then ``axis`` at ``order_z``."""
    shape = tuple(int(s) for s in shape)
    if axis is None:
        return _zoom(volume, shape, order)
    in_plane = tuple(volume.shape[i] if i == axis else shape[i] for i in range(3))
    return _zoom(_zoom(volume, in_plane, order), shape, order_z)


def resample_image(image: np.ndarray, shape: Sequence[int], current_spacing: Sequence[float] | None = None,
                   new_spacing: Sequence[float] | None = None, *, order: int = 3, order_z: int = 0,
                   threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """Each channel of ``image`` (C, Z, Y, X) resampled to ``shape`` (Z', Y', X'); float32 (C, Z', Y', X')."""
    axis = separate_axis(current_spacing, new_spacing, threshold)
    return np.stack([resample_volume(channel, shape, order, axis, order_z) for channel in image])


def resample_labels(labels: np.ndarray, shape: Sequence[int], current_spacing: Sequence[float] | None = None,
                    new_spacing: Sequence[float] | None = None, *, order: int = 1, order_z: int = 0,
                    threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """``labels`` (Z, Y, X) to ``shape``: one-hot maps resampled, argmax; int16, values ⊆ the input's."""
    if tuple(labels.shape) == tuple(shape):
        return labels.astype(np.int16)
    axis = separate_axis(current_spacing, new_spacing, threshold)
    out = np.zeros(tuple(shape), np.int16)
    best = np.full(tuple(shape), -1.0, np.float32)
    for value in np.unique(labels):
        score = resample_volume((labels == value).astype(np.float32), shape, order, axis, order_z)
        better = score > best
        out[better] = value
        np.maximum(best, score, out=best)
    return out


def resample_to_shape(array: np.ndarray, shape: Sequence[int], *, current_spacing: Sequence[float] | None = None,
                      new_spacing: Sequence[float] | None = None, order: int = 1, order_z: int = 0,
                      threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """Per-class probabilities or scores (C, Z, Y, X) to ``shape`` (Z', Y', X'); float32 (C, Z', Y', X').

    Linear (order 1) by default, as nnU-Net resamples softmax outputs back to the
    original grid: values stay within the input's range and the per-voxel sum of
    probabilities stays 1. Give ``current_spacing`` (the plans' target spacing) and
    ``new_spacing`` (the original spacing) to get nnU-Net's separate-z handling.
    """
    if array.ndim != 4:
        raise PlansError(f"expected (C, Z, Y, X) scores, got shape {array.shape}")
    return resample_image(array, shape, current_spacing, new_spacing, order=order, order_z=order_z,
                          threshold=threshold)


# --------------------------------------------------------------------------- one case


def _target_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """The shape at ``target_spacing``; :class:`PlansError` when ``spacing`` is implausible for it."""
    if len(spacing) != 3 or min(spacing) <= 0:
        raise PlansError(f"spacing {tuple(spacing)} must be three positive numbers (sz, sy, sx) in mm")
    new = compute_new_shape(shape, spacing, target_spacing)
    if min(new) < 1 or max(n / max(int(o), 1) for n, o in zip(new, shape, strict=True)) > 64:
        target = tuple(float(t) for t in target_spacing)
        raise PlansError(f"at {tuple(float(s) for s in spacing)} mm per voxel this {tuple(int(n) for n in shape)} scan "
                         f"becomes {new} voxels at the model's {target} mm: the voxel size looks wrong (micrometres or "
                         "centimetres stored as millimetres?); fix it in the file's header (or the TIFF sidecar)")
    return new


def preprocess_image(image: np.ndarray, spacing: Sequence[float], plans: Plans) -> np.ndarray:
    """Normalise, then resample ``image`` (C, Z, Y, X) at ``spacing`` to the plans' spacing; float32 (C, Z', Y', X')."""
    normalized = normalize_image(image, plans)
    r = plans.separate_z
    return resample_image(normalized, _target_shape(image.shape[1:], spacing, plans.target_spacing), spacing,
                          plans.target_spacing, order=r.image_order, order_z=r.image_order_z, threshold=r.threshold)


def preprocess_labels(labels: np.ndarray, spacing: Sequence[float], plans: Plans) -> np.ndarray:
    """Resample ``labels`` (Z, Y, X) at ``spacing`` to the plans' spacing; int16 (Z', Y', X'), no new values."""
    if labels.ndim != 3:
        raise PlansError(f"labels must be (Z, Y, X), got shape {labels.shape}")
    values = np.unique(labels)
    bad = values[(values < 0) | (values >= plans.num_classes)]
    if bad.size:
        raise PlansError(f"label values {bad.tolist()} are not classes of the plans (0..{plans.num_classes - 1}); "
                         f"add them to dataset.json labels or fix the label file")
    r = plans.separate_z
    return resample_labels(labels, _target_shape(labels.shape, spacing, plans.target_spacing), spacing,
                           plans.target_spacing, order=r.label_order, order_z=r.label_order_z, threshold=r.threshold)


def class_locations(labels: np.ndarray, num_classes: int, *, per_class: int = CLASS_LOCATIONS_PER_CLASS,
                    seed: int = CLASS_LOCATIONS_SEED) -> dict[str, list[list[int]]]:
    """Up to ``per_class`` voxel coordinates [z, y, x] of each foreground class 1..num_classes-1 (random, seeded).

    Classes absent from ``labels`` get an empty list.
    """
    rng = np.random.default_rng(seed)
    flat = np.flatnonzero(labels)
    values = labels.reshape(-1)[flat]
    out: dict[str, list[list[int]]] = {}
    for c in range(1, num_classes):
        idx = flat[values == c]
        if idx.size > per_class:
            idx = np.sort(rng.choice(idx, per_class, replace=False))
        out[str(c)] = np.stack(np.unravel_index(idx, labels.shape), axis=1).tolist() if idx.size else []
    return out


# --------------------------------------------------------------------------- cache


def _paths(cache_dir: Path, case_id: str) -> PreprocessedCase:
    return PreprocessedCase(case_id, cache_dir / f"{case_id}_image.npy", cache_dir / f"{case_id}_labels.npy")


def case_key(case: Case, plans_key: str) -> str:
    """Cache key of a case: the plans' preprocessing key and each source file's path, size and mtime_ns."""
    files = []
    for path in case.images if case.label is None else [*case.images, case.label]:
        try:
            st = Path(path).stat()
        except OSError as error:
            raise PlansError(f"case {case.id}: cannot read {path} ({error.strerror}); restore the file or run "
                             f"masksam-core check on the data set") from None
        files.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"cache": CACHE_VERSION, "plans": plans_key, "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()


def build_case(case: Case, plans: Plans, cache_dir: Path) -> str:
    """Read, preprocess and write one case to ``cache_dir`` (each file atomically); returns the case id."""
    image, labels, spacing = read_case(case)
    out = _paths(cache_dir, case.id)
    pre_image = preprocess_image(image, spacing, plans)
    if labels is None:
        raise PlansError(f"case {case.id} has no label file; preprocessing is for training, which needs labels")
    pre_labels = preprocess_labels(labels, spacing, plans)
    atomic_save_npy(out.image, pre_image)
    atomic_save_npy(out.labels, pre_labels)
    atomic_write_json(out.meta, {
        "id": case.id,
        "original_spacing": [float(s) for s in spacing],
        "original_shape": [int(s) for s in image.shape[1:]],
        "spacing": [float(s) for s in plans.target_spacing],
        "shape": [int(s) for s in pre_labels.shape],
        "class_locations": class_locations(pre_labels, plans.num_classes),
    }, indent=1, newline=False, allow_nan=False)
    return case.id


def _read_index(cache_dir: Path) -> dict[str, str]:
    """The {case: key} table of ``cache.json``; empty when absent, unreadable or of another version."""
    try:
        index = json.loads((cache_dir / "cache.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(index, dict) or index.get("version") != CACHE_VERSION:
        return {}
    cases = index.get("cases")
    return dict(cases) if isinstance(cases, dict) else {}


def _write_index(cache_dir: Path, cases: dict[str, str]) -> None:
    atomic_write_json(cache_dir / "cache.json", {"version": CACHE_VERSION, "cases": dict(sorted(cases.items()))},
                      indent=1, newline=False, allow_nan=False)


def preprocess_dataset(spec: DatasetSpec, plans: Plans, cache_dir: str | Path, *, progress: bool = True,
                       num_workers: int = 1) -> list[PreprocessedCase]:
    """Preprocess every case of ``spec`` into ``cache_dir``, reusing cases whose data and plans are unchanged.

    Returns the cases in the data set's order. Cases that left the data set are
    removed from the cache. ``num_workers > 1`` builds cases in that many processes.
    Run it in one process per ``cache_dir`` (under DDP: rank 0, then a barrier).
    """
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for case in spec.cases:
        if case.label is None:
            raise PlansError(f"case {case.id} has no label file; training needs labelsTr/{case.id}{spec.file_ending}")
    plans_key = preprocessing_key(plans)
    index = _read_index(cache_dir)
    keys = {case.id: case_key(case, plans_key) for case in spec.cases}
    todo = [case for case in spec.cases if index.get(case.id) != keys[case.id]
            or not all(p.is_file() for p in _paths(cache_dir, case.id).files)]
    for stale in set(index) - set(keys):
        for path in _paths(cache_dir, stale).files:
            path.unlink(missing_ok=True)
    index = {cid: key for cid, key in index.items() if cid in keys and cid not in {c.id for c in todo}}
    _write_index(cache_dir, index)  # drop rebuilt and stale entries before any file is touched

    bar = tqdm(total=len(spec.cases), initial=len(spec.cases) - len(todo), desc=f"preprocess {spec.name}",
               unit="case", disable=not progress)
    with bar:
        if num_workers <= 1 or len(todo) <= 1:
            for case in todo:
                build_case(case, plans, cache_dir)
                index[case.id] = keys[case.id]
                _write_index(cache_dir, index)
                bar.update()
        else:
            with ProcessPoolExecutor(min(num_workers, len(todo)), mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(build_case, case, plans, cache_dir) for case in todo]
                for future in as_completed(futures):
                    case_id = future.result()
                    index[case_id] = keys[case_id]
                    _write_index(cache_dir, index)
                    bar.update()
    return [_paths(cache_dir, case.id) for case in spec.cases]
