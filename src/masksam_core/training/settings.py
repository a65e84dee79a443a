"""Dataclass fields that describe themselves: command-line flag, help, default, range rule, widget limits.

A settings dataclass (:class:`~.config.TrainConfig`) declares each field with :func:`setting`; the
command line (:func:`add_arguments`, :func:`from_args`), the range checks (:func:`check`) and the
napari widgets' spin boxes (:func:`widget_options`) are all generated from that one declaration, so a
default, a limit or a flag's name is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MaskSAMError

__all__ = [
    "AT_LEAST_0",
    "AT_LEAST_1",
    "POSITIVE",
    "Limits",
    "Rule",
    "Setting",
    "add_arguments",
    "check",
    "default_of",
    "from_args",
    "in_range",
    "one_of",
    "setting",
    "settings",
    "widget_options",
]

Text = str | Callable[[], str]  # a callable for text built from modules that are slow to import (torch)
Choices = Sequence[str] | Callable[[], Sequence[str]]


def _text(text: Text) -> str:
    return text() if callable(text) else text


def _choices(choices: Choices) -> list[str]:
    return list(choices() if callable(choices) else choices)


@dataclass(frozen=True)
class Rule:
    """A check on a resolved value: ``ok(value)``, else the error ``'{flag} {value} is {problem}'``."""

    ok: Callable[[Any], bool]
    problem: Text


def in_range(ok: Callable[[Any], bool], rule: str) -> Rule:
    """A range rule, reported as ``'--flag VALUE is out of range: it RULE'``."""
    return Rule(ok, f"out of range: it {rule}")


def one_of(choices: Choices) -> Rule:
    """The value must be one of ``choices``: ``'--flag VALUE is unknown: choose one of a, b, c'``."""
    return Rule(lambda value: value in _choices(choices),
                lambda: f"unknown: choose one of {', '.join(_choices(choices))}")


AT_LEAST_0 = in_range(lambda value: value >= 0, "must be 0 or more")
AT_LEAST_1 = in_range(lambda value: value >= 1, "must be 1 or more")
POSITIVE = in_range(lambda value: value > 0, "must be positive")


@dataclass(frozen=True)
class Limits:
    """A spin box's range and step for a numeric setting (``None`` values show as ``min``)."""

    min: float
    max: float
    step: float | None = None


@dataclass(frozen=True)
class Setting:
    """What a field says about itself; see :func:`setting`."""

    flag: str
    help: Text
    arg_type: type | None = None
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None
    choices: Choices | None = None
    shown_default: str | None = None
    kept: bool = False
    new_run: Any = None
    rule: Rule | None = None
    widget: Limits | None = None

    @property
    def positional(self) -> bool:
        return not self.flag.startswith("-")


def setting(flag: str, help: Text, *, default: Any = dataclasses.MISSING, type: type | None = None,
            nargs: int | str | None = None, metavar: str | tuple[str, ...] | None = None,
            choices: Choices | None = None, shown_default: str | None = None, kept: bool = False,
            new_run: Any = None, rule: Rule | None = None, widget: Limits | None = None) -> Any:
    """A dataclass field with its :class:`Setting`.

    ``flag``: ``"--name"``, or the name alone for a positional argument; ``type=bool`` makes a switch
    (``--name``, or ``--name/--no-name`` when the default is ``None``). ``help`` gets ``" (default: X)"``
    appended, X being ``shown_default`` or else the default value (nothing for ``None``, ``False``, ``()``).
    ``kept``: one of a run's own settings: the field's default is ``None``, which means the run's value
    when resuming and ``new_run`` for a new run. ``rule``: checked by :func:`check` (``None`` passes).
    ``widget``: the spin box of a napari widget that shows this setting.
    """
    meta = Setting(flag, help, type, nargs, metavar, choices, shown_default, kept, new_run, rule, widget)
    return dataclasses.field(default=None if kept else default, metadata={"setting": meta})


def settings(cls: type) -> Iterator[tuple[dataclasses.Field, Setting]]:
    """The fields of a dataclass (type or instance) that carry a :class:`Setting`, in declaration order."""
    for f in dataclasses.fields(cls):
        if "setting" in f.metadata:
            yield f, f.metadata["setting"]


def _shown(value: Any) -> str | None:
    if value is None or value is False or value == () or value is dataclasses.MISSING:
        return None
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_of(f: dataclasses.Field) -> Any:
    """A new run's value of a field: ``new_run`` for a kept setting, else the field's default."""
    meta: Setting = f.metadata["setting"]
    return meta.new_run if meta.kept else f.default


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argparse argument per :class:`Setting` of ``cls`` (its default: the field's default)."""
    for f, s in settings(cls):
        shown = s.shown_default or _shown(default_of(f))
        options: dict[str, Any] = {"help": _text(s.help) + (f" (default: {shown})" if shown else "")}
        if s.arg_type is bool:
            options["action"] = argparse.BooleanOptionalAction if f.default is None else "store_true"
        elif s.arg_type is not None:
            options["type"] = s.arg_type
        for key in ("nargs", "metavar"):
            if getattr(s, key) is not None:
                options[key] = getattr(s, key)
        if s.choices is not None:
            options["choices"] = _choices(s.choices)
        if not s.positional:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                options["required"] = True
            else:
                options["default"] = f.default
        parser.add_argument(s.flag, **options)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of ``cls`` from the namespace :func:`add_arguments`' parser returned (lists become tuples)."""
    values = {f.name: getattr(args, f.name) for f, _ in settings(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check(config: Any) -> None:
    """Raise :class:`MaskSAMError` naming the flag and its rule for the first value that breaks its
    :class:`Rule` (``None`` values pass)."""
    for f, s in settings(config):
        value = getattr(config, f.name)
        if s.rule is None or value is None or s.rule.ok(value):
            continue
        shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        raise MaskSAMError(f"{s.flag} {shown} is {_text(s.rule.problem)}")


def widget_options(cls: type, name: str) -> dict[str, Any]:
    """``min``, ``max``, ``step`` (if set) and ``value`` (the new-run default; ``min`` for ``None``) of the
    spin box that shows setting ``name`` of ``cls``."""
    f = next(f for f, _ in settings(cls) if f.name == name)
    limits = f.metadata["setting"].widget
    if limits is None:
        raise ValueError(f"{cls.__name__}.{name} has no widget limits")
    value = default_of(f)
    options = {"min": limits.min, "max": limits.max, "value": limits.min if value is None else value}
    if limits.step is not None:
        options["step"] = limits.step
    return options
