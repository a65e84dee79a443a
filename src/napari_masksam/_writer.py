"""napari writer: a Labels layer as NIfTI or TIFF that overlays its scan exactly.

The geometry comes from the layer's ``metadata["masksam"]`` (the :class:`~masksam_core.io.ImageGeometry`
of the scan the labels were made on: its exact affine and NIfTI header), else from the layer's
``scale``, ``translate`` and ``affine``. Class names (the ``features`` ``name`` column, else
``metadata["class_names"]``, else ``background``, ``class_1``, ...) go to the ``.classes.json``
sidecar, so that MaskSAM's reader opens the file again as a Labels layer with its names.
"""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np

from masksam_core.errors import MaskSAMError
from masksam_core.io import NIFTI_SUFFIXES, TIFF_SUFFIXES, ImageGeometry
from masksam_core.io import write_labels as write_label_file

from ._layers import GEOMETRY_KEY, class_names_of

__all__ = ["geometry_from_meta", "write_labels"]


def _last3(values: Any, default: float) -> np.ndarray:
    values = [float(v) for v in (values if values is not None else [])]
    return np.array(([default] * 3 + values)[-3:], dtype=np.float64)


def geometry_from_meta(shape: tuple[int, int, int], meta: dict[str, Any]) -> ImageGeometry:
    """The geometry napari shows a (Z, Y, X) layer with: ``affine @ (scale * index + translate)``.

    napari's axes are (z, y, x); the file affine maps (x, y, z), so the 3×3 part is reversed on
    both sides. With napari's default (identity) affine this is ``diag(sx, sy, sz)`` with the
    origin at ``translate`` reversed.
    """
    scale, translate = _last3(meta.get("scale"), 1.0), _last3(meta.get("translate"), 0.0)
    index_to_napari = np.eye(4)
    index_to_napari[:3, :3], index_to_napari[:3, 3] = np.diag(scale), translate
    napari_affine = np.eye(4)
    matrix = meta.get("affine")
    matrix = getattr(matrix, "affine_matrix", matrix)  # a napari Affine, or a plain (n+1, n+1) array
    if matrix is not None:
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1] and matrix.shape[0] >= 4:
            napari_affine[:3, :3], napari_affine[:3, 3] = matrix[-4:-1, -4:-1], matrix[-4:-1, -1]
    zyx = napari_affine @ index_to_napari
    flip = np.eye(4)[[2, 1, 0, 3]]  # (z, y, x, 1) <-> (x, y, z, 1)
    affine = flip @ zyx @ flip
    sx, sy, sz = (float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    if min(sx, sy, sz) <= 0:
        raise MaskSAMError(f"the layer's scale {tuple(scale)} has a zero axis; set a positive voxel size "
                           "(layer.scale = (sz, sy, sx) in mm) before saving")
    return ImageGeometry(affine, (sz, sy, sx), shape, "nifti")


def _class_names(data: np.ndarray, meta: dict[str, Any]) -> dict[int, str]:
    features = meta.get("features")
    if features is None or "name" not in features or len(features) == 0:
        names = (meta.get("metadata") or {}).get("class_names")
        features = {"index": np.arange(len(names)), "name": list(names)} if names else None
    return dict(enumerate(class_names_of(SimpleNamespace(features=features, data=data))))


def _volume(data: Any) -> np.ndarray:
    if isinstance(data, (list, tuple)):  # multiscale labels: the full-resolution level
        data = data[0]
    array = np.asarray(data)
    if array.ndim != 3:
        raise MaskSAMError(f"labels of shape {array.shape}: MaskSAM writes one 3D (Z, Y, X) label map; "
                           "save each time point or channel as its own layer")
    return array


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer (npe2 single-layer writer) to ``path``; returns ``[path]``.

    data: (Z, Y, X) integer labels; meta: the layer's attributes (``scale``, ``translate``,
    ``affine``, ``features``, ``metadata``). NIfTI (``.nii.gz``, ``.nii``) keeps the scan's exact
    affine and header from ``metadata["masksam"]``; TIFF (``.tif``, ``.tiff``) stores the spacing
    (ImageJ metadata plus a ``.tif.json`` sidecar). Labels whose shape differs from that geometry
    are written with the layer's scale instead, with a warning. Class names go to
    ``<stem>.classes.json``.

    An existing file (and its sidecars) is **replaced**: napari's Save dialog has already asked
    the user to confirm. Each file is written to a temporary name and renamed (atomic).
    Raises MaskSAMError for another extension, non-3D data or invalid label values.
    """
    if not os.fspath(path).lower().endswith(NIFTI_SUFFIXES + TIFF_SUFFIXES):
        raise MaskSAMError(f"{path}: MaskSAM saves labels as NIfTI (.nii.gz, .nii) or TIFF (.tif, .tiff); "
                           "choose one of these extensions")
    meta = dict(meta or {})
    labels = _volume(data)
    shape = (int(labels.shape[0]), int(labels.shape[1]), int(labels.shape[2]))
    geometry = (meta.get("metadata") or {}).get(GEOMETRY_KEY)
    if isinstance(geometry, ImageGeometry) and tuple(geometry.shape) != shape:
        warnings.warn(f"labels {meta.get('name', '')!r} of shape {shape} do not match the shape "
                      f"{tuple(geometry.shape)} of the scan they were made on; saving {path} with the "
                      "layer's scale and translate instead of the scan's affine", stacklevel=2)
        geometry = None
    if not isinstance(geometry, ImageGeometry):
        geometry = geometry_from_meta(shape, meta)
    written = write_label_file(path, labels, geometry, class_names=_class_names(labels, meta), overwrite=True)
    return [os.fspath(written)]
