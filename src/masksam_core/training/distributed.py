"""Multi-GPU training with ``torchrun``: process-group set-up, DDP wrapping, collective helpers.

``torchrun --nproc_per_node=N -m masksam_core train ...`` starts N processes with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set; each trains on its own GPU (NCCL) or
on the CPU (gloo), the data sampler gives each rank its own patches, and only rank 0
writes files. A single process needs none of this: every helper here is then a no-op
(or returns its input), so the trainer runs the same code in both cases.

Every helper that communicates must be called by all ranks in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ..devices import distributed_env, select_device
from ..errors import MaskSAMError

_device = torch.device("cpu")  # where collective tensors live (CUDA for NCCL)


def world_size() -> int:
    """Number of processes: the process group's size, else ``WORLD_SIZE`` (1 without torchrun)."""
    if active():
        return tdist.get_world_size()
    return distributed_env()[1]


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """Pick the device and, under torchrun, join the process group; returns (rank, world size, device).

    The backend follows the device: NCCL for CUDA, gloo for the CPU (so ``--device cpu`` works on a GPU
    machine too). One GPU per process, chosen by ``LOCAL_RANK``.
    """
    global _device
    _, world, local = distributed_env()
    if world == 1:
        _device = select_device(device_name)
        return 0, 1, _device
    device = select_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise MaskSAMError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s): start torchrun "
                               "with --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    elif device.type == "mps":
        raise MaskSAMError("multi-process training needs CUDA GPUs or the CPU: pass --device cuda or --device cpu")
    if not active():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    _device = device
    return tdist.get_rank(), tdist.get_world_size(), device


def rank() -> int:
    return tdist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when running under torchrun, else the model itself.

    DDP broadcasts rank 0's parameters and buffers (frozen ones included) at wrapping, so
    every rank starts from the same weights whatever its seed.
    """
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    if active():
        tdist.barrier()


def any_flags(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over ranks (one all-reduce), so that all ranks take the same branch."""
    if not active():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=_device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def mean(value: torch.Tensor) -> torch.Tensor:
    """A tensor averaged over ranks (a copy; the input itself when single-process)."""
    if not active():
        return value
    t = value.detach().to(_device, torch.float64).clone()
    tdist.all_reduce(t)
    return (t / tdist.get_world_size()).to(value.device, value.dtype)


def mean_dict(values: Mapping[str, float]) -> dict[str, float]:
    """Every value averaged over ranks (all ranks must hold the same keys)."""
    if not active() or not values:
        return dict(values)
    keys = sorted(values)
    t = mean(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, (float(v) for v in t.tolist()), strict=True))


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` single-process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself single-process); picklable objects only."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    """Leave the process group (after a barrier); nothing single-process."""
    if active():
        tdist.barrier()
        tdist.destroy_process_group()


def shutdown() -> None:
    """Leave the process group without waiting for the other ranks (after an error); no-op when left."""
    if active():
        tdist.destroy_process_group()
