"""How much memory a training step keeps for its backward pass, and whether to recompute instead.

``masksam-core train`` recomputes activations (gradient checkpointing,
:meth:`~masksam_core.modeling.MaskSAM.set_grad_checkpointing`) when asked to, and on a CPU by
default when the step would not fit comfortably: the activations of one batch, counted on the meta
device (shapes only: no memory, well under a second), against the memory the system has available.
"""

from __future__ import annotations

from typing import Any

import torch

from ..modeling import build_model, gt_prompts


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor,
                           prompts: dict[str, torch.Tensor] | None = None) -> int:
    """Bytes autograd keeps for the backward pass of ``model(x, prompts)`` outside recomputed pieces.

    Counted with saved-tensor hooks (each saved tensor once; views of one tensor are counted apart,
    so this is an upper estimate). On the meta device it costs no memory and well under a second.
    """
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, prompts)
    return sum(kept.values())


def activation_bytes(preset: str, batch_size: int, *, num_classes: int, in_channels: int, prompt_mode: str,
                     **overrides: Any) -> int:
    """Bytes autograd keeps for the backward pass of one fp32 training forward without recomputation,
    counted by :func:`saved_activation_bytes` on a meta-device model of the same shapes (about 10%
    above the real count for ``lite``)."""
    with torch.device("meta"):
        model = build_model(preset, num_classes=num_classes, in_channels=in_channels, prompt_mode=prompt_mode,
                            pretrained=False, progress=False, **overrides).train()
        x = torch.zeros(batch_size, in_channels, *model.patch_size)
        labels = torch.zeros(batch_size, *model.patch_size, dtype=torch.long)
    prompts = gt_prompts(labels, num_classes) if prompt_mode == "gt" else None
    return saved_activation_bytes(model, x, prompts)


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_recompute_reason(activations: int, available: int | None) -> str | None:
    """Why a CPU run should recompute (a message), or None when the activations fit in half the memory."""
    gib = 2**30
    if available is None:
        return f"activations of about {activations / gib:.1f} GiB per step, free memory unknown"
    if activations > available / 2:
        return f"activations of about {activations / gib:.1f} GiB per step, {available / gib:.1f} GiB free"
    return None
