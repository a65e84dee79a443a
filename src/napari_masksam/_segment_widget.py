"""The Segment widget: a trained MaskSAM run on a whole 3D image layer.

Image layer + model + device + options -> ``Predictor.predict_iter`` in a thread worker (see
:mod:`._worker`) -> one Labels layer ``"<image> [MaskSAM]"`` that overlays the image exactly
(its scale, translate, affine and geometry) and names the run's classes in ``features``; a
second run updates that layer. Predictors stay loaded per (model, device) between runs. The image,
model, device and Run / Cancel parts are :class:`._job_widget.JobWidget`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, FloatSpinBox

from masksam_core.errors import MaskSAMError

from ._job_widget import JobWidget, Make, chosen_image, on_gpu
from ._layers import show_labels, volume_of
from ._models import model_choices

if TYPE_CHECKING:
    import napari

__all__ = ["SegmentWidget"]


def _load_predictor(model: Any, device: str) -> Any:
    from masksam_core.inference.predictor import Predictor

    return Predictor(model, device=device)


class SegmentWidget(JobWidget):
    """Segment a 3D image layer with a trained MaskSAM run ("Segment (MaskSAM)")."""

    WHAT = "Segment (MaskSAM)"

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.tta = CheckBox(value=False, text="mirroring (TTA)",
                            tooltip="average the 8 mirrored copies of each window: usually slightly better, 8x "
                            "slower; on by default on a GPU, off on the CPU (models trained without "
                            "mirroring, whose labels name a side, run one pass)")
        self.step_size = FloatSpinBox(value=0.5, min=0.1, max=1.0, step=0.05, label="step size",
                                      tooltip="window step as a fraction of the window: 0.5 = half-overlapping "
                                      "windows; 1 = no overlap (fastest)")
        super().__init__(viewer, models=model_choices, load=_load_predictor, unit="windows",
                         after=[self.tta, self.step_size])
        # mirroring by default where it costs seconds (a GPU), not where it turns minutes into an hour
        self.tta.value = on_gpu(str(self.device.value))
        self.device.changed.connect(lambda value: setattr(self.tta, "value", on_gpu(str(value))))

    def prepare(self) -> tuple[Make, Callable[[Any], None]]:
        """The chosen image's volume through the chosen run, shown as ``"<image> [MaskSAM]"``."""
        layer = chosen_image(self.image, self.viewer)
        volume, spacing, _ = volume_of(layer)
        model, device = self.model.value, str(self.device.value)
        if model is None:
            raise MaskSAMError("no model to choose: train one with the Train widget, or add a run folder "
                               "with Browse...")
        tta, step_size = bool(self.tta.value), float(self.step_size.value)

        def make(cancel: threading.Event) -> Generator[Any, None, Any]:
            predictor = self.loaded.get(model, device)
            return (yield from predictor.predict_iter(volume, spacing, tta=tta, step_size=step_size, cancel=cancel))

        def show(prediction: Any) -> None:
            shown = show_labels(self.viewer, layer, prediction.labels, prediction.class_names)
            if shown.name != f"{layer.name} [MaskSAM]":
                from napari.utils.notifications import show_info

                show_info(f"'{layer.name} [MaskSAM]' was edited since it was made, so it stays as it is; "
                          f"this result is '{shown.name}'")

        return make, show
