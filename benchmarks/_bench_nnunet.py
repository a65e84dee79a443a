"""nnU-Net v2's default ``3d_fullres`` network for a volume shape and spacing, for the speed comparison.

The configuration follows the rules of nnU-Net v2's default ``ExperimentPlanner`` (8 GB GPU target,
``PlainConvUNet``), for a data set whose cases all share one shape and spacing:

1. Target spacing = the median spacing. When one axis is coarser than 3× the others and has fewer
   than a third of their voxels, nnU-Net takes the 10th percentile of that axis's spacings instead;
   with one spacing for all cases that is the same value. Axis 0 is the coarsest (nnU-Net transposes
   the coarsest axis first; (Z, Y, X) CT already has it there).
2. Initial patch: proportional to 1/spacing, scaled to the volume of 256³ voxels, clipped to the
   median shape.
3. Topology: pool an axis (stride 2) while its feature map is at least 2×4 voxels and its current
   spacing is within 2× of the finest; a lone axis pools only while at least 3×4 voxels. A conv kernel
   is 3 along an axis once that axis's spacing is within 2× of the finest, else 1; the bottleneck is
   3×3×3. The patch is rounded up to a multiple of 2^(pools per axis).
4. Memory: while ``PlainConvUNet.compute_conv_feature_map_size(patch)`` exceeds 560,000,000 (nnU-Net's
   reference for 8 GB at batch size 2), shrink the axis with the largest patch/median-shape ratio by
   one divisibility step and redo the topology.
5. Features per stage 32·2^i capped at 320; two convs per stage in encoder and decoder; conv bias,
   InstanceNorm3d (eps 1e-5, affine), LeakyReLU.

For the suite's 128×512×512 CT at (3.0, 0.78, 0.78) mm (a typical abdominal CT: Synapse-like
~3 mm slices, ~0.78 mm pixels; the axial axis is anisotropic, 3.0 > 3 × 0.78, and 128 × 3 < 512)
this gives (:data:`DEFAULT_PLAN`, checked by the tests against :func:`plan_3d_fullres`):

* initial patch 104×401×401 → 112×416×416 after rounding, reduced by rule 4 to **48×192×192**
  (feature-map estimate 495,203,328 ≤ 560,000,000; batch size 2);
* **6 stages**, features per stage **32, 64, 128, 256, 320, 320**;
* strides **(1,1,1), (1,2,2), (2,2,2), (2,2,2), (2,2,2), (1,2,2)** (the first in-plane pool brings
  the in-plane spacing to 1.56 mm, within 2× of 3.0 mm, so Z pools from stage 2; the last stage
  has 3 slices along Z, too few to pool again);
* kernels **(1,3,3)** in stage 0 (Z still coarser than 2× the in-plane spacing), **(3,3,3)** after;
* 30.7M parameters (nnU-Net's usual "31M" 3d_fullres network).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MISSING = (
    "the nnU-Net comparison needs the package dynamic-network-architectures (nnU-Net's network "
    "definitions): pip install 'dynamic-network-architectures>=0.4' (offline: copy the wheel made by "
    "`pip download --no-deps dynamic-network-architectures -d wheels/` and `pip install --no-deps "
    "wheels/*.whl`), or pass --no-nnunet"
)

BASE_FEATURES = 32
MAX_FEATURES_3D = 320
MIN_EDGE = 4  # smallest feature-map edge in the bottleneck
REFERENCE_3D = 560_000_000  # feature-map voxels that fit an 8 GB GPU at batch size 2
ANISOTROPY = 3.0
CONVS_PER_STAGE = 2

DEFAULT_SHAPE = (128, 512, 512)
DEFAULT_SPACING = (3.0, 0.78, 0.78)


@dataclass(frozen=True)
class UNetPlan:
    """A 3d_fullres configuration: everything needed to build its ``PlainConvUNet``."""

    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    batch_size: int
    feature_map_estimate: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_PLAN = UNetPlan(
    spacing=DEFAULT_SPACING,
    patch_size=(48, 192, 192),
    features_per_stage=(32, 64, 128, 256, 320, 320),
    kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
    batch_size=2,
    feature_map_estimate=495_203_328,
)


def topology(spacing: tuple[float, ...], patch: tuple[int, ...]) -> tuple[list[list[int]], list[list[int]],
                                                                          tuple[int, ...], list[int]]:
    """Rule 3: (strides, kernel sizes, patch rounded up, divisibility per axis) for ``patch``."""
    dims = len(spacing)
    current = [float(s) for s in spacing]
    size = [int(p) for p in patch]
    pools = [0] * dims
    kernel = [1] * dims
    strides: list[list[int]] = [[1] * dims]
    kernels: list[list[int]] = []
    while True:
        fits = [a for a in range(dims) if size[a] >= 2 * MIN_EDGE]
        if not fits:
            break
        finest = min(current[a] for a in fits)
        axes = [a for a in fits if current[a] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * MIN_EDGE:
            break
        for a in range(dims):
            if kernel[a] == 1 and current[a] / min(current) < 2:
                kernel[a] = 3
        stride = [1] * dims
        for a in axes:
            stride[a] = 2
            pools[a] += 1
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dims)
    divisible = [2**p for p in pools]
    rounded = tuple(int(p) if p % d == 0 else int(p + d - p % d) for p, d in zip(patch, divisible, strict=True))
    return strides, kernels, rounded, divisible


def _features(stages: int) -> tuple[int, ...]:
    return tuple(min(MAX_FEATURES_3D, BASE_FEATURES * 2**i) for i in range(stages))


def build_plain_unet(plan: UNetPlan, in_channels: int, num_classes: int, *, device: Any = None) -> Any:
    """nnU-Net's ``PlainConvUNet`` for ``plan`` (random weights, no deep supervision)."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    stages = len(plan.strides)
    with torch.device(device or "cpu"):
        return PlainConvUNet(
            input_channels=in_channels, n_stages=stages, features_per_stage=list(plan.features_per_stage),
            conv_op=nn.Conv3d, kernel_sizes=[list(k) for k in plan.kernel_sizes],
            strides=[list(s) for s in plan.strides], n_conv_per_stage=[CONVS_PER_STAGE] * stages,
            num_classes=num_classes, n_conv_per_stage_decoder=[CONVS_PER_STAGE] * (stages - 1), conv_bias=True,
            norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False,
        )


def _estimate(spacing: tuple[float, ...], patch: tuple[int, ...], strides: list[list[int]],
              kernels: list[list[int]], num_classes: int, in_channels: int) -> int:
    plan = UNetPlan(spacing, patch, _features(len(strides)), tuple(map(tuple, kernels)),
                    tuple(map(tuple, strides)), 2, 0)
    net = build_plain_unet(plan, in_channels, num_classes, device="meta")
    return int(net.compute_conv_feature_map_size(patch))


def plan_3d_fullres(shape: tuple[int, ...] = DEFAULT_SHAPE, spacing: tuple[float, ...] = DEFAULT_SPACING, *,
                    num_classes: int = 14, in_channels: int = 1) -> UNetPlan:
    """nnU-Net v2's default 3d_fullres configuration for cases of ``shape`` (Z, Y, X) at ``spacing``."""
    spacing = tuple(float(s) for s in spacing)  # rule 1: every case has this spacing
    inverse = 1 / np.asarray(spacing, dtype=np.float64)
    initial = [round(float(v)) for v in inverse * (256**3 / np.prod(inverse)) ** (1 / 3)]
    patch = tuple(min(p, int(s)) for p, s in zip(initial, shape, strict=True))
    strides, kernels, patch, divisible = topology(spacing, patch)
    estimate = _estimate(spacing, patch, strides, kernels, num_classes, in_channels)
    while estimate > REFERENCE_3D:
        axis = int(np.argsort([p / s for p, s in zip(patch, shape, strict=True)])[-1])
        trial = list(patch)
        trial[axis] -= divisible[axis]
        _, _, _, step = topology(spacing, tuple(trial))
        reduced = list(patch)
        reduced[axis] -= step[axis]
        strides, kernels, patch, divisible = topology(spacing, tuple(reduced))
        estimate = _estimate(spacing, patch, strides, kernels, num_classes, in_channels)
    batch = max(round(REFERENCE_3D / estimate * 2), 2)  # (nnU-Net also caps it at 5% of the data set's voxels)
    return UNetPlan(spacing, tuple(patch), _features(len(strides)), tuple(map(tuple, kernels)),
                    tuple(map(tuple, strides)), batch, estimate)
