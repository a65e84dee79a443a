"""The Box prompt widget: rectangles drawn in napari -> one 3D mask per box.

Rectangles live in a Shapes layer (``"boxes [MaskSAM]"``, made by "Add boxes layer" with the
image's scale, translate and affine, so that its data coordinates are the image's voxel
indices; any other Shapes layer works too: vertices go through world coordinates). Each
rectangle becomes a half-open voxel box ``(z0, z1, y0, x0, y1, x1)`` as
``BoxPrompter.segment_iter`` takes it (see ``masksam_core.inference.box_prompt``):

* in-plane: the voxels the rectangle overlaps, clipped to the image;
* along Z: the slices ``z0 .. z1`` of the spin boxes (both included; by default they follow the
  current slice, ± :data:`HALF_DEPTH`), which must hold the rectangle's own slice. When the
  rectangles lie on exactly two slices, as many on each, each rectangle on the first slice that
  overlaps the nearest one on the other in-plane makes with it one box from the first slice to
  the last, covering both; the others are boxed over the z-range.

The masks go to the Labels layer ``"<image> [boxes]"``: box i of a run becomes a new label after
the layer's largest one (earlier results stay), named ``"box <label>"`` in its ``features``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, PushButton, SpinBox

from masksam_core.errors import MaskSAMError

from ._compat import load_triton_beside_mesa
from ._layers import class_names_of, show_labels, volume_of
from ._models import ModelPicker, box_model_choices
from ._segment_widget import ModelCache, chosen_image, device_choices, image_choices, watch_layers
from ._worker import Job, JobPanel, failed_job, notify_error, on_close, run_job

if TYPE_CHECKING:
    import napari

__all__ = ["BOXES_LAYER", "BoxPromptWidget", "boxes_from_rectangles"]

WHAT = "Box prompt (MaskSAM)"
BOXES_LAYER = "boxes [MaskSAM]"
HALF_DEPTH = 2  # slices above and below the current one
EPS = 1e-6  # coordinates this close to a voxel edge count as on it


def _in_plane(low: float, high: float, size: int) -> tuple[int, int]:
    """Half-open voxel range [v0, v1) overlapped by [low, high] (voxel v spans v - 0.5 .. v + 0.5)."""
    v0 = max(math.floor(low + 0.5 + EPS), 0)
    v1 = min(math.ceil(high - 0.5 - EPS) + 1, size)
    return v0, v1


def _paired_spans(rects: Sequence[Sequence[float]]) -> tuple[list[tuple[float, ...]], list[Sequence[float]]]:
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
    spans, single = [], []
    for r in first:
        centre = np.array([r[1] + r[3], r[2] + r[4]])
        j = min(range(len(rest)), key=lambda k: np.hypot(*(centre - [rest[k][1] + rest[k][3], rest[k][2] + rest[k][4]])))
        other = rest.pop(j)
        if min(r[3], other[3]) <= max(r[1], other[1]) or min(r[4], other[4]) <= max(r[2], other[2]):
            single += [r, other]  # they do not overlap: two objects, not one object's two ends
            continue
        spans.append((slices[0], slices[1], min(r[1], other[1]), min(r[2], other[2]), max(r[3], other[3]),
                      max(r[4], other[4])))
    return spans, single


def boxes_from_rectangles(rects: Sequence[Sequence[float]], shape: Sequence[int], z_range: tuple[int, int]
                          ) -> list[tuple[int, int, int, int, int, int]]:
    """Voxel boxes (z0, z1, y0, x0, y1, x1), half-open, from rectangles (slice, y_min, x_min, y_max, x_max)
    in the image's voxel coordinates (Z, Y, X) ``shape``; ``z_range`` = (first, last) slice, inclusive.
    See the module docstring for the rules; errors say which rectangle is wrong."""
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


def _load_prompter(model: Any, device: str) -> Any:
    from masksam_core.inference.box_prompt import BoxPrompter

    return BoxPrompter(model, device=device)


class BoxPromptWidget(Container):
    """Segment the objects inside rectangles drawn on an image ("Box prompt (MaskSAM)")."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        load_triton_beside_mesa()  # before the worker imports the model (see _compat)
        self.viewer = viewer
        self.image = ComboBox(label="image", choices=lambda _: image_choices(viewer),
                              tooltip="a 3D scan (Z, Y, X); open one with File > Open or File > Open Sample")
        self.boxes = ComboBox(label="boxes", choices=self._shapes_choices,
                              tooltip="the Shapes layer with the rectangles, one per object")
        self.add_boxes = PushButton(text="Add boxes layer")
        self.z0 = SpinBox(label="z0 (first slice)", min=0, max=0)
        self.z1 = SpinBox(label="z1 (last slice)", min=0, max=0)
        self.follow = CheckBox(value=True, text=f"follow the current slice (± {HALF_DEPTH})",
                               tooltip="rectangles on exactly two slices define the slices themselves")
        self.model = ModelPicker(box_model_choices, label="model")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.panel = JobPanel(unit="slices")
        super().__init__(widgets=[self.image, self.boxes, self.add_boxes, self.z0, self.z1, self.follow,
                                  self.model, self.device, self.panel])
        self.job: Job | None = None
        self.prompters = ModelCache(_load_prompter)
        self._setting_range = False
        on_close(self, lambda: self.job is not None and self.job.cancel())
        self.add_boxes.changed.connect(self.add_boxes_layer)
        self.panel.run_button.changed.connect(lambda: self.run())
        self.image.changed.connect(self._follow_slice)
        self.follow.changed.connect(self._follow_slice)
        self.z0.changed.connect(self._range_edited)
        self.z1.changed.connect(self._range_edited)
        viewer.dims.events.point.connect(self._follow_slice)
        watch_layers(viewer, self)
        self._follow_slice()

    # ------------------------------------------------------------------ layers
    def _shapes_choices(self, *_: Any) -> list[tuple[str, Any]]:
        from napari.layers import Shapes

        found = [(layer.name, layer) for layer in reversed(self.viewer.layers) if isinstance(layer, Shapes)]
        return sorted(found, key=lambda item: item[0] != BOXES_LAYER)  # ours first

    def add_boxes_layer(self) -> Any:
        """The ``"boxes [MaskSAM]"`` Shapes layer (made with the image's transform if absent), selected and
        ready for drawing rectangles; None (and a notification) without an image."""
        from napari.layers import Shapes

        try:
            image = chosen_image(self.image, self.viewer)
        except MaskSAMError as error:
            notify_error(error, WHAT)
            return None
        layers = self.viewer.layers
        if BOXES_LAYER in layers and isinstance(layers[BOXES_LAYER], Shapes):
            layer = layers[BOXES_LAYER]
        else:
            layer = self.viewer.add_shapes(ndim=3, name=BOXES_LAYER, scale=tuple(image.scale),
                                           translate=tuple(image.translate),
                                           affine=np.array(image.affine.affine_matrix), edge_color="yellow",
                                           face_color="transparent")
        self.boxes.reset_choices()
        self.boxes.value = layer
        layers.selection.active = layer
        if self.viewer.dims.ndisplay != 2 or tuple(self.viewer.dims.order[-3:]) != tuple(
                sorted(self.viewer.dims.order[-3:])):
            from napari.utils.notifications import show_info

            self.viewer.dims.ndisplay = 2  # rectangles are drawn on axial slices
            self.viewer.dims.order = tuple(range(self.viewer.dims.ndim))
            show_info("switched to the 2D axial view: boxes are drawn on slices")
        layer.mode = "add_rectangle"
        return layer

    def current_slice(self, image: Any) -> int:
        """The image's Z index (voxel) of the viewer's current position, clipped to the image."""
        z = image.world_to_data(np.asarray(self.viewer.dims.point))[-3]
        return int(np.clip(round(float(z)), 0, image.data.shape[-3] - 1))

    def _follow_slice(self, *_: Any) -> None:
        image = self.image.value
        if image is None or image.ndim != 3:
            return
        depth = int(image.data.shape[-3])
        self._setting_range = True
        try:
            self.z0.max = self.z1.max = depth - 1
            if self.follow.value:
                z = self.current_slice(image)
                self.z0.value, self.z1.value = max(z - HALF_DEPTH, 0), min(z + HALF_DEPTH, depth - 1)
        finally:
            self._setting_range = False

    def _range_edited(self, *_: Any) -> None:
        if not self._setting_range:
            self.follow.value = False  # the user's own range stays

    def rectangles(self, image: Any) -> list[tuple[float, float, float, float, float]]:
        """(slice, y_min, x_min, y_max, x_max) of every shape in the boxes layer, in ``image``'s voxel
        coordinates (through world coordinates, whatever the two layers' transforms)."""
        shapes = self.boxes.value
        if shapes is None or shapes not in self.viewer.layers:
            raise MaskSAMError("no boxes layer: press 'Add boxes layer' and draw a rectangle around each object")
        point = np.asarray(self.viewer.dims.point, dtype=float)
        out = []
        for i, vertices in enumerate(shapes.data, 1):
            world = []
            for vertex in np.asarray(vertices, dtype=float):
                position = point.copy()
                position[len(point) - shapes.ndim:] = shapes.data_to_world(vertex)
                world.append(image.world_to_data(position)[-3:])
            zyx = np.asarray(world)
            (z_min, y_min, x_min), (z_max, y_max, x_max) = zyx.min(0), zyx.max(0)
            if z_max - z_min > 0.5:  # drawn across slices (a sagittal or coronal view): not an axial box
                raise MaskSAMError(f"rectangle {i} spans slices {z_min:.0f} to {z_max:.0f}: boxes are drawn on axial "
                                   "slices; draw it in the default view (slices along Z, the first axis)")
            out.append((float(round((z_min + z_max) / 2)), float(y_min), float(x_min), float(y_max), float(x_max)))
        return out

    def voxel_boxes(self, image: Any | None = None) -> list[tuple[int, int, int, int, int, int]]:
        """The boxes (z0, z1, y0, x0, y1, x1), half-open voxel indices of the image, that Run segments."""
        image = image if image is not None else chosen_image(self.image, self.viewer)
        return boxes_from_rectangles(self.rectangles(image), image.data.shape,
                                     (int(self.z0.value), int(self.z1.value)))

    # ------------------------------------------------------------------ running
    def run(self, sync: bool = False) -> Job:
        """Segment one object per box in a thread worker (``sync``: here, blocking); returns the Job,
        also kept as ``self.job``. Bad input ends the job at once with a notification."""
        if self.job is not None and self.job.running:
            return self.job
        try:
            image = chosen_image(self.image, self.viewer)
            volume, spacing, _ = volume_of(image)
            boxes = self.voxel_boxes(image)
            model, device = self.model.value, str(self.device.value)
            if model is None:
                raise MaskSAMError("no model to choose")
        except Exception as error:  # noqa: BLE001 - bad input becomes a notification
            self.job = failed_job(error, WHAT)
            return self.job
        self.panel.unit = "slices" if str(model) in ("lite", "vit_b", "vit_l", "vit_h") else "windows"

        def make(cancel: threading.Event) -> Generator[Any, None, Any]:
            prompter = self.prompters.get(model, device)
            return (yield from prompter.segment_iter(volume, boxes, spacing=spacing))

        def show(labels: np.ndarray) -> None:
            self.add_labels(image, labels, len(boxes))

        self.job = run_job(make, WHAT, on_yield=self.panel.show_progress, on_return=show,
                           on_finish=self.panel.finished, sync=sync)
        if self.job.running:
            self.panel.started(self.job)
        return self.job

    def cancel(self) -> None:
        """Stop the running job at its next slice (or window)."""
        self.panel.cancel()

    def add_labels(self, image: Any, labels: np.ndarray, count: int) -> Any:
        """Write box masks ``labels`` (Z, Y, X), values 1..``count``, into ``"<image> [boxes]"`` as new
        labels after its largest one; returns the layer."""
        from napari.layers import Labels

        name = f"{image.name} [boxes]"
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if isinstance(layer, Labels) and layer.data.shape == labels.shape:
            merged = np.asarray(layer.data)
            offset = int(merged.max()) if merged.size else 0
            names = class_names_of(layer)[: offset + 1]
        else:
            merged, offset, names = np.zeros(labels.shape, np.uint8), 0, ["background"]
        dtype = np.uint16 if offset + count < 2**16 else np.uint32
        merged = merged.astype(np.promote_types(merged.dtype, dtype))
        inside = labels > 0
        merged[inside] = labels[inside].astype(merged.dtype) + offset
        names = names + [f"box {offset + i}" for i in range(1, count + 1)]
        return show_labels(self.viewer, image, merged, names, name=name, keep_edits=False)  # edits are merged in
