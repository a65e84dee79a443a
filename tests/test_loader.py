"""Patch sampling and the reproducible training loader (masksam_core.data.loader)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from masksam_core.data.augment import AugmentConfig, build_train_transforms
from masksam_core.data.loader import (
    CaseFiles,
    LoaderError,
    PatchSampler,
    TrainPatchDataset,
    as_case,
    case_locations,
    forced_position,
    foreground_locations,
    load_case_arrays,
    make_train_loader,
)


def save_case(folder: Path, name: str, image: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``{name}_image.npy`` (C, Z, Y, X) float32 and ``{name}_labels.npy`` (Z, Y, X) int16."""
    np.save(folder / f"{name}_image.npy", image.astype(np.float32))
    np.save(folder / f"{name}_labels.npy", labels.astype(np.int16))
    return folder / name


def coordinate_image(shape: tuple[int, int, int]) -> np.ndarray:
    """(1, Z, Y, X) with value z·10⁴ + y·10² + x + 1: every voxel names its own position (0 = padding)."""
    z, y, x = np.indices(shape)
    return (z * 10_000 + y * 100 + x + 1)[None].astype(np.float32)


def tiny_object_case(tmp_path: Path, name: str = "tiny") -> Path:
    labels = np.zeros((24, 96, 96), np.int16)
    labels[11:13, 40:43, 60:63] = 1  # 18 voxels of foreground in 221k
    image = np.random.default_rng(0).normal(size=(1, *labels.shape))
    return save_case(tmp_path, name, image, labels)


@pytest.fixture
def small_cases(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    cases = []
    for i, shape in enumerate([(12, 40, 48), (6, 30, 30)]):
        labels = np.zeros(shape, np.int16)
        labels[2:5, 5:15, 8:20] = 1
        labels[shape[0] // 2 :, 20:26, 10:18] = 2
        cases.append(save_case(tmp_path, f"c{i}", rng.normal(size=(2, *shape)), labels))
    return cases


def test_load_case_arrays_maps_files_and_checks_shapes(tmp_path: Path) -> None:
    prefix = save_case(tmp_path, "a", np.zeros((1, 4, 5, 6)), np.zeros((4, 5, 6)))
    image, labels = load_case_arrays(f"{prefix}_image.npy", f"{prefix}_labels.npy")
    assert isinstance(image, np.memmap) and isinstance(labels, np.memmap)
    assert image.shape == (1, 4, 5, 6) and labels.dtype == np.int16
    np.save(tmp_path / "b_labels.npy", np.zeros((4, 5, 7), np.int16))
    with pytest.raises(LoaderError, match="same size"):
        load_case_arrays(f"{prefix}_image.npy", tmp_path / "b_labels.npy")
    with pytest.raises(LoaderError, match="cannot read"):
        load_case_arrays(tmp_path / "missing_image.npy", f"{prefix}_labels.npy")


def test_patch_of_a_volume_smaller_than_the_patch_is_centred_and_zero_padded() -> None:
    image = coordinate_image((2, 10, 12))
    labels = np.ones((2, 10, 12), np.int16)
    img, lab = PatchSampler((4, 16, 16)).sample(image, labels, np.random.default_rng(0))
    assert img.shape == (1, 4, 16, 16) and lab.shape == (4, 16, 16)
    # offsets (4-2)//2 = 1, (16-10)//2 = 3, (16-12)//2 = 2
    np.testing.assert_array_equal(img[:, 1:3, 3:13, 2:14], image)
    assert img.sum() == image.sum() and lab.sum() == labels.sum() == lab[1:3, 3:13, 2:14].sum()


@pytest.mark.parametrize(("patch", "sample"), [((4, 16, 16), None), ((4, 64, 64), (4, 108, 108)),
                                              ((8, 8, 8), (12, 12, 12))])
def test_patch_of_a_large_volume_is_a_block_of_it(patch: tuple, sample: tuple | None) -> None:
    shape = (30, 80, 200)
    image = coordinate_image(shape)
    sampler = PatchSampler(patch, sample_size=sample)
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, lab = sampler.sample(image, np.zeros(shape, np.int16), rng)
        assert img.shape == (1, *sampler.sample_size) and lab.shape == sampler.sample_size
        centre = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(sampler.sample_size, patch, strict=True))
        core = img[0][centre]
        assert core.min() > 0  # the patch itself lies inside the volume (only its context may be padding)
        first = int(core[0, 0, 0]) - 1  # the patch's first voxel names its position
        z, y, x = first // 10_000, first // 100 % 100, first % 100
        np.testing.assert_array_equal(core, image[0, z : z + patch[0], y : y + patch[1], x : x + patch[2]])


def test_forced_patches_contain_foreground_unforced_rarely(tmp_path: Path) -> None:
    prefix = tiny_object_case(tmp_path)
    image, labels = load_case_arrays(f"{prefix}_image.npy", f"{prefix}_labels.npy")
    for patch, sample in [((4, 32, 32), None), ((4, 32, 32), (4, 54, 54)), ((2, 8, 8), None)]:
        sampler = PatchSampler(patch, sample_size=sample)
        crop = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(sampler.sample_size, patch, strict=True))
        rng = np.random.default_rng(0)
        forced = [sampler.sample(image, labels, rng, force_foreground=True)[1][crop].any() for _ in range(100)]
        free = [sampler.sample(image, labels, rng)[1][crop].any() for _ in range(200)]
        assert all(forced)
        assert np.mean(free) < 0.15  # expected ≈ 0.03–0.1 for these patch sizes


def test_forced_patches_pick_classes_uniformly() -> None:
    labels = np.zeros((8, 64, 64), np.int16)
    labels[:, :40, :40] = 2  # large organ
    labels[4, 60, 60] = 1  # one voxel
    sampler = PatchSampler((2, 8, 8))
    rng = np.random.default_rng(0)
    has_one = [sampler.sample(np.zeros((1, *labels.shape)), labels, rng, force_foreground=True)[1].__eq__(1).any()
               for _ in range(300)]
    assert 0.4 < np.mean(has_one) < 0.6


def test_foreground_locations_against_argwhere() -> None:
    labels = np.zeros((5, 6, 7), np.int16)
    labels[1, 2, 3] = 3
    labels[2:4, 1:3, 0:2] = 1
    locs = foreground_locations(labels)
    assert sorted(locs) == [1, 3]
    for k in (1, 3):
        np.testing.assert_array_equal(locs[k], np.argwhere(labels == k))
    big = np.ones((10, 100, 100), np.int16)  # 100 000 voxels: keep max(50, 1%) = 1000
    sub = foreground_locations(big, max_per_class=50)[1]
    assert sub.shape == (1000, 3) and len(np.unique(sub, axis=0)) == 1000


def test_oversampling_positions_follow_nnunet() -> None:
    rng = np.random.default_rng(0)
    assert [forced_position(i, 2, rng) for i in range(2)] == [False, True]
    assert [forced_position(i, 3, rng) for i in range(3)] == [False, False, True]
    assert [forced_position(i, 4, rng) for i in range(4)] == [False, False, False, True]
    assert [forced_position(i, 8, rng) for i in range(8)] == [False] * 5 + [True] * 3
    assert 0.25 < np.mean([forced_position(0, 1, rng) for _ in range(1000)]) < 0.41


def test_dataset_forces_foreground_at_the_last_batch_position(tmp_path: Path) -> None:
    ds = TrainPatchDataset([tiny_object_case(tmp_path)], (2, 16, 16), batch_size=3, samples_per_epoch=60, seed=4)
    samples = list(ds)
    assert len(samples) == 60
    assert all(s["labels"].any() for s in samples[2::3])
    assert np.mean([bool(s["labels"].any()) for i, s in enumerate(samples) if i % 3 != 2]) < 0.2


def batches(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for b in loader]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
                                    for k in ("image", "labels"))


def test_loader_is_deterministic_per_seed_and_epoch(small_cases: list[Path]) -> None:
    tr = build_train_transforms((4, 16, 16), anisotropic=True)
    kw = dict(patch_size=(4, 16, 16), batch_size=2, iterations=3, transforms=tr, num_workers=0)
    run = batches(make_train_loader(small_cases, seed=1, epoch=0, **kw))
    assert len(run) == 3
    assert run[0]["image"].shape == (2, 2, 4, 16, 16) and run[0]["image"].dtype == torch.float32
    assert run[0]["labels"].shape == (2, 4, 16, 16) and run[0]["labels"].dtype == torch.int64
    assert same(run, batches(make_train_loader(small_cases, seed=1, epoch=0, **kw)))
    assert not same(run, batches(make_train_loader(small_cases, seed=1, epoch=1, **kw)))
    assert not same(run, batches(make_train_loader(small_cases, seed=2, epoch=0, **kw)))
    # resuming: a dataset moved to epoch 1 equals a fresh one built for epoch 1
    ds = TrainPatchDataset(small_cases, (4, 16, 16), 2, 6, transforms=tr, seed=1)
    list(ds)
    ds.set_epoch(1)
    fresh = TrainPatchDataset(small_cases, (4, 16, 16), 2, 6, transforms=tr, seed=1, epoch=1)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(ds, fresh, strict=True))


def test_resuming_mid_epoch_yields_the_rest_of_the_epoch(small_cases: list[Path]) -> None:
    kw = dict(patch_size=(4, 16, 16), batch_size=2, iterations=5, transforms=None, seed=4, epoch=1)
    full = batches(make_train_loader(small_cases, num_workers=0, **kw))
    for workers in (0, 2):
        tail = batches(make_train_loader(small_cases, num_workers=workers, start_iteration=3, **kw))
        assert len(tail) == 2 and same(full[3:], tail)


def test_workers_give_the_same_batches_as_the_main_process(small_cases: list[Path]) -> None:
    tr = build_train_transforms((4, 16, 16), anisotropic=True, config=AugmentConfig(p_rotation=0.5))
    kw = dict(patch_size=(4, 16, 16), batch_size=2, iterations=5, transforms=tr, seed=3, epoch=2)
    main = batches(make_train_loader(small_cases, num_workers=0, **kw))
    workers = batches(make_train_loader(small_cases, num_workers=2, **kw))
    assert len(main) == len(workers) == 5
    assert same(main, workers)


def test_ranks_draw_disjoint_samples_that_add_up(small_cases: list[Path]) -> None:
    kw = dict(patch_size=(4, 16, 16), batch_size=2, iterations=4, transforms=None, seed=0, epoch=0,
              world_size=2, num_workers=0)
    r0 = batches(make_train_loader(small_cases, rank=0, **kw))
    r1 = batches(make_train_loader(small_cases, rank=1, **kw))
    assert len(r0) == len(r1) == 4
    images = [img for run in (r0, r1) for b in run for img in b["image"]]
    assert len(images) == 16
    keys = {img.numpy().tobytes() for img in images}
    assert len(keys) == 16  # all 16 patches distinct: the ranks did not repeat each other
    ds = TrainPatchDataset(small_cases, (4, 16, 16), 2, 16, seed=0, rank=1, world_size=2)
    assert len(ds) == 8


def test_bad_settings_raise_clear_errors(tmp_path: Path, small_cases: list[Path]) -> None:
    with pytest.raises(LoaderError, match="multiple"):
        TrainPatchDataset(small_cases, (4, 16, 16), batch_size=2, samples_per_epoch=5)
    with pytest.raises(LoaderError, match="no training cases"):
        TrainPatchDataset([], (4, 16, 16), batch_size=2, samples_per_epoch=4)
    other = save_case(tmp_path, "mono", np.zeros((1, 6, 30, 30)), np.zeros((6, 30, 30)))
    with pytest.raises(LoaderError, match="channel"):
        TrainPatchDataset([*small_cases, other], (4, 16, 16), batch_size=2, samples_per_epoch=4)
    with pytest.raises(LoaderError, match="rank"):
        TrainPatchDataset(small_cases, (4, 16, 16), batch_size=2, samples_per_epoch=4, rank=2, world_size=2)


def test_case_forms_and_class_locations_from_meta_json(tmp_path: Path) -> None:
    prefix = tiny_object_case(tmp_path, "m")
    assert as_case(f"{prefix}_image.npy") == as_case(prefix) == CaseFiles(Path(f"{prefix}_image.npy"),
                                                                          Path(f"{prefix}_labels.npy"))

    @dataclass(frozen=True)
    class Preprocessed:  # the preprocessing module's case: id, image, labels, meta JSON
        id: str
        image: Path
        labels: Path
        meta: Path

    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"class_locations": {"1": [[12, 41, 61]], "2": []}}))
    case = as_case(Preprocessed("m", Path(f"{prefix}_image.npy"), Path(f"{prefix}_labels.npy"), meta))
    locs = case_locations(case)
    assert set(locs) == {1, 2}
    np.testing.assert_array_equal(locs[1], [[12, 41, 61]])
    assert set(case_locations(as_case(prefix))) == {1}  # no JSON: computed from the labels
    ds = TrainPatchDataset([case], (2, 8, 8), batch_size=2, samples_per_epoch=20, seed=0)
    assert all(s["labels"].any() for s in list(ds)[1::2])


def test_real_ct_batch(shared_data: Path, tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    folder = shared_data / "Dataset501_AbdomenCT"
    image = np.asarray(nib.load(folder / "imagesTr" / "abdct_001_0000.nii.gz").dataobj, dtype=np.float32).T
    labels = np.asarray(nib.load(folder / "labelsTr" / "abdct_001.nii.gz").dataobj).T.astype(np.int16)
    image = (np.clip(image, -200, 300) - 40.0) / 100.0  # quick CT window z-score, (Z, Y, X)
    prefix = save_case(tmp_path, "abdct_001", image[None], labels)
    patch = (4, 64, 64)
    tr = build_train_transforms(patch, anisotropic=True, seed=0)
    loader = make_train_loader([prefix], patch_size=patch, batch_size=2, iterations=3, transforms=tr, seed=0,
                               epoch=0, num_workers=0)
    seen: set[int] = set()
    for batch in loader:
        assert batch["image"].shape == (2, 1, *patch) and batch["labels"].shape == (2, *patch)
        assert torch.isfinite(batch["image"]).all()
        assert int(batch["labels"].min()) >= 0 and int(batch["labels"].max()) <= 8
        assert batch["labels"][1].any()  # position 1 of 2 is forced to foreground
        seen |= set(batch["labels"].unique().tolist())
    assert len(seen) >= 2


@pytest.mark.slow
def test_time_of_an_augmented_batch_of_two_8x256x256_patches(tmp_path: Path) -> None:
    # lite preset: 2 patches of 8×256×256 (sampled as 8×426×426), default augmentation, one process
    labels = np.zeros((40, 400, 400), np.int16)
    labels[10:30, 100:250, 120:300] = 1
    prefix = save_case(tmp_path, "big", np.random.default_rng(0).normal(size=(1, *labels.shape)), labels)
    tr = build_train_transforms((8, 256, 256), anisotropic=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        loader = make_train_loader([prefix], patch_size=(8, 256, 256), batch_size=2, iterations=30, transforms=tr,
                                   seed=0, epoch=0, num_workers=0)
        start = time.perf_counter()
        count = sum(1 for _ in loader)
        per_batch = (time.perf_counter() - start) / count
    finally:
        torch.set_num_threads(threads)
    print(f"\naugmented batch of 2 × 8×256×256, one core: {per_batch:.3f} s")
    assert per_batch < 5.0
