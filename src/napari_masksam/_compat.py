"""Loading order fixes for running torch beside napari's OpenGL canvas."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["load_triton_beside_mesa"]


def load_triton_beside_mesa() -> None:
    """Load ``triton`` (torch's compiler back end; torchvision and segment-anything import it through
    ``torch._dynamo``) now, in a way that cannot crash beside napari's canvas.

    Mesa's software OpenGL (Xvfb, virtual machines, remote desktops) loads its own LLVM; triton bundles
    another, and loading triton after Mesa's crashes the process. Where an LLVM is already loaded, triton
    is loaded with its own symbols bound first (``RTLD_DEEPBIND``); otherwise it is imported plainly, so
    that a canvas made later finds it loaded. The widgets call this before any model is imported.
    """
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    try:
        llvm_loaded = "libLLVM" in Path("/proc/self/maps").read_text()  # Linux only
    except OSError:
        llvm_loaded = False
    flags = sys.getdlopenflags() if hasattr(sys, "getdlopenflags") else None
    if llvm_loaded and flags is not None and hasattr(os, "RTLD_DEEPBIND"):
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception:  # torch treats a triton that fails to load as absent
        pass
    finally:
        if flags is not None:
            sys.setdlopenflags(flags)
