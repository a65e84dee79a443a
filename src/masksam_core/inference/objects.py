"""Named objects in one label volume: no overwriting unless asked, and undo.

:class:`LabelMap` is the bookkeeping behind interactive annotation: every object gets a label value
and a class name, all objects live in one (Z, Y, X) label volume, an object only takes voxels that
are background (or already its own) unless ``overwrite=True``, and every change can be undone, last
first. The napari widget keeps one per Labels layer; the CLI's ``prompt --propagate`` writes one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MaskSAMError

__all__ = ["LabelMap"]


@dataclass(frozen=True)
class _Change:
    """What one add or update changed: the voxels written and their values before."""

    label: int
    index: np.ndarray
    before: np.ndarray
    name_before: str | None


class LabelMap:
    """A label volume with class names, no-overwrite writes and undo.

    Args:
        shape: (Z, Y, X) of a new, empty label volume; or
        labels: an existing label volume (kept as it is; its labels are kept unless overwritten).
        names: names of existing labels {value: name}.
    """

    def __init__(self, shape: tuple[int, ...] | None = None, *, labels: np.ndarray | None = None,
                 names: dict[int, str] | None = None) -> None:
        if labels is None:
            if shape is None:
                raise MaskSAMError("give a shape or an existing label volume")
            labels = np.zeros(tuple(shape), dtype=np.uint16)
        self.labels = np.ascontiguousarray(labels)
        if self.labels.dtype.kind not in "ui":
            raise MaskSAMError(f"labels must be integers, got {self.labels.dtype}")
        self.names: dict[int, str] = {int(k): str(v) for k, v in (names or {}).items() if int(k) != 0}
        for value in np.unique(self.labels):
            if value != 0:
                self.names.setdefault(int(value), f"label_{int(value)}")
        self._history: list[_Change] = []

    def next_label(self) -> int:
        """The smallest label value not yet in use."""
        used = set(self.names) | {0}
        return next(v for v in range(1, len(used) + 2) if v not in used)

    def label_of(self, name: str) -> int | None:
        return next((k for k, v in self.names.items() if v == name), None)

    def add(self, mask: np.ndarray, name: str | None = None, *, overwrite: bool = False) -> int:
        """Write ``mask`` as a new object named ``name`` (default ``object_N``); returns its label value.
        A name already in use adds to that object. Voxels of other labels are kept unless ``overwrite``."""
        label = self.label_of(name) if name else None
        label = label or self.next_label()
        if label > np.iinfo(self.labels.dtype).max:
            raise MaskSAMError(f"label {label} does not fit the label volume's type {self.labels.dtype}")
        return self._write(label, mask, name or self.names.get(label) or f"object_{label}", overwrite, replace=False)

    def update(self, label: int, mask: np.ndarray, *, overwrite: bool = False) -> int:
        """Replace object ``label``'s voxels by ``mask`` (a corrected object); other labels are kept unless
        ``overwrite``."""
        if label not in self.names:
            raise MaskSAMError(f"no object with label {label} (labels: {sorted(self.names)})")
        return self._write(label, mask, self.names[label], overwrite, replace=True)

    def _write(self, label: int, mask: np.ndarray, name: str, overwrite: bool, replace: bool) -> int:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.labels.shape:
            raise MaskSAMError(f"mask shape {mask.shape} differs from the label volume's {self.labels.shape}")
        free = (self.labels == 0) | (self.labels == label)
        target = mask if overwrite else mask & free
        if replace:
            target = target | ((self.labels == label) & ~mask)
        index = np.flatnonzero(target)
        flat = self.labels.reshape(-1)
        self._history.append(_Change(label, index, flat[index].copy(), self.names.get(label)))
        new = np.where(mask.reshape(-1)[index], label, 0).astype(self.labels.dtype)
        flat[index] = new
        self.names[label] = name
        return label

    def undo(self) -> int | None:
        """Undo the last add or update; returns the label it concerned (None when there is nothing to undo)."""
        if not self._history:
            return None
        change = self._history.pop()
        self.labels.reshape(-1)[change.index] = change.before
        if change.name_before is None:
            self.names.pop(change.label, None)
        else:
            self.names[change.label] = change.name_before
        return change.label

    @property
    def can_undo(self) -> bool:
        return bool(self._history)

    def class_names(self) -> dict[int, str]:
        """{0: "background", label: name, ...} as the label writers take them."""
        return {0: "background", **dict(sorted(self.names.items()))}
