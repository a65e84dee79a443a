"""Run ``masksam_core``'s generators off the GUI thread and report to the user.

Every long job in ``masksam_core`` is a generator that yields progress and returns its result
(``Predictor.predict_iter``, ``BoxPrompter.segment_iter``, ``Trainer.run``). :func:`run_job`
runs one in a napari thread worker (the viewer stays responsive; ``Job.cancel`` stops it at the
next yield, and closes the generator there) or, with ``sync=True``, right here (tests and
scripts). Errors reach the user as a napari notification carrying ``masksam_core``'s message;
nothing is raised into Qt's event loop. :class:`JobPanel` is the Run / Cancel / progress part
of the widgets.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from magicgui.widgets import Container, Label, ProgressBar, PushButton

from masksam_core.errors import MaskSAMError
from masksam_core.progress import drive, relay

__all__ = ["Job", "JobPanel", "failed_job", "notify_error", "run_job"]

log = logging.getLogger(__name__)


def _is_cancelled(error: BaseException) -> bool:
    return type(error).__name__ == "Cancelled"


def notify_error(error: BaseException, what: str) -> str:
    """Show ``error`` as a napari error notification; returns the text shown."""
    from napari.utils.notifications import show_error, show_info

    if _is_cancelled(error):
        text = f"{what}: stopped"
        show_info(text)
        return text
    if isinstance(error, MaskSAMError):
        text = f"{what} failed: {error}"
    elif isinstance(error, MemoryError):
        text = f"{what} failed: out of memory; use a smaller preset, a smaller image, or the GPU"
    else:
        text = f"{what} failed with an unexpected error: {type(error).__name__}: {error}"
        log.error("%s", text, exc_info=error)
    show_error(text)
    return text


class Job:
    """One running generator. ``cancel()`` stops it at the next yield (and sets ``cancel_event``,
    which the generator may pass on to ``masksam_core`` to stop even sooner)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.cancel_event = threading.Event()
        self.worker: Any = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.started = time.perf_counter()
        self.first_yield: float | None = None  # seconds from start to the first progress report
        self.seconds: float | None = None  # seconds from start to the end

    @property
    def running(self) -> bool:
        return not self.done

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()


def failed_job(error: BaseException, what: str) -> Job:
    """A finished :class:`Job` that failed before it started (bad input); shows the notification."""
    job = Job(what)
    job.error, job.done, job.seconds = error, True, 0.0
    notify_error(error, what)
    return job


class _Failed:
    """What the worker's generator returns when the job raised: the error, for the GUI thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _drive(gen: Generator[Any, None, Any], cancel: threading.Event) -> Generator[Any, None, Any]:
    """Yield ``gen``'s items until it returns, raises (returns :class:`_Failed`) or ``cancel`` is set.

    The generator is always closed here, so whatever it holds is freed as soon as it stops.
    Errors never leave: superqt would re-raise them in Qt's event loop, and swallows a
    RuntimeError (torch's usual error) without even emitting ``finished``.
    """
    try:
        return (yield from relay(gen, cancel=cancel.is_set))
    except Exception as error:  # noqa: BLE001 - every error becomes a notification
        return _Failed(error)


def run_job(make: Callable[[threading.Event], Generator[Any, None, Any]], what: str, *,
            on_yield: Callable[[Any], None] | None = None,
            on_return: Callable[[Any], None] | None = None,
            on_finish: Callable[[Job], None] | None = None,
            sync: bool = False) -> Job:
    """Run ``make(cancel_event)``'s generator; callbacks run on the GUI thread.

    ``make`` itself runs in the worker (it may load a model). ``on_yield(item)`` per yielded
    item, ``on_return(value)`` with the generator's return value (not called after a cancel or
    an error), ``on_finish(job)`` always, last. Errors are shown as notifications (see
    :func:`notify_error`) and kept in ``job.error``; a ``Cancelled`` error counts as a cancel.
    """
    job = Job(what)

    def yielded(item: Any) -> None:
        if job.first_yield is None:
            job.first_yield = time.perf_counter() - job.started
        if on_yield is not None:
            try:
                on_yield(item)
            except Exception as error:  # noqa: BLE001 - a display problem must not stop the job
                log.error("%s: progress display failed", what, exc_info=error)

    def returned(value: Any) -> None:
        if isinstance(value, _Failed):
            if _is_cancelled(value.error):
                job.cancel_event.set()
            else:
                job.error = value.error
                notify_error(value.error, what)
            return
        job.result = value
        if on_return is not None and not job.cancel_event.is_set():
            try:
                on_return(value)
            except Exception as error:  # noqa: BLE001 - showing the result may fail too
                job.error = error
                notify_error(error, what)

    def finished() -> None:
        job.done = True
        job.seconds = time.perf_counter() - job.started
        if job.cancel_event.is_set() and job.error is None:
            from napari.utils.notifications import show_info

            show_info(f"{what}: stopped")
        if on_finish is not None:
            try:
                on_finish(job)
            except RuntimeError as error:  # the widget was closed (its Qt objects deleted) while the job ran
                log.debug("%s: finished after its widget was closed: %s", what, error)

    def body() -> Generator[Any, None, Any]:
        try:
            gen = make(job.cancel_event)
        except Exception as error:  # noqa: BLE001
            return _Failed(error)
        return (yield from _drive(gen, job.cancel_event))

    if sync:
        returned(drive(body(), yielded))
        finished()
        return job

    from napari.qt.threading import create_worker

    # _ignore_errors: body() returns errors instead of raising them (see _drive)
    worker = create_worker(body, _start_thread=False, _ignore_errors=True)
    worker.yielded.connect(yielded)
    worker.returned.connect(returned)
    worker.finished.connect(finished)
    job.worker = worker
    worker.start()
    return job


def on_close(widget: Any, callback: Callable[[], None]) -> None:
    """Call ``callback()`` when ``widget``'s Qt widget is destroyed (its dock or the viewer closed):
    the widgets then stop or cancel their job instead of running on for nobody."""
    destroyed = getattr(getattr(widget, "native", None), "destroyed", None)
    if destroyed is not None:
        destroyed.connect(lambda *_: callback())


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class JobPanel(Container):
    """Run and Cancel buttons, a progress bar (``unit`` done of total) and a status line with the ETA.

    The owning widget connects ``run_button`` and calls :meth:`started`, :meth:`show_progress`
    (``run_job``'s ``on_yield``) and :meth:`finished` (``on_finish``); Cancel cancels ``job``.
    """

    def __init__(self, unit: str = "windows") -> None:
        self.unit = unit
        self.job: Job | None = None
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="")
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        super().__init__(widgets=[buttons, self.progress, self.status], labels=False)
        self.margins = (0, 0, 0, 0)
        self.cancel_button.changed.connect(self.cancel)

    def started(self, job: Job, text: str = "loading the model...") -> None:
        self.job = job
        self.progress.max, self.progress.value = 1, 0
        self.status.value = text
        self.run_button.enabled, self.cancel_button.enabled = not job.running, job.running

    def show_progress(self, progress: Any) -> None:
        """Show a ``Progress`` (done, total, seconds, eta)."""
        total = max(int(progress.total), 1)
        self.progress.max = total
        self.progress.value = min(int(progress.done), total)
        self.status.value = f"{progress.done}/{progress.total} {self.unit}, ETA {_clock(progress.eta)}"

    def finished(self, job: Job) -> None:
        self.run_button.enabled, self.cancel_button.enabled = True, False
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
