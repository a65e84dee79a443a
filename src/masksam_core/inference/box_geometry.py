"""Rectangles drawn on slices of a volume -> the half-open voxel boxes that box prompts take.

A rectangle is ``(slice, y_min, x_min, y_max, x_max)`` in the volume's voxel coordinates
(axes (Z, Y, X)), where voxel v spans v - 0.5 .. v + 0.5: what a viewer gives for a rectangle
drawn on an axial slice. Each rectangle becomes a box ``(z0, z1, y0, x0, y1, x1)`` as
:meth:`BoxPrompter.segment_iter <masksam_core.inference.box_prompt.BoxPrompter.segment_iter>`
takes it:

* in-plane: the voxels the rectangle overlaps, clipped to the volume;
* along Z: the slices of a z-range ``(first, last)`` (both included), which must hold the
  rectangle's own slice. When the rectangles lie on exactly two slices, as many on each, each
  rectangle on the first slice that overlaps the nearest one on the other in-plane makes with it
  one box from the first slice to the last, covering both; the others are boxed over the z-range.

Errors are :class:`MaskSAMError` messages that name the rectangle (or box) that is wrong; their hints
name the controls of napari's Box prompt widget, where such rectangles are drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import MaskSAMError

__all__ = ["boxes_from_rectangles"]

EPS = 1e-6  # coordinates this close to a voxel edge count as on it

Rectangle = Sequence[float]
Span = tuple[int, int, float, float, float, float]  # z0, z1 (slices), y_min, x_min, y_max, x_max


def _in_plane(low: float, high: float, size: int) -> tuple[int, int]:
    """Half-open voxel range [v0, v1) overlapped by [low, high] (voxel v spans v - 0.5 .. v + 0.5)."""
    v0 = max(math.floor(low + 0.5 + EPS), 0)
    v1 = min(math.ceil(high - 0.5 - EPS) + 1, size)
    return v0, v1


def _paired_spans(rects: Sequence[Rectangle]) -> tuple[list[Span], list[Rectangle]]:
    """(boxes from rectangles drawn on an object's first and last slices, the other rectangles).

    Pairs are looked for when the rectangles lie on exactly two slices, as many on each: each one
    on the first slice with the nearest one (by centre) on the other. A pair whose rectangles
    overlap in-plane is one object's two ends; the two rectangles of a pair that do not overlap are
    different objects, each to be boxed over the z-range.
    """
    slices = sorted({int(r[0]) for r in rects})
    first = [r for r in rects if r[0] == slices[0]]
    if len(slices) != 2 or len(first) * 2 != len(rects):
        return [], list(rects)
    rest = [r for r in rects if r[0] == slices[1]]
    spans: list[Span] = []
    single: list[Rectangle] = []
    for r in first:
        centre = np.array([r[1] + r[3], r[2] + r[4]])
        j = min(range(len(rest)),
                key=lambda k: np.hypot(*(centre - [rest[k][1] + rest[k][3], rest[k][2] + rest[k][4]])))
        other = rest.pop(j)
        if min(r[3], other[3]) <= max(r[1], other[1]) or min(r[4], other[4]) <= max(r[2], other[2]):
            single += [r, other]  # they do not overlap: two objects, not one object's two ends
            continue
        spans.append((slices[0], slices[1], min(r[1], other[1]), min(r[2], other[2]), max(r[3], other[3]),
                      max(r[4], other[4])))
    return spans, single


def boxes_from_rectangles(rects: Sequence[Rectangle], shape: Sequence[int], z_range: tuple[int, int]
                          ) -> list[tuple[int, int, int, int, int, int]]:
    """Voxel boxes (z0, z1, y0, x0, y1, x1), half-open, from rectangles (slice, y_min, x_min, y_max, x_max)
    in the voxel coordinates of a volume of (Z, Y, X) ``shape``; ``z_range`` = (first, last) slice,
    inclusive. See the module docstring for the rules; errors say which rectangle is wrong."""
    if not rects:
        raise MaskSAMError("no boxes: press 'Add boxes layer' and draw a rectangle around each object on one "
                           "of its slices")
    depth, height, width = (int(n) for n in shape[-3:])
    for i, (z, *_) in enumerate(rects, 1):
        if not 0 <= z < depth:
            raise MaskSAMError(f"rectangle {i} is on slice {z}, outside the image's slices 0..{depth - 1}")
    spans, single = _paired_spans(rects)
    if single:
        z0, z1 = (int(v) for v in z_range)
        if z0 > z1:
            raise MaskSAMError(f"the z-range {z0}..{z1} is empty: set z0 at or below z1")
        z0, z1 = max(z0, 0), min(z1, depth - 1)
        for rect in single:
            i = next(k for k, r in enumerate(rects, 1) if r is rect)
            z, y_min, x_min, y_max, x_max = rect
            if not z0 <= z <= z1:
                raise MaskSAMError(f"rectangle {i} is on slice {int(z)}, outside the z-range {z0}..{z1}: set z0 and "
                                   "z1 around it (or tick 'follow the current slice' and go to its slice)")
            spans.append((z0, z1, y_min, x_min, y_max, x_max))
    boxes = []
    for i, (z0, z1, y_min, x_min, y_max, x_max) in enumerate(spans, 1):
        (y0, y1), (x0, x1) = _in_plane(y_min, y_max, height), _in_plane(x_min, x_max, width)
        if y0 >= y1 or x0 >= x1:
            raise MaskSAMError(f"box {i} lies outside the image in-plane ({height} x {width} voxels): draw it on the "
                               "image")
        boxes.append((int(z0), int(z1) + 1, y0, x0, y1, x1))
    return boxes
