"""napari writer: a Labels layer as NIfTI or TIFF that overlays its scan exactly.

The geometry comes from the layer's ``metadata["masksam"]`` (the :class:`~masksam_core.io.ImageGeometry`
of the scan the labels were made on: its exact affine and NIfTI header); for a layer without it
(labels drawn in napari: *New Labels Layer* copies the scan layer's placement but not its metadata)
from the scan layer of the current viewer that has the same shape and placement; else from the
layer's ``scale``, ``translate`` and ``affine``. Class names (the ``features`` ``name`` column, else
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
from masksam_core.files import is_image_name
from masksam_core.io import ImageGeometry
from masksam_core.io import write_labels as write_label_file

from ._layers import GEOMETRY_KEY, class_names_of, geometry_from_meta

__all__ = ["geometry_from_meta", "write_labels"]


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


def _scan_geometry_in_viewer(shape: tuple[int, int, int], meta: dict[str, Any]) -> ImageGeometry | None:
    """The stored geometry of the one scan in napari's current viewer that ``meta``'s layer lies on
    exactly (same shape, scale, translate and affine), or None (no viewer, none, or scans that disagree)."""
    import sys

    if "napari" not in sys.modules:
        return None
    try:
        viewer = sys.modules["napari"].current_viewer()
        layers = list(viewer.layers) if viewer is not None else []
    except Exception:  # no viewer to look in: the layer's own placement is used
        return None
    mine = geometry_from_meta(shape, meta).affine  # where napari shows the labels
    found: list[ImageGeometry] = []
    for layer in layers:
        geometry = (getattr(layer, "metadata", None) or {}).get(GEOMETRY_KEY)
        if not isinstance(geometry, ImageGeometry) or tuple(geometry.shape) != shape:
            continue
        shown = geometry_from_meta(shape, {"scale": layer.scale, "translate": layer.translate, "affine": layer.affine})
        if np.allclose(shown.affine, mine) and not any(np.allclose(geometry.affine, g.affine) for g in found):
            found.append(geometry)
    return found[0] if len(found) == 1 else None


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
    if not is_image_name(os.fspath(path)):
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
        geometry = _scan_geometry_in_viewer(shape, meta)
    if not isinstance(geometry, ImageGeometry):
        if any(float(t) for t in (meta.get("translate") or ())):
            warnings.warn(f"no open scan layer lies where {meta.get('name', 'these labels')!r} lies: {path} gets the "
                          "layer's own voxel size and position, with the axes as shown; to give it the scan's exact "
                          "affine (orientation included), save while the scan it was drawn on is open", stacklevel=2)
        geometry = geometry_from_meta(shape, meta)
    written = write_label_file(path, labels, geometry, class_names=_class_names(labels, meta), overwrite=True)
    return [os.fspath(written)]
