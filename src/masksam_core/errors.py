"""Errors that reach users.

Every failure a user can cause or fix (a missing file, a corrupt download, a
wrong checkpoint, bad input data) is raised as a :class:`MaskSAMError` whose
message says what is wrong and what to do. The command line prints the
message without a traceback; the napari plugin shows it as a notification.
"""

from __future__ import annotations


class MaskSAMError(Exception):
    """A problem the user can act on; ``str(error)`` is the message to show."""


class WeightsError(MaskSAMError):
    """Pretrained weights are missing, corrupt, unreachable or of the wrong model."""


class ModelError(MaskSAMError):
    """A model cannot be built with the requested settings."""
