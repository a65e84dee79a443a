"""Shared pieces of the benchmark suite: timing, memory, failure records and the matmul reference."""

from __future__ import annotations

import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

GIB = 1024**3


def synchronize(device: torch.device) -> None:
    """Wait for the queued work of ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Median, minimum and all of a list of timings, in seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": [round(t, 6) for t in times]}


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``, or a disabled autocast when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ---------------------------------------------------------------------------- memory


def reset_peak_memory(device: torch.device) -> float | None:
    """Start a new peak: CUDA's allocator statistics, or the process's peak RSS (Linux ``clear_refs``).

    Returns the memory in use now (GiB: allocated tensors on CUDA, the resident set on the CPU, which
    includes memory the allocator kept from earlier items), or None where unknown.
    """
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / GIB
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    return _status_gib("VmRSS:")


def _status_gib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(GiB, what was measured) since :func:`reset_peak_memory`.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only; weights, optimiser state, activations).
    CPU: the process's peak resident set (``VmHWM`` of ``/proc/self/status``, reset by writing 5 to
    ``/proc/self/clear_refs``); elsewhere ``resource.getrusage`` ``ru_maxrss`` (the process's peak since
    it started, not resettable).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "torch.cuda.max_memory_allocated"
    hwm = _status_gib("VmHWM:")
    if hwm is not None:
        return hwm, "peak RSS of the process (VmHWM, reset per item)"
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib = kib / 1024 if platform.system() == "Darwin" else kib  # macOS reports bytes
    return kib * 1024 / GIB, "peak RSS since the process started (ru_maxrss)"


def free_memory(device: torch.device) -> None:
    """Collect garbage; give cached memory back (CUDA's cache; glibc's free heap, so that the next
    item's resident set starts low)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if platform.system() == "Linux":
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# ---------------------------------------------------------------------------- failures


def is_oom(error: BaseException) -> bool:
    """Out of GPU or CPU memory (also the Predictor's MaskSAMError that wraps a CUDA OOM)."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "out of gpu memory" in text or "can't allocate memory" in text


def guarded(record: dict[str, Any], device: torch.device, fn: Callable[..., dict[str, Any]], *args: Any,
            **kwargs: Any) -> dict[str, Any]:
    """``record`` updated with ``fn(*args, **kwargs)`` and ``status: ok``; on failure with ``status`` oom
    or error and the message (and the traceback for an error), so one item never stops the suite."""
    try:
        record.update(fn(*args, **kwargs))
        record["status"] = "ok"
    except Exception as error:  # every failure becomes a row of the results
        record["status"] = "oom" if is_oom(error) else "error"
        record["error"] = f"{type(error).__name__}: {str(error).strip()[:500]}"
        if record["status"] == "error":
            record["traceback"] = traceback.format_exc(limit=6)[-2000:]
    finally:
        free_memory(device)
    return record


# ---------------------------------------------------------------------------- machine and reference


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, *, warmup: int = 3,
                repeats: int = 10) -> dict[str, Any]:
    """Achieved TFLOP/s of a dense (size × size) @ (size × size) matmul in ``dtype``: 2·size³ FLOP per call."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_calls(lambda: torch.mm(a, b), device, warmup=warmup, repeats=repeats)
    best = min(times)
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "tflops": 2 * size**3 / best / 1e12,
            **summary(times)}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers ran on: device, torch and its backend flags, CPU, threads, load average."""
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "git": _git_revision(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": loadavg(),
        "backends": {
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    """``git describe --always --dirty`` of the repository holding this file (None outside git)."""
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (contention on a shared machine), or None."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
