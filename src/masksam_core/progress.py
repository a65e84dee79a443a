"""The progress-generator protocol of every long job, and the two ways to run one.

A long job (a prediction, a box prompt, a validation, a training run, the demo) is a generator:

* it **yields** a progress item after each piece of work (a
  :class:`~masksam_core.inference.sliding_window.Progress` of windows done, a ``(done, total)``
  pair, a :class:`~masksam_core.training.trainer.TrainEvent`), so that its caller can show
  progress and decide between two pieces whether to go on;
* it **returns** its result (``StopIteration.value``, what ``yield from`` gives);
* it is **cancelled** between two pieces: its caller stops asking for items and closes it
  (``GeneratorExit`` at the ``yield``, so ``finally`` blocks free what the job holds). Jobs that
  can stop sooner, inside a piece, take a cancel event of their own.

:func:`drive` runs a job here to its end (command lines, scripts, tests, a GUI's synchronous path);
:func:`relay` runs one inside another job, passing its items on.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar, overload

__all__ = ["drive", "relay"]

R = TypeVar("R")


@overload
def drive(gen: Generator[Any, Any, R], on_item: Callable[[Any], object] | None = None,
          cancel: None = None) -> R: ...


@overload
def drive(gen: Generator[Any, Any, R], on_item: Callable[[Any], object] | None = None,
          cancel: Callable[[], bool] | None = None) -> R | None: ...


def drive(gen: Generator[Any, Any, R], on_item: Callable[[Any], object] | None = None,
          cancel: Callable[[], bool] | None = None) -> R | None:
    """Run ``gen`` to its end and return its result, calling ``on_item(item)`` for every item.

    ``cancel()`` is asked before each step: once true, ``gen`` is closed and None returned. ``gen``
    is closed however this ends (an error in ``gen`` or ``on_item`` included).
    """
    try:
        while cancel is None or not cancel():
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            if on_item is not None:
                on_item(item)
        return None
    finally:
        gen.close()


def relay(gen: Generator[Any, Any, R], convert: Callable[[Any], Any] | None = None,
          cancel: Callable[[], Any] | None = None) -> Generator[Any, None, R | None]:
    """Yield ``gen``'s items (through ``convert`` when given) and return its result: for
    ``result = yield from relay(...)`` inside another job.

    ``cancel()`` is asked before each step: a true value closes ``gen`` and returns None; it may
    also raise (the job's own ``Cancelled``), which ends ``gen`` the same way. ``gen`` is closed
    however this ends, also when the outer job is closed.
    """
    try:
        while cancel is None or not cancel():
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            yield item if convert is None else convert(item)
        return None
    finally:
        gen.close()
