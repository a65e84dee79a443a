"""The spacing of a 3D TIFF for :mod:`masksam_core.io`: sidecar JSON, OME or ImageJ metadata, or 1 mm.

A sidecar ``{"spacing": [sz, sy, sx]}`` (mm) wins; else OME-XML's ``PhysicalSizeZ/Y/X`` in their
units (micrometres by default, as the OME schema says); else ImageJ's ``spacing`` (Z) and X/Y
resolution tags (pixels per unit) in its ``unit``, converted to mm; else 1.0 mm with a warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import tifffile

from .errors import MaskSAMError

UNIT_MM = {"mm": 1.0, "millimeter": 1.0, "millimetre": 1.0, "cm": 10.0, "m": 1000.0, "nm": 1e-6,
           "um": 1e-3, "micron": 1e-3, "microns": 1e-3, "\u00b5m": 1e-3, "\u03bcm": 1e-3, "\\u00b5m": 1e-3}


def tiff_spacing(path: Path, tif: tifffile.TiffFile, sidecars: Sequence[Path]) -> tuple[float, float, float]:
    """(sz, sy, sx) in mm from the first existing sidecar JSON of ``sidecars``, else the ImageJ
    metadata of ``tif`` (unit converted to mm), else 1.0 with a warning that says how to set it."""
    for sidecar in sidecars:
        if sidecar.is_file():
            try:
                spacing = tuple(float(s) for s in json.loads(sidecar.read_text(encoding="utf-8"))["spacing"])
            except (ValueError, KeyError, TypeError) as error:
                raise MaskSAMError(f"{sidecar}: expected JSON like {{\"spacing\": [sz, sy, sx]}} "
                                   f"({error}); fix or delete this file") from error
            if len(spacing) != 3 or min(spacing) <= 0:
                raise MaskSAMError(f"{sidecar}: 'spacing' must be 3 positive numbers [sz, sy, sx] "
                                   f"in mm, got {list(spacing)}")
            return spacing
    ome = _ome_spacing(path, tif)
    if ome is not None:
        return ome
    meta, tags = tif.imagej_metadata or {}, tif.pages.first.tags
    if meta and "XResolution" in tags and "YResolution" in tags:  # pixels per unit, as (num, den)
        unit = str(meta.get("unit", "mm")).strip().lower()
        if unit not in UNIT_MM:
            warnings.warn(f"{path}: unknown ImageJ unit {unit!r}; taking it as mm", stacklevel=3)
        scale = UNIT_MM.get(unit, 1.0)
        (ny, dy), (nx, dx) = tags["YResolution"].value, tags["XResolution"].value
        return (float(meta.get("spacing", 1.0)) * scale, dy / ny * scale if ny else scale,
                dx / nx * scale if nx else scale)
    warnings.warn(f"{path}: no spacing found (no {sidecars[0].name} sidecar, no ImageJ "
                  "metadata); using 1.0 mm. Write {\"spacing\": [sz, sy, sx]} to "
                  f"{sidecars[0].name} to set it.", stacklevel=3)
    return (1.0, 1.0, 1.0)


def _ome_spacing(path: Path, tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """(sz, sy, sx) mm from the first image's OME-XML ``Pixels`` (all three sizes given), else None."""
    import xml.etree.ElementTree as ElementTree

    xml = tif.ome_metadata if tif.is_ome else None
    if not xml:
        return None
    try:
        pixels = next(e for e in ElementTree.fromstring(xml).iter() if e.tag.rsplit("}", 1)[-1] == "Pixels")
    except (ElementTree.ParseError, StopIteration):
        return None
    sizes = []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m").strip().lower()
        if value is None:
            return None
        try:
            usable = unit in UNIT_MM and float(value) > 0
        except ValueError:
            usable = False
        if not usable:
            warnings.warn(f"{path}: OME PhysicalSize{axis} {value} {unit!r} cannot be used; ignoring the OME sizes",
                          stacklevel=4)
            return None
        sizes.append(float(value) * UNIT_MM[unit])
    return sizes[0], sizes[1], sizes[2]
