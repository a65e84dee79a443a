"""Training targets, point sampling, the Hungarian matcher and the set criterion.

References are independent of the code under test: hand-computed values on tiny
tensors, brute force over all assignments, direct pixel indexing, torchvision's
GIoU and per-pair losses written out with plain torch ops. Box L1 and GIoU: test_giou.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou as tv_giou

from masksam_core.errors import MaskSAMError
from masksam_core.modeling import build_model, get_preset, gt_prompts
from masksam_core.training.criterion import (
    LOSS_WEIGHTS,
    SetCriterion,
    class_loss,
    dice_loss,
    loss_weights,
    sigmoid_ce_loss,
    weighted_total,
)
from masksam_core.training.matcher import (
    HungarianMatcher,
    MatchingError,
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    class_cost,
    solve,
)
from masksam_core.training.targets import point_sample, slice_targets, uncertain_points

AUX_NAMES = {"loss_aux_mask", "loss_aux_box", "loss_aux_giou"}
MAIN_NAMES = {"loss_ce", "loss_mask", "loss_dice"}


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(x: float, t: float) -> float:
    return -(t * math.log(_sig(x)) + (1 - t) * math.log(1 - _sig(x)))


# ---------------------------------------------------------------------------- targets


def test_slice_targets_tiny_volume():
    # B=1, T=2, H=3, W=4; C=3. Slice 0 has classes 0, 2; slice 1 has 0, 1, 2.
    labels = torch.tensor([[
        [[0, 0, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0]],
        [[1, 1, 0, 0], [1, 1, 0, 2], [0, 0, 0, 2]],
    ]])
    targets = slice_targets(labels, 3)
    assert len(targets) == 2
    assert targets[0]["labels"].tolist() == [0, 2]
    assert targets[1]["labels"].tolist() == [0, 1, 2]
    assert targets[0]["labels"].dtype == torch.int64
    assert targets[0]["masks"][1].tolist() == [[False] * 4, [False, True, True, False], [False] * 4]
    # boxes: (x0, y0, x1, y1) pixel edges / (W, H)
    torch.testing.assert_close(targets[0]["boxes"][1], torch.tensor([1 / 4, 1 / 3, 3 / 4, 2 / 3]))
    torch.testing.assert_close(targets[0]["boxes"][0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(targets[1]["boxes"][1], torch.tensor([0.0, 0.0, 2 / 4, 2 / 3]))
    torch.testing.assert_close(targets[1]["boxes"][2], torch.tensor([3 / 4, 1 / 3, 1.0, 1.0]))
    torch.testing.assert_close(targets[1]["boxes"][0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # b-major order: B=2, T=2 → slices (0,0), (0,1), (1,0), (1,1)
    two = torch.stack([labels[0], torch.zeros_like(labels[0])])
    order = [t["labels"].tolist() for t in slice_targets(two, 3)]
    assert order == [[0, 2], [0, 1, 2], [0], [0]]


@pytest.mark.parametrize("bad", [torch.full((1, 1, 2, 2), 3), torch.full((1, 1, 2, 2), -1), torch.zeros(1, 1, 2, 2)])
def test_slice_targets_rejects_bad_labels(bad):
    with pytest.raises(MaskSAMError, match="label"):
        slice_targets(bad, 3)


# ---------------------------------------------------------------------------- points


def test_point_sample_reads_pixel_centres():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 5, 7, generator=g)
    rows = torch.randint(0, 5, (3, 20), generator=g)
    cols = torch.randint(0, 7, (3, 20), generator=g)
    coords = torch.stack([(cols + 0.5) / 7, (rows + 0.5) / 5], dim=-1)
    expected = torch.stack([x[n, 0, rows[n], cols[n]] for n in range(3)])
    torch.testing.assert_close(point_sample(x, coords), expected)
    # halfway between two horizontal pixel centres: their mean
    mid = torch.tensor([[[2.0 / 7, 0.5 / 5]]]).expand(3, 1, 2)
    torch.testing.assert_close(point_sample(x, mid)[:, 0], (x[:, 0, 0, 1] + x[:, 0, 0, 2]) / 2)


def test_uncertain_points_pick_the_uncertain_region():
    # logits 0 (maximally uncertain) in columns 0..11 of 20, confident (+-10) elsewhere
    logits = torch.full((2, 1, 20, 20), 10.0)
    logits[1, :, ::2] = -10.0
    logits[..., :12] = 0.0
    g = torch.Generator().manual_seed(1)
    coords = uncertain_points(logits, 500, oversample_ratio=2.0, importance_ratio=0.75, generator=g)
    assert coords.shape == (2, 500, 2)
    assert (coords >= 0).all() and (coords <= 1).all()
    important, rest = coords[:, :375], coords[:, 375:]
    assert (important[..., 0] < 0.6).all()  # all 375 chosen points lie in the uncertain columns
    assert (rest[..., 0] >= 0.6).float().mean() > 0.2  # the 125 others are uniform (40% expected)
    again = uncertain_points(logits, 500, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(coords, again)
    uniform = uncertain_points(logits, 500, importance_ratio=0.0, generator=g)
    assert 0.3 < (uniform[..., 0] >= 0.6).float().mean() < 0.5


# ---------------------------------------------------------------------------- costs, by hand


def test_mask_costs_by_hand_on_a_2x2_mask():
    logits = torch.tensor([[2.0, -1.0, 0.0, 3.0]])  # a 2x2 mask, flattened
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    bce = (_bce(2, 1) + _bce(-1, 0) + _bce(0, 0) + _bce(3, 1)) / 4
    p = [_sig(v) for v in (2.0, -1.0, 0.0, 3.0)]
    dice = 1 - (2 * (p[0] + p[3]) + 1) / (sum(p) + 2 + 1)
    assert batch_sigmoid_ce_cost(logits, target).item() == pytest.approx(bce, rel=1e-6)
    assert batch_dice_cost(logits, target).item() == pytest.approx(dice, rel=1e-6)
    assert sigmoid_ce_loss(logits, target, 1).item() == pytest.approx(bce, rel=1e-6)
    assert dice_loss(logits, target, 2).item() == pytest.approx(dice / 2, rel=1e-6)
    # the (N, M) costs are the per-pair losses
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 9, generator=g), (torch.rand(4, 9, generator=g) > 0.5).float()
    bce_pairs = torch.tensor([[sigmoid_ce_loss(x[i : i + 1], t[j : j + 1], 1) for j in range(4)] for i in range(3)])
    dice_pairs = torch.tensor([[dice_loss(x[i : i + 1], t[j : j + 1], 1) for j in range(4)] for i in range(3)])
    torch.testing.assert_close(batch_sigmoid_ce_cost(x, t), bce_pairs)
    torch.testing.assert_close(batch_dice_cost(x, t), dice_pairs)


def test_class_cost_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]])  # softmax = (1/4, 1/2, 1/4)
    torch.testing.assert_close(class_cost(logits, torch.tensor([1, 0])), torch.tensor([[-0.5, -0.25]]))


def test_class_loss_with_no_object_weight_by_hand():
    # C = 2 classes + no object; query 0 → class 0, query 1 → no object (index 2, weight 0.1)
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    expected = (math.log(3) + 0.1 * math.log(math.e + 2)) / 1.1
    weight = SetCriterion(2, HungarianMatcher(), no_object_weight=0.1).class_weight
    assert weight.tolist() == pytest.approx([1.0, 1.0, 0.1])
    assert class_loss(logits, torch.tensor([0, 2]), weight).item() == pytest.approx(expected, rel=1e-6)


def test_loss_weights_and_weighted_total():
    assert LOSS_WEIGHTS == {"loss_ce": 0.2, "loss_mask": 1.5, "loss_dice": 1.5,
                            "loss_aux_mask": 0.5, "loss_aux_box": 0.5, "loss_aux_giou": 0.2}
    amos = loss_weights(get_preset("amos").mask_loss_weight)
    assert amos["loss_mask"] == amos["loss_dice"] == 1.2 and amos["loss_ce"] == 0.2
    assert LOSS_WEIGHTS["loss_mask"] == 1.5  # the table itself is untouched
    losses = {"loss_ce": torch.tensor(1.0), "loss_mask": torch.tensor(2.0), "loss_dice": torch.tensor(3.0)}
    assert weighted_total(losses, LOSS_WEIGHTS).item() == pytest.approx(0.2 + 3.0 + 4.5)
    with pytest.raises(MaskSAMError, match="no weight"):
        weighted_total({"loss_other": torch.tensor(1.0)}, LOSS_WEIGHTS)
    matcher = HungarianMatcher.from_weights(amos, num_points=None)
    assert (matcher.cost_class, matcher.cost_mask, matcher.cost_dice) == (0.2, 1.2, 1.2)
    assert (matcher.cost_box_l1, matcher.cost_giou, matcher.cost_aux_mask) == (0.5, 0.2, 0.5)


# ---------------------------------------------------------------------------- matcher


def _random_case(seed: int, q: int, kmax: int, *, b: int = 2, t: int = 2, c: int = 5, hw: int = 8):
    """Random outputs and labels: every slice has 1..kmax classes (background not forced)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(b, t, hw, hw, dtype=torch.int64)
    for i in range(b):
        for j in range(t):
            k = int(torch.randint(1, kmax + 1, (1,), generator=g))
            classes = torch.randperm(c, generator=g)[:k]
            idx = torch.randint(0, k, (hw * hw,), generator=g)
            idx[:k] = torch.arange(k)  # every chosen class appears
            labels[i, j] = classes[idx].view(hw, hw)
    outputs = {
        "pred_logits": torch.randn(b, q, t, c + 1, generator=g) * 2,
        "pred_masks": torch.randn(b, q, t, hw, hw, generator=g) * 2,
        "aux_masks": torch.randn(b, q, t, hw, hw, generator=g) * 2,
        "aux_boxes": torch.rand(b, q, t, 4, generator=g),
    }
    return outputs, labels


def _reference_cost(outputs, labels, b, t, q, cls, w=LOSS_WEIGHTS):
    """Cost of prediction (b, q, t) for class ``cls``, written out with plain torch ops."""
    target = (labels[b, t] == cls).float()
    rows, cols = torch.nonzero(target, as_tuple=True)
    h, wd = target.shape
    tbox = torch.tensor([[cols.min() / wd, rows.min() / h, (cols.max() + 1) / wd, (rows.max() + 1) / h]])

    def bce_dice(logits):
        p = logits.sigmoid()
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        return F.binary_cross_entropy_with_logits(logits, target), dice

    prob = outputs["pred_logits"][b, q, t].softmax(-1)[cls]
    bce, dice = bce_dice(outputs["pred_masks"][b, q, t])
    aux_bce, aux_dice = bce_dice(outputs["aux_masks"][b, q, t])
    x0, y0, x1, y1 = outputs["aux_boxes"][b, q, t]
    box = torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1), torch.maximum(x0, x1), torch.maximum(y0, y1)])
    l1 = (box - tbox[0]).abs().sum()
    giou = tv_giou(box[None], tbox)[0, 0]
    return (w["loss_ce"] * -prob + w["loss_mask"] * bce + w["loss_dice"] * dice
            + w["loss_aux_mask"] * (aux_bce + aux_dice) + w["loss_aux_box"] * l1 + w["loss_aux_giou"] * (1 - giou))


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force(seed):
    q = 4 + seed % 3  # 4, 5, 6 queries; up to 4 classes per slice
    outputs, labels = _random_case(seed, q, kmax=4)
    targets = slice_targets(labels, 5)
    matcher = HungarianMatcher(num_points=None)  # every pixel: exact costs
    costs = matcher.cost_matrices(outputs, targets)
    indices = matcher(outputs, targets)
    tsz = labels.shape[1]
    for s, (tgt, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices, strict=True)):
        b, t = divmod(s, tsz)
        classes = tgt["labels"].tolist()
        ref = torch.tensor([[_reference_cost(outputs, labels, b, t, i, c) for c in classes] for i in range(q)])
        torch.testing.assert_close(costs[s], ref, rtol=1e-5, atol=1e-5)
        k = len(classes)
        best = min(itertools.permutations(range(q), k), key=lambda p: sum(ref[p[j], j] for j in range(k)))
        assert sorted(zip(pred_idx.tolist(), tgt_idx.tolist(), strict=True)) == sorted((best[j], j) for j in range(k))


@pytest.mark.parametrize("seed", range(3))
def test_matcher_with_sampled_points_is_optimal_for_its_costs(seed):
    outputs, labels = _random_case(10 + seed, 6, kmax=4, hw=16)
    targets = slice_targets(labels, 5)
    matcher = HungarianMatcher(num_points=64)
    costs = matcher.cost_matrices(outputs, targets, torch.Generator().manual_seed(seed))
    indices = matcher(outputs, targets, torch.Generator().manual_seed(seed))
    for cost, (pred_idx, tgt_idx) in zip(costs, indices, strict=True):
        k = cost.shape[1]
        brute = min(sum(cost[p[j], j].item() for j in range(k)) for p in itertools.permutations(range(6), k))
        assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(brute, abs=1e-5)


def test_solve_edge_cases():
    pred_idx, tgt_idx = solve(torch.zeros(3, 0))
    assert pred_idx.numel() == tgt_idx.numel() == 0
    with pytest.raises(MatchingError, match="num_queries Q=2 < classes on a slice K=3"):
        solve(torch.zeros(2, 3))
    with pytest.raises(MatchingError, match="not finite"):
        solve(torch.tensor([[float("nan")]]))
    outputs, labels = _random_case(0, 2, kmax=1)
    labels[0, 0, :2, :2] = torch.tensor([[0, 1], [2, 3]])  # 4 classes on one slice, 2 queries
    with pytest.raises(MatchingError, match="more queries"):
        HungarianMatcher(num_points=None)(outputs, slice_targets(labels, 5))


# ---------------------------------------------------------------------------- criterion


def _perfect_case():
    """Outputs that predict the labels exactly through a known query assignment."""
    labels = torch.zeros(1, 2, 16, 16, dtype=torch.int64)
    labels[0, 0, 2:9, 3:12] = 1
    labels[0, 0, 10:15, 1:6] = 2
    labels[0, 1, 4:14, 6:15] = 1
    assignment = [{0: 3, 1: 0, 2: 4}, {0: 1, 1: 2}]  # slice → {class: query}
    q, c = 5, 3
    logits = torch.full((1, q, 2, c + 1), -10.0)
    logits[..., c] = 10.0  # unmatched queries: no object
    masks = torch.full((1, q, 2, 16, 16), -10.0)
    boxes = torch.rand(1, q, 2, 4)
    for t, pairs in enumerate(assignment):
        targets = slice_targets(labels[:, t : t + 1], c)[0]
        for k, cls in enumerate(targets["labels"].tolist()):
            query = pairs[cls]
            logits[0, query, t] = -10.0
            logits[0, query, t, cls] = 10.0
            masks[0, query, t] = 10.0 * (2 * targets["masks"][k].float() - 1)
            boxes[0, query, t] = targets["boxes"][k][[2, 1, 0, 3]]  # x corners swapped: order_box fixes them
    outputs = {"pred_logits": logits, "pred_masks": masks, "aux_masks": masks.clone(), "aux_boxes": boxes}
    return outputs, labels, assignment


def test_perfect_prediction_has_near_zero_losses():
    outputs, labels, assignment = _perfect_case()
    g = torch.Generator().manual_seed(0)
    indices = HungarianMatcher(num_points=128)(outputs, slice_targets(labels, 3), g)  # sampled points
    for s, (pred_idx, tgt_idx) in enumerate(indices):
        classes = slice_targets(labels[:, s : s + 1], 3)[0]["labels"]
        assert {int(classes[j]): int(i) for i, j in zip(pred_idx, tgt_idx, strict=True)} == assignment[s]
    # Every pixel: sub-pixel points between a +10 and a -10 pixel read logit ~0 and target ~0.5
    # (bilinear), where BCE cannot be below log 2, so "near zero" is a pixel-level statement.
    criterion = SetCriterion(3, HungarianMatcher(num_points=None), num_points=None)
    losses = criterion(outputs, labels)
    assert set(losses) == MAIN_NAMES | AUX_NAMES
    assert losses["loss_mask"].item() < 1e-3 and losses["loss_dice"].item() < 1e-2
    assert losses["loss_aux_mask"].item() < 1e-2 and losses["loss_ce"].item() < 1e-3
    assert losses["loss_aux_box"].item() < 1e-6 and losses["loss_aux_giou"].item() < 1e-6
    wrong = dict(outputs, pred_masks=-outputs["pred_masks"])
    assert criterion(wrong, labels)["loss_mask"].item() > 1.0


def test_criterion_class_loss_targets_no_object_for_unmatched_queries():
    outputs, labels, assignment = _perfect_case()
    outputs["pred_logits"] = torch.randn(outputs["pred_logits"].shape, generator=torch.Generator().manual_seed(3))
    losses = SetCriterion(3, HungarianMatcher(num_points=None), num_points=None)(outputs, labels)
    num, den = 0.0, 0.0
    for t, pairs in enumerate(assignment):
        query_to_class = {query: cls for cls, query in pairs.items()}
        for query in range(5):
            y = query_to_class.get(query, 3)  # 3 = no object
            w = 0.1 if y == 3 else 1.0
            log_p = outputs["pred_logits"][0, query, t].log_softmax(-1)[y].item()
            num, den = num - w * log_p, den + w
    assert losses["loss_ce"].item() == pytest.approx(num / den, rel=1e-5)


def test_criterion_num_masks_normalises_and_fp32_under_autocast():
    outputs, labels, _ = _perfect_case()
    outputs["pred_masks"] = outputs["pred_masks"] * 0.1  # non-trivial losses
    criterion = SetCriterion(3, HungarianMatcher(num_points=None), num_points=None)
    own = criterion(outputs, labels)  # 5 target masks
    doubled = criterion(outputs, labels, num_masks=torch.tensor(10.0))
    for name in ("loss_mask", "loss_dice", "loss_aux_box", "loss_aux_giou"):
        assert doubled[name].item() == pytest.approx(own[name].item() / 2, rel=1e-5)
    assert doubled["loss_ce"].item() == pytest.approx(own["loss_ce"].item(), rel=1e-6)
    half = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = SetCriterion(3, HungarianMatcher(num_points=64), num_points=64)(half, labels)
    assert all(v.dtype == torch.float32 for v in losses.values())
    with pytest.raises(MaskSAMError, match="num_classes"):
        SetCriterion(4, HungarianMatcher())(outputs, labels)
    with pytest.raises(MaskSAMError, match="labels"):
        criterion(outputs, labels[:, :1])


def _phantom_labels(t: int, hw: int) -> torch.Tensor:
    labels = torch.zeros(1, t, hw, hw, dtype=torch.int64)
    labels[..., 10:30, 12:40] = 1
    labels[:, 1:, 38:58, 6:24] = 2
    return labels


@pytest.mark.parametrize("mode", ["auto", "gt"])
def test_criterion_on_tiny_model_backpropagates(mode):
    torch.manual_seed(0)
    preset = get_preset("tiny")
    patch = (2, *preset.patch_size[1:])  # 2 slices keep the test fast
    model = build_model("tiny", pretrained=False, prompt_mode=mode, patch_size=patch)
    labels = _phantom_labels(*patch[:2])
    x = torch.randn(1, 1, *patch)
    outputs = model(x, gt_prompts(labels, preset.num_classes) if mode == "gt" else None)
    matcher = HungarianMatcher.from_weights(LOSS_WEIGHTS, num_points=preset.num_points)
    criterion = SetCriterion(preset.num_classes, matcher, num_points=preset.num_points)
    losses = criterion(outputs, labels)
    assert set(losses) == (MAIN_NAMES | AUX_NAMES if mode == "auto" else MAIN_NAMES)
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    weighted_total(losses, LOSS_WEIGHTS).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert sum(p.grad.abs().sum().item() for _, p in trainable) > 0
    assert all(p.grad is None for p in model.sam.parameters())
    if mode == "auto":  # every auxiliary head receives gradient from its loss
        gen = model.prompt_generator
        for head in (gen.mask_head, gen.box_head):
            assert any(p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_criterion_on_cuda_under_bf16_autocast():
    outputs, labels, _ = _perfect_case()
    outputs = {k: v.cuda() for k, v in outputs.items()}
    outputs["pred_masks"].requires_grad_(True)
    criterion = SetCriterion(3, HungarianMatcher(num_points=256), num_points=256).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = criterion(outputs, labels.cuda(), generator=torch.Generator("cuda").manual_seed(0))
    assert set(losses) == MAIN_NAMES | AUX_NAMES
    assert all(v.dtype == torch.float32 and v.is_cuda and torch.isfinite(v) for v in losses.values())
    weighted_total(losses, LOSS_WEIGHTS).backward()
    assert torch.isfinite(outputs["pred_masks"].grad).all()
