"""Click geometry: how a positive or negative click changes a slice's prompt.

The SAM ViT backbones take points natively (``native`` rule: the click is added to the slice's
box and points). LiteMedSAM was trained on boxes only: a point alone gives an empty mask and points
added to a box make it worse. For it clicks act through the box (``box`` rule):

* a positive click outside the box grows the box to reach it (plus a margin);
* a negative click shrinks the box: the side nearest to the click moves to just past it;

and, with the ``box+local`` rule, local edits where the box cannot express the correction, applied
to the decoded mask of that slice:

* a positive click still outside the mask adds the connected part of SAM's answer to a small box
  around the click (what SAM sees there);
* a negative click still inside the mask removes the connected part of the mask around it within
  a small box around the click, or, when that part is the whole mask (the object has ended on this
  slice), clears the slice: propagation then stops there.

Boxes here are half-open voxel boxes (y0, x0, y1, x1) of one slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["CLICK_RULES", "Box", "Click", "component_at", "grow_box", "local_box", "mask_box", "shrink_box"]

CLICK_RULES = ("native", "box", "box+local")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Click:
    """A click on slice ``z`` at voxel (y, x); ``positive``: the voxel belongs to the object."""

    z: int
    y: int
    x: int
    positive: bool


def mask_box(mask: np.ndarray, margin: int = 0) -> Box | None:
    """Half-open bounding box (y0, x0, y1, x1) of a 2D mask, widened by ``margin`` within the slice; None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (max(int(ys[0]) - margin, 0), max(int(xs[0]) - margin, 0),
            min(int(ys[-1]) + 1 + margin, h), min(int(xs[-1]) + 1 + margin, w))


def grow_box(box: Box, y: int, x: int, margin: int, shape: tuple[int, int]) -> Box:
    """The smallest box holding ``box`` and voxel (y, x) with ``margin`` voxels around it, within ``shape``."""
    y0, x0, y1, x1 = box
    h, w = shape
    return (max(min(y0, y - margin), 0), max(min(x0, x - margin), 0),
            min(max(y1, y + 1 + margin), h), min(max(x1, x + 1 + margin), w))


def shrink_box(box: Box, y: int, x: int) -> Box | None:
    """``box`` with the side nearest to voxel (y, x) moved just past it (the click ends up outside);
    None when the click lies outside the box or no side can move without emptying the box."""
    y0, x0, y1, x1 = box
    if not (y0 <= y < y1 and x0 <= x < x1):
        return None
    options = sorted([(y - y0, (y + 1, x0, y1, x1)), (y1 - 1 - y, (y0, x0, y, x1)),
                      (x - x0, (y0, x + 1, y1, x1)), (x1 - 1 - x, (y0, x0, y1, x))])
    for _, (a, b, c, d) in options:
        if a < c and b < d:
            return a, b, c, d
    return None


def local_box(y: int, x: int, reference: Box | None, shape: tuple[int, int], fraction: float = 0.35,
              minimum: int = 6) -> Box:
    """A square box centred on (y, x) whose side is ``fraction`` of the reference box's longer side
    (at least ``minimum`` voxels), within ``shape``."""
    side = minimum if reference is None else max(minimum, round(fraction * max(reference[2] - reference[0],
                                                                               reference[3] - reference[1])))
    half = side // 2
    h, w = shape
    return max(y - half, 0), max(x - half, 0), min(y + half + 1, h), min(x + half + 1, w)


def component_at(mask: np.ndarray, y: int, x: int) -> np.ndarray:
    """The 8-connected component of ``mask`` holding voxel (y, x) (all False if (y, x) is outside the mask)."""
    if not mask[y, x]:
        return np.zeros_like(mask, dtype=bool)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    return labels == labels[y, x]


def in_box(mask: np.ndarray, box: Box) -> np.ndarray:
    """``mask`` with everything outside ``box`` set to False."""
    out = np.zeros_like(mask, dtype=bool)
    y0, x0, y1, x1 = box
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out
