"""What the widgets that run a job share: the job panel and the base of the Segment and Box prompt widgets.

:class:`JobPanel` is the Run / Cancel buttons, the progress bar and the status line (the Train widget
uses it too, as Start / Stop). :class:`JobWidget` is an image picker, a model picker, a device box
and the panel around one job at a time, run by :func:`._worker.run_job`; closing the widget (its
dock or the viewer) cancels the job, since nobody is left to see its result.

The layer pickers refresh themselves: napari calls a docked widget's ``reset_choices`` when layers
are added, removed, reordered or renamed, and a magicgui ``Container`` passes that on to every
picker in it.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, Label, ProgressBar, PushButton, Widget

from masksam_core.devices import available_devices
from masksam_core.runs import checkpoint_of

from ._compat import load_triton_beside_mesa
from ._layers import volume_of
from ._models import ModelPicker
from ._worker import Job, failed_job, run_job

if TYPE_CHECKING:
    import napari

__all__ = ["JobPanel", "JobWidget", "ModelCache", "chosen_image", "device_choices", "image_choices", "on_close",
           "on_gpu"]

Make = Callable[[threading.Event], Generator[Any, None, Any]]


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


def on_close(widget: Any, callback: Callable[[], None]) -> None:
    """Call ``callback()`` when ``widget``'s Qt widget is destroyed (its dock or the viewer closed):
    the widgets then stop or cancel their job instead of running on for nobody."""
    destroyed = getattr(getattr(widget, "native", None), "destroyed", None)
    if destroyed is not None:
        destroyed.connect(lambda *_: callback())


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


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class JobPanel(Container):
    """Run and Cancel buttons, a progress bar (``unit`` done of total) and a status line with the ETA.

    The owner connects both buttons, and calls :meth:`started`, :meth:`show_progress` (``run_job``'s
    ``on_yield``) and :meth:`finished` (``on_finish``), or :meth:`set_running` where it reports
    progress its own way; :meth:`cancel` cancels ``job``.
    """

    def __init__(self, unit: str = "windows", *, run_text: str = "Run", cancel_text: str = "Cancel") -> None:
        self.unit = unit
        self.cancel_text = cancel_text
        self.job: Job | None = None
        self.run_button = PushButton(text=run_text)
        self.cancel_button = PushButton(text=cancel_text, enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="")
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        super().__init__(widgets=[buttons, self.progress, self.status], labels=False)
        self.margins = (0, 0, 0, 0)
        self.status.native.setWordWrap(True)  # long messages wrap instead of widening the dock

    def set_running(self, running: bool) -> None:
        """Enable Run or Cancel (whose text returns to ``cancel_text``)."""
        self.run_button.enabled, self.cancel_button.enabled = not running, running
        self.cancel_button.text = self.cancel_text

    def started(self, job: Job, text: str = "loading the model...") -> None:
        self.job = job
        self.progress.max, self.progress.value = 1, 0
        self.status.value = text
        self.set_running(job.running)

    def show_progress(self, progress: Any) -> None:
        """Show a ``Progress`` (done, total, seconds, eta)."""
        total = max(int(progress.total), 1)
        self.progress.max = total
        self.progress.value = min(int(progress.done), total)
        self.status.value = f"{progress.done}/{progress.total} {self.unit}, ETA {_clock(progress.eta)}"

    def finished(self, job: Job) -> None:
        self.set_running(False)
        if job.error is not None:
            self.status.value = "failed (see the notification)"
        elif job.cancelled:
            self.status.value = "stopped"
        else:
            self.progress.value = self.progress.max
            self.status.value = f"done in {job.seconds or 0.0:.1f} s"

    def cancel(self) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.status.value = "stopping..."


class JobWidget(Container):
    """An image, a model and a device, and Run: one job at a time in a thread worker.

    Subclasses set :attr:`WHAT` (the notifications' title) and implement :meth:`prepare`; their own
    controls go ``before`` the model picker or ``after`` the device box.

    Args:
        models: the model picker's choices (see :mod:`._models`).
        load: ``load(model, device)`` -> the loaded model, run in the worker and kept in a
            :class:`ModelCache` (``self.loaded``).
        unit: what the progress counts (``windows``, ``slices``).
    """

    WHAT = "MaskSAM"

    def __init__(self, viewer: napari.viewer.Viewer, *, models: Callable[..., Any], load: Callable[[Any, str], Any],
                 unit: str, before: Sequence[Widget] = (), after: Sequence[Widget] = ()) -> None:
        load_triton_beside_mesa()  # before the worker imports the model (see _compat)
        self.viewer = viewer
        self.image = ComboBox(label="image", choices=lambda _: image_choices(viewer),
                              tooltip="a 3D scan (Z, Y, X); open one with File > Open or File > Open Sample")
        self.model = ModelPicker(models, label="model")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.panel = JobPanel(unit=unit)
        super().__init__(widgets=[self.image, *before, self.model, self.device, *after, self.panel])
        self.job: Job | None = None
        self.loaded = ModelCache(load)
        self.panel.run_button.changed.connect(lambda: self.run())
        self.panel.cancel_button.changed.connect(self.cancel)
        on_close(self, self._cancel_job)  # nobody is left to see the result

    def prepare(self) -> tuple[Make, Callable[[Any], None]]:
        """Check the inputs (raise :class:`MaskSAMError` saying what to fix) and return ``(make, show)``:
        ``make(cancel_event)`` makes the job's generator (in the worker), ``show(result)`` shows what it
        returned (on the GUI thread)."""
        raise NotImplementedError

    def run(self, sync: bool = False) -> Job:
        """Run the job in a thread worker (``sync``: here, blocking); returns the Job, also kept as
        ``self.job``. Bad input ends the job at once with a notification."""
        if self.job is not None and self.job.running:
            return self.job
        try:
            make, show = self.prepare()
        except Exception as error:  # bad input becomes a notification
            self.job = failed_job(error, self.WHAT)
            return self.job
        self.job = run_job(make, self.WHAT, on_yield=self.panel.show_progress, on_return=show,
                           on_finish=self.panel.finished, sync=sync)
        if self.job.running:  # a worker: its reports arrive later, through the event loop
            self.panel.started(self.job)
        return self.job

    def cancel(self) -> None:
        """Stop the running job at its next step (window batch or slice)."""
        self.panel.cancel()

    def _cancel_job(self) -> None:
        if self.job is not None:
            self.job.cancel()
