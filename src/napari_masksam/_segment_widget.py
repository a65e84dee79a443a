"""The Segment widget: a trained MaskSAM run on a whole 3D image layer.

Image layer + model + device + options -> ``Predictor.predict_iter`` in a thread worker (see
:mod:`._worker`) -> one Labels layer ``"<image> [MaskSAM]"`` that overlays the image exactly
(its scale, translate, affine and geometry) and names the run's classes in ``features``; a
second run updates that layer. Predictors stay loaded per (model, device) between runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox

from masksam_core.devices import available_devices
from masksam_core.errors import MaskSAMError
from masksam_core.runs import checkpoint_of

from ._compat import load_triton_beside_mesa
from ._layers import show_labels, volume_of
from ._models import ModelPicker, model_choices
from ._worker import Job, JobPanel, failed_job, on_close, run_job

if TYPE_CHECKING:
    import napari

__all__ = ["ModelCache", "SegmentWidget", "chosen_image", "device_choices", "image_choices", "watch_layers"]

WHAT = "Segment (MaskSAM)"


def image_choices(viewer: napari.viewer.Viewer) -> list[tuple[str, Any]]:
    """The viewer's 3D grey-value Image layers, top-most first, as (name, layer) pairs."""
    from napari.layers import Image

    return [(layer.name, layer) for layer in reversed(viewer.layers)
            if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb]


def chosen_image(picker: ComboBox, viewer: napari.viewer.Viewer) -> Any:
    """The picked Image layer, or a :class:`MaskSAMError` that says why there is none."""
    from napari.layers import Image

    layer = picker.value
    if layer is not None and layer in viewer.layers:
        return layer
    others = [layer for layer in viewer.layers if isinstance(layer, Image)]
    if others:
        volume_of(others[-1])  # raises the reason it cannot be segmented (2D, RGB, 4D)
    volume_of(None)  # raises "no image layer chosen"
    raise AssertionError("unreachable")


def device_choices() -> list[str]:
    """``auto``, then the devices present (``cuda``, ``mps``, ``cpu``)."""
    return ["auto", *available_devices()]


def on_gpu(device: str) -> bool:
    """Whether a choice of the device box (``auto``, ``cuda``, ``cuda:1``, ``mps``, ``cpu``) runs on a GPU."""
    return (available_devices()[0] if device == "auto" else device) != "cpu"


def watch_layers(viewer: napari.viewer.Viewer, widget: Container) -> None:
    """Refresh ``widget``'s layer pickers when layers are added, removed, reordered or renamed."""

    def refresh(*_: Any) -> None:
        try:
            widget.reset_choices()
        except RuntimeError:  # the widget's Qt side was deleted
            pass

    for name in ("inserted", "removed", "reordered"):
        getattr(viewer.layers.events, name).connect(refresh)
    viewer.layers.events.inserted.connect(lambda event: event.value.events.name.connect(refresh))
    for layer in viewer.layers:
        layer.events.name.connect(refresh)


class ModelCache:
    """Loaded models by (model, device, checkpoint file's mtime and size): a second run with the same
    model does not load it again, and a checkpoint rewritten by training is loaded anew. Keeps
    the ``size`` most recently used. Thread-safe (loading happens in the worker)."""

    def __init__(self, load: Any, size: int = 2) -> None:
        self.load = load
        self.size = size
        self.models: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(model: Any, device: str) -> tuple:
        checkpoint = checkpoint_of(model) if isinstance(model, (str, Path)) else None
        if checkpoint is None:
            return (str(model), device)
        stat = checkpoint.stat()
        return (str(model), device, str(checkpoint), stat.st_mtime_ns, stat.st_size)

    def get(self, model: Any, device: str) -> Any:
        key = self.key(model, device)
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
            loaded = self.load(model, device)
            self.models[key] = loaded
            while len(self.models) > self.size:
                self.models.popitem(last=False)
            return loaded


def _load_predictor(model: Any, device: str) -> Any:
    from masksam_core.inference.predictor import Predictor

    return Predictor(model, device=device)


class SegmentWidget(Container):
    """Segment a 3D image layer with a trained MaskSAM run ("Segment (MaskSAM)")."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        load_triton_beside_mesa()  # before the worker imports the model (see _compat)
        self.viewer = viewer
        self.image = ComboBox(label="image", choices=lambda _: image_choices(viewer),
                              tooltip="a 3D scan (Z, Y, X); open one with File > Open or File > Open Sample")
        self.model = ModelPicker(model_choices, label="model")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        # mirroring by default where it costs seconds (a GPU), not where it turns minutes into an hour
        self.tta = CheckBox(value=on_gpu(str(self.device.value)), text="mirroring (TTA)",
                            tooltip="average the 8 mirrored copies of each window: usually slightly better, 8x "
                            "slower; on by default on a GPU, off on the CPU (models trained without "
                            "mirroring, whose labels name a side, run one pass)")
        self.device.changed.connect(lambda value: setattr(self.tta, "value", on_gpu(str(value))))
        self.step_size = FloatSpinBox(value=0.5, min=0.1, max=1.0, step=0.05, label="step size",
                                      tooltip="window step as a fraction of the window: 0.5 = half-overlapping "
                                      "windows; 1 = no overlap (fastest)")
        self.panel = JobPanel(unit="windows")
        super().__init__(widgets=[self.image, self.model, self.device, self.tta, self.step_size, self.panel])
        self.job: Job | None = None
        self.predictors = ModelCache(_load_predictor)
        self.panel.run_button.changed.connect(lambda: self.run())
        on_close(self, lambda: self.job is not None and self.job.cancel())  # nobody is left to see the result
        watch_layers(viewer, self)

    def run(self, sync: bool = False) -> Job:
        """Segment the chosen image in a thread worker (``sync``: here, blocking); returns the Job,
        also kept as ``self.job``. Bad input ends the job at once with a notification."""
        if self.job is not None and self.job.running:
            return self.job
        try:
            layer = chosen_image(self.image, self.viewer)
            volume, spacing, _ = volume_of(layer)
            model, device = self.model.value, str(self.device.value)
            if model is None:
                raise MaskSAMError("no model to choose: train one with the Train widget, or add a run folder "
                                   "with Browse...")
        except Exception as error:  # noqa: BLE001 - bad input becomes a notification
            self.job = failed_job(error, WHAT)
            return self.job
        tta, step_size = bool(self.tta.value), float(self.step_size.value)

        def make(cancel: threading.Event) -> Generator[Any, None, Any]:
            predictor = self.predictors.get(model, device)
            return (yield from predictor.predict_iter(volume, spacing, tta=tta, step_size=step_size, cancel=cancel))

        def show(prediction: Any) -> None:
            shown = show_labels(self.viewer, layer, prediction.labels, prediction.class_names)
            if shown.name != f"{layer.name} [MaskSAM]":
                from napari.utils.notifications import show_info

                show_info(f"'{layer.name} [MaskSAM]' was edited since it was made, so it stays as it is; "
                          f"this result is '{shown.name}'")

        self.job = run_job(make, WHAT, on_yield=self.panel.show_progress, on_return=show,
                           on_finish=self.panel.finished, sync=sync)
        if self.job.running:  # a worker: its reports arrive later, through the event loop
            self.panel.started(self.job)
        return self.job

    def cancel(self) -> None:
        """Stop the running job at its next window batch."""
        self.panel.cancel()
