"""Errors that reach users.

Every failure a user can cause or fix (a missing file, a corrupt download, a
wrong checkpoint, bad input data) is raised as a :class:`MaskSAMError` whose
message says what is wrong and what to do. The command line prints the
message without a traceback; the napari plugin shows it as a notification.
"""

from __future__ import annotations

import os
from pathlib import Path


class MaskSAMError(Exception):
    """A problem the user can act on; ``str(error)`` is the message to show."""


class WeightsError(MaskSAMError):
    """Pretrained weights are missing, corrupt, unreachable or of the wrong model."""


class ModelError(MaskSAMError):
    """A model cannot be built with the requested settings."""


def check_output_folder(path: str | os.PathLike[str], flag: str) -> None:
    """Raise :class:`MaskSAMError` unless folder ``path`` exists or can be made (nothing is created).

    ``flag`` names the option the path came from (``--out``), for the message.
    """
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise MaskSAMError(f"{flag} {folder} is a file, not a folder: choose a folder (it is made if missing)")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise MaskSAMError(f"{flag} {folder}: the folder is not writable; choose another one")
        return
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MaskSAMError(f"{flag} {folder}: {parent} is a file, so the folder cannot be made; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MaskSAMError(f"{flag} {folder}: cannot make it, {parent} is not writable; choose another path")
