"""Hungarian matching of Q predicted masks to the K ground-truth masks of each slice.

The matching cost of prediction q and target k on one slice is

    w_class * (-p_q[class_k])
    + w_mask * BCE(mask_q, mask_k) + w_dice * Dice(mask_q, mask_k)
    + (auto mode) w_box_l1 * |box_q - box_k|_1 + w_giou * (1 - GIoU(box_q, box_k))
    + (auto mode) w_aux_mask * (BCE + Dice)(aux_mask_q, mask_k)

with masks compared at the same uniformly random points for predictions and
targets (as Mask2Former does). The weights default to the loss weights
(docs/method.md, "Matcher and losses": class 0.2, mask 1.5, Dice 1.5, aux box
L1 0.5, aux GIoU 0.2, aux mask 0.5):
like Mask2Former, the criterion's weights double as the matching costs.
Costs are computed in fp32 without gradients and solved per slice with
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from ..errors import MaskSAMError
from ..modeling.heads import order_box
from .targets import Target, TargetError, sample_channels, slice_masks, slice_outputs, uniform_points

Match = tuple[torch.Tensor, torch.Tensor]


class MatchingError(MaskSAMError):
    """Predictions cannot be matched to targets (too few queries, non-finite outputs)."""


# ---------------------------------------------------------------------------- pure cost functions


def class_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-p[target class]: logits (N, C+1), labels (M,) int → (N, M)."""
    return -logits.float().softmax(-1)[:, labels]


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid BCE over points of every pair: logits (N, P), targets (M, P) in [0, 1] → (N, M)."""
    p = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / p


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - (2|p∩t| + 1) / (|p| + |t| + 1) with p = sigmoid: logits (N, P), targets (M, P) → (N, M)."""
    probs = inputs.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def box_l1_cost(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of absolute coordinate differences: boxes (N, 4), targets (M, 4) → (N, M)."""
    return torch.cdist(boxes.float(), targets.float(), p=1)


def giou_cost(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - GIoU of every pair: boxes (N, 4), targets (M, 4), ordered corners (x0, y0, x1, y1) → (N, M).

    torchvision's ``generalized_box_iou_loss`` on all N x M pairs, not its pairwise
    ``generalized_box_iou``: the latter divides by the union and the enclosing area without an
    epsilon, so a pair of zero-area boxes (a prediction collapsed to a line or a point) costs NaN,
    and a NaN cost stops the matching. The loss adds eps = 1e-7 to both, as the criterion's GIoU loss
    does, so matching and loss score every pair alike.
    """
    n, m = boxes.shape[0], targets.shape[0]
    pairs = boxes.float()[:, None].expand(n, m, 4), targets.float()[None, :].expand(n, m, 4)
    return generalized_box_iou_loss(*pairs)


def solve(cost: torch.Tensor) -> Match:
    """Minimum-cost assignment of a cost matrix (Q, K), Q >= K → (pred_idx, tgt_idx) int64, each (K,).

    ``pred_idx`` is sorted; target ``tgt_idx[i]`` goes to prediction ``pred_idx[i]``.
    """
    q, k = cost.shape
    if k > q:
        raise MatchingError(
            f"num_queries Q={q} < classes on a slice K={k}: every class on a slice needs its own query; "
            f"use a preset/override with more queries (num_queries >= {k})"
        )
    if k == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    c = cost.detach().float().cpu()
    if not torch.isfinite(c).all():
        raise MatchingError(
            "matching costs are not finite: the model produced NaN or infinite outputs "
            "(training diverged); lower the learning rate or resume from an earlier checkpoint"
        )
    rows, cols = linear_sum_assignment(c.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


# ---------------------------------------------------------------------------- the matcher


class HungarianMatcher(nn.Module):
    """Assigns each slice's target masks to its predictions (see the module docstring).

    Args:
        cost_class, cost_mask, cost_dice: weights of the class, mask-BCE and mask-Dice costs.
        cost_box_l1, cost_giou, cost_aux_mask: weights of the auxiliary box L1, box GIoU and
            aux-mask (BCE + Dice) costs; used when the outputs hold ``aux_boxes`` / ``aux_masks``.
        num_points: uniformly random points per slice at which masks are compared
            (``None``: every pixel, exact and fine for small patches).
    """

    def __init__(
        self,
        cost_class: float = 0.2,
        cost_mask: float = 1.5,
        cost_dice: float = 1.5,
        cost_box_l1: float = 0.5,
        cost_giou: float = 0.2,
        cost_aux_mask: float = 0.5,
        *,
        num_points: int | None = 128 * 128 * 2,
    ) -> None:
        super().__init__()
        if num_points is not None and num_points < 1:
            raise MatchingError(f"num_points must be positive or None (every pixel), got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_box_l1 = cost_box_l1
        self.cost_giou = cost_giou
        self.cost_aux_mask = cost_aux_mask
        self.num_points = num_points

    @classmethod
    def from_weights(cls, weights: Mapping[str, float], *, num_points: int | None) -> HungarianMatcher:
        """A matcher whose costs are a criterion weight table (see ``criterion.loss_weights``)."""
        return cls(
            cost_class=weights["loss_ce"],
            cost_mask=weights["loss_mask"],
            cost_dice=weights["loss_dice"],
            cost_box_l1=weights["loss_aux_box"],
            cost_giou=weights["loss_aux_giou"],
            cost_aux_mask=weights["loss_aux_mask"],
            num_points=num_points,
        )

    def _points(self, masks: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
        """masks (N, H, W) → values (N, P) at coords (P, 2), or every pixel when coords is None."""
        if coords is None:
            return masks.flatten(1).float()
        return sample_channels(masks[None].float(), coords[None])[0]

    @torch.no_grad()
    def cost_matrices(
        self,
        outputs: dict[str, torch.Tensor],
        targets: list[Target],
        generator: torch.Generator | None = None,
    ) -> list[torch.Tensor]:
        """One fp32 cost matrix (Q, K_s) per slice s, on the CPU.

        outputs: MaskSAM's dict (``pred_logits`` (B, Q, T, C+1), ``pred_masks``
        (B, Q, T, H, W), optional ``aux_masks``, ``aux_boxes`` (B, Q, T, 4));
        targets: ``slice_targets(labels, C)``, length B*T; ``generator`` (on the
        outputs' device, optional) draws the random points.
        """
        with torch.autocast(device_type=outputs["pred_masks"].device.type, enabled=False):
            flat = slice_outputs(outputs, len(targets))
            logits = flat["pred_logits"].float()
            boxes = order_box(flat["aux_boxes"].float()) if "aux_boxes" in flat else None
            masks, aux = outputs["pred_masks"], outputs.get("aux_masks")
            costs = []
            for s, tgt in enumerate(targets):
                labels = tgt["labels"]
                if labels.numel() == 0:
                    costs.append(logits.new_zeros(logits.shape[1], 0))
                    continue
                coords = None
                if self.num_points is not None:
                    coords = uniform_points(1, self.num_points, device=masks.device, generator=generator)[0]
                tgt_pts = self._points(tgt["masks"], coords)
                pred_pts = self._points(slice_masks(masks, s), coords)
                cost = self.cost_class * class_cost(logits[s], labels)
                cost = cost + self.cost_mask * batch_sigmoid_ce_cost(pred_pts, tgt_pts)
                cost = cost + self.cost_dice * batch_dice_cost(pred_pts, tgt_pts)
                if aux is not None:
                    aux_pts = self._points(slice_masks(aux, s), coords)
                    aux_cost = batch_sigmoid_ce_cost(aux_pts, tgt_pts) + batch_dice_cost(aux_pts, tgt_pts)
                    cost = cost + self.cost_aux_mask * aux_cost
                if boxes is not None:
                    cost = cost + self.cost_box_l1 * box_l1_cost(boxes[s], tgt["boxes"])
                    cost = cost + self.cost_giou * giou_cost(boxes[s], tgt["boxes"])
                costs.append(cost)
            sizes = [c.numel() for c in costs]
            packed = torch.cat([c.flatten() for c in costs]).cpu() if costs else torch.zeros(0)  # one transfer
        return [p.view(c.shape) for p, c in zip(packed.split(sizes), costs, strict=True)]

    @torch.no_grad()
    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        targets: list[Target],
        generator: torch.Generator | None = None,
    ) -> list[Match]:
        """Per slice (b*T + t) the pair (pred_idx (K,), tgt_idx (K,)) int64 on the CPU."""
        if len(targets) == 0:
            raise TargetError("no targets: pass slice_targets(labels, num_classes) for a non-empty batch")
        return [solve(cost) for cost in self.cost_matrices(outputs, targets, generator)]
