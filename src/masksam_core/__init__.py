"""MaskSAM: auto-prompted Segment Anything with mask classification for 3D medical images."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import MaskSAMError

__all__ = ["MaskSAMError", "__version__"]
