"""From a data-set folder to training batches and validation volumes.

Checks the data set, plans it (or uses the plans of the checkpoint when resuming),
preprocesses it into a cache, splits off validation data and builds the
per-epoch loader. Validation: ``--val-cases``, else a fraction of the cases,
else, for a single-case data set, a slab at the end of its slice axis (the
last ``val_fraction`` of the slices).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.augment import TrainTransforms, augmentation_settings, build_train_transforms, is_anisotropic
from ..data.dataset import load_checked_dataset
from ..data.fingerprint import fingerprint_dataset
from ..data.loader import CaseFiles, make_train_loader
from ..data.plans import Plans, load_plans, make_plans, save_plans
from ..data.preprocess import PreprocessedCase, class_locations, preprocess_dataset
from ..errors import MaskSAMError
from ..files import atomic_save_npy
from . import distributed as dist

if TYPE_CHECKING:
    from ..data.dataset import DatasetSpec
    from .config import ResolvedConfig


@dataclass
class DataBundle:
    plans: Plans
    class_names: list[str]
    num_classes: int
    in_channels: int
    train_cases: list[PreprocessedCase | CaseFiles]
    val_volumes: list[tuple[np.ndarray, np.ndarray]]  # (C, Z, Y, X) image, (Z, Y, X) labels
    loader: Callable[..., Iterable[dict[str, Any]]]
    transforms: TrainTransforms | None = None  # the training augmentation the loader applies
    note: str = ""  # what the user should know about the data (a resumed run's moved data set)


def slab_start(depth: int, fraction: float) -> int:
    """First slice of the held-out slab of a single case of ``depth`` slices: the last ``fraction``."""
    return round(depth * (1 - fraction))


def _slab_split(case: PreprocessedCase, fraction: float, folder: Path, num_classes: int) -> tuple[CaseFiles, tuple]:
    """Split one preprocessed case along Z: the first part trains, the last ``fraction`` validates."""
    image = np.load(case.image, mmap_mode="r")
    labels = np.load(case.labels, mmap_mode="r")
    z = image.shape[1]
    cut = slab_start(z, fraction)
    if cut < 1 or cut >= z:
        raise MaskSAMError(f"case {case.id} has {z} slices: too few to hold out {fraction:.0%} for validation; "
                           "pass --val-fraction 0 or add cases")
    folder.mkdir(parents=True, exist_ok=True)
    # named by the cut too: runs sharing a --cache-dir with other fractions never touch each other's files
    img_path, lab_path = folder / f"{case.id}_z0-{cut}_image.npy", folder / f"{case.id}_z0-{cut}_labels.npy"
    if dist.is_main():
        atomic_save_npy(img_path, image[:, :cut])
        atomic_save_npy(lab_path, labels[:cut])
    dist.barrier()
    locations = class_locations(np.asarray(labels[:cut]), num_classes)
    train = CaseFiles(img_path, lab_path, {int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3)
                                          for k, v in locations.items()})
    return train, (np.asarray(image[:, cut:]), np.asarray(labels[cut:]))


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def patch_fit_note(patch_size: tuple[int, int, int], median_shape: Sequence[float]) -> str:
    """A hint when the patch's slices are far larger than the data's (median, after resampling).

    Such patches are mostly padding and every slice goes through SAM at the patch's size, so a
    smaller patch trains and predicts several times faster. The suggested side is the smallest
    of the patch's side halved (1/2, 1/4, ...) that still holds the median slice and is a
    multiple of 64, which every backbone takes. Empty when the patch fits.
    """
    t, h, _ = (int(v) for v in patch_size)
    need = max(float(median_shape[1]), float(median_shape[2]))
    side = h
    while (side // 2) % 64 == 0 and side // 2 >= max(need, 64):
        side //= 2
    if side == h:
        return ""
    shape = "x".join(str(round(float(v))) for v in median_shape[1:])
    return (f"note: the patches are {h}x{h} in-plane but this data set's median slice is {shape} voxels after "
            f"resampling, so most of each patch is padding. --patch-size {t} {side} {side} fits the data and "
            f"runs {(h // side) ** 2}x fewer pixels through SAM per slice (SAM's input shrinks with it)")


def check_same_dataset(spec: DatasetSpec, plans: Plans, out: Path, cache: Path) -> str:
    """A resumed run trains on the data set it began with: the same classes and channels, and,
    where the folder's name changed (moved or copied), the same cases (those of the run's
    preprocessed ``cache``, else their number). Raises MaskSAMError naming what differs; returns a
    note when the name changed but the data are the same, else ''."""
    import json

    from ..data.plans import _class_names

    classes = _class_names(spec)
    channels = {str(k): str(v) for k, v in spec.channel_names.items()}
    what = None
    if list(plans.class_names) != classes:
        what = f"has the classes {list(plans.class_names)}, this data set {classes}"
    elif dict(plans.channel_names) != channels:
        what = f"has the channels {dict(plans.channel_names)}, this data set {channels}"
    was, now = plans.dataset_name, spec.name
    if what is None and was != now:
        ids = sorted(c.id for c in spec.cases)
        try:
            before = sorted(json.loads((cache / "cache.json").read_text(encoding="utf-8"))["cases"])
        except (OSError, ValueError, KeyError, TypeError):
            before = None
        same = ids == before if before is not None else plans.stats is not None and len(ids) == plans.stats.num_cases
        if not same:
            listed = ", ".join(before[:5]) + (", ..." if len(before) > 5 else "") if before else ""
            what = f"was trained on {was}, not {now}" + (f" (its cases: {listed})" if listed else "")
    if what:
        raise MaskSAMError(f"{out} {what}: resume with the data set the run began with (it may have moved), "
                           "or start a new run with another --out")
    return f"the data set is now {now} (the run began on {was}, with the same cases)" if was != now else ""


def _plans(config: ResolvedConfig, spec: DatasetSpec, out: Path, plans: Plans | None,
           patch_size: tuple[int, int, int]) -> Plans:
    """The run's plans: given (resuming: the checkpoint's), else made and saved by rank 0, then read."""
    plans_path = out / "plans.json"
    if plans is not None:
        if dist.is_main() and not plans_path.exists():
            out.mkdir(parents=True, exist_ok=True)
            save_plans(plans, plans_path)
        return plans
    if dist.is_main():
        made = make_plans(spec, fingerprint_dataset(spec, progress=True), config.preset)
        # the axes test-time augmentation may mirror: those the model learned to be mirror-invariant
        # on (nnU-Net's inference_allowed_mirroring_axes); none after --augmentation no-mirror
        plans = replace(made, patch_size=tuple(patch_size),
                        mirror_axes=tuple(augmentation_settings(config.augmentation)[1]))
        out.mkdir(parents=True, exist_ok=True)
        save_plans(plans, plans_path)
    dist.barrier()
    return load_plans(plans_path)  # every rank (and a later resume) uses the plans exactly as saved


def prepare_data(config: ResolvedConfig, out: Path, *, patch_size: tuple[int, int, int],
                 plans: Plans | None = None) -> DataBundle:
    """Check, plan (or use ``plans``), preprocess and split; returns what the trainer needs.

    Under DDP rank 0 plans and preprocesses while the others wait at a barrier, then read its files.
    """
    spec = load_checked_dataset(config.dataset)
    cache = Path(config.cache_dir) if config.cache_dir else out / "preprocessed"
    note = check_same_dataset(spec, plans, out, cache) if plans is not None else ""  # before the cache is touched
    plans = _plans(config, spec, out, plans, patch_size)
    # rank 0 preprocesses (or finds the cache valid); the others wait here and take its list of files
    cases = dist.broadcast_object(preprocess_dataset(spec, plans, cache, progress=True) if dist.is_main() else None)
    by_id = {c.id: c for c in cases}
    unknown = sorted(set(config.val_cases) - set(by_id))
    if unknown:
        raise MaskSAMError(f"--val-cases {' '.join(unknown)} not in the data set (cases: {', '.join(sorted(by_id))})")
    num_classes = plans.num_classes
    if config.val_cases:
        val_ids = set(config.val_cases)
    elif config.val_fraction > 0 and len(cases) >= 2:
        rng = np.random.default_rng(config.seed)
        n_val = max(1, round(config.val_fraction * len(cases)))
        val_ids = {cases[i].id for i in rng.choice(len(cases), n_val, replace=False)}
    else:
        val_ids = set()
    train: list[PreprocessedCase | CaseFiles] = []
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

    # nnU-Net's "dummy 2D" rule looks at the PATCH (max / T > 3), not at the spacing: slab patches of a few
    # slices are rotated and scaled in-plane only, whatever the voxel size
    augment, mirror_axes = augmentation_settings(config.augmentation)
    transforms = build_train_transforms(patch_size, anisotropic=is_anisotropic(patch_size), mirror_axes=mirror_axes,
                                        seed=config.seed, config=augment)
    rank, world = dist.rank(), dist.world_size()

    def loader(*, epoch: int, start_iteration: int = 0) -> Iterable[dict[str, Any]]:
        dl = make_train_loader(
            train, patch_size=patch_size, batch_size=config.batch_size, iterations=config.iters_per_epoch,
            transforms=transforms, seed=config.seed, epoch=epoch, rank=rank, world_size=world,
            num_workers=config.num_workers, pin_memory=False, start_iteration=start_iteration,
        )
        # Starting an iteration over a DataLoader draws a seed from its generator (the global torch RNG
        # without one); its own generator keeps the global RNG, saved in checkpoints, untouched, so a run
        # resumed mid-epoch draws the same random numbers as one that never stopped.
        dl.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 1009 + rank)
        dl.worker_init_fn = _ignore_sigint
        return dl

    return DataBundle(plans, list(plans.class_names), num_classes, plans.in_channels, train, val, loader,
                      transforms, note)
