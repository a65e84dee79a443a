"""The Mask2Former-style set criterion of MaskSAM, per slice.

``SetCriterion.forward`` returns UNWEIGHTED named losses; one weight table
(:data:`LOSS_WEIGHTS`, docs/method.md, "Matcher and losses") turns them into the training loss
with :func:`weighted_total`:

======================  ======  =====================================================
name                    weight  what
======================  ======  =====================================================
``loss_ce``             0.2     cross-entropy over C+1 classes, no-object weight 0.1
``loss_mask``           1.5     sigmoid BCE of matched masks at uncertain points
``loss_dice``           1.5     Dice of matched masks at the same points
``loss_aux_mask``       0.5     BCE + Dice of matched auxiliary masks (auto mode)
``loss_aux_box``        0.5     L1 of matched auxiliary boxes (auto mode)
``loss_aux_giou``       0.2     1 - GIoU of matched auxiliary boxes (auto mode)
======================  ======  =====================================================

The amos preset uses 1.2 for the mask BCE and Dice (``loss_weights(1.2)``).
Mask and box losses are sums over matched masks divided by the number of
target masks; all losses are computed in fp32, also under autocast.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from ..modeling.heads import order_box
from .matcher import HungarianMatcher, Match
from .targets import (
    TargetError,
    gather_slice_masks,
    num_target_masks,
    point_sample,
    slice_outputs,
    slice_targets,
    uncertain_points,
)

__all__ = [
    "LOSS_WEIGHTS",
    "HungarianMatcher",
    "SetCriterion",
    "box_l1_loss",
    "class_loss",
    "dice_loss",
    "giou_loss",
    "loss_weights",
    "sigmoid_ce_loss",
    "weighted_total",
]

LOSS_WEIGHTS: dict[str, float] = {
    "loss_ce": 0.2,
    "loss_mask": 1.5,
    "loss_dice": 1.5,
    "loss_aux_mask": 0.5,
    "loss_aux_box": 0.5,
    "loss_aux_giou": 0.2,
}


def loss_weights(mask_weight: float = 1.5) -> dict[str, float]:
    """A copy of :data:`LOSS_WEIGHTS` with ``mask_weight`` for ``loss_mask`` and ``loss_dice``."""
    return {**LOSS_WEIGHTS, "loss_mask": mask_weight, "loss_dice": mask_weight}


def weighted_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum_k weights[k] * losses[k] over the losses present (scalar tensor)."""
    missing = sorted(set(losses) - set(weights))
    if missing:
        raise TargetError(f"no weight for loss(es) {', '.join(missing)}; add them to the weight table")
    if not losses:
        raise TargetError("no losses to weight: the criterion returned an empty dict")
    return torch.stack([weights[k] * v.float() for k, v in losses.items()]).sum()


# ---------------------------------------------------------------------------- pure loss functions


def class_loss(logits: torch.Tensor, target_classes: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy: logits (N, C+1), target_classes (N,) in 0..C, class_weight (C+1,).

    Mean weighted by class: sum_i w[y_i] * CE_i / sum_i w[y_i] (PyTorch's ``weight=``).
    """
    return F.cross_entropy(logits.float(), target_classes, weight=class_weight.float())


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """BCE with logits, mean over points, summed over masks / ``num_masks``: (M, P), (M, P) → scalar."""
    loss = F.binary_cross_entropy_with_logits(inputs.float(), targets.float(), reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """1 - (2|p∩t| + 1) / (|p| + |t| + 1), p = sigmoid, summed over masks / ``num_masks``: (M, P) → scalar."""
    probs = inputs.float().sigmoid()
    t = targets.float()
    numerator = 2 * (probs * t).sum(-1)
    denominator = probs.sum(-1) + t.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def box_l1_loss(boxes: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Sum of |box - target| over coordinates and boxes / ``num_masks``: (M, 4), (M, 4) → scalar."""
    return (boxes.float() - targets.float()).abs().sum() / num_masks


def giou_loss(boxes: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Sum of 1 - GIoU over box pairs / ``num_masks``: ordered (M, 4), (M, 4) → scalar.

    torchvision's ``generalized_box_iou_loss``, whose eps = 1e-7 keeps zero-area pairs finite.
    """
    return generalized_box_iou_loss(boxes.float(), targets.float(), reduction="sum") / num_masks


# ---------------------------------------------------------------------------- the criterion


class SetCriterion(nn.Module):
    """Matches predictions to per-slice targets and returns the unweighted losses.

    Args:
        num_classes: C, classes including background (the model predicts C+1 logits).
        matcher: the Hungarian matcher (its costs are the loss weights by default).
        no_object_weight: class weight of the "no object" column in ``loss_ce``.
        num_points: points per matched mask for the mask losses (``None``: every pixel).
        oversample_ratio, importance_ratio: PointRend importance sampling (see ``uncertain_points``).
    """

    class_weight: torch.Tensor  # a buffer

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        *,
        no_object_weight: float = 0.1,
        num_points: int | None = 128 * 128 * 2,
        oversample_ratio: float = 2.0,
        importance_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_ratio = importance_ratio
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        self.register_buffer("class_weight", weight, persistent=False)

    def _mask_losses(
        self, logits: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE and Dice of logits (M, H, W) vs targets (M, H, W) at the logits' uncertain points."""
        if self.num_points is None:
            pred, tgt = logits.flatten(1), targets.flatten(1).float()
        else:
            coords = uncertain_points(
                logits.detach()[:, None].float(), self.num_points, self.oversample_ratio,
                self.importance_ratio, generator,
            )
            with torch.no_grad():
                tgt = point_sample(targets[:, None].float(), coords)
            pred = point_sample(logits[:, None].float(), coords)
        return sigmoid_ce_loss(pred, tgt, num_masks), dice_loss(pred, tgt, num_masks)

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        *,
        num_masks: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """outputs: MaskSAM's dict; labels (B, T, H, W) int64 in 0..C-1 → unweighted losses (scalars).

        ``num_masks``: the normaliser of the mask and box losses (default: the
        number of target masks in this batch; under DDP pass its mean over ranks).
        ``generator`` (on the outputs' device, optional) draws the sampling points;
        without it the global RNG is used (and saved with a checkpoint's RNG state).
        """
        c1 = outputs["pred_logits"].shape[-1]
        if c1 != self.num_classes + 1:
            raise TargetError(
                f"the model predicts {c1 - 1} classes (+ no object) but the criterion was built for "
                f"{self.num_classes}; build both with the same num_classes"
            )
        if outputs["pred_masks"].shape[-2:] != labels.shape[-2:] or outputs["pred_masks"].shape[2] != labels.shape[1]:
            raise TargetError(
                f"labels {tuple(labels.shape)} (B, T, H, W) do not fit the predicted masks "
                f"{tuple(outputs['pred_masks'].shape)} (B, Q, T, H, W); pass the labels of the same patches"
            )
        targets = slice_targets(labels, self.num_classes)
        indices = self.matcher(outputs, targets, generator)
        return self.losses(outputs, targets, indices, num_masks=num_masks, generator=generator)

    def losses(
        self,
        outputs: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        indices: list[Match],
        *,
        num_masks: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The losses for a given matching (``indices`` from the matcher, one pair per slice)."""
        device = outputs["pred_masks"].device
        if num_masks is None:
            num_masks = float(num_target_masks(targets))
        if isinstance(num_masks, torch.Tensor):
            num_masks = num_masks.to(device=device, dtype=torch.float32).clamp(min=1.0)
        else:
            num_masks = max(float(num_masks), 1.0)
        slice_idx = torch.cat([torch.full_like(p, s) for s, (p, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([p for p, _ in indices]).to(device)
        tgt_cls = torch.cat([t["labels"][j.to(device)] for t, (_, j) in zip(targets, indices, strict=True)])
        tgt_masks = torch.cat([t["masks"][j.to(device)] for t, (_, j) in zip(targets, indices, strict=True)])
        tgt_boxes = torch.cat([t["boxes"][j.to(device)] for t, (_, j) in zip(targets, indices, strict=True)])

        with torch.autocast(device_type=device.type, enabled=False):
            flat = slice_outputs(outputs, len(targets))
            logits = flat["pred_logits"].float()  # (S, Q, C+1)
            target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
            target_classes[slice_idx, query_idx] = tgt_cls
            losses = {"loss_ce": class_loss(logits.flatten(0, 1), target_classes.flatten(), self.class_weight)}

            pred = gather_slice_masks(outputs["pred_masks"], slice_idx, query_idx)  # (M, H, W)
            losses["loss_mask"], losses["loss_dice"] = self._mask_losses(pred, tgt_masks, num_masks, generator)
            if "aux_masks" in outputs:
                aux = gather_slice_masks(outputs["aux_masks"], slice_idx, query_idx)
                bce, dice = self._mask_losses(aux, tgt_masks, num_masks, generator)
                losses["loss_aux_mask"] = bce + dice
            if "aux_boxes" in flat:
                boxes = order_box(flat["aux_boxes"][slice_idx, query_idx].float())  # (M, 4)
                losses["loss_aux_box"] = box_l1_loss(boxes, tgt_boxes, num_masks)
                losses["loss_aux_giou"] = giou_loss(boxes, tgt_boxes, num_masks)
        return losses
