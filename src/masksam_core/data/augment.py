"""nnU-Net-style training augmentation, assembled from MONAI transforms.

The paper's nine augmentations (docs/method.md, "Augmentation") with the probabilities, ranges and order of nnU-Net
v2's default ``get_training_transforms`` (batchgeneratorsv2); resampling, filtering and intensity maths
are MONAI's. Defaults (:class:`AugmentConfig`), p per sample:

* rotation p 0.2 (``AffineGrid`` + ``Resample``): uniform ±30° about each axis; anisotropic patches
  (max/T > 3): about the slice axis only, ±180° (nnU-Net's "dummy 2D" rule);
* scaling p 0.2 (same resampling): one factor, uniform 0.7–1.4 (>1 shrinks objects), in-plane only when
  anisotropic; image bilinear, labels nearest, padding zeros / background;
* Gaussian noise p 0.1 (``RandGaussianNoised``): std uniform 0–0.1 (nnU-Net's "variance", used as std);
* Gaussian blur p 0.2 (:class:`RandGaussianBlur`): per channel p 0.5, sigma 0.5–1 voxel drawn per axis;
* brightness p 0.15 (``RandScaleIntensity``): multiplier per channel, 0.75–1 or 1–1.25 with equal odds
  (nnU-Net's BGContrast draw, built with ``OneOf``);
* contrast p 0.15 (``RandScaleIntensityFixedMean``): (x - mean)·f + mean, f as brightness, clipped to the
  old range;
* low resolution p 0.25 (``RandSimulateLowResolution``): per channel p 0.5, zoom 0.5–1, nearest-exact
  down, linear up; anisotropic: in-plane only;
* gamma p 0.1 inverted, then p 0.3 not (``RandAdjustContrast``, ``invert_image``, ``retain_stats``):
  per channel, gamma 0.7–1 or 1–1.5 with equal odds;
* mirroring (``RandFlipd``): p 0.5 independently per axis in ``mirror_axes``.

:func:`augmentation_settings` gives the settings of the ``--augmentation`` levels of
``masksam-core train`` (:data:`AUGMENTATIONS`): ``full`` (the above), ``no-mirror``, ``intensity``, ``none``.

nnU-Net samples a patch larger than the training patch and crops its centre after rotation and scaling,
so that rotated corners hold image rather than padding. :func:`sampling_size` gives that larger size
(bounding box of the patch rotated by any allowed angle, divided by 0.85 as nnU-Net does); the spatial
step resamples straight onto the centred ``patch_size`` grid, or crops the centre (no interpolation)
when neither rotation nor scaling fires.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    OneOf,
    RandAdjustContrast,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
    RandSimulateLowResolution,
)
from monai.utils import MAX_SEED

from .transforms import AugmentError, RandGaussianBlur, RandPerChannel, RandRotateScaleCropd, check_patch

ANISO_THRESHOLD = 3.0  # nnU-Net: a patch is anisotropic when max(patch) / patch[0] > 3


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the nine augmentations (defaults: nnU-Net v2, see module docstring)."""

    p_rotation: float = 0.2
    rotation_deg: float | None = None  # None: 180 when anisotropic, else 30 (nnU-Net's rule)
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    context_scale: float = 1 / 0.85  # enlargement of the sampled patch beyond the rotated box
    image_mode: str = "bilinear"  # image interpolation of the spatial step; labels are always nearest
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_blur: float = 0.2
    p_blur_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    p_lowres_channel: float = 0.5
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5

    def rotation(self, anisotropic: bool) -> float:
        """Largest rotation angle in degrees."""
        if self.rotation_deg is not None:
            return float(self.rotation_deg)
        return 180.0 if anisotropic else 30.0


AUGMENTATIONS: dict[str, str] = {
    "full": "the nine augmentations (the paper's and nnU-Net's default)",
    "no-mirror": "all but mirroring (labels that name a side, such as kidney_left and kidney_right)",
    "intensity": "noise, blur, brightness, contrast, low resolution and gamma; no rotation, scaling or mirroring",
    "none": "patches as sampled",
}


def augmentation_settings(level: str) -> tuple[AugmentConfig, tuple[int, ...]]:
    """The :class:`AugmentConfig` and mirror axes of a ``--augmentation`` level (a key of :data:`AUGMENTATIONS`)."""
    if level not in AUGMENTATIONS:
        raise AugmentError(f"unknown augmentation {level!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    off: dict[str, Any] = {f: 0.0 for f in AugmentConfig.__dataclass_fields__ if f.startswith("p_")}
    if level == "none":
        return AugmentConfig(**off), ()
    if level == "intensity":
        return AugmentConfig(p_rotation=0.0, p_scaling=0.0), ()
    return AugmentConfig(), () if level == "no-mirror" else (0, 1, 2)


def is_anisotropic(patch_size: Sequence[int]) -> bool:
    """nnU-Net's test for "dummy 2D" augmentation: max(T, H, W) / T > 3."""
    return max(patch_size) / patch_size[0] > ANISO_THRESHOLD


def _rotation_matrix(axis: int, angle: float) -> np.ndarray:
    """3x3 rotation about spatial axis ``axis`` (in the plane of the two other axes)."""
    a, b = [d for d in range(3) if d != axis]
    m = np.eye(3)
    m[a, a] = m[b, b] = math.cos(angle)
    m[a, b], m[b, a] = -math.sin(angle), math.sin(angle)
    return m


def sampling_size(
    patch_size: Sequence[int], *, anisotropic: bool, config: AugmentConfig | None = None
) -> tuple[int, int, int]:
    """Size (T', H', W') of the region to sample so that rotation/scaling rarely reach padding.

    The bounding box of the patch rotated by every angle up to the configured maximum (about each axis
    separately, as nnU-Net does; only about the slice axis when anisotropic, where T' = T), times
    ``context_scale``. Each axis is rounded up so that T' - T is even: the centre crop is then exact.
    Without rotation and scaling (``--augmentation intensity`` or ``none``) it is the patch itself.
    """
    patch = np.array(check_patch(patch_size), dtype=float)
    cfg = config or AugmentConfig()
    if cfg.p_rotation == 0 and cfg.p_scaling == 0:  # nothing to resample: the patch itself
        t, h, w = (int(p) for p in patch)
        return t, h, w
    max_rad = math.radians(min(cfg.rotation(anisotropic), 180.0)) if cfg.p_rotation > 0 else 0.0
    corners = np.array(list(itertools.product((-0.5, 0.5), repeat=3))) * patch
    extent = patch / 2
    for axis in (0,) if anisotropic else (0, 1, 2):
        for angle in np.append(np.arange(0.0, max_rad, math.radians(1.0)), max_rad):
            extent = np.maximum(extent, np.abs(corners @ _rotation_matrix(axis, angle).T).max(0))
    size = np.ceil(np.round(2 * extent * max(cfg.context_scale, 1.0), 6)).astype(int)
    if anisotropic:
        size[0] = int(patch[0])
    size += (size - patch.astype(int)) % 2
    t, h, w = (int(s) for s in size)
    return t, h, w


def _split(make: Callable[[tuple[float, float]], Callable], low: float, high: float) -> Callable:
    """nnU-Net's BGContrast draw: below 1 or above 1 with equal odds, then uniform in that part."""
    if low < 1 < high:
        return OneOf([make((low, 1.0)), make((1.0, high))], weights=[0.5, 0.5])
    return make((low, high))


@contextlib.contextmanager
def _plain_tensors() -> Iterator[None]:
    """MONAI without MetaTensor bookkeeping (faster, returns plain tensors)."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


class TrainTransforms:
    """The training augmentation: ``{"image": (C,T',H',W') float, "label": (1,T',H',W') int}`` →
    ``{"image": (C,T,H,W) float32 tensor, "label": (1,T,H,W) int64 tensor}``.

    ``input_size`` is the region a sampler should cut (:func:`sampling_size`); any input size works.
    ``applied`` names the augmentations that fired in the last call.
    """

    def __init__(self, steps: list[tuple[str, Callable]], patch_size: tuple[int, int, int],
                 input_size: tuple[int, int, int]) -> None:
        self.steps = steps
        self.compose = Compose([t for _, t in steps])
        self.patch_size = patch_size
        self.input_size = input_size
        self._random = _randomizables(self.compose)
        for t in self._random:  # each its own generator (MONAI's default is one shared by the class)
            t.R = np.random.RandomState(0)
        self._master = np.random.RandomState(0)

    def set_random_state(self, seed: int) -> TrainTransforms:
        """Seed every random step with its own seed derived from ``seed``; same seed → same output.

        The generators are reseeded in place (far cheaper than MONAI's new generator per step: docs/benchmarks.md).
        """
        self._master.seed(int(seed) % MAX_SEED)
        seeds = self._master.randint(MAX_SEED, size=len(self._random), dtype=np.int64)
        for t, s in zip(self._random, seeds, strict=True):
            t.R.seed(int(s))
        return self

    @property
    def applied(self) -> dict[str, bool]:
        """For each augmentation name, whether it fired in the last call."""
        result: dict[str, bool] = {}
        for name, step in self.steps:
            if isinstance(step, RandRotateScaleCropd):
                result["rotation"], result["scaling"] = step.rotated, step.scaled
            elif isinstance(step, RandPerChannel):
                result[name] = step.applied
            else:
                result[name] = bool(getattr(step, "_do_transform", False))
        return result

    def __call__(self, data: Mapping) -> dict[str, torch.Tensor]:
        image = torch.tensor(np.asarray(data["image"]), dtype=torch.float32)
        label = torch.tensor(np.asarray(data["label"]))
        label = label[None] if label.ndim == 3 else label
        if image.ndim != 4 or label.shape[0] != 1 or image.shape[1:] != label.shape[1:]:
            raise AugmentError(f"augmentation needs image (C, T, H, W) and label (1, T, H, W) of the same size, "
                               f"got {tuple(image.shape)} and {tuple(label.shape)}; check the patch sampler")
        with _plain_tensors():
            out = self.compose({"image": image, "label": label})
        label = torch.as_tensor(out["label"])
        if label.is_floating_point():  # resampled (nearest): whole numbers stored as float
            label = torch.round(label)
        return {
            "image": torch.as_tensor(out["image"]).to(torch.float32).contiguous(),
            "label": label.to(torch.int64).contiguous(),
        }


def _randomizables(root: object) -> list[Randomizable]:
    """Every :class:`Randomizable` reachable from ``root`` (attributes, lists), in a fixed order."""
    found: dict[int, Randomizable] = {}

    def visit(obj: object) -> None:
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        elif isinstance(obj, Randomizable) and id(obj) not in found:
            found[id(obj)] = obj
            for value in vars(obj).values():
                visit(value)

    visit(root)
    return list(found.values())


def build_train_transforms(patch_size: Sequence[int], *, anisotropic: bool, mirror_axes: Sequence[int] = (0, 1, 2),
                           seed: int | None = None, config: AugmentConfig | None = None) -> TrainTransforms:
    """The nine augmentations in nnU-Net's order, output cropped to ``patch_size`` (T, H, W)."""
    patch = check_patch(patch_size)
    cfg = config or AugmentConfig()
    if any(a not in (0, 1, 2) for a in mirror_axes):
        raise AugmentError(f"mirror_axes must be among the spatial axes 0, 1, 2 (T, H, W), got {tuple(mirror_axes)}")
    sigma = cfg.blur_sigma
    brightness = _split(lambda r: RandScaleIntensity(factors=(r[0] - 1, r[1] - 1), prob=1.0), *cfg.brightness)
    contrast = _split(lambda r: RandScaleIntensityFixedMean(prob=1.0, factors=(r[0] - 1, r[1] - 1),
                                                            preserve_range=True), *cfg.contrast)

    def gamma(invert: bool) -> Callable:
        return _split(lambda r: RandAdjustContrast(prob=1.0, gamma=r, invert_image=invert, retain_stats=True),
                      *cfg.gamma)

    lowres = RandSimulateLowResolution(prob=1.0, downsample_mode="nearest-exact", zoom_range=cfg.lowres_zoom,
                                       upsample_mode="bilinear" if anisotropic else "trilinear")
    steps: list[tuple[str, Callable]] = [
        ("spatial", RandRotateScaleCropd(patch, anisotropic=anisotropic, p_rotation=cfg.p_rotation,
                                         max_rotation_deg=cfg.rotation(anisotropic), p_scaling=cfg.p_scaling,
                                         scaling=cfg.scaling, image_mode=cfg.image_mode)),
        ("noise", RandGaussianNoised("image", prob=cfg.p_noise, mean=0.0, std=cfg.noise_std)),
        ("blur", RandPerChannel(RandGaussianBlur(sigma), prob=cfg.p_blur, p_per_channel=cfg.p_blur_channel)),
        ("brightness", RandPerChannel(brightness, prob=cfg.p_brightness)),
        ("contrast", RandPerChannel(contrast, prob=cfg.p_contrast)),
        ("lowres", RandPerChannel(lowres, prob=cfg.p_lowres, p_per_channel=cfg.p_lowres_channel,
                                  fold_depth=anisotropic)),
        ("gamma_inverted", RandPerChannel(gamma(True), prob=cfg.p_gamma_inverted)),
        ("gamma", RandPerChannel(gamma(False), prob=cfg.p_gamma)),
    ]
    steps += [(f"mirror{a}", RandFlipd(("image", "label"), prob=cfg.p_mirror, spatial_axis=a)) for a in mirror_axes]
    transforms = TrainTransforms(steps, patch, sampling_size(patch, anisotropic=anisotropic, config=cfg))
    if seed is not None:
        transforms.set_random_state(seed)
    return transforms


def set_random_state(transforms: Callable | None, seed: int) -> None:
    """Seed ``transforms`` (a :class:`TrainTransforms` or any MONAI transform / ``Compose``).

    Callables without a ``set_random_state`` method are taken to be deterministic and left alone.
    """
    if transforms is not None and hasattr(transforms, "set_random_state"):
        transforms.set_random_state(seed=int(seed) % MAX_SEED)
