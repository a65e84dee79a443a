"""``masksam-core prompt --propagate``: boxes followed through the slices, clicks, named objects.

With ``--propagate`` each ``--box`` is one object: a box on one slice (``--box Z Z+1 Y0 X0 Y1 X1``)
is segmented there and followed up and down until the object ends; a box over several slices
(Z0 < Z1 - 1) is placed on its middle slice and followed only within Z0 .. Z1-1. Each
``--point Z Y X {+,-}`` is a click on the object of the ``--box`` before it (positive: belongs to the
object; negative: does not); the object re-propagates after each. ``--name`` names the objects in
order (default ``box_N``). Objects never overwrite each other: an earlier object keeps its voxels.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import MaskSAMError
from .clicks import Click
from .sliding_window import Progress

__all__ = ["PointAction", "add_arguments", "check_points", "segment_propagated"]


class PointAction(argparse.Action):
    """``--point Z Y X SIGN``, remembered with the number of ``--box`` given before it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        points = list(getattr(namespace, self.dest) or [])
        points.append((len(getattr(namespace, "box", None) or []), list(values)))
        setattr(namespace, self.dest, points)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The interactive flags of ``prompt``."""
    from .windows import WINDOW_HELP

    p.add_argument("--propagate", action="store_true", help="each --box is one object: a box on one slice (Z Z+1 ...) "
                   "followed through the slices until the object ends (a box over several slices: from its middle "
                   "slice, within its slices)")
    p.add_argument("--point", action=PointAction, nargs=4, metavar=("Z", "Y", "X", "SIGN"), default=[],
                   help="with --propagate: a click (SIGN + or -) refining the object of the --box before it (repeat)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="class name of the n-th box's object (repeat; default box_N)")
    p.add_argument("--window", default="auto", help=WINDOW_HELP + " (default: auto)")


def check_points(points: Sequence[tuple[int, list[str]]], boxes: int, shape: Sequence[int]) -> list[tuple[int, Click]]:
    """``--point`` values -> (object index, click); clear errors for bad input."""
    out = []
    for before, values in points:
        text = " ".join(values)
        if before == 0:
            raise MaskSAMError(f"--point {text}: give it after the --box of the object it refines")
        *coords, sign = values
        if sign not in ("+", "-"):
            raise MaskSAMError(f"--point {text}: the last value must be + (belongs to the object) or - (does not)")
        try:
            z, y, x = (int(v) for v in coords)
        except ValueError:
            raise MaskSAMError(f"--point {text}: Z Y X must be whole voxel indices") from None
        if not all(0 <= v < n for v, n in zip((z, y, x), tuple(shape)[-3:], strict=True)):
            raise MaskSAMError(f"--point {text} lies outside the image of shape (Z, Y, X) = {tuple(shape)}")
        out.append((min(before, boxes) - 1, Click(z, y, x, sign == "+")))
    return out


def segment_propagated(volume: np.ndarray, boxes: list[tuple[int, ...]], points: list[tuple[int, Click]],
                       names: Sequence[str], *, sam, device: str, amp: str, window: str,
                       progress: Callable[[Progress], object] | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Labels (Z, Y, X) uint16 and class names for propagated, clicked, named objects."""
    from ..progress import drive
    from .interactive import InteractiveSession
    from .objects import LabelMap
    from .slice_cache import SliceEncoder

    if len(names) > len(boxes):
        raise MaskSAMError(f"{len(names)} --name for {len(boxes)} --box: give at most one name per box")
    if len(set(names)) < len(names):
        raise MaskSAMError(f"--name: each object needs its own name, got {list(names)}")
    session = InteractiveSession(SliceEncoder(volume, sam, device=device, amp=amp, window=window))
    labels = LabelMap(volume.shape)
    for i, (z0, z1, y0, x0, y1, x1) in enumerate(boxes):
        key = (z0 + z1 - 1) // 2
        ann = drive(session.start_iter({key: (y0, x0, y1, x1)}, None if z1 == z0 + 1 else (z0, z1)), progress)
        for _, click in (p for p in points if p[0] == i):
            ann = drive(session.click_iter(ann, click), progress)
        labels.add(ann.mask(), names[i] if i < len(names) else f"box_{i + 1}")
    return labels.labels, labels.class_names()
