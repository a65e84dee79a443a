"""Between napari layers and ``masksam_core``: volumes, geometry, and labelled result layers.

Conventions:

* Layer data are (Z, Y, X) arrays, as everywhere in ``masksam_core``. ``layer.scale`` is the voxel
  spacing (sz, sy, sx) in mm, so that scans of different spacing overlay in napari's world.
* The scan's full geometry (its 4×4 affine, the NIfTI header, the source path) travels in
  ``layer.metadata["masksam"]`` as a :class:`masksam_core.io.ImageGeometry`; every layer made
  from a layer copies it, and the writer saves labels with it, so the file on disk overlays the
  scan exactly in any viewer.
* Labels layers name their classes in ``layer.features``: one row per label value, column
  ``index`` (the value) and ``name`` (row 0 = background).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from masksam_core.errors import MaskSAMError
from masksam_core.io import ImageGeometry

__all__ = ["GEOMETRY_KEY", "class_names_of", "contrast_limits", "geometry_of", "image_layer_kwargs",
           "labels_layer_kwargs", "show_labels", "volume_of"]

GEOMETRY_KEY = "masksam"

CT_WINDOW = (-160.0, 240.0)  # soft-tissue window: level 40 HU, width 400 HU


def looks_like_ct(array: np.ndarray) -> bool:
    """True for Hounsfield-unit volumes (air near -1000 HU, bone or contrast above +300 HU)."""
    low, high = np.percentile(array[:: max(1, array.shape[0] // 16)], [0.5, 99.5])
    return bool(low <= -500 and high >= 300)


def contrast_limits(array: np.ndarray) -> tuple[float, float]:
    """A soft-tissue window for CT; the 0.5--99.5 percentiles for MR and microscopy."""
    if np.issubdtype(array.dtype, np.bool_):
        return 0.0, 1.0
    if looks_like_ct(array):
        return CT_WINDOW
    low, high = (float(v) for v in np.percentile(array[:: max(1, array.shape[0] // 16)], [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def image_layer_kwargs(array: np.ndarray, geometry: ImageGeometry, name: str) -> dict[str, Any]:
    """Keyword arguments of an Image layer for ``array`` (Z, Y, X) read with ``geometry``."""
    return {"name": name, "scale": tuple(float(s) for s in geometry.spacing),
            "contrast_limits": contrast_limits(array), "colormap": "gray",
            "metadata": {GEOMETRY_KEY: geometry}}


def geometry_of(layer: Any) -> ImageGeometry:
    """The geometry of a layer: the one its reader stored, else a diagonal one from ``layer.scale``."""
    shape = tuple(int(n) for n in np.shape(layer.data)[-3:])
    stored = getattr(layer, "metadata", {}).get(GEOMETRY_KEY)
    if isinstance(stored, ImageGeometry) and tuple(stored.shape) == shape:
        return stored
    scale = tuple(float(s) for s in layer.scale[-3:])
    translate = tuple(float(t) for t in layer.translate[-3:])
    geometry = ImageGeometry.from_spacing(shape, scale)
    geometry.affine[:3, 3] = translate[::-1]  # file index (x, y, z) -> world; napari's translate is (z, y, x)
    return geometry


def volume_of(layer: Any) -> tuple[np.ndarray, tuple[float, float, float], ImageGeometry]:
    """(volume (Z, Y, X), spacing (sz, sy, sx) mm, geometry) of an Image layer, or a clear error."""
    if layer is None:
        raise MaskSAMError("no image layer chosen: open a scan (File > Open, or File > Open Sample > MaskSAM) "
                           "and pick it in the widget")
    if getattr(layer, "rgb", False):
        raise MaskSAMError(f"layer {layer.name!r} is an RGB image: MaskSAM segments grey-value 3D scans")
    if getattr(layer, "multiscale", False):
        data = layer.data[0]
    else:
        data = layer.data
    array = np.asarray(data)
    if array.ndim != 3:
        raise MaskSAMError(f"layer {layer.name!r} has {array.ndim} dimensions (shape {array.shape}); MaskSAM needs "
                           "a 3D scan (Z, Y, X). Split channels or time points into separate layers first")
    if min(array.shape) < 1:
        raise MaskSAMError(f"layer {layer.name!r} is empty (shape {array.shape})")
    geometry = geometry_of(layer)
    return array, tuple(float(s) for s in geometry.spacing), geometry  # type: ignore[return-value]


def class_names_of(layer: Any) -> list[str]:
    """Class names of a Labels layer: its ``features`` ``name`` column (row i = label i), else
    ``background``, ``class_1``, ... up to its largest label."""
    features = getattr(layer, "features", None)
    n = int(np.max(layer.data)) + 1 if np.size(layer.data) else 1
    if features is not None and "name" in features and len(features) > 0:
        if "index" in features:
            table = {int(i): str(v) for i, v in zip(features["index"], features["name"])}
        else:
            table = {i: str(v) for i, v in enumerate(features["name"])}
        n = max(n, max(table) + 1)
        return [table.get(i, "background" if i == 0 else f"class_{i}") for i in range(n)]
    return ["background"] + [f"class_{i}" for i in range(1, n)]


def labels_layer_kwargs(image_layer: Any, class_names: Sequence[str], name: str | None = None) -> dict[str, Any]:
    """Keyword arguments of a Labels layer that overlays ``image_layer`` exactly and names its classes."""
    names = [str(n) for n in class_names]
    metadata = dict(getattr(image_layer, "metadata", {}) or {})
    metadata[GEOMETRY_KEY] = geometry_of(image_layer)
    metadata["class_names"] = names
    return {"name": name or f"{image_layer.name} [MaskSAM]",
            "scale": tuple(image_layer.scale), "translate": tuple(image_layer.translate),
            "affine": np.asarray(image_layer.affine.affine_matrix), "metadata": metadata,
            "features": {"index": np.arange(len(names)), "name": names}}


def show_labels(viewer: Any, image_layer: Any, labels: np.ndarray, class_names: Sequence[str],
                name: str | None = None) -> Any:
    """Add (or, on a second run, update) the Labels layer ``name`` for ``image_layer``; returns it."""
    kwargs = labels_layer_kwargs(image_layer, class_names, name)
    if kwargs["name"] in viewer.layers and viewer.layers[kwargs["name"]].__class__.__name__ == "Labels":
        layer = viewer.layers[kwargs["name"]]
        layer.data = labels
        for key in ("scale", "translate", "affine", "metadata", "features"):
            setattr(layer, key, kwargs[key])
        return layer
    return viewer.add_labels(labels, **kwargs)
