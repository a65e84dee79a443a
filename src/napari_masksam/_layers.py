"""Between napari layers and ``masksam_core``: volumes, geometry, and labelled result layers.

Conventions:

* Layer data are (Z, Y, X) arrays, as everywhere in ``masksam_core``. ``layer.scale`` is the voxel
  spacing (sz, sy, sx) in mm and ``layer.translate`` the position of voxel (0, 0, 0) in mm along
  the scan's own axes (:func:`scan_translate`), so that scans of different spacing, and a scan and
  crops of it (or labels saved from it), overlay in napari's world while every scan shows in its
  array order.
* The scan's full geometry (its 4×4 affine, the NIfTI header, the source path) travels in
  ``layer.metadata["masksam"]`` as a :class:`masksam_core.io.ImageGeometry`; every layer made
  from a layer copies it, and the writer saves labels with it, so the file on disk overlays the
  scan exactly in any viewer.
* Labels layers name their classes in ``layer.features``: one row per label value, column
  ``index`` (the value) and ``name`` (row 0 = background).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from masksam_core.errors import MaskSAMError
from masksam_core.io import CT_WINDOW, ImageGeometry

__all__ = ["GEOMETRY_KEY", "class_names_of", "contrast_limits", "geometry_from_meta", "geometry_of",
           "image_layer_kwargs", "labels_layer_kwargs", "scan_translate", "show_labels", "volume_of"]

GEOMETRY_KEY = "masksam"


def _percentiles(array: np.ndarray) -> tuple[float, float] | None:
    """The 0.5 and 99.5 percentiles of the finite voxels of every 16th-or-so slice; None without any."""
    sample = np.asarray(array[:: max(1, array.shape[0] // 16)])
    if np.issubdtype(sample.dtype, np.floating) or np.issubdtype(sample.dtype, np.complexfloating):
        sample = sample[np.isfinite(sample)]  # NaN (outside a scan's field of view) and inf left out
    if sample.size == 0:
        return None
    low, high = np.percentile(sample, [0.5, 99.5])
    return float(low), float(high)


def looks_like_ct(array: np.ndarray) -> bool:
    """True for Hounsfield-unit volumes (air near -1000 HU, bone or contrast above +300 HU)."""
    limits = _percentiles(array)
    return limits is not None and limits[0] <= -500 and limits[1] >= 300


def contrast_limits(array: np.ndarray) -> tuple[float, float]:
    """A soft-tissue window for CT; the 0.5--99.5 percentiles for MR and microscopy (finite voxels)."""
    if np.issubdtype(array.dtype, np.bool_):
        return 0.0, 1.0
    limits = _percentiles(array)
    if limits is None:
        return 0.0, 1.0
    if limits[0] <= -500 and limits[1] >= 300:
        return CT_WINDOW
    low, high = limits
    return (low, high) if high > low else (low, low + 1.0)


def scan_translate(geometry: ImageGeometry) -> tuple[float, float, float]:
    """napari ``translate`` (z, y, x) of a scan: where its voxel (0, 0, 0) lies, in mm, along its own axes.

    The file affine maps a voxel index v = (x, y, z) to the world as ``M v + o`` with ``M = D S``
    (D the axis directions, S the spacing). Along the scan's own axes a voxel lies at
    ``D⁻¹ (M v + o) = S v + D⁻¹ o``: napari's ``scale`` = S and ``translate`` = ``D⁻¹ o``. Scans that
    share their axis directions (a scan, crops of it, labels made on it) so overlay exactly, and
    each still shows in its array order (no rotation or flip on screen).
    """
    matrix = np.asarray(geometry.affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(norms <= 0):
        return (0.0, 0.0, 0.0)
    directions = matrix / norms
    try:
        xyz = np.linalg.solve(directions, np.asarray(geometry.affine, dtype=np.float64)[:3, 3])
    except np.linalg.LinAlgError:
        return (0.0, 0.0, 0.0)
    z, y, x = (float(v) for v in xyz[::-1])
    return z, y, x


def image_layer_kwargs(array: np.ndarray, geometry: ImageGeometry, name: str) -> dict[str, Any]:
    """Keyword arguments of an Image layer for ``array`` (Z, Y, X) read with ``geometry``."""
    return {"name": name, "scale": tuple(float(s) for s in geometry.spacing), "translate": scan_translate(geometry),
            "contrast_limits": contrast_limits(array), "colormap": "gray",
            "metadata": {GEOMETRY_KEY: geometry}}


def _last3(values: Any, default: float) -> np.ndarray:
    values = [float(v) for v in (values if values is not None else [])]
    return np.array(([default] * 3 + values)[-3:], dtype=np.float64)


def geometry_from_meta(shape: tuple[int, int, int], meta: dict[str, Any]) -> ImageGeometry:
    """The geometry napari shows a (Z, Y, X) layer with: ``affine @ (scale * index + translate)``.

    ``meta`` holds the layer's ``scale``, ``translate`` and ``affine`` (a napari Affine or a
    matrix). napari's axes are (z, y, x); the file affine maps (x, y, z), so the 3×3 part is
    reversed on both sides. With napari's default (identity) affine this is ``diag(sx, sy, sz)``
    with the origin at ``translate`` reversed.
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


def geometry_of(layer: Any) -> ImageGeometry:
    """The geometry of a layer: the one its reader stored, else the one napari shows it with
    (its ``scale``, ``translate`` and ``affine``, rotations included)."""
    shape = tuple(int(n) for n in np.shape(layer.data)[-3:])
    stored = getattr(layer, "metadata", {}).get(GEOMETRY_KEY)
    if isinstance(stored, ImageGeometry) and tuple(stored.shape) == shape:
        return stored
    affine = getattr(layer, "affine", None)
    return geometry_from_meta(shape, {"scale": layer.scale, "translate": layer.translate,  # type: ignore[arg-type]
                                      "affine": getattr(affine, "affine_matrix", affine)})


def volume_of(layer: Any) -> tuple[np.ndarray, tuple[float, float, float], ImageGeometry]:
    """(volume (Z, Y, X), spacing (sz, sy, sx) mm, geometry) of an Image layer, or a clear error."""
    if layer is None:
        raise MaskSAMError("no image layer chosen: open a scan (File > Open, or File > Open Sample > MaskSAM) "
                           "and pick it in the widget")
    if getattr(layer, "rgb", False):
        raise MaskSAMError(f"layer {layer.name!r} is an RGB image: MaskSAM segments grey-value 3D scans")
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    array = np.asarray(data)
    if array.ndim != 3:
        raise MaskSAMError(f"layer {layer.name!r} has {array.ndim} dimensions (shape {array.shape}); MaskSAM needs "
                           "a 3D scan (Z, Y, X). Split channels or time points into separate layers first")
    if min(array.shape) < 1:
        raise MaskSAMError(f"layer {layer.name!r} is empty (shape {array.shape})")
    geometry = geometry_of(layer)
    sz, sy, sx = (float(s) for s in geometry.spacing)
    return array, (sz, sy, sx), geometry


def class_names_of(layer: Any) -> list[str]:
    """Class names of a Labels layer: its ``features`` ``name`` column (row i = label i), else
    ``background``, ``class_1``, ... up to its largest label."""
    features = getattr(layer, "features", None)
    n = int(np.max(layer.data)) + 1 if np.size(layer.data) else 1
    if features is not None and "name" in features and len(features) > 0:
        if "index" in features:
            table = {int(i): str(v) for i, v in zip(features["index"], features["name"], strict=True)}
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


WRITTEN_KEY = "masksam_written"  # metadata: fingerprint of the labels a run wrote into the layer


def fingerprint(labels: Any) -> str:
    """A digest of a label array's shape, type and values (to tell whether someone edited it)."""
    array = np.ascontiguousarray(np.asarray(labels))
    digest = hashlib.blake2b(f"{array.shape}{array.dtype.str}".encode(), digest_size=16)
    digest.update(array.data.cast("B"))
    return digest.hexdigest()


def _unedited(layer: Any) -> bool:
    """A Labels layer still holding exactly what a run wrote into it."""
    return layer.__class__.__name__ == "Labels" and (layer.metadata or {}).get(WRITTEN_KEY) == fingerprint(layer.data)


def _next_name(viewer: Any, name: str) -> str:
    """``"<name> (k)"``: the first such result layer left unedited (it is reused), else the first free name."""
    for k in range(2, 10_000):
        candidate = f"{name} ({k})"
        if candidate not in viewer.layers or _unedited(viewer.layers[candidate]):
            return candidate
    return name


def show_labels(viewer: Any, image_layer: Any, labels: np.ndarray, class_names: Sequence[str],
                name: str | None = None, keep_edits: bool = True) -> Any:
    """Add (or, on a second run, update) the Labels layer ``name`` for ``image_layer``; returns it.

    With ``keep_edits``, a layer of that name whose labels were changed since a run wrote them
    (painted, erased, or not made by a run at all) is left as it is and the result goes to a new
    layer ``"<name> (2)"`` (the caller tells the user by the returned layer's name).
    """
    kwargs = labels_layer_kwargs(image_layer, class_names, name)
    if kwargs["name"] in viewer.layers and keep_edits and not _unedited(viewer.layers[kwargs["name"]]):
        kwargs["name"] = _next_name(viewer, kwargs["name"])  # leave the edited (or foreign) layer as it is
    existing = viewer.layers[kwargs["name"]] if kwargs["name"] in viewer.layers else None  # noqa: SIM401 - LayerList has no get()
    if existing is not None and existing.__class__.__name__ == "Labels":
        existing.data = labels
        for key in ("scale", "translate", "affine", "metadata", "features"):
            setattr(existing, key, kwargs[key])
        existing.metadata = {**existing.metadata, WRITTEN_KEY: fingerprint(labels)}
        return existing
    if existing is not None:  # another kind of layer has the name
        kwargs["name"] = _next_name(viewer, kwargs["name"])
    kwargs["metadata"] = {**kwargs["metadata"], WRITTEN_KEY: fingerprint(labels)}
    return viewer.add_labels(labels, **kwargs)
