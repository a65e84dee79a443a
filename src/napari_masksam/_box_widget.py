"""The Box prompt widget: rectangles drawn in napari -> one 3D mask per box.

Rectangles live in a Shapes layer (``"boxes [MaskSAM]"``, made by "Add boxes layer" with the
image's scale, translate and affine, so that its data coordinates are the image's voxel
indices; any other Shapes layer works too: vertices go through world coordinates). Their
(slice, y_min, x_min, y_max, x_max) in the image's voxel coordinates become half-open voxel boxes
by :func:`masksam_core.inference.box_geometry.boxes_from_rectangles`, with the z-range of the spin
boxes ``z0 .. z1`` (both included; by default they follow the current slice, ± :data:`HALF_DEPTH`).
Rectangles on exactly two slices, as many on each, can span the slices between them themselves.

The masks go to the Labels layer ``"<image> [boxes]"``: box i of a run becomes a new label after
the layer's largest one (earlier results stay), named ``"box <label>"`` in its ``features``. The
image, model, device and Run / Cancel parts are :class:`._job_widget.JobWidget`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, PushButton, SpinBox

from masksam_core.errors import MaskSAMError
from masksam_core.inference.box_geometry import boxes_from_rectangles

from ._job_widget import JobWidget, Make, chosen_image
from ._layers import class_names_of, show_labels, volume_of
from ._models import box_model_choices
from ._worker import notify_error

if TYPE_CHECKING:
    import napari

__all__ = ["BOXES_LAYER", "BoxPromptWidget"]

BOXES_LAYER = "boxes [MaskSAM]"
HALF_DEPTH = 2  # slices above and below the current one


def _load_prompter(model: Any, device: str) -> Any:
    from masksam_core.inference.box_prompt import BoxPrompter

    return BoxPrompter(model, device=device)


class BoxPromptWidget(JobWidget):
    """Segment the objects inside rectangles drawn on an image ("Box prompt (MaskSAM)")."""

    WHAT = "Box prompt (MaskSAM)"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer  # the boxes picker's choices need it
        self.boxes = ComboBox(label="boxes", choices=self._shapes_choices,
                              tooltip="the Shapes layer with the rectangles, one per object")
        self.add_boxes = PushButton(text="Add boxes layer")
        self.z0 = SpinBox(label="z0 (first slice)", min=0, max=0)
        self.z1 = SpinBox(label="z1 (last slice)", min=0, max=0)
        self.follow = CheckBox(value=True, text=f"follow the current slice (± {HALF_DEPTH})",
                               tooltip="rectangles on exactly two slices define the slices themselves")
        self._setting_range = False
        super().__init__(viewer, models=box_model_choices, load=_load_prompter, unit="slices",
                         before=[self.boxes, self.add_boxes, self.z0, self.z1, self.follow])
        self.add_boxes.changed.connect(self.add_boxes_layer)
        self.image.changed.connect(self._follow_slice)
        self.follow.changed.connect(self._follow_slice)
        self.z0.changed.connect(self._range_edited)
        self.z1.changed.connect(self._range_edited)
        viewer.dims.events.point.connect(self._follow_slice)
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
            notify_error(error, self.WHAT)
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
    def prepare(self) -> tuple[Make, Callable[[Any], None]]:
        """One object per box of the chosen image, added to ``"<image> [boxes]"``."""
        image = chosen_image(self.image, self.viewer)
        volume, spacing, _ = volume_of(image)
        boxes = self.voxel_boxes(image)
        model, device = self.model.value, str(self.device.value)
        if model is None:
            raise MaskSAMError("no model to choose")
        self.panel.unit = "slices" if str(model) in ("lite", "vit_b", "vit_l", "vit_h") else "windows"

        def make(cancel: threading.Event) -> Generator[Any, None, Any]:
            prompter = self.loaded.get(model, device)
            return (yield from prompter.segment_iter(volume, boxes, spacing=spacing))

        def show(labels: np.ndarray) -> None:
            self.add_labels(image, labels, len(boxes))

        return make, show

    def add_labels(self, image: Any, labels: np.ndarray, count: int) -> Any:
        """Write box masks ``labels`` (Z, Y, X), values 1..``count``, into ``"<image> [boxes]"`` as new
        labels after its largest one; returns the layer."""
        from napari.layers import Labels

        name = f"{image.name} [boxes]"
        layer = self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401 - LayerList has no get()
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
