"""Open napari layers -> a training data set in the nnU-Net v2 raw layout.

The Train widget trains from a scan and the labels painted on it. :func:`export_layers_dataset`
writes them as a one-case data set (``dataset.json``, ``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, both with the scan's geometry) into ``<run folder>/dataset``, so that
training runs on it exactly as on any data set, ``masksam-core check`` included. Label values are
renumbered to consecutive 0..C-1 (the classes present, names kept). The trainer holds out the last
``val_fraction`` of a single case's slices (along Z) for validation, so the scan is exported whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from masksam_core.errors import MaskSAMError
from masksam_core.files import atomic_write_json
from masksam_core.io import ImageGeometry, write_image, write_labels

from ._layers import class_names_of, looks_like_ct, volume_of

__all__ = ["DATASET_FOLDER", "LayersData", "check_split", "export_layers_dataset", "layers_training_data",
           "write_dataset"]

DATASET_FOLDER = "dataset"
FILE_ENDING = ".nii.gz"


@dataclass
class LayersData:
    """A scan and its labels ready to export: ``image`` (Z, Y, X), ``labels`` (Z, Y, X) uint8/int16
    with values 0..C-1, ``class_names`` (C names, index = value), and the scan's ``geometry``."""

    image: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    geometry: ImageGeometry
    name: str = "layers"
    dropped: tuple[str, ...] = ()  # named classes with no voxel in the labels (not trained)


def _label_values(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer label map (a bincount where the values are small)."""
    if labels.size and labels.min() >= 0 and labels.max() < 65536:
        return np.flatnonzero(np.bincount(labels.ravel()))
    return np.unique(labels)


def _is_layer(obj: Any) -> bool:
    return hasattr(obj, "data") and hasattr(obj, "scale") and not isinstance(obj, np.ndarray)


def _unique(names: list[str]) -> list[str]:
    """Names made distinct (``liver``, ``liver_2``): dataset.json maps each name to one value."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, k = name or "class", 2
        while candidate in seen:
            candidate, k = f"{name}_{k}", k + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def layers_training_data(image: Any, labels: Any, class_names: Sequence[str] | None = None, *,
                         geometry: ImageGeometry | None = None) -> LayersData:
    """Check a scan and its labels and renumber the labels to 0..C-1; raises MaskSAMError with the fix.

    ``image``: a napari Image layer or an array (Z, Y, X) with ``geometry`` (default: 1 mm voxels).
    ``labels``: a napari Labels layer (class names from its features) or an integer array (Z, Y, X).
    ``class_names``: names indexed by the original label values (default: the layer's).
    """
    if image is None or _is_layer(image):
        array, _, geometry = volume_of(image)
        name = str(image.name)
    else:
        array = np.asarray(image)
        if array.ndim != 3:
            raise MaskSAMError(f"the image has shape {array.shape}; a 3D scan (Z, Y, X) is needed")
        geometry = geometry or ImageGeometry.from_spacing(array.shape)
        name = "image"
    if labels is None:
        raise MaskSAMError("no labels layer chosen: paint the structures to learn in a Labels layer on the "
                           "scan (Layers > New Labels Layer) and pick it in the widget")
    label_name = repr(str(labels.name)) if _is_layer(labels) else "the labels"
    if class_names is None:
        class_names = class_names_of(labels) if _is_layer(labels) else []
    lab = np.asarray(labels.data if _is_layer(labels) else labels)
    lab = lab.astype(np.uint8) if lab.dtype == bool else lab
    if lab.shape != array.shape:
        raise MaskSAMError(f"labels {label_name} have shape {lab.shape} but the scan {name!r} has {array.shape} "
                           "(Z, Y, X): the labels must be painted on the scan's voxel grid (select the scan, "
                           "then Layers > New Labels Layer)")
    if not np.issubdtype(lab.dtype, np.integer):
        raise MaskSAMError(f"labels {label_name} have dtype {lab.dtype}; integer class ids are needed")
    values = _label_values(lab)
    if values.size and values[0] < 0:
        raise MaskSAMError(f"labels {label_name} hold negative values ({int(values[0])}); use 0 for background "
                           "and 1, 2, ... for the classes")
    present = [int(v) for v in values if v > 0]
    if not present:
        raise MaskSAMError(f"labels {label_name} are empty: paint at least one structure (label 1, 2, ...) "
                           "on the scan before training")
    table = list(class_names)

    def name_of(v: int) -> str:
        return table[v] if v < len(table) and table[v] else f"class_{v}"

    names = _unique(["background" if not table or not table[0] else table[0]] + [name_of(v) for v in present])
    dropped = tuple(name_of(v) for v in sorted(set(range(1, len(table))) - set(present)))
    dtype = np.uint8 if len(present) < 255 else np.int16
    if present == list(range(1, len(present) + 1)):
        remapped = lab.astype(dtype, copy=True)
    else:
        lut = np.zeros(max(present) + 1, dtype=dtype)
        lut[present] = np.arange(1, len(present) + 1)
        remapped = lut[lab]
    return LayersData(array, remapped, names, geometry, name, dropped)


def check_split(labels: np.ndarray, class_names: Sequence[str], val_fraction: float) -> list[str]:
    """Classes absent from the training part when the last ``val_fraction`` of the Z slices are held out
    for validation; raises MaskSAMError when no labelled voxel is left to train on."""
    if val_fraction <= 0:
        return []
    cut = round(labels.shape[0] * (1 - val_fraction))
    if cut < 1 or cut >= labels.shape[0]:
        raise MaskSAMError(f"the scan has {labels.shape[0]} slices: too few to hold out {val_fraction:.0%} of them "
                           "for validation; set the validation fraction to 0 or use a larger scan")
    values = set(_label_values(labels[:cut]).tolist())
    if values <= {0}:
        raise MaskSAMError(f"every labelled slice lies in the last {val_fraction:.0%} of the scan (along Z), "
                           "which is held out for validation: label slices nearer the start too, or set the "
                           "validation fraction to 0")
    return [str(n) for v, n in enumerate(class_names) if v > 0 and v not in values]


def _channel_name(image: np.ndarray, geometry: ImageGeometry) -> str:
    """``CT`` for Hounsfield units (also a crop inside the body: some air below -500 HU, and contrast or
    bone above 300 HU), so that the CT normalisation is used; else ``MR`` (``image`` for TIFF)."""
    if looks_like_ct(image) or (float(image.min()) <= -500 and float(np.percentile(image, 99.5)) >= 300):
        return "CT"
    return "image" if geometry.format == "tiff" else "MR"


def write_dataset(data: LayersData, out_dir: str | os.PathLike, *, case: str = "case_000",
                  overwrite: bool = False) -> Path:
    """Write ``data`` as a one-case nnU-Net v2 raw data set in ``out_dir/dataset``; returns that folder.

    An existing export there is replaced only with ``overwrite`` (resuming a run).
    """
    root = Path(out_dir) / DATASET_FOLDER
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise MaskSAMError(f"{root} already holds a data set: choose a new output folder, or resume the run")
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    write_image(root / "imagesTr" / f"{case}_0000{FILE_ENDING}", data.image, data.geometry, overwrite=True)
    write_labels(root / "labelsTr" / f"{case}{FILE_ENDING}", data.labels, data.geometry, overwrite=True)
    channel = _channel_name(data.image, data.geometry)
    meta = {
        "name": data.name, "channel_names": {"0": channel},
        "labels": {n: i for i, n in enumerate(data.class_names)},
        "numTraining": 1, "file_ending": FILE_ENDING,
        "description": f"exported from the napari layers of {data.name!r} by napari-masksam",
    }
    atomic_write_json(root / "dataset.json", meta)
    return root


def export_layers_dataset(image: Any, labels: Any, class_names: Sequence[str] | None,
                          out_dir: str | os.PathLike, *, geometry: ImageGeometry | None = None,
                          case: str = "case_000", overwrite: bool = False) -> Path:
    """Check, renumber and write a scan and its labels as a data set in ``out_dir/dataset``; returns it.

    See :func:`layers_training_data` for the arguments and :func:`write_dataset` for the files.
    """
    data = layers_training_data(image, labels, class_names, geometry=geometry)
    return write_dataset(data, out_dir, case=case, overwrite=overwrite)
