"""Choosing the compute device: ``auto`` = CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch

from .errors import MaskSAMError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def available_devices() -> list[str]:
    """Devices present on this machine, best first (always ends with ``cpu``)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def select_device(name: str = "auto") -> torch.device:
    """The device for ``name`` (``auto``, ``cuda``, ``cuda:1``, ``mps``, ``cpu``), with a clear
    error when it is not present."""
    present = available_devices()
    if name == "auto":
        return torch.device(present[0])
    kind = name.split(":", 1)[0]
    if kind not in DEVICE_CHOICES[1:]:
        raise MaskSAMError(f"unknown device {name!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if kind not in present:
        raise MaskSAMError(
            f"device {name!r} is not available on this machine (available: {', '.join(present)}); "
            "use --device auto or one of those"
        )
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """Mixed-precision dtype: ``auto`` = bf16 on CUDA (where supported), none elsewhere."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
