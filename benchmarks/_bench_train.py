"""Training-step time and peak memory of a preset, the step being the trainer's own code.

A :class:`~masksam_core.training.trainer.Trainer` is given what ``Trainer._build`` sets up (a random
``build_model(preset, pretrained=False)`` model, AdamW over its trainable parameters with lr 1e-3,
eps 1e-4 and the new-run weight decay, the set criterion with the preset's point count and loss
weights, the autocast dtype of ``--amp auto``, the gradient scaler), and each timed step is exactly
``Trainer._forward`` (forward under autocast, criterion, weighted total) followed by
``Trainer._backward`` (backward, gradient clipping at 12, optimiser step). The batch is synthetic:
random intensities and labels with every class present on every slice, at the preset's patch size.
The criterion is moved to the device (its class-weight buffer would otherwise stay on the CPU).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ._bench_common import peak_memory, reset_peak_memory, time_calls


def synthetic_batch(batch_size: int, patch: tuple[int, int, int], num_classes: int,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """image (B, 1, T, H, W) float32 and labels (B, T, H, W) int64 where every class 1..C-1 fills a
    rectangle on every slice (placed at random per batch item) and the rest is background."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = patch
    labels = torch.zeros(batch_size, t, h, w, dtype=torch.int64)
    side_h, side_w = max(h // 4, 1), max(w // 4, 1)
    for b in range(batch_size):
        for c in range(1, num_classes):
            y = int(torch.randint(0, h - side_h + 1, (1,), generator=g))
            x = int(torch.randint(0, w - side_w + 1, (1,), generator=g))
            labels[b, :, y : y + side_h, x : x + side_w] = c
    image = torch.randn(batch_size, 1, t, h, w, generator=g) + labels[:, None].float() / max(num_classes - 1, 1)
    return {"image": image, "labels": labels}


def make_trainer(preset: str, device: torch.device, amp_mode: str = "auto", *,
                 grad_checkpointing: bool = False) -> Any:
    """A Trainer holding what ``Trainer._build`` creates, for a random model of ``preset`` on ``device``
    (``grad_checkpointing``: as ``masksam-core train --grad-checkpointing``)."""
    from masksam_core.devices import autocast_dtype
    from masksam_core.modeling import build_model
    from masksam_core.modeling.presets import get_preset
    from masksam_core.training.config import NEW_RUN_DEFAULTS, TrainConfig
    from masksam_core.training.criterion import HungarianMatcher, SetCriterion, loss_weights
    from masksam_core.training.trainer import Trainer

    p = get_preset(preset)
    trainer = Trainer(TrainConfig(dataset="benchmark", out="benchmark", preset=preset, amp=amp_mode))
    torch.manual_seed(0)
    with torch.device(device):  # random initialisation on the device itself
        trainer.model = build_model(preset, pretrained=False).to(device)
    trainer.model.set_grad_checkpointing(grad_checkpointing)
    trainer.net = trainer.model
    trainer.params = [q for q in trainer.model.parameters() if q.requires_grad]
    trainer.optimizer = torch.optim.AdamW(trainer.params, lr=NEW_RUN_DEFAULTS["lr"], eps=1e-4,
                                          weight_decay=NEW_RUN_DEFAULTS["weight_decay"])
    trainer.criterion = SetCriterion(p.num_classes, HungarianMatcher(num_points=p.num_points),
                                     num_points=p.num_points).to(device)
    trainer.weights = loss_weights(mask_weight=p.mask_loss_weight)
    trainer.amp = autocast_dtype(device, amp_mode)
    trainer.scaler = torch.amp.GradScaler(device.type, enabled=trainer.amp == torch.float16)
    return trainer


def train_item(preset: str, batch_size: int, device: torch.device, *, warmup: int, repeats: int,
               grad_checkpointing: bool = False) -> dict[str, Any]:
    """Seconds per training step (median of ``repeats`` after ``warmup``) and the peak memory of the
    timed steps (after warm-up, so the optimiser state is already allocated and counted)."""
    from masksam_core.modeling.presets import get_preset

    p = get_preset(preset)
    trainer = make_trainer(preset, device, grad_checkpointing=grad_checkpointing)
    batch = synthetic_batch(batch_size, p.patch_size, p.num_classes)
    trainer.net.train()
    losses: dict[str, float] = {}

    def step() -> None:
        values, total = trainer._forward(batch, device)
        trainer._backward(total)
        losses.update(values)

    from masksam_core.devices import reuse_freed_memory

    with reuse_freed_memory(device.type == "cpu"):  # as the trainer's CPU steps run
        time_calls(step, device, warmup=max(warmup, 1), repeats=0)
        baseline = reset_peak_memory(device)
        times = time_calls(step, device, warmup=0, repeats=repeats)
        peak, kind = peak_memory(device)
    trainable = sum(q.numel() for q in trainer.params)
    return {
        "batch_size": batch_size, "patch_size": list(p.patch_size), "seconds_per_step": statistics.median(times),
        "times_s": [round(t, 6) for t in times], "peak_memory_gib": peak, "memory_at_start_gib": baseline,
        "memory_kind": kind,
        "trainable_params_m": trainable / 1e6, "amp": str(trainer.amp).replace("torch.", "") if trainer.amp else "off",
        "loss": losses.get("loss"),
        "grad_checkpointing": trainer.model.grad_checkpointing,
    }
