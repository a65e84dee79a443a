"""Box costs and losses: L1 and GIoU of the matcher and the criterion.

References are independent of the code under test: hand-computed values, torchvision's pairwise
GIoU on ordinary boxes, and GIoU written out with plain torch ops (eps-guarded, so that zero-area
boxes, where torchvision's pairwise GIoU gives NaN, are covered too).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou as tv_giou

from masksam_core.training.criterion import box_l1_loss, giou_loss
from masksam_core.training.matcher import box_l1_cost, giou_cost


def test_box_costs_and_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0]])
    # overlapping: inter 1, union 7, enclosing 9; disjoint: inter 0, union 2, enclosing 9
    giou_overlap = 1 / 7 - 2 / 9
    giou_disjoint = -7 / 9
    torch.testing.assert_close(1 - giou_cost(a, b).diagonal(), torch.tensor([giou_overlap, giou_disjoint]))
    torch.testing.assert_close(giou_cost(a, b), 1 - tv_giou(a, b))
    assert giou_cost(a, b)[0, 0].item() == pytest.approx(1 - giou_overlap, rel=1e-6)
    assert giou_loss(a, b, 2).item() == pytest.approx((2 - giou_overlap - giou_disjoint) / 2, rel=1e-6)
    torch.testing.assert_close(box_l1_cost(a, b), torch.tensor([[4.0, 6.0], [6.0, 8.0]]))
    assert box_l1_loss(a, b, 4).item() == pytest.approx((4 + 8) / 4)
    assert 1 - giou_cost(a[:1], a[:1]).item() == pytest.approx(1.0)
    assert 1 - giou_loss(a[:1], a[:1], 1).item() == pytest.approx(1.0)


def _giou_with_eps(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU written out for box pairs a, b (..., 4), eps-guarded as the matcher and criterion promise."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    enclosing = ((torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0]))
                 * (torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])))
    return inter / (union + eps) - (enclosing - union) / (enclosing + eps)


def test_giou_cost_and_loss_keep_degenerate_boxes_finite():
    """Zero-area boxes (a collapsed prediction, a one-pixel target) cost what the eps-guarded GIoU says,
    where torchvision's pairwise generalized_box_iou (no eps) would give NaN and stop the matching."""
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(6, 2, 2, generator=g)
    random = torch.cat([corners.min(1).values, corners.max(1).values], -1)  # ordered boxes (x0, y0, x1, y1)
    degenerate = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.3, 0.2, 0.7], [0.5, 0.5, 0.5, 0.5],
                               [0.1, 0.4, 0.6, 0.4], [0.0, 0.0, 0.0, 0.0]])
    boxes = torch.cat([random, degenerate])
    targets = torch.cat([degenerate, random[:3]])
    expected = 1 - _giou_with_eps(boxes[:, None], targets[None, :])
    assert torch.isfinite(expected).all()
    assert torch.isnan(tv_giou(degenerate[:1], degenerate[:1])).all()  # why torchvision's pairwise GIoU is not used
    cost = giou_cost(boxes, targets)
    assert cost.shape == (len(boxes), len(targets))
    torch.testing.assert_close(cost, expected, atol=1e-6, rtol=0)
    pairs = boxes[: len(targets)]
    want = (1 - _giou_with_eps(pairs, targets)).sum() / 3
    assert abs(giou_loss(pairs, targets, 3).item() - want.item()) < 1e-6
    finite = random[:, None].expand(6, 6, 4), random[None].expand(6, 6, 4)  # and on ordinary boxes
    torch.testing.assert_close(giou_cost(random, random), 1 - _giou_with_eps(*finite), atol=1e-6, rtol=0)
    ours, reference = random[:3].clone().requires_grad_(), random[:3].clone().requires_grad_()
    giou_loss(ours, random[3:], 3).backward()
    ((1 - _giou_with_eps(reference, random[3:])).sum() / 3).backward()
    torch.testing.assert_close(ours.grad, reference.grad, atol=1e-6, rtol=0)  # the training signal too
