"""MaskSAM: auto-prompted Segment Anything with mask classification for 3D medical images."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .errors import MaskSAMError

if TYPE_CHECKING:
    from .inference.predictor import Predictor

__all__ = ["BoxPrompter", "MaskSAMError", "Predictor", "__version__", "bundled_models"]

# heavy classes (they import torch) load on first access, so `import masksam_core` stays light
_LAZY = {"Predictor": ".inference.predictor", "BoxPrompter": ".inference.box_prompt"}


def bundled_models() -> dict:
    """Name -> file of the trained models shipped with masksam_core (see :mod:`masksam_core.runs`)."""
    from .runs import bundled_models as found

    return found()


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
