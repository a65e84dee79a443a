"""Ground truth per slice, model outputs per slice, and the points where the two are compared.

MaskSAM's targets are per SLICE (docs/method.md, "Training targets"): a slice with label map
(H, W) has one binary mask per label id present on it, background included.
Model outputs (B, Q, T, ...) are read as B*T slices, index ``b * T + t``, each
with Q predictions.

Point sampling follows PointRend / Mask2Former: masks are compared at P points
instead of every pixel. Coordinates are (x, y) in [0, 1] over the slice, with
pixel i covering [i/W, (i+1)/W) (so its centre is at (i + 0.5)/W), the same
convention as :func:`masksam_core.modeling.heads.mask_boxes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MaskSAMError
from ..modeling.heads import mask_boxes

Target = dict[str, torch.Tensor]


class TargetError(MaskSAMError):
    """Labels or model outputs that cannot be turned into per-slice training targets."""


def slice_targets(labels: torch.Tensor, num_classes: int) -> list[Target]:
    """One target dict per slice, in (b, t) order.

    labels (B, T, H, W) integer in 0..C-1 (C = ``num_classes``, background = 0)
    → a list of length B*T; entry ``b * T + t`` holds, for the K classes present
    on that slice (sorted, background included when present):

    * ``labels`` (K,) int64 class ids;
    * ``masks`` (K, H, W) bool;
    * ``boxes`` (K, 4) float32 (x0, y0, x1, y1) pixel edges / size.
    """
    if labels.ndim != 4:
        raise TargetError(f"labels must have shape (B, T, H, W), got {tuple(labels.shape)}; add the missing axes")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TargetError(f"labels must be an integer tensor, got {labels.dtype}; convert with labels.long()")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise TargetError(
            f"label values span {int(labels.min())}..{int(labels.max())} but num_classes is {num_classes} "
            f"(values must be 0..{num_classes - 1}); fix the label maps or pass the right number of classes"
        )
    b, t, h, w = labels.shape
    classes = torch.arange(num_classes, device=labels.device)
    onehot = labels.reshape(b * t, 1, h, w) == classes.view(1, -1, 1, 1)  # (S, C, H, W)
    boxes, present = mask_boxes(onehot)  # (S, C, 4), (S, C)
    present_cpu = present.cpu()
    out: list[Target] = []
    for s in range(b * t):
        ids = torch.nonzero(present_cpu[s]).squeeze(1).to(labels.device)
        out.append({"labels": ids, "masks": onehot[s, ids], "boxes": boxes[s, ids]})
    return out


def num_target_masks(targets: list[Target]) -> int:
    """Total number of target masks K summed over slices."""
    return sum(int(t["labels"].numel()) for t in targets)


def slice_outputs(outputs: dict[str, torch.Tensor], slices: int | None = None) -> dict[str, torch.Tensor]:
    """Model outputs seen as slices (views where possible, no gradient cut).

    ``pred_logits`` (B, Q, T, C+1) → (B*T, Q, C+1); ``aux_boxes`` (B, Q, T, 4)
    → (B*T, Q, 4). Mask tensors (B, Q, T, H, W) are NOT copied: use
    :func:`slice_masks` to read one slice. ``slices`` checks B*T.
    """
    if "pred_logits" not in outputs or "pred_masks" not in outputs:
        raise TargetError("model outputs need 'pred_logits' and 'pred_masks' (the dict MaskSAM.forward returns)")
    out: dict[str, torch.Tensor] = {}
    for key in ("pred_logits", "aux_boxes"):
        if key in outputs:
            v = outputs[key]
            out[key] = v.transpose(1, 2).reshape(v.shape[0] * v.shape[2], v.shape[1], v.shape[3])
    n = out["pred_logits"].shape[0]
    if slices is not None and n != slices:
        raise TargetError(f"model outputs hold {n} slices (B*T) but the labels hold {slices}; pass matching batches")
    return out


def slice_masks(masks: torch.Tensor, index: int) -> torch.Tensor:
    """Slice ``index`` = b*T + t of masks (B, Q, T, H, W) → (Q, H, W) (a view)."""
    t = masks.shape[2]
    return masks[index // t, :, index % t]


def gather_slice_masks(masks: torch.Tensor, slice_idx: torch.Tensor, query_idx: torch.Tensor) -> torch.Tensor:
    """Masks (B, Q, T, H, W) at (slice, query) pairs → (M, H, W); slice = b*T + t."""
    t = masks.shape[2]
    return masks[slice_idx // t, query_idx, slice_idx % t]


def sample_channels(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of inputs (N, C, H, W) at coords (N, P, 2) (x, y in [0, 1]) → (N, C, P).

    Points outside the image read the nearest border value.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(1).to(inputs.dtype)  # (N, 1, P, 2) in grid_sample's [-1, 1]
    out = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(2)


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of inputs (N, 1, H, W) at coords (N, P, 2) (x, y in [0, 1]) → (N, P).

    A coordinate (x, y) = ((j + 0.5) / W, (i + 0.5) / H) reads pixel [i, j] exactly.
    """
    return sample_channels(inputs, coords).squeeze(1)


def uniform_points(
    n: int, num_points: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniformly random coords (n, num_points, 2) in [0, 1) (``generator`` on ``device``)."""
    return torch.rand(n, num_points, 2, device=device, generator=generator)


@torch.no_grad()
def uncertain_points(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 2.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend importance sampling: coords (N, P, 2) for mask logits (N, 1, H, W), P = ``num_points``.

    ``oversample_ratio * P`` uniformly random points are drawn; the
    ``importance_ratio * P`` of them with the highest uncertainty ``-|logit|``
    (closest to the decision boundary) are kept and the rest of the P points
    are uniformly random. Cost: O(N * P * oversample_ratio) memory and time,
    independent of H*W; with a preset's P (e.g. 128*128*2) this dominates the
    criterion's memory, so keep the number of matched masks per batch in mind.
    ``generator`` (on the logits' device) makes the draw reproducible.
    """
    if num_points < 1 or oversample_ratio < 1.0 or not 0.0 <= importance_ratio <= 1.0:
        raise TargetError(
            f"point sampling needs num_points >= 1, oversample_ratio >= 1 and importance_ratio in [0, 1], "
            f"got {num_points}, {oversample_ratio}, {importance_ratio}"
        )
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_ratio * num_points)
    num_random = num_points - num_uncertain
    candidates = uniform_points(n, num_sampled, device=logits.device, generator=generator)
    uncertainty = -point_sample(logits.float(), candidates).abs()  # (N, num_sampled)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    chosen = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random:
        rand = uniform_points(n, num_random, device=logits.device, generator=generator)
        chosen = torch.cat([chosen, rand], dim=1)
    return chosen
