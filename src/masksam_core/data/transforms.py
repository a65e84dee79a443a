"""The training augmentation's own MONAI transforms (assembled in :mod:`masksam_core.data.augment`).

* :class:`RandRotateScaleCropd`: nnU-Net's rotation and scaling, resampled straight onto the centred patch;
* :class:`RandGaussianBlur`: Gaussian blur that continues the patch by its edge voxels;
* :class:`RandPerChannel`: a per-sample probability, then a per-channel one, around any array transform.

Each takes explicit keyword arguments; none knows the augmentation presets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.networks.layers import gaussian_1d, separable_filtering
from monai.transforms import (
    AffineGrid,
    MapTransform,
    Randomizable,
    Resample,
    ResizeWithPadOrCrop,
)
from monai.utils import MAX_SEED

from masksam_core.errors import MaskSAMError


def check_patch(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """``patch_size`` as three positive ints (T, H, W), or an error that says what is wrong."""
    if len(patch_size) != 3 or any(int(p) != p or p < 1 for p in patch_size):
        raise AugmentError(f"patch_size must be three positive integers (T, H, W), got {tuple(patch_size)}")
    t, h, w = (int(p) for p in patch_size)
    return t, h, w


class AugmentError(MaskSAMError):
    """Augmentation settings or inputs that cannot work."""


class RandRotateScaleCropd(Randomizable, MapTransform):
    """Rotation and scaling (nnU-Net's spatial transform without elastic deformation) + centre crop.

    Input ``image`` (C, T', H', W') and ``label`` (1, T', H', W') of any size; output (., T, H, W) with
    the output grid centred on the input. Resampling: MONAI's ``AffineGrid`` + ``Resample`` (image
    ``image_mode``, labels nearest, zeros padding, one grid for both keys; anisotropic: one 2D grid for
    all slices, folded into channels, so nothing mixes across slices). When neither rotation nor scaling
    fires, the centre is cropped (zero-padded if the input is smaller) with no interpolation.
    """

    def __init__(self, patch_size: Sequence[int], *, anisotropic: bool, p_rotation: float, max_rotation_deg: float,
                 p_scaling: float, scaling: tuple[float, float], image_mode: str = "bilinear") -> None:
        MapTransform.__init__(self, ("image", "label"))
        self.patch_size = check_patch(patch_size)
        self.anisotropic = anisotropic
        self.p_rotation = float(p_rotation)
        self.max_rotation_deg = float(max_rotation_deg)
        self.p_scaling = float(p_scaling)
        self.scaling = (float(scaling[0]), float(scaling[1]))
        self.image_mode = image_mode
        self.angles = np.zeros(3)
        self.scales = np.ones(3)
        self.rotated = self.scaled = False

    def randomize(self, data: object = None) -> None:
        """Draw whether to rotate / scale and the angles (radians) and scale factor."""
        self.rotated = bool(self.R.rand() < self.p_rotation)
        self.scaled = bool(self.R.rand() < self.p_scaling)
        limit = math.radians(self.max_rotation_deg)
        self.angles = np.zeros(3)
        if self.rotated:
            if self.anisotropic:
                self.angles[0] = self.R.uniform(-limit, limit)
            else:
                self.angles[:] = self.R.uniform(-limit, limit, size=3)
        self.scales = np.ones(3)
        if self.scaled:
            factor = self.R.uniform(*self.scaling)
            self.scales[1 if self.anisotropic else 0 :] = factor

    def __call__(self, data: Mapping) -> dict:
        self.randomize()
        out = dict(data)
        if not (self.rotated or self.scaled):
            crop = ResizeWithPadOrCrop(self.patch_size, mode="constant")
            for key in self.key_iterator(out):
                out[key] = crop(out[key])
            return out
        t, h, w = self.patch_size
        if self.anisotropic:  # per-slice 2D transform: slices folded into channels, T only cropped/padded
            grid, _ = AffineGrid(rotate_params=float(self.angles[0]), scale_params=self.scales[1:].tolist())(
                spatial_size=(h, w)
            )
        else:
            grid, _ = AffineGrid(rotate_params=self.angles.tolist(), scale_params=self.scales.tolist())(
                spatial_size=self.patch_size
            )
        for key in self.key_iterator(out):
            img = out[key]
            if self.anisotropic:
                img = ResizeWithPadOrCrop((t, -1, -1), mode="constant")(img)
            # an odd size difference would put the input centre between voxels: drop the last voxel
            trim = tuple(slice(0, s - ((s - p) % 2)) for s, p in zip(img.shape[1:], self.patch_size, strict=True))
            index = (slice(None), *trim)
            img = torch.as_tensor(img)[index]
            if self.anisotropic:
                img = img.reshape(-1, *img.shape[2:])
            mode = self.image_mode if key == "image" else "nearest"
            res = Resample(mode=mode, padding_mode="zeros", dtype=np.float32)(img, grid=grid)
            out[key] = torch.as_tensor(res).reshape(-1, t, h, w)
        return out


class RandGaussianBlur(Randomizable):
    """Gaussian blur of one channel (1, T, H, W), sigma uniform in ``sigma`` per axis: MONAI's sampled
    ``gaussian_1d`` kernels (4 sigma, normalised, as nnU-Net's) and ``separable_filtering`` continuing the
    patch by its edge voxels (nnU-Net reflects; thin slabs are too thin for that). Not MONAI's
    ``GaussianSmooth``: its zero padding pulls the border of a normalised image towards 0, and on a 4-slice
    patch every slice is a border slice."""

    def __init__(self, sigma: tuple[float, float], truncated: float = 4.0) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.truncated = truncated
        self.sigmas = np.zeros(0)

    def randomize(self, data: object = None) -> None:
        self.sigmas = self.R.uniform(self.sigma[0], self.sigma[1], size=3)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(img, dtype=torch.float32)
        self.randomize()
        # monai's stub asks for a Tensor sigma; gaussian_1d takes a float as well
        kernels = [gaussian_1d(float(s), truncated=self.truncated, approx="sampled")  # type: ignore[arg-type]
                   for s in self.sigmas[: x.ndim - 1]]
        kernels = [k / k.sum() for k in kernels]  # sums to 1: flat regions stay flat
        return separable_filtering(x[None], kernels, mode="replicate")[0]


class RandPerChannel(Randomizable, MapTransform):
    """With probability ``prob`` per sample, apply ``transform`` to each channel with ``p_per_channel``.

    ``transform`` is a MONAI array transform (its own probability 1) that gets one channel (1, T, H, W);
    with ``fold_depth`` it gets (T, H, W) instead, i.e. a 2D image whose "channels" are the slices, so
    that it leaves the slice axis alone (nnU-Net's ``ignore_axes=(0,)``).
    """

    def __init__(
        self, transform: Callable, *, prob: float, p_per_channel: float = 1.0, fold_depth: bool = False
    ) -> None:
        MapTransform.__init__(self, "image")
        self.transform = transform
        self.prob = prob
        self.p_per_channel = p_per_channel
        self.fold_depth = fold_depth
        self.applied = False

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed=seed, state=state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: object = None) -> None:
        self.applied = bool(self.R.rand() < self.prob)

    def __call__(self, data: Mapping) -> dict:
        self.randomize()
        out = dict(data)
        if not self.applied:
            return out
        for key in self.key_iterator(out):
            img = torch.as_tensor(out[key])
            channels = []
            for c in range(img.shape[0]):
                channel = img[c : c + 1]
                if self.R.rand() < self.p_per_channel:
                    src = channel[0] if self.fold_depth else channel
                    res = torch.as_tensor(self.transform(src), dtype=img.dtype)
                    channel = res[None] if self.fold_depth else res
                channels.append(channel)
            out[key] = torch.cat(channels, 0)
        return out
