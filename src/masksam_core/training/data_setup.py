"""From a data-set folder to training batches and validation volumes.

Checks the data set, plans it (or reuses RUN_DIR/plans.json when resuming),
preprocesses it into a cache, splits off validation data and builds the
per-epoch loader. Validation: ``--val-cases``, else a fraction of the cases,
else, for a single-case data set, a slab at the end of its slice axis (the
last ``val_fraction`` of the slices).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.augment import build_train_transforms
from ..data.dataset import load_checked_dataset
from ..data.loader import CaseFiles, make_train_loader
from ..data.plans import fingerprint_dataset, load_plans, make_plans, save_plans
from ..data.preprocess import PreprocessedCase, class_locations, preprocess_dataset
from ..errors import MaskSAMError
from . import distributed as dist


@dataclass
class DataBundle:
    plans: dict[str, Any]
    class_names: list[str]
    num_classes: int
    in_channels: int
    train_cases: list[Any]
    val_volumes: list[tuple[np.ndarray, np.ndarray]]  # (C, Z, Y, X) image, (Z, Y, X) labels
    loader: Callable[..., Iterable[dict[str, Any]]]


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, np.ascontiguousarray(array))
    os.replace(tmp, path)


def _slab_split(case: PreprocessedCase, fraction: float, folder: Path, num_classes: int) -> tuple[CaseFiles, tuple]:
    """Split one preprocessed case along Z: the first part trains, the last ``fraction`` validates."""
    image = np.load(case.image, mmap_mode="r")
    labels = np.load(case.labels, mmap_mode="r")
    z = image.shape[1]
    cut = int(round(z * (1 - fraction)))
    if cut < 1 or cut >= z:
        raise MaskSAMError(f"case {case.id} has {z} slices: too few to hold out {fraction:.0%} for validation; "
                           "pass --val-fraction 0 or add cases")
    folder.mkdir(parents=True, exist_ok=True)
    img_path, lab_path = folder / f"{case.id}_image.npy", folder / f"{case.id}_labels.npy"
    if dist.is_main():
        _save_npy(img_path, image[:, :cut])
        _save_npy(lab_path, labels[:cut])
    dist.barrier()
    locations = class_locations(np.asarray(labels[:cut]), num_classes)
    train = CaseFiles(img_path, lab_path, {int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3)
                                          for k, v in locations.items()})
    return train, (np.asarray(image[:, cut:]), np.asarray(labels[cut:]))


def prepare_data(config: Any, out: Path, *, resume: bool, patch_size: tuple[int, int, int]) -> DataBundle:
    """Check, plan, preprocess and split; returns what the trainer needs."""
    spec = load_checked_dataset(config.dataset)
    plans_path = out / "plans.json"
    if resume and plans_path.exists():
        plans = load_plans(plans_path)
    else:
        plans = make_plans(spec, fingerprint_dataset(spec, progress=dist.is_main()), config.preset)
        plans["patch_size"] = list(patch_size)
        if dist.is_main():
            out.mkdir(parents=True, exist_ok=True)
            save_plans(plans, plans_path)
    cache = Path(config.cache_dir) if config.cache_dir else out / "preprocessed"
    if dist.is_main():
        cases = preprocess_dataset(spec, plans, cache, progress=True)
    dist.barrier()
    if not dist.is_main():
        cases = preprocess_dataset(spec, plans, cache, progress=False)  # cache hit: nothing rebuilt
    by_id = {c.id: c for c in cases}
    unknown = sorted(set(config.val_cases) - set(by_id))
    if unknown:
        raise MaskSAMError(f"--val-cases {' '.join(unknown)} not in the data set (cases: {', '.join(sorted(by_id))})")
    num_classes = int(plans["num_classes"])
    if config.val_cases:
        val_ids = set(config.val_cases)
    elif config.val_fraction > 0 and len(cases) >= 2:
        rng = np.random.default_rng(config.seed)
        n_val = max(1, int(round(config.val_fraction * len(cases))))
        val_ids = {cases[i].id for i in rng.choice(len(cases), n_val, replace=False)}
    else:
        val_ids = set()
    train: list[Any] = []
    val: list[tuple[np.ndarray, np.ndarray]] = []
    if not val_ids and config.val_fraction > 0 and len(cases) == 1:
        part, held = _slab_split(cases[0], config.val_fraction, cache / "slab", num_classes)
        train, val = [part], [held]
    else:
        for case in cases:
            if case.id in val_ids:
                val.append((np.load(case.image), np.load(case.labels)))
            else:
                train.append(case)  # the loader reads its class locations from the case's JSON
    if not train:
        raise MaskSAMError("every case is held out for validation: leave some for training")

    transforms = build_train_transforms(patch_size, anisotropic=bool(plans.get("anisotropic", False)), seed=config.seed)
    rank, world = dist.rank(), dist.world_size()

    def loader(*, epoch: int, start_iteration: int = 0) -> Iterable[dict[str, Any]]:
        return make_train_loader(
            train, patch_size=patch_size, batch_size=config.batch_size, iterations=config.iters_per_epoch,
            transforms=transforms, seed=config.seed, epoch=epoch, rank=rank, world_size=world,
            num_workers=config.num_workers, pin_memory=False, start_iteration=start_iteration,
        )

    return DataBundle(plans, list(plans["class_names"]), num_classes, int(plans["in_channels"]), train, val, loader)
