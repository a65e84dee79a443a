"""Choosing the compute device (``auto`` = CUDA, then Apple MPS, then CPU) and tuning it; which process
of a ``torchrun`` launch this is (:func:`distributed_env`)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

from .errors import MaskSAMError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
AMP_HELP = ("mixed precision: auto = bf16 on CUDA GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX; "
            "faster there, probabilities within about 1e-2 of fp32), fp32 elsewhere")


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
    (0, 1, 0) when not set (one process). The local rank defaults to the rank (one machine)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise MaskSAMError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise MaskSAMError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast beats fp32."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(getattr(torch, "cpu", None), name, None)  # PyTorch's own CPU feature checks
        try:
            if check is not None and check():
                return True
        except Exception:  # a missing or failing check means: not known to be native
            continue
    return False


def autocast_dtype(device: torch.device, amp: str = "auto", *, cpu_bf16: bool = False) -> torch.dtype | None:
    """Mixed-precision dtype: ``auto`` = bf16 on CUDA (where supported) and, with ``cpu_bf16``, on
    CPUs with native bf16 (:func:`cpu_has_native_bf16`); none elsewhere."""
    if amp not in AMP_CHOICES:
        raise MaskSAMError(f"unknown mixed-precision setting {amp!r}: use one of {', '.join(AMP_CHOICES)}")
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.bfloat16
    return None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


@contextlib.contextmanager
def compile_errors(device: torch.device, instead: str) -> Iterator[None]:
    """Turn a ``torch.compile`` failure (no C++ compiler, no Triton, an unsupported operation) raised
    inside the block into a :class:`MaskSAMError` naming the device, the failure's first line and
    ``instead`` (what to do; eager runs give the same results)."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as error:
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        raise MaskSAMError(f"torch.compile could not compile the network on {device} ({first}); {instead}") from error


def _glibc() -> Any | None:
    """glibc through ctypes, or None elsewhere (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """While inside, freed CPU memory is kept for the next tensor instead of returned to the system.

    A CPU forward pass allocates and frees tensors of tens to hundreds of MiB; glibc serves
    each from fresh pages (mmap) and returns it on free (munmap), so every pass pays the
    page faults of zero-filling those pages again; on a virtual machine that can take as
    long as the arithmetic (half of a ``lite`` window on 2 cores). Inside this context
    blocks up to 1 GiB come from the heap and freed memory stays there; on exit the
    default thresholds come back and the kept memory is handed back (``malloc_trim``).
    Linux with glibc only; elsewhere (and with ``enabled=False``) it does nothing.
    Yields whether the setting took effect.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _ALLOCATOR_LOCK:
        global _ALLOCATOR_USERS
        if _ALLOCATOR_USERS == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        _ALLOCATOR_USERS += 1
    try:
        yield True
    finally:
        with _ALLOCATOR_LOCK:
            _ALLOCATOR_USERS -= 1
            if _ALLOCATOR_USERS == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
                libc.malloc_trim(0)


_ALLOCATOR_LOCK = threading.Lock()
_ALLOCATOR_USERS = 0
