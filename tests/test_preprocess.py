"""Fingerprint, plans and preprocessing (nnU-Net rules) against hand-computed and numpy references."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from masksam_core.data.fingerprint import fingerprint_dataset
from masksam_core.data.plans import (
    PLANS_VERSION,
    Plans,
    PlansError,
    compute_new_shape,
    determine_target_spacing,
    load_plans,
    make_plans,
    save_plans,
)
from masksam_core.data.preprocess import (
    normalize_image,
    preprocess_dataset,
    preprocess_image,
    preprocess_labels,
    resample_image,
    resample_labels,
    resample_to_shape,
    separate_axis,
)
from masksam_core.errors import MaskSAMError

# --------------------------------------------------------------------------- helpers: a data set on disk


def write_nifti(path: Path, array_zyx: np.ndarray, spacing_zyx: tuple[float, float, float]) -> None:
    """Write (Z, Y, X) with spacing (sz, sy, sx) as NIfTI (file axes (x, y, z))."""
    sz, sy, sx = spacing_zyx
    nib.save(nib.Nifti1Image(np.asarray(array_zyx).transpose(2, 1, 0), np.diag([sx, sy, sz, 1.0])), str(path))


def make_dataset(root: Path, cases: dict[str, tuple[list[np.ndarray], np.ndarray, tuple]],
                 channel_names: dict[str, str], labels: dict[str, int]):
    """Write an nnU-Net raw data set; ``cases`` = {id: ([channels (Z,Y,X)], labels, spacing)}; returns its spec."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for cid, (channels, lab, spacing) in cases.items():
        for c, channel in enumerate(channels):
            write_nifti(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", channel.astype(np.float32), spacing)
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", lab.astype(np.uint8), spacing)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channel_names, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return load_spec(root)


def load_spec(root: Path):
    """The data set spec (``masksam_core.data.dataset.load_dataset``)."""
    from masksam_core.data.dataset import load_dataset

    return load_dataset(root)


def ball(shape: tuple[int, int, int], centre_mm, radius_mm: float, spacing) -> np.ndarray:
    """Boolean ball on a voxel grid with voxel centres at index * spacing."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm, strict=True)) <= radius_mm ** 2


@pytest.fixture
def ct_dataset(tmp_path: Path):
    """Two CT cases (spacing (2, 1, 1) and (2.5, 1, 1)), labels 0..2, HU-like intensities."""
    rng = np.random.default_rng(0)
    cases = {}
    for i, (spacing, shape) in enumerate([((2.0, 1.0, 1.0), (12, 24, 20)), ((2.5, 1.0, 1.0), (10, 22, 24))]):
        lab = np.zeros(shape, np.uint8)
        lab[ball(shape, (10, 10, 10), 6, spacing)] = 1
        lab[ball(shape, (14, 16, 15), 3, spacing)] = 2
        img = rng.normal(-800, 50, shape)
        img[lab > 0] = rng.normal(60 + 20 * i, 40, int((lab > 0).sum()))
        img[0, 0, 0] = 3000.0  # an outlier outside the labels: must not move the statistics
        cases[f"ct_{i:03d}"] = ([img], lab, spacing)
    return make_dataset(tmp_path / "Dataset900_CT", cases, {"0": "ct"},
                        {"background": 0, "organ": 1, "lesion": 2})


# --------------------------------------------------------------------------- target spacing (nnU-Net rule)


def test_target_spacing_anisotropic_uses_10th_percentile():
    z = [2.5, 3, 4, 5, 5, 6, 6, 8, 8, 10]
    spacings = [[s, 0.7, 0.7] for s in z]
    target, axis = determine_target_spacing(spacings, [[20, 512, 512]] * 10)
    # median z = (5 + 6) / 2 = 5.5 > 3 * 0.7 and 20 * 3 < 512 -> 10th percentile of z:
    # position 0.1 * 9 = 0.9 between 2.5 and 3 -> 2.95
    assert axis == 0
    assert target == pytest.approx([2.95, 0.7, 0.7])


def test_target_spacing_anisotropic_but_many_slices_keeps_median():
    spacings = [[s, 0.7, 0.7] for s in [2.5, 3, 4, 5, 5, 6, 6, 8, 8, 10]]
    target, axis = determine_target_spacing(spacings, [[400, 512, 512]] * 10)  # 400 * 3 > 512
    assert axis is None and target == pytest.approx([5.5, 0.7, 0.7])


def test_target_spacing_compares_with_largest_other_axis():
    # 5 > 3 * 0.7 (smallest) but not > 3 * 2.0 (largest other axis): nnU-Net keeps the median
    target, axis = determine_target_spacing([[5.0, 0.7, 2.0]] * 3, [[20, 512, 512]] * 3)
    assert axis is None and target == pytest.approx([5.0, 0.7, 2.0])


def test_target_spacing_never_below_in_plane():
    z = [0.5, 0.5, 5, 5, 5, 5, 5, 5, 5, 5]  # median 5, 10th percentile 0.5 < 1.0 in-plane
    target, axis = determine_target_spacing([[s, 1.0, 1.0] for s in z], [[30, 256, 256]] * 10)
    assert axis == 0 and target == pytest.approx([1.0 + 1e-5, 1.0, 1.0], abs=1e-9)


def test_target_spacing_isotropic_is_median():
    target, axis = determine_target_spacing([[1, 1, 1], [1.5, 1.5, 1.5], [2, 2, 2]], [[100, 100, 100]] * 3)
    assert axis is None and target == pytest.approx([1.5, 1.5, 1.5])


def test_new_shape_rounding_and_halving():
    assert compute_new_shape((10, 20, 30), (1, 1, 1), (2, 2, 2)) == (5, 10, 15)
    assert compute_new_shape((7, 9, 11), (3.0, 0.5, 1.0), (1.5, 1.0, 3.0)) == (14, round(4.5), round(11 / 3))
    image = np.random.default_rng(0).normal(size=(1, 10, 20, 30)).astype(np.float32)
    plans = _bare_plans([2.0, 2.0, 2.0])
    assert preprocess_image(image, (1.0, 1.0, 1.0), plans).shape == (1, 5, 10, 15)
    assert preprocess_labels(np.zeros((10, 20, 30), np.int16), (1.0, 1.0, 1.0), plans).shape == (5, 10, 15)


# --------------------------------------------------------------------------- separate z and resampling


def test_separate_axis_rule():
    assert separate_axis((5, 0.7, 0.7), (2.5, 0.7, 0.7)) == 0
    assert separate_axis((1, 1, 1), (1, 1, 4)) == 2  # current isotropic, target anisotropic
    assert separate_axis((1, 1, 1), (2, 2, 2)) is None
    assert separate_axis((0.24, 1.25, 1.25), None) is None  # two axes share the largest spacing
    assert separate_axis((2.9, 1, 1), (2.9, 1, 1)) is None  # ratio not above 3


def test_separate_z_uses_nearest_along_slices():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 4, 8, 8)).astype(np.float32)
    out = resample_image(image, (8, 12, 12), (5.0, 1.0, 1.0), (2.5, 2 / 3, 2 / 3))
    # order 0 along z: every output slice is one of the in-plane-resampled input slices
    # (grid-aligned nearest: output slice k takes input slice floor(k / 2))
    in_plane = resample_image(image, (4, 12, 12), None, None)
    np.testing.assert_allclose(out[0], np.repeat(in_plane[0], 2, axis=0), atol=1e-6)


def test_constant_image_stays_constant():
    image = np.full((2, 6, 9, 11), 7.25, np.float32)
    for current, new, shape in [((1, 1, 1), (0.7, 1.3, 2), (9, 7, 6)), ((5, 1, 1), (2, 0.5, 0.5), (15, 18, 22))]:
        out = resample_image(image, shape, current, new)
        assert out.shape == (2, *shape) and out.dtype == np.float32
        np.testing.assert_allclose(out, 7.25, rtol=0, atol=1e-5)


@pytest.mark.parametrize("current,target", [((1.0, 1.0, 1.0), (1.7, 0.6, 1.3)), ((5.0, 0.8, 0.8), (2.0, 1.1, 1.1))])
def test_label_resampling_keeps_values_and_shapes(current, target):
    rng = np.random.default_rng(2)
    labels = rng.choice(np.array([0, 2, 5], np.int16), size=(9, 17, 15))
    labels[2:7, 4:12, 3:10] = 2
    image = rng.normal(size=(1, *labels.shape)).astype(np.float32)
    plans = _bare_plans(list(target), num_classes=6)
    out = preprocess_labels(labels, current, plans)
    img = preprocess_image(image, current, plans)
    assert out.dtype == np.int16 and out.shape == img.shape[1:] == compute_new_shape(labels.shape, current, target)
    assert set(np.unique(out)) <= {0, 2, 5}


def test_label_resampling_matches_analytic_ball():
    spacing, target = (1.0, 1.0, 1.0), (2.0, 1.5, 1.5)
    shape = (40, 48, 48)
    labels = ball(shape, (20, 24, 24), 12, spacing).astype(np.int16) * 3
    out = resample_labels(labels, compute_new_shape(shape, spacing, target), spacing, target)
    # the resampled grid's voxel centres sit at (i + 0.5) * target - 0.5 * spacing in the old frame
    centres = [(np.arange(n) + 0.5) * t - 0.5 * s for n, t, s in zip(out.shape, target, spacing, strict=True)]
    grids = np.meshgrid(*centres, indexing="ij")
    ref = sum((g - c) ** 2 for g, c in zip(grids, (20, 24, 24), strict=True)) <= 12 ** 2
    dice = 2 * ((out == 3) & ref).sum() / ((out == 3).sum() + ref.sum())
    assert dice > 0.95 and set(np.unique(out)) == {0, 3}


def test_resample_to_shape_is_linear_and_keeps_probabilities():
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32), (1, 4, 6, 10)).copy()
    out = resample_to_shape(ramp, (4, 6, 25))
    coords = (np.arange(25) + 0.5) * 10 / 25 - 0.5  # linear interpolation of a ramp is the coordinate
    np.testing.assert_allclose(out[0, 0, 0], np.clip(coords, 0, 9), atol=1e-5)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 5, 7, 9))
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    back = resample_to_shape(probs, (10, 5, 13), current_spacing=(2, 1, 1), new_spacing=(1, 1.4, 0.7))
    assert back.shape == (3, 10, 5, 13) and back.min() >= 0 and back.max() <= 1
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- normalisation


def _bare_plans(target, num_classes=3, normalization=None):
    from masksam_core.data.plans import RESAMPLING

    normalization = normalization or [{"channel": 0, "channel_name": "MR", "scheme": "zscore"}]
    return Plans.from_dict({
        "version": PLANS_VERSION, "dataset_name": "t", "preset": "tiny", "patch_size": [4, 64, 64],
        "target_spacing": list(target), "separate_z": dict(RESAMPLING), "normalization": normalization,
        "channel_names": {str(n["channel"]): n["channel_name"] for n in normalization},
        "in_channels": len(normalization), "class_names": [f"c{i}" for i in range(num_classes)],
        "num_classes": num_classes})


def test_fingerprint_and_ct_normalisation(ct_dataset):
    fp = fingerprint_dataset(ct_dataset, progress=False)
    assert fp["spacings"] == [[2.0, 1.0, 1.0], [2.5, 1.0, 1.0]]
    assert fp["shapes"] == [[12, 24, 20], [10, 22, 24]]
    fg = []
    for case in ct_dataset.cases:
        img = np.asarray(nib.load(str(case.images[0])).dataobj, dtype=np.float64).transpose(2, 1, 0)
        lab = np.asarray(nib.load(str(case.label)).dataobj).transpose(2, 1, 0)
        fg.append(img[lab > 0])
    stats = fp["foreground_intensity"]["0"]
    assert stats["num_samples"] == 2 * 10_000
    all_fg = np.concatenate(fg)  # equal-sized cases aside, the sampled statistics approximate the exact ones
    assert stats["mean"] == pytest.approx(all_fg.mean(), abs=3)
    assert stats["std"] == pytest.approx(all_fg.std(), rel=0.05)
    assert stats["percentile_00_5"] >= all_fg.min() and stats["percentile_99_5"] <= all_fg.max() < 1000

    plans = make_plans(ct_dataset, fp, "tiny")
    norm = plans.normalization[0]
    assert norm.scheme == "ct" and norm.lower == stats["percentile_00_5"]
    rng = np.random.default_rng(4)
    image = rng.normal(0, 500, size=(1, 6, 7, 8)).astype(np.float32)
    ref = (np.clip(image.astype(np.float64), norm.lower, norm.upper) - norm.mean) / norm.std
    np.testing.assert_allclose(normalize_image(image, plans), ref, rtol=1e-5, atol=1e-5)
    same_grid = replace(plans, target_spacing=(2.0, 1.0, 1.0))
    np.testing.assert_allclose(preprocess_image(image, (2.0, 1.0, 1.0), same_grid), ref, rtol=1e-5, atol=1e-5)


def test_zscore_for_non_ct_channels():
    plans = _bare_plans([1, 1, 1], normalization=[
        {"channel": 0, "channel_name": "CT", "scheme": "ct", "mean": 10.0, "std": 2.0, "lower": 0.0, "upper": 20.0},
        {"channel": 1, "channel_name": "T2", "scheme": "zscore"}])
    rng = np.random.default_rng(5)
    image = np.stack([rng.uniform(-10, 30, (5, 6, 7)), rng.normal(300, 80, (5, 6, 7))]).astype(np.float32)
    out = normalize_image(image, plans)
    t2 = image[1].astype(np.float64)
    np.testing.assert_allclose(out[1], (t2 - t2.mean()) / t2.std(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0], (np.clip(image[0], 0, 20) - 10) / 2, rtol=1e-5, atol=1e-5)
    with pytest.raises(MaskSAMError, match="channels"):
        normalize_image(image[:1], plans)


# --------------------------------------------------------------------------- plans file


def test_plans_keys_and_roundtrip(ct_dataset, tmp_path):
    plans = make_plans(ct_dataset, fingerprint_dataset(ct_dataset, progress=False), "tiny")
    assert plans.target_spacing == pytest.approx((2.25, 1.0, 1.0)) and plans.stats.anisotropic is False
    assert plans.patch_size == (4, 64, 64) and plans.preset == "tiny"
    assert plans.class_names == ("background", "organ", "lesion") and plans.num_classes == 3
    assert plans.in_channels == 1 and plans.channel_names == {"0": "ct"}
    # median over cases of round(shape * spacing / target): z (11, 11) -> 11, y (24, 22) -> 23, x (20, 24) -> 22
    assert plans.stats.median_shape == (11.0, 23.0, 22.0)
    path = tmp_path / "run" / "plans.json"
    save_plans(plans, path)
    assert load_plans(path) == plans and plans.version == PLANS_VERSION
    with pytest.raises(PlansError, match="in_channels"):
        make_plans(ct_dataset, fingerprint_dataset(ct_dataset, progress=False), "tiny", in_channels=2)


def test_ct_without_foreground_is_an_error():
    spec = SimpleNamespace(name="x", channel_names={0: "CT"}, labels={"background": 0, "organ": 1})
    fp = {"spacings": [[1.0, 1.0, 1.0]], "shapes": [[4, 4, 4]], "foreground_intensity": {"0": {"num_samples": 0}}}
    with pytest.raises(PlansError, match="no case has foreground"):
        make_plans(spec, fp, "tiny")


def test_load_plans_errors(tmp_path):
    with pytest.raises(PlansError, match="not found"):
        load_plans(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "target_')
    with pytest.raises(PlansError, match="not readable JSON"):
        load_plans(bad)
    bad.write_text(json.dumps({"version": 0}))
    with pytest.raises(PlansError, match="version 0"):
        load_plans(bad)


# --------------------------------------------------------------------------- cache


def _mtimes(cases) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for c in cases for p in (c.image, c.labels, c.meta)}


def test_preprocess_dataset_cache(ct_dataset, tmp_path):
    plans = make_plans(ct_dataset, fingerprint_dataset(ct_dataset, progress=False), "tiny")
    cache = tmp_path / "cache"
    first = preprocess_dataset(ct_dataset, plans, cache, progress=False)
    assert [c.id for c in first] == ["ct_000", "ct_001"]
    for case in first:
        image, labels = np.load(case.image, mmap_mode="r"), np.load(case.labels, mmap_mode="r")
        assert image.dtype == np.float32 and labels.dtype == np.int16 and image.shape[1:] == labels.shape
        meta = json.loads(case.meta.read_text())
        assert meta["shape"] == list(labels.shape) and set(meta["class_locations"]) == {"1", "2"}
        for value, locs in meta["class_locations"].items():
            assert locs and all(labels[tuple(p)] == int(value) for p in locs)
    assert json.loads((cache / "cache.json").read_text())["cases"].keys() == {"ct_000", "ct_001"}
    before = _mtimes(first)

    again = preprocess_dataset(ct_dataset, plans, cache, progress=False)  # unchanged: nothing rewritten
    assert again == first and _mtimes(again) == before

    src = Path(ct_dataset.cases[1].images[0])  # a touched source file rebuilds that case only
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after_touch = _mtimes(preprocess_dataset(ct_dataset, plans, cache, progress=False))
    changed = {p for p in before if after_touch[p] != before[p]}
    assert changed and all("ct_001" in p for p in changed) and len(changed) == 3

    first[0].labels.unlink()  # a missing file (killed run, manual deletion) rebuilds that case
    preprocess_dataset(ct_dataset, plans, cache, progress=False)
    assert first[0].labels.is_file()

    new_plans = replace(plans, target_spacing=(3.0, 2.0, 2.0))  # changed plans rebuild everything
    rebuilt = preprocess_dataset(ct_dataset, new_plans, cache, progress=False)
    assert all(_mtimes(rebuilt)[p] != after_touch[p] for p in after_touch)
    assert np.load(rebuilt[0].labels).shape == compute_new_shape((12, 24, 20), (2.0, 1.0, 1.0), (3.0, 2.0, 2.0))


@pytest.mark.slow  # starts two worker processes (spawn)
def test_preprocess_dataset_parallel_equals_serial(ct_dataset, tmp_path):
    plans = make_plans(ct_dataset, fingerprint_dataset(ct_dataset, progress=False), "tiny")
    serial = preprocess_dataset(ct_dataset, plans, tmp_path / "a", progress=False)
    parallel = preprocess_dataset(ct_dataset, plans, tmp_path / "b", progress=False, num_workers=2)
    for s, p in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(np.load(s.image), np.load(p.image))
        np.testing.assert_array_equal(np.load(s.labels), np.load(p.labels))


def test_preprocess_labels_rejects_unknown_values():
    with pytest.raises(MaskSAMError, match="not classes"):
        preprocess_labels(np.full((3, 4, 5), 7, np.int16), (1, 1, 1), _bare_plans([1, 1, 1], num_classes=3))


# --------------------------------------------------------------------------- the real CT scan


def test_real_ct_dataset(shared_data, tmp_path):
    spec = load_spec(shared_data / "Dataset501_AbdomenCT")
    fp = fingerprint_dataset(spec, progress=False)
    plans = make_plans(spec, fp, "lite")
    assert plans.target_spacing == pytest.approx((3.0, 3.0, 3.0), abs=1e-3) and not plans.stats.anisotropic
    norm = plans.normalization[0]
    assert norm.scheme == "ct" and -1024 <= norm.lower < norm.mean < norm.upper <= 3000
    assert -300 < norm.lower < 50 < norm.upper < 600  # soft-tissue organs and the aorta in HU
    (case,) = preprocess_dataset(spec, plans, tmp_path / "cache", progress=False)
    image, labels = np.load(case.image, mmap_mode="r"), np.load(case.labels, mmap_mode="r")
    assert np.isfinite(image).all() and image.shape == (1, *labels.shape)
    assert set(np.unique(labels)) <= set(range(9))
    fg = image[0][labels > 0].astype(np.float64)
    # Reference from the raw scan (3 mm already: no resampling). The fingerprint samples 10,000 foreground
    # voxels, so its statistics approximate the exact ones (the stomach's gas makes the low tail wide).
    raw = nib.load(str(spec.cases[0].images[0])).get_fdata().transpose(2, 1, 0)
    raw_fg = raw[np.asarray(nib.load(str(spec.cases[0].label)).dataobj).transpose(2, 1, 0) > 0]
    assert norm.mean == pytest.approx(raw_fg.mean(), abs=5)
    assert norm.upper == pytest.approx(np.percentile(raw_fg, 99.5), abs=5)
    assert raw_fg.min() <= norm.lower < np.median(raw_fg)
    # nnU-Net's CT scheme: clip, then z-score with the mean/std of the UNCLIPPED foreground
    ref = (np.clip(raw_fg, norm.lower, norm.upper) - norm.mean) / norm.std
    assert fg.mean() == pytest.approx(ref.mean(), abs=1e-4) and fg.std() == pytest.approx(ref.std(), abs=1e-4)
    # so the foreground is centred but its std is below 1 (clipping removes the gas tail the std was taken on)
    assert abs(fg.mean()) < 0.1 and 0.3 < fg.std() <= 1.0


def test_an_implausible_voxel_size_is_a_clear_error():
    from masksam_core.data.preprocess import _target_shape

    target = [3.0, 1.0, 1.0]
    assert _target_shape((40, 200, 200), (3.0, 0.5, 0.5), target) == (40, 100, 100)
    with pytest.raises(MaskSAMError, match=r"becomes \(0, 0, 0\) voxels .* the voxel size looks wrong"):
        _target_shape((40, 200, 200), (0.003, 0.001, 0.001), target)  # micrometres written as millimetres
    with pytest.raises(MaskSAMError, match="voxel size looks wrong"):
        _target_shape((40, 200, 200), (300.0, 100.0, 100.0), target)  # 100x upsampling in every axis
