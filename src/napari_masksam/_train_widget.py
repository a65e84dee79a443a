"""The *Train (MaskSAM)* widget: train a model on a data-set folder or on the open layers.

It only gathers settings and shows progress (Start / Stop and the progress bar are a
:class:`._job_widget.JobPanel`, the curves a :class:`._training_plot.TrainingPlot`); ``masksam_core``'s
:class:`Trainer` does the work, in a napari worker thread (:func:`._worker.run_job`). Sources: a folder
in the nnU-Net v2 raw layout, or an Image layer and the Labels layer painted on it (exported as a
one-case data set into the run folder, see :mod:`._dataset_export`). Stop asks the trainer to save a
checkpoint and end; a run that ends with a checkpoint is added to the models of the *Segment (MaskSAM)* widget.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    RadioButtons,
    SpinBox,
    Widget,
)

from masksam_core.devices import available_devices
from masksam_core.errors import MaskSAMError
from masksam_core.training import TrainConfig, TrainEvent, epoch_line, format_duration
from masksam_core.training.config import NEW_RUN_DEFAULTS, widget_options

from . import _models
from ._compat import load_triton_beside_mesa
from ._dataset_export import DATASET_FOLDER, LayersData, check_split, layers_training_data, write_dataset
from ._job_widget import JobPanel, on_close
from ._training_plot import TrainingPlot
from ._worker import Job, run_job

if TYPE_CHECKING:
    import napari

    from masksam_core.training.trainer import Trainer

__all__ = ["TrainWidget", "default_preset"]

FOLDER, LAYERS = "data-set folder", "open layers"
RUNS_FOLDER = "masksam-runs"


def default_preset() -> str:
    """``lite`` where its weights (the ``lite`` extra) are installed, else ``tiny``."""
    from masksam_core import weights

    return "lite" if weights.path("lite") is not None else "tiny"


def _path(edit: FileEdit) -> Path:
    """The folder chosen in a (not nullable) single-folder ``FileEdit``."""
    return Path(_models.chosen_path(edit) or "")


class TrainWidget(Container):
    """Train MaskSAM from the viewer: source, preset, schedule, run folder, device; Start and Stop."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        load_triton_beside_mesa()
        from masksam_core.data.augment import AUGMENTATIONS
        from masksam_core.modeling.presets import PRESETS

        self._viewer = viewer
        self.job: Job | None = None
        self.trainer: Trainer | None = None  # the running one
        self._auto_out = True  # the output folder follows the source's name until the user picks one
        preset = default_preset()
        self.source = RadioButtons(label="train on", choices=[FOLDER, LAYERS], orientation="horizontal")
        self.source.value = FOLDER
        self.dataset = FileEdit(label="data set", mode=FileDialogMode.EXISTING_DIRECTORY,
                                tooltip="nnU-Net v2 raw layout; see docs/training.md")
        self.image = ComboBox(label="image", choices=self._layers("Image"))
        self.labels_layer = ComboBox(label="labels", choices=self._layers("Labels"), tooltip="painted on the image")
        self.split_info = Label(value="")
        self.preset = ComboBox(label="preset", choices=list(PRESETS), value=preset,
                               tooltip="\n".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
        self.epochs = SpinBox(label="epochs", **{**widget_options("epochs"), "value": PRESETS[preset].epochs})
        self.iters = SpinBox(label="iterations / epoch", **widget_options("iters_per_epoch"))
        self.minutes = FloatSpinBox(label="time budget (min)", **widget_options("time_limit"), tooltip="0: no limit")
        self.out = FileEdit(label="output folder", mode=FileDialogMode.EXISTING_DIRECTORY,
                            tooltip="the run folder (created)")
        self.resume = CheckBox(text="resume the run in the output folder", tooltip="with its settings; epochs may grow")
        self.device = ComboBox(label="device", choices=["auto", *available_devices()], value=TrainConfig.device)
        self.advanced = CheckBox(text="advanced settings", value=False)
        self.batch_size = SpinBox(label="batch size", **widget_options("batch_size"))
        self.patch_size = LineEdit(label="patch T H W", value="", tooltip="empty: the preset's patch size")
        self.queries = SpinBox(label="queries", **widget_options("num_queries"), tooltip="0: the preset's")
        self.lr = FloatSpinBox(label="learning rate", **widget_options("lr"))
        self.val_fraction = FloatSpinBox(label="validation fraction", **widget_options("val_fraction"))
        self.workers = SpinBox(label="loader processes", **widget_options("num_workers"))
        self.augmentation = ComboBox(label="augmentation", choices=list(AUGMENTATIONS),
                                     value=NEW_RUN_DEFAULTS["augmentation"],
                                     tooltip="\n".join(f"{k}: {v}" for k, v in AUGMENTATIONS.items()))
        self._advanced: list[Widget] = [self.batch_size, self.patch_size, self.queries, self.lr, self.val_fraction,
                                        self.workers, self.augmentation]
        self.panel = JobPanel(unit="iterations", run_text="Start", cancel_text="Stop")
        self.stats = Label(value="")
        super().__init__(widgets=[
            self.source, self.dataset, self.image, self.labels_layer, self.split_info, self.preset, self.epochs,
            self.iters, self.minutes, self.out, self.resume, self.device, self.advanced, *self._advanced,
        ])
        self.plot = TrainingPlot()
        self.stats.native.setWordWrap(True)  # full width, and long text wraps instead of widening the dock
        for native in (self.panel.native, self.stats.native, self.plot.canvas):
            self.native.layout().addWidget(native)

        self.source.changed.connect(self._on_source)
        self.dataset.changed.connect(self._refresh_out)
        self.image.changed.connect(self._on_image)
        self.val_fraction.changed.connect(self._on_split)
        self.preset.changed.connect(lambda name: setattr(self.epochs, "value", PRESETS[name].epochs))
        self.out.changed.connect(lambda _: setattr(self, "_auto_out", False))  # the user picked a folder
        self.advanced.changed.connect(self._show_advanced)
        self.panel.run_button.changed.connect(self.start)
        self.panel.cancel_button.changed.connect(self.stop)
        on_close(self, self._closed)
        self._show_advanced(False)
        self._on_source(FOLDER)

    # ------------------------------------------------------------------ inputs
    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def _layers(self, kind: str) -> Any:
        def choices(_widget: Any) -> list[tuple[str, Any]]:
            return [(layer.name, layer) for layer in self._viewer.layers if type(layer).__name__ == kind]
        return choices

    def reset_choices(self, *_: Any) -> None:
        """Refresh the layer pickers (napari calls this when layers change), then pick labels that fit."""
        super().reset_choices()
        self._on_image(self.image.value)

    def _show_advanced(self, shown: bool) -> None:
        for widget in self._advanced:
            widget.visible = shown

    def _on_source(self, source: str) -> None:
        self.dataset.visible = source != LAYERS
        self.image.visible = self.labels_layer.visible = self.split_info.visible = source == LAYERS
        self._on_image(self.image.value)

    def _on_image(self, layer: Any) -> None:
        """Pick a Labels layer on the image's grid (if the chosen one is not), then name the run after it."""
        labels, shape = self.labels_layer.value, getattr(getattr(layer, "data", None), "shape", None)
        if shape is not None and (labels is None or labels.data.shape != shape):
            match = [c for c in self.labels_layer.choices if c is not None and c.data.shape == shape]
            if match:
                self.labels_layer.value = match[0]
        self._on_split()
        self._refresh_out()

    def _on_split(self, _value: Any = None) -> None:
        f = self.val_fraction.value
        self.split_info.value = f"validation: the last {f:.0%} of the slices (Z)" if f > 0 else "no validation"

    def _default_out(self) -> Path:
        """~/masksam-runs/<source name>-<date and time>, a folder that does not exist yet."""
        source = self.image.value if self.source.value == LAYERS else _path(self.dataset)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(source, "name", ""))).strip("._") or "run"
        base = out = Path.home() / RUNS_FOLDER / f"{name}-{datetime.now():%Y%m%d-%H%M}"
        for k in range(2, 1000):
            if not out.exists():
                break
            out = base.with_name(f"{base.name}-{k}")
        return out

    def _refresh_out(self, _value: Any = None) -> None:
        if self._auto_out and not self.running:
            with self.out.changed.blocked():
                self.out.value = self._default_out()

    def _message(self, text: str, level: str = "info") -> None:
        from napari.utils import notifications

        self.panel.status.value = text
        getattr(notifications, f"show_{level}")(text)

    def _out_folder(self, resume: bool) -> Path:
        """The run folder, never written over: an existing run needs 'resume', other files another folder."""
        if self._auto_out and not resume:
            self._refresh_out()
        out = _path(self.out).expanduser().resolve()
        has_run = (out / "checkpoint_last.pt").is_file()
        if resume and not has_run:
            raise MaskSAMError(f"nothing to resume: {out} holds no run (checkpoint_last.pt); untick 'resume' "
                               "to start a new run, or choose the folder of the run to continue")
        if not resume and has_run:
            raise MaskSAMError(f"{out} already holds a training run: tick 'resume' to continue it, or choose "
                               "another output folder")
        if not resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise MaskSAMError(f"the output folder {out} is not empty: choose a new or empty folder (a run is "
                               "never written over other files)")
        return out

    def _settings(self) -> dict[str, Any]:
        """The trainer's settings from the widgets (a resumed run uses its own)."""
        text = self.patch_size.value.replace(",", " ").replace("x", " ").split()
        if text and (len(text) != 3 or not all(t.isdigit() and int(t) > 0 for t in text)):
            raise MaskSAMError(f"patch size {self.patch_size.value!r}: give three positive integers T H W "
                               "(e.g. 8 256 256), or leave it empty for the preset's")
        return {"preset": self.preset.value, "iters_per_epoch": self.iters.value, "batch_size": self.batch_size.value,
                "lr": self.lr.value, "val_fraction": self.val_fraction.value,
                "patch_size": tuple(int(t) for t in text) if text else None, "num_queries": self.queries.value or None,
                "augmentation": self.augmentation.value}

    def _closed(self) -> None:
        """The widget (or the viewer) was closed while training: save a checkpoint and end."""
        if self.running and self.trainer is not None:
            self.trainer.request_stop("the Train widget was closed")

    def _run_dataset(self, out: Path) -> Path:
        """The data set a run began with: its exported layers, else the folder in its config.json."""
        if (out / DATASET_FOLDER / "dataset.json").is_file():
            return out / DATASET_FOLDER
        try:
            folder = Path(json.loads((out / "config.json").read_text(encoding="utf-8"))["dataset"])
        except (OSError, ValueError, KeyError, TypeError):
            folder = None
        if folder is not None and folder.is_dir():
            return folder
        chosen = _path(self.dataset).expanduser()
        if (chosen / "dataset.json").is_file():
            return chosen
        raise MaskSAMError(f"the data set {out.name} was trained on ({folder or 'unknown'}) is not there: choose it "
                           "as 'data set' (train on: data-set folder), then Start")

    def plan(self) -> tuple[TrainConfig, LayersData | None]:
        """(The trainer's config, the layers to export or None); raises MaskSAMError saying what to fix.

        Resuming continues the run on the data it began with (its exported layers or its data-set
        folder), whatever the source controls show."""
        data, missing = None, []
        if self.resume.value:
            out = self._out_folder(True)
            return TrainConfig(dataset=str(self._run_dataset(out)), out=str(out), epochs=self.epochs.value,
                               device=self.device.value, resume=True, time_limit=self.minutes.value or None,
                               num_workers=self.workers.value), None
        if self.source.value == LAYERS:
            data = layers_training_data(self.image.value, self.labels_layer.value)
            missing = check_split(data.labels, data.class_names, self.val_fraction.value)
        else:
            from masksam_core.data.dataset import check_dataset

            folder = _path(self.dataset).expanduser()
            if not str(self.dataset.value or "").strip() or not (
                    (folder / "dataset.json").exists() or (folder / "imagesTr").is_dir()):
                raise MaskSAMError(f"choose a data-set folder: {folder.resolve()} holds no dataset.json or imagesTr/ "
                                   "(the nnU-Net layout, see docs/training.md); or train on the open image and "
                                   "labels layers (train on: open layers)")
            problems = check_dataset(_path(self.dataset), deep=False)
            if problems:
                more = f" (and {len(problems) - 3} more: masksam-core check lists them)" if len(problems) > 3 else ""
                raise MaskSAMError("the data set has problems: " + "; ".join(map(str, problems[:3])) + more)
        out = self._out_folder(False)
        dataset = out / DATASET_FOLDER if data is not None else _path(self.dataset)
        config = TrainConfig(dataset=str(dataset), out=str(out), epochs=self.epochs.value, device=self.device.value,
                             time_limit=self.minutes.value or None, num_workers=self.workers.value, **self._settings())
        if missing:
            self._message(f"{', '.join(missing)}: only in the validation slices, so not trained", "warning")
        return config, data

    # ------------------------------------------------------------------ running
    def start(self) -> Job | None:
        """Check the inputs and start training; a problem becomes a notification (and None is returned)."""
        if self.running:
            return self.job
        try:
            config, data = self.plan()
        except MaskSAMError as error:
            self._message(f"Training not started: {error}", "warning")
            return None
        from masksam_core.training.trainer import Trainer

        self._out, self.trainer, self._stopping, self._iterating = Path(config.out), None, False, False
        self._times: deque[float] = deque(maxlen=20)  # iteration clock
        self._epoch_seconds: list[float] = []  # seconds per epoch
        self._total_epochs, self._iters_per_epoch = config.epochs or 1, config.iters_per_epoch or 1
        self._deadline = time.monotonic() + config.time_limit * 60 if config.time_limit else None
        self.plot.clear()
        self.stats.value = ""

        def make(cancel_event: Any) -> Any:
            if data is not None:
                yield TrainEvent("setup", message=f"writing the layers as a data set in {config.dataset}")
                write_dataset(data, config.out)
            self.trainer = Trainer(config)
            return (yield from self.trainer.run())

        self.job = run_job(make, "Training", on_yield=self._on_event, on_finish=self._on_finish)
        self.panel.started(self.job, f"starting: run folder {config.out}")
        return self.job

    def stop(self) -> None:
        """First press: save a checkpoint after this iteration and end. Before the first iteration, or on a
        second press, abort at the next step (no new checkpoint)."""
        if not self.running or self.job is None:
            return
        if self.trainer is not None and self._iterating and not self._stopping:
            self._stopping = True
            self.trainer.request_stop("stopped from the Train widget")
            self.panel.cancel_button.text = "Abort (no checkpoint)"
            self.panel.status.value = "stopping: saving a checkpoint after this iteration"
        else:
            self.panel.status.value = "aborting"
            self.job.cancel()

    def _on_event(self, event: TrainEvent) -> None:
        n = self._iters_per_epoch
        self._total_epochs = event.epochs or self._total_epochs
        if event.kind == "epoch_start":
            self._iters_per_epoch = n = event.iterations or n
            self.panel.progress.max = self._total_epochs * n
            self.panel.progress.value = event.epoch * n + event.iteration
            self._epoch_started = time.monotonic()
            self.panel.status.value = f"epoch {event.epoch + 1}/{event.epochs}"
        elif event.kind == "iteration":
            self._iterating = True
            self._times.append(time.monotonic())
            done = self.panel.progress.value = event.epoch * n + event.iteration
            self.plot.add_iteration(event.epoch + event.iteration / n, event.loss)
            self.stats.value = f"loss {event.loss:.4f} · lr {event.lr:.2e}" + self._speed(done)
        elif event.kind == "validation":
            self.panel.status.value = (f"epoch {event.epoch}/{event.epochs}: validating, "
                                 f"{event.iteration}/{event.iterations} windows")
        elif event.kind == "epoch":
            self._epoch_seconds.append(time.monotonic() - self._epoch_started)
            mean = sum(self._epoch_seconds[-5:]) / len(self._epoch_seconds[-5:])
            self.panel.status.value = epoch_line(event, mean * (event.epochs - event.epoch))
            self.panel.progress.value = event.epoch * n
            self.plot.add_epoch(event.epoch, event.loss, (event.metrics or {}).get("val_mean_dice"))
        if event.message and event.kind in ("setup", "stopped", "done"):
            self.panel.status.value = event.message

    def _speed(self, done: int) -> str:
        """' · 2.31 it/s · ETA 4 min' from the last iterations and epochs (validation included), within the budget."""
        if len(self._times) < 2:
            return ""
        rate = (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-9)
        n, total = self._iters_per_epoch, self._total_epochs * self._iters_per_epoch
        left = (total - done) / rate
        if self._epoch_seconds:
            per_epoch = sum(self._epoch_seconds[-5:]) / len(self._epoch_seconds[-5:])
            left = (-done % n) / rate + (total - done) // n * per_epoch
        if self._deadline is not None:
            left = max(0.0, min(left, self._deadline - time.monotonic()))
        return f" · {rate:.2f} it/s · ETA {format_duration(left)}"

    def _on_finish(self, job: Job) -> None:
        saved = job.error is None and (self._out / "checkpoint_last.pt").is_file()
        if saved:
            _models.add_run(self._out)  # first: the widget itself may be gone (closed while training)
        # a run stays in its folder (Start again needs 'resume' or another folder); after a failure
        # without a checkpoint a fresh automatic folder is taken next time
        self._auto_out = self._auto_out and not saved
        self.panel.set_running(False)
        self.plot.update(force=True)
        if saved:
            how = "stopped" if self._stopping or job.cancel_event.is_set() else "finished"
            self._message(f"Training {how}: the run is in {self._out} (tick 'resume' to continue it); it is listed "
                          "in the models of Segment (MaskSAM)")
