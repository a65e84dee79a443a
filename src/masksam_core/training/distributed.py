"""Multi-GPU training with ``torchrun``: process-group set-up, DDP wrapping, rank checks.

``torchrun --nproc_per_node=N -m masksam_core train ...`` starts N processes with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set; each trains on its own GPU (or CPU
with the gloo backend), the data sampler gives each rank its own patches, and only
rank 0 writes files. A single process needs none of this and runs unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist
from torch import nn

from ..devices import select_device


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> tuple[int, int]:
    """Join the process group when started by torchrun; returns (rank, world size)."""
    if world_size() == 1:
        return 0, 1
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend)
    return tdist.get_rank(), tdist.get_world_size()


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def device_for_rank(name: str) -> torch.device:
    """One GPU per process (``LOCAL_RANK``) under torchrun; CPU processes share the CPU."""
    device = select_device(name)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when running under torchrun, else the model itself."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
