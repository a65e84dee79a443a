"""Training augmentation (masksam_core.data.augment): alignment, label safety, seeding, probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from masksam_core.data.augment import (
    AUGMENTATIONS,
    AugmentConfig,
    AugmentError,
    augmentation_settings,
    build_train_transforms,
    is_anisotropic,
    sampling_size,
    set_random_state,
)

ALL_OFF = dict(p_rotation=0, p_scaling=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
               p_gamma_inverted=0, p_gamma=0, p_mirror=0)
INTENSITY_ON = dict(p_noise=1, p_blur=1, p_blur_channel=1, p_brightness=1, p_contrast=1, p_lowres=1,
                    p_lowres_channel=1, p_gamma_inverted=1, p_gamma=1)


def config(**kw: float) -> AugmentConfig:
    return AugmentConfig(**{**ALL_OFF, **kw})


def blobs(shape: tuple[int, ...], n: int = 6, classes: tuple[int, ...] = (1, 2, 3), seed: int = 0) -> np.ndarray:
    """Labels (T, H, W) int16: ellipsoids of the given classes on background 0."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    labels = np.zeros(shape, np.int16)
    for i in range(n):
        centre = [rng.uniform(0.2 * s, 0.8 * s) for s in shape]
        radii = [max(1.5, rng.uniform(0.1, 0.3) * s) for s in shape]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
        labels[inside] = classes[i % len(classes)]
    return labels


def encoded_image(labels: np.ndarray) -> np.ndarray:
    """Image (1, T, H, W) = 10·label + a smooth background in [0, 5): floor(image / 10) is the label."""
    grid = np.indices(labels.shape).astype(float)
    background = 2.5 + 2.4 * np.sin(grid[1] / 7.0) * np.cos(grid[2] / 5.0 + grid[0] / 3.0)
    return (labels * 10 + background)[None].astype(np.float32)


def centre(array: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    """Centre crop of the last three axes (even size differences)."""
    sl = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(array.shape[-3:], patch, strict=True))
    return array[(..., *sl)]


CASES = [((4, 32, 32), True), ((16, 16, 16), False)]


def test_sampling_size_hand_computed() -> None:
    # anisotropic: in-plane rotation up to 180°, worst at 45°: 256·√2 / 0.85 = 425.9 → 426 (426-256 even)
    assert sampling_size((8, 256, 256), anisotropic=True) == (8, 426, 426)
    # isotropic: ±30° about one axis: 64·(cos30° + sin30°) / 0.85 = 102.9 → 103, made even → 104
    assert sampling_size((64, 64, 64), anisotropic=False) == (104, 104, 104)
    assert sampling_size((8, 64, 64), anisotropic=True, config=config(context_scale=1.0)) == (8, 64, 64)
    assert is_anisotropic((8, 256, 256)) and not is_anisotropic((64, 128, 128))


@pytest.mark.parametrize("level", ["intensity", "none"])
def test_levels_without_rotation_or_scaling_sample_the_patch_itself(level: str) -> None:
    cfg, _ = augmentation_settings(level)
    assert sampling_size((8, 256, 256), anisotropic=True, config=cfg) == (8, 256, 256)
    assert sampling_size((64, 64, 64), anisotropic=False, config=cfg) == (64, 64, 64)
    # scaling alone still needs context around the patch (shrinking pulls in image from outside it)
    assert sampling_size((64, 64, 64), anisotropic=False, config=config(p_scaling=1)) == (76, 76, 76)


@pytest.mark.parametrize(("patch", "aniso"), CASES)
def test_rotation_scaling_keep_labels_aligned_nearest(patch: tuple[int, ...], aniso: bool) -> None:
    # Image resampled NEAREST like the labels: every output voxel must come from the same input voxel,
    # so floor(image / 10) equals the label everywhere (padding: 0 and 0).
    tr = build_train_transforms(patch, anisotropic=aniso, config=config(p_rotation=1, p_scaling=1,
                                                                         image_mode="nearest"))
    labels = blobs(tr.input_size)
    image = encoded_image(labels)
    moved = 0
    for seed in range(6):
        out = tr.set_random_state(seed)({"image": image, "label": labels[None]})
        img, lab = out["image"][0].numpy(), out["label"][0].numpy()
        assert img.shape == lab.shape == patch
        np.testing.assert_array_equal(np.floor(img / 10).astype(int), lab)
        moved += not np.array_equal(lab, centre(labels, patch))
        assert len(np.unique(lab)) >= 2
    assert moved >= 5  # the transform really rotated/scaled


@pytest.mark.parametrize(("patch", "aniso"), CASES)
def test_rotation_scaling_keep_labels_aligned_bilinear(patch: tuple[int, ...], aniso: bool) -> None:
    # Default (bilinear) image: well inside a label region the image must still read 10·k + [0, 5).
    tr = build_train_transforms(patch, anisotropic=aniso, config=config(p_rotation=1, p_scaling=1))
    labels = blobs(tr.input_size, seed=1)
    image = encoded_image(labels)
    structure = ndimage.generate_binary_structure(3, 1)
    if aniso:  # slices are transformed independently: erode in-plane only
        structure[0] = structure[2] = False
    checked = 0
    for seed in range(6):
        out = tr.set_random_state(seed)({"image": image, "label": labels[None]})
        img, lab = out["image"][0].numpy(), out["label"][0].numpy()
        for k in np.unique(lab):
            interior = ndimage.binary_erosion(lab == k, structure, iterations=3)
            values = img[interior]
            assert np.all((values >= 10 * k - 1e-3) & (values < 10 * k + 5)), (seed, k)
            checked += interior.sum()
    assert checked > 100


def test_anisotropic_rotation_never_mixes_slices() -> None:
    patch = (4, 32, 32)
    tr = build_train_transforms(patch, anisotropic=True, config=config(p_rotation=1, p_scaling=1))
    t = tr.input_size
    image = np.broadcast_to(np.arange(1, 5, dtype=np.float32)[:, None, None], t)[None].copy()
    for seed in range(5):
        img = tr.set_random_state(seed)({"image": image, "label": np.zeros((1, *t), np.int16)})["image"][0]
        for z in range(4):  # bilinear within a slice: between 0 (padding) and the slice's own value
            assert float(img[z].max()) <= z + 1 + 1e-5 and float(img[z].min()) >= -1e-6
            assert float(img[z, 16, 16]) == pytest.approx(z + 1)


def test_labels_keep_their_values_under_all_augmentations() -> None:
    # labels without background: only the original values and 0 (padding) may come out
    patch = (4, 32, 32)
    tr = build_train_transforms(patch, anisotropic=True, config=AugmentConfig(
        p_rotation=1, p_scaling=1, **INTENSITY_ON))
    labels = np.where(blobs(tr.input_size, classes=(5, 7)) > 0, blobs(tr.input_size, classes=(5, 7)), 2)
    labels = labels.astype(np.int16)
    image = encoded_image(labels)
    for seed in range(8):
        out = tr.set_random_state(seed)({"image": image, "label": labels[None]})
        assert out["label"].dtype == torch.int64
        assert set(np.unique(out["label"].numpy())) <= {0, 2, 5, 7}


def test_intensity_augmentations_leave_labels_bit_identical() -> None:
    patch = (4, 32, 32)
    tr = build_train_transforms(patch, anisotropic=True, config=config(**INTENSITY_ON))
    labels = blobs(tr.input_size)
    image = np.random.default_rng(0).normal(size=(2, *tr.input_size)).astype(np.float32)
    for seed in range(4):
        out = tr.set_random_state(seed)({"image": image, "label": labels[None]})
        np.testing.assert_array_equal(out["label"][0].numpy(), centre(labels, patch))
        assert not np.allclose(out["image"].numpy(), centre(image, patch))
        assert all(v for k, v in tr.applied.items() if k not in ("rotation", "scaling") and "mirror" not in k)


def test_mirroring_flips_image_and_labels_together() -> None:
    patch = (4, 16, 16)
    tr = build_train_transforms(patch, anisotropic=True, mirror_axes=(0, 1, 2), config=config(p_mirror=1))
    labels = blobs(tr.input_size)
    image = encoded_image(labels)
    out = tr.set_random_state(0)({"image": image, "label": labels[None]})
    np.testing.assert_array_equal(out["image"].numpy(), np.flip(centre(image, patch), axis=(1, 2, 3)))
    np.testing.assert_array_equal(out["label"][0].numpy(), np.flip(centre(labels, patch), axis=(0, 1, 2)))
    tr1 = build_train_transforms(patch, anisotropic=True, mirror_axes=(2,), config=config(p_mirror=1))
    out = tr1.set_random_state(0)({"image": image, "label": labels[None]})
    np.testing.assert_array_equal(out["label"][0].numpy(), np.flip(centre(labels, patch), axis=2))


def test_no_augmentation_is_an_exact_centre_crop_and_pads_small_inputs() -> None:
    patch = (4, 16, 16)
    tr = build_train_transforms(patch, anisotropic=True, config=config())
    labels = blobs((6, 30, 40))
    image = encoded_image(labels)
    out = tr({"image": image, "label": labels[None]})
    np.testing.assert_array_equal(out["image"].numpy(), centre(image, patch))
    small = tr({"image": np.ones((1, 2, 8, 8), np.float32), "label": np.ones((1, 2, 8, 8), np.int16)})
    assert small["image"].shape == (1, 4, 16, 16) and float(small["image"].sum()) == 2 * 8 * 8
    assert float(small["label"].sum()) == 2 * 8 * 8


def test_lowres_is_in_plane_only_for_anisotropic_patches() -> None:
    # slices constant in-plane: in-plane down/up-sampling keeps them; 3D zoom would mix slices
    cfg = config(p_lowres=1, p_lowres_channel=1, lowres_zoom=(0.5, 0.6))
    values = np.arange(8, dtype=np.float32) ** 2
    image = np.broadcast_to(values[:, None, None], (8, 32, 32))[None].copy()
    labels = np.zeros((1, 8, 32, 32), np.int16)
    aniso = build_train_transforms((8, 32, 32), anisotropic=True, config=cfg, seed=0)(
        {"image": image, "label": labels})
    np.testing.assert_allclose(aniso["image"].numpy(), image, atol=1e-5)
    iso = build_train_transforms((8, 32, 32), anisotropic=False, config=cfg, seed=0)(
        {"image": image, "label": labels})
    assert not np.allclose(iso["image"].numpy(), image, atol=1e-3)


def test_same_seed_same_output_other_seed_other_output() -> None:
    patch = (4, 32, 32)
    cfg = AugmentConfig(p_rotation=1, p_scaling=1, **INTENSITY_ON)
    tr = build_train_transforms(patch, anisotropic=True, config=cfg)
    labels = blobs(tr.input_size)
    data = {"image": encoded_image(labels), "label": labels[None]}
    set_random_state(tr, 123)
    a = tr(data)
    set_random_state(tr, 999)
    c = tr(data)
    b = build_train_transforms(patch, anisotropic=True, config=cfg, seed=123)(data)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])


def test_probabilities_match_the_configuration() -> None:
    patch = (2, 8, 8)
    tr = build_train_transforms(patch, anisotropic=True)
    data = {"image": np.random.default_rng(0).normal(size=(1, *tr.input_size)).astype(np.float32),
            "label": np.zeros((1, *tr.input_size), np.int16)}
    n = 400
    counts: dict[str, int] = {}
    tr.set_random_state(7)
    for _ in range(n):
        tr(data)
        for name, fired in tr.applied.items():
            counts[name] = counts.get(name, 0) + fired
    expected = dict(rotation=0.2, scaling=0.2, noise=0.1, blur=0.2, brightness=0.15, contrast=0.15, lowres=0.25,
                    gamma_inverted=0.1, gamma=0.3, mirror0=0.5, mirror1=0.5, mirror2=0.5)
    assert set(counts) == set(expected)
    for name, p in expected.items():
        tolerance = 4.5 * math.sqrt(p * (1 - p) / n)
        assert abs(counts[name] / n - p) < tolerance, (name, counts[name] / n, p)


def test_augmentation_levels_switch_off_what_they_name() -> None:
    patch = (4, 16, 16)
    tr0 = build_train_transforms(patch, anisotropic=True)
    labels = blobs(tr0.input_size)
    data = {"image": encoded_image(labels), "label": labels[None]}
    fired: dict[str, dict[str, int]] = {}
    for level in AUGMENTATIONS:
        cfg, axes = augmentation_settings(level)
        tr = build_train_transforms(patch, anisotropic=True, mirror_axes=axes, config=cfg, seed=3)
        fired[level] = {}
        for _ in range(200):
            out = tr(data)
            for name, on in tr.applied.items():
                fired[level][name] = fired[level].get(name, 0) + on
            if level in ("intensity", "none"):  # labels exactly as sampled: no rotation, scaling or mirroring
                np.testing.assert_array_equal(out["label"][0].numpy(), centre(labels, patch))
            if level == "none":
                np.testing.assert_array_equal(out["image"].numpy(), centre(data["image"], patch))
    spatial = {"rotation", "scaling"}
    mirrors = {"mirror0", "mirror1", "mirror2"}
    assert all(fired["full"][k] > 0 for k in spatial | mirrors) and "mirror0" not in fired["no-mirror"]
    assert all(fired["no-mirror"][k] > 0 for k in spatial) and fired["no-mirror"]["gamma"] > 0
    assert all(fired["intensity"][k] == 0 for k in spatial) and fired["intensity"]["noise"] > 0
    assert sum(fired["none"].values()) == 0
    with pytest.raises(AugmentError, match="choose one of: full, no-mirror, intensity, none"):
        augmentation_settings("some")


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(AugmentError, match="patch_size"):
        build_train_transforms((8, 64), anisotropic=True)
    with pytest.raises(AugmentError, match="mirror_axes"):
        build_train_transforms((8, 64, 64), anisotropic=True, mirror_axes=(3,))
    tr = build_train_transforms((2, 8, 8), anisotropic=True)
    with pytest.raises(AugmentError, match="same size"):
        tr({"image": np.zeros((1, 2, 8, 8), np.float32), "label": np.zeros((1, 2, 8, 9), np.int16)})


def test_blur_keeps_a_constant_image_constant_at_the_patch_borders() -> None:
    # A normalised image is not 0 outside the patch: zero padding (MONAI's GaussianSmooth) pulls every
    # slice of a 4-slice patch towards 0 (a flat -1.5 becomes -1.04 on the border slices at sigma 1).
    patch = (4, 16, 16)
    tr = build_train_transforms(patch, anisotropic=True, config=config(p_blur=1, p_blur_channel=1,
                                                                       blur_sigma=(1.0, 1.0)), seed=0)
    flat = {"image": np.full((1, *patch), -1.5, np.float32), "label": np.zeros((1, *patch), np.int16)}
    torch.testing.assert_close(tr(flat)["image"], torch.full((1, *patch), -1.5), atol=1e-4, rtol=0)
    # and it still blurs: an edge inside the patch matches scipy's Gaussian filter there (sigma 1, 4 sigma)
    step = np.full((1, *patch), -1.5, np.float32)
    step[..., 8:] = 1.5
    out = tr({"image": step, "label": flat["label"]})["image"][0].numpy()
    reference = ndimage.gaussian_filter(step[0], 1.0, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(out, reference, atol=1e-5)
