"""Run ``masksam_core``'s generators off the GUI thread and report to the user.

Every long job in ``masksam_core`` is a generator that yields progress and returns its result
(``Predictor.predict_iter``, ``BoxPrompter.segment_iter``, ``Trainer.run``). :func:`run_job`
runs one in a napari thread worker (the viewer stays responsive; ``Job.cancel`` stops it at the
next yield, and closes the generator there) or, with ``sync=True``, right here (tests and
scripts). Errors reach the user as a napari notification carrying ``masksam_core``'s message;
nothing is raised into Qt's event loop. The widgets' Run / Cancel / progress part is
:class:`._job_widget.JobPanel`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from masksam_core.errors import MaskSAMError
from masksam_core.progress import drive, relay

__all__ = ["Job", "failed_job", "notify_error", "run_job"]

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
    except Exception as error:  # every error becomes a notification
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
            except Exception as error:  # a display problem must not stop the job
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
            except Exception as error:  # showing the result may fail too
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
        except Exception as error:
            return _Failed(error)
        return (yield from _drive(gen, job.cancel_event))

    if sync:
        returned(drive(body(), yielded))
        finished()
        return job

    from napari.qt.threading import create_worker

    # The worker's own yielded / returned / finished signals deliver to the GUI thread. Its errored and
    # aborted are not used: body() returns errors instead of raising them (see _drive), hence
    # _ignore_errors, and a cancel goes through job.cancel_event, which also closes the generator.
    job.worker = create_worker(body, _connect={"yielded": yielded, "returned": returned, "finished": finished},
                               _ignore_errors=True)  # with _connect, it starts at once
    return job
