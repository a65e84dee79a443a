"""The models the widgets offer: trained runs the user made or opened, remembered across sessions.

``add_run(path)`` records a run folder (the Train widget calls it when training ends, the Segment
widget when the user picks a checkpoint); ``known_runs()`` lists those that still exist, newest
first; ``runs_changed`` fires after every change so that open widgets refresh their lists. The list
is a small JSON file in ``masksam_core``'s cache folder (``$MASKSAM_CACHEDIR``, else the user
cache), written atomically.

The pickers: :func:`model_choices` (Segment: bundled models, then trained runs) and
:func:`box_model_choices` (Box prompt: the base SAM models, then runs trained for box prompts)
give (label, value) pairs; :class:`ModelPicker` shows them with a "Browse..." field that adds a
run folder or checkpoint and refreshes on ``runs_changed``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from magicgui.types import FileDialogMode
from magicgui.widgets import ComboBox, Container, FileEdit
from psygnal import Signal

from masksam_core.files import atomic_write_json
from masksam_core.runs import checkpoint_of, run_prompt_mode
from masksam_core.weights import cache_dir

__all__ = ["RUNS_FILE_NAME", "ModelPicker", "add_run", "box_model_choices", "bundled_models", "known_runs",
           "model_choices", "run_label", "runs_changed", "runs_file"]

log = logging.getLogger(__name__)

RUNS_FILE_NAME = "napari_runs.json"
MAX_RUNS = 50


def chosen_path(edit: FileEdit) -> Path | None:
    """The path chosen in a single-path ``FileEdit`` (None when a nullable one is empty)."""
    value = edit.value
    if isinstance(value, tuple):
        raise TypeError(f"{edit.label!r} chooses one path, not {len(value)}")
    return value


class _Events:
    changed = Signal()


_events = _Events()
runs_changed = _events.changed
_session: list[str] = []  # this session's runs, kept even where the cache folder is read-only


def runs_file() -> Path:
    return cache_dir() / RUNS_FILE_NAME


def _read() -> list[str]:
    try:
        entries = json.loads(runs_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(e) for e in entries] if isinstance(entries, list) else []


def known_runs() -> list[Path]:
    """Run folders and checkpoint files recorded with :func:`add_run` that still exist, newest first."""
    entries = _session + [e for e in _read() if e not in _session]
    return [Path(p) for p in entries if Path(p).exists()]


def add_run(path: str | os.PathLike) -> None:
    """Remember a run folder or checkpoint file (moved to the top of the list) and emit ``runs_changed``."""
    entry = str(Path(path).expanduser().resolve())
    entries = [entry] + [e for e in _read() if e != entry and Path(e).exists()]
    _session[:] = [entry] + [e for e in _session if e != entry]
    file = runs_file()
    with contextlib.suppress(OSError):  # a read-only cache only costs the memory of this list across sessions
        atomic_write_json(file, entries[:MAX_RUNS], indent=1, newline=False)
    runs_changed.emit()


# --------------------------------------------------------------------------- what the pickers list

Choices = list[tuple[str, Any]]

BASE_MODEL_LABELS = {"lite": "LiteMedSAM", "vit_b": "SAM ViT-B", "vit_l": "SAM ViT-L", "vit_h": "SAM ViT-H"}


def run_label(path: str | os.PathLike) -> str:
    """``run: <folder> (trained)``; a checkpoint file shows as ``<folder>/<file>``."""
    path = Path(path)
    name = path.name if path.is_dir() else f"{path.parent.name}/{path.name}"
    mode = run_prompt_mode(path)
    return f"run: {name} (trained{', box prompts' if mode == 'gt' else ''})"


def _unique(choices: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Labels that clash (runs of the same folder name in different places) get their full path."""
    labels = [label for label, _ in choices]
    return [(f"{label} {value}" if labels.count(label) > 1 else label, value) for label, value in choices]


def bundled_models() -> Choices:
    """Models shipped with ``masksam_core`` (``masksam_core.bundled_models()``, where it exists).

    It may return a mapping name -> run path, or items that are paths or have ``name`` and ``path``.
    """
    import masksam_core

    get = getattr(masksam_core, "bundled_models", None)
    if get is None:
        return []
    try:
        found = get()
    except Exception as error:  # a broken bundle must not break the widget
        log.warning("masksam_core.bundled_models() failed: %s", error)
        return []
    if isinstance(found, Mapping):
        items = [(str(name), value) for name, value in found.items()]
    else:
        items = [(str(getattr(m, "name", None) or Path(str(m)).name), getattr(m, "path", m)) for m in found]
    return [(f"{name} (bundled)", value) for name, value in items]


def model_choices(*_: Any) -> Choices:
    """Segment: bundled models, then the known runs that predict on their own (not gt-mode ones)."""
    runs = _unique([(run_label(p), str(p)) for p in known_runs() if run_prompt_mode(p) != "gt"])
    return bundled_models() + runs


def box_model_choices(*_: Any) -> Choices:
    """Box prompt: ``lite`` and the SAM ViTs (marked bundled, cached or to download), then the known
    runs trained for box prompts (``--prompt-mode gt``)."""
    from masksam_core import weights

    choices: Choices = []
    for name, what in BASE_MODEL_LABELS.items():
        info = weights.WEIGHTS[name]
        if info.url is None:
            state = "bundled" if weights.path(name) is not None else f"not installed: {weights.LITE_INSTALL}"
        elif weights.is_cached(name, verify=False):
            state = "cached"
        else:
            state = f"needs download, {info.size / 1e6:,.0f} MB"
        choices.append((f"{name}: {what} ({state})", name))
    runs = _unique([(run_label(p), str(p)) for p in known_runs() if run_prompt_mode(p) != "auto"])
    return choices + runs


class ModelPicker(Container):
    """A model list and a "Browse..." field that adds a run folder (or a typed checkpoint path).

    ``value`` is the chosen model (a name or a path string), or None when the list is empty.
    The list refreshes on :data:`runs_changed`.
    """

    def __init__(self, choices: Callable[..., Choices], **kwargs: Any) -> None:
        self._choices = choices
        self.combo = ComboBox(choices=choices, nullable=False, tooltip="the model to run")
        self.browse = FileEdit(mode=FileDialogMode.EXISTING_DIRECTORY, nullable=True,
                               tooltip="add a training run folder (or type the path of "
                               "a checkpoint .pt file); it is remembered across sessions")
        self.browse.choose_btn.text = "Browse..."
        super().__init__(widgets=[self.combo, self.browse], labels=False, **kwargs)
        self.margins = (0, 0, 0, 0)
        self.browse.changed.connect(self._add)
        # connected after FileEdit's own handler, so this runs once the dialog has set the path
        self.browse.choose_btn.changed.connect(self._check_chosen)
        editing_finished = getattr(self.browse.line_edit.native, "editingFinished", None)
        if editing_finished is not None:  # a typed path, once Enter is pressed or the field is left
            editing_finished.connect(self._check_chosen)
        runs_changed.connect(self.refresh)

    @property
    def value(self) -> Any:
        return self.combo.value

    @value.setter
    def value(self, value: Any) -> None:
        self.combo.value = value

    def refresh(self) -> None:
        try:
            self.combo.reset_choices()
            self._order_as_listed()
        except RuntimeError:  # its Qt widget was deleted with its viewer
            runs_changed.disconnect(self.refresh)

    def _order_as_listed(self) -> None:
        """Put the items in the order of the choices (newest run first): magicgui appends new ones."""
        native = self.combo.native
        wanted = [label for label, _ in self._choices(self.combo)]
        shown = [native.itemText(i) for i in range(native.count())]
        if shown == wanted or sorted(shown) != sorted(wanted):
            return
        data = {native.itemText(i): native.itemData(i) for i in range(native.count())}
        current = native.currentText()
        blocked = native.blockSignals(True)  # the value does not change, so nothing is announced
        try:
            native.clear()
            for label in wanted:
                native.addItem(label, data[label])
            native.setCurrentIndex(native.findText(current))
        finally:
            native.blockSignals(blocked)

    def _check_chosen(self, *_: Any) -> None:
        """Say why a chosen folder or file was not added (typing passes through such paths quietly)."""
        path = chosen_path(self.browse)
        if not path or checkpoint_of(path) is not None:
            return
        from napari.utils.notifications import show_warning

        path = Path(path).expanduser()
        if not path.exists():
            show_warning(f"{path} does not exist: choose a training run folder or a checkpoint .pt file")
            return
        runs = sorted(p.name for p in path.iterdir() if p.is_dir() and checkpoint_of(p) is not None) \
            if path.is_dir() else []
        if runs:
            listed = ", ".join(runs[:5]) + (", ..." if len(runs) > 5 else "")
            show_warning(f"{path.name} is not a training run but holds {len(runs)}: {listed}; choose one of them")
        else:
            show_warning(f"{path} is not a training run: a run folder (what masksam-core train --out or the "
                         "Train widget wrote) holds checkpoint_best.pt or checkpoint_last.pt; or type the path "
                         "of a checkpoint .pt file")

    def _add(self, path: Path | None) -> None:
        if not path or checkpoint_of(path) is None:
            return  # nothing yet, or a path still being typed
        add_run(path)  # emits runs_changed -> refresh
        added = str(Path(path).expanduser().resolve())
        if any(value == added for value in self.combo.choices):
            self.combo.value = added
            return
        from napari.utils.notifications import show_info

        other = "Box prompt" if run_prompt_mode(added) == "gt" else "Segment"
        show_info(f"added {run_label(added)}: it is listed in the {other} widget, not here")
