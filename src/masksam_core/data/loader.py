"""Training patches: sampling with nnU-Net's foreground oversampling, reproducible background loading.

Cases are preprocessed ``.npy`` files: ``{case}_image.npy`` float32 (C, Z, Y, X) and ``{case}_labels.npy``
int16 (Z, Y, X), read with ``np.load(mmap_mode="r")`` so that only the patch is read from disk.

Reproducibility. Every sample has a *global index* ``g = rank * n_rank + j`` (``j`` = its index among the
``n_rank = samples_per_epoch / world_size`` samples of this rank, ``j = b * batch_size + i`` for batch ``b``,
position ``i``). Everything random about a sample (case, location, augmentation) comes from
``np.random.default_rng([seed, epoch, g])``. So the data of an epoch depend only on (seed, epoch, rank):
not on the worker that made them, nor on what ran before. Resuming at an epoch boundary replays the same
data, ranks draw disjoint streams, and ``num_workers=0`` equals ``num_workers=N``.

Worker split. DataLoader worker ``w`` of ``W`` makes the whole batches ``b = w, w + W, w + 2W, ...`` of its
rank; PyTorch's DataLoader takes batches from its workers round-robin, so batches arrive in the order
0, 1, 2, ... Counts per worker differ by at most one batch; together they are exactly the rank's samples.

Foreground oversampling (nnU-Net): in each batch, position ``i`` is forced to contain foreground when
``i >= round(batch_size * (1 - 0.33))``: batch 2 → position 1 (1 of 2), 3 → 1 of 3, 4 → 1 of 4,
8 → 3 of 8. With batch size 1 that rule never forces, so there each sample is forced with probability 0.33.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from masksam_core.errors import MaskSAMError

from .augment import set_random_state

OVERSAMPLE_FOREGROUND = 0.33
LOCATIONS_PER_CLASS = 10_000


class LoaderError(MaskSAMError):
    """Preprocessed cases or loader settings that cannot work."""


@dataclass(frozen=True)
class CaseFiles:
    """One preprocessed case: image (C, Z, Y, X) and labels (Z, Y, X) ``.npy`` files.

    ``class_locations``: {class: (K, 3) array of (z, y, x)}; when None, they are read from ``meta`` (the
    preprocessing's ``{case}.json``, key ``class_locations``) or else computed from the labels.
    """

    image: Path
    labels: Path
    class_locations: Mapping[int, np.ndarray] | None = None
    meta: Path | None = None


def as_case(item: Any) -> CaseFiles:
    """A :class:`CaseFiles` from a ``CaseFiles``, an object with ``image`` and ``labels`` paths (its
    ``meta`` JSON's ``class_locations`` are used when present), a ``(image, labels)`` pair, or a path
    prefix ``dir/case`` / ``dir/case_image.npy``."""
    if isinstance(item, CaseFiles):
        return item
    if hasattr(item, "image") and hasattr(item, "labels"):
        meta = getattr(item, "meta", None)
        return CaseFiles(Path(item.image), Path(item.labels), meta=Path(meta) if meta is not None else None)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return CaseFiles(Path(item[0]), Path(item[1]))
    if isinstance(item, (str, Path)):
        text = str(item)
        prefix = text[: -len("_image.npy")] if text.endswith("_image.npy") else text
        return CaseFiles(Path(prefix + "_image.npy"), Path(prefix + "_labels.npy"))
    raise LoaderError(f"cannot use {item!r} as a preprocessed case: give a path prefix 'dir/case' or an "
                      "(image.npy, labels.npy) pair")


def _as_locations(raw: Mapping) -> dict[int, np.ndarray]:
    return {int(k): np.asarray(v, dtype=np.int32).reshape(-1, 3) for k, v in raw.items()}


@functools.lru_cache(maxsize=4096)
def _meta_locations(path: str, mtime_ns: int) -> dict[int, np.ndarray] | None:
    """``class_locations`` of a case's JSON ({"1": [[z, y, x], ...]}), or None when it has none."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))["class_locations"]
        return _as_locations(raw) if isinstance(raw, Mapping) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_case_arrays(image_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped image (C, Z, Y, X) float and labels (Z, Y, X) integer arrays, checked to match."""
    arrays = []
    for path in (Path(image_path), Path(labels_path)):
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (OSError, ValueError) as err:
            raise LoaderError(f"cannot read preprocessed file {path} ({err}); run the preprocessing again") from err
    image, labels = arrays
    if image.ndim != 4 or labels.ndim != 3 or image.shape[1:] != labels.shape:
        raise LoaderError(f"{image_path} has shape {image.shape} and {labels_path} has {labels.shape}; expected "
                          "(C, Z, Y, X) and (Z, Y, X) of the same size: run the preprocessing again")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LoaderError(f"{labels_path} holds {labels.dtype}, not integer labels: run the preprocessing again")
    return image, labels


def foreground_locations(labels: np.ndarray, *, max_per_class: int = LOCATIONS_PER_CLASS,
                         seed: int = 1234) -> dict[int, np.ndarray]:
    """{class > 0: (K, 3) int32 (z, y, x)} for every class present; nnU-Net's subsampling: K = all voxels
    up to ``max_per_class``, at least 1% of the class (random, seeded)."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(labels).reshape(-1)
    idx = np.flatnonzero(flat > 0)
    values = flat[idx]
    out: dict[int, np.ndarray] = {}
    for c in np.unique(values):
        sel = idx[values == c]
        keep = min(sel.size, max(max_per_class, int(np.ceil(sel.size * 0.01))))
        if keep < sel.size:
            sel = np.sort(rng.choice(sel, keep, replace=False))
        out[int(c)] = np.stack(np.unravel_index(sel, labels.shape), axis=1).astype(np.int32)
    return out


@functools.lru_cache(maxsize=4096)
def _cached_locations(path: str, mtime_ns: int, size: int) -> dict[int, np.ndarray]:
    return foreground_locations(np.load(path, mmap_mode="r"))


def case_locations(case: CaseFiles) -> dict[int, np.ndarray]:
    """The case's foreground locations: given, read from its meta JSON, or computed from its labels
    (JSON and computed ones cached per process and file version)."""
    if case.class_locations is not None:
        return _as_locations(case.class_locations)
    if case.meta is not None and case.meta.is_file():
        found = _meta_locations(str(case.meta.resolve()), case.meta.stat().st_mtime_ns)
        if found is not None:
            return found
    st = case.labels.stat()
    return _cached_locations(str(case.labels.resolve()), st.st_mtime_ns, st.st_size)


class PatchSampler:
    """Cut patches of ``patch_size`` (T, H, W) from a case, with ``context`` around them.

    :meth:`sample` returns image (C, T', H', W') float32 and labels (T', H', W') with (T', H', W') =
    ``sample_size`` (default ``patch_size``): the patch plus a margin on every side, for augmentations
    that crop the centre afterwards. Outside the volume the image is 0 (the mean after z-score
    normalisation) and the labels are 0 (background). Per axis, the patch lies inside the volume where
    the volume is at least as long; where it is shorter the volume is centred in the patch. Unforced
    patches are placed uniformly at random; ``force_foreground`` picks a random foreground class present
    in the case, a random voxel of it, and centres the patch on it, shifted by a jitter of up to
    ``jitter`` × the patch size per axis (never enough to lose the voxel). A case without foreground
    gives a random patch.
    """

    def __init__(self, patch_size: Sequence[int], *, sample_size: Sequence[int] | None = None,
                 jitter: float = 0.25) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sample_size = tuple(int(s) for s in (sample_size or patch_size))
        if len(self.patch_size) != 3 or len(self.sample_size) != 3 or min(self.patch_size) < 1 or any(
            s < p for s, p in zip(self.sample_size, self.patch_size, strict=True)
        ):
            raise LoaderError(f"patch_size {tuple(patch_size)} and sample_size {sample_size} must be 3 positive "
                              "sizes (T, H, W), the sample size at least the patch size")
        self.jitter = jitter

    def patch_start(self, shape: Sequence[int], rng: np.random.Generator,
                    voxel: Sequence[int] | None = None) -> tuple[int, ...]:
        """Start (z, y, x) of the patch (may be negative or reach past the volume: padding)."""
        start = []
        for d, (size, p) in enumerate(zip(shape, self.patch_size, strict=True)):
            lo, hi = (0, size - p) if size >= p else (-((p - size) // 2),) * 2
            if voxel is None:
                start.append(int(rng.integers(lo, hi + 1)))
                continue
            j = min(int(p * self.jitter), max(p // 2 - 1, 0))
            start.append(int(np.clip(int(voxel[d]) - p // 2 + int(rng.integers(-j, j + 1)), lo, hi)))
        return tuple(start)

    def crop(self, image: np.ndarray, labels: np.ndarray, start: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image (C, T', H', W') float32 and labels (T', H', W') of ``sample_size`` around the patch at
        ``start``, zero-padded outside the volume."""
        first = [s - (q - p) // 2 for s, p, q in zip(start, self.patch_size, self.sample_size, strict=True)]
        src, dst = [], []
        for f, q, size in zip(first, self.sample_size, labels.shape, strict=True):
            a, b = max(f, 0), min(f + q, size)
            src.append(slice(a, max(a, b)))
            dst.append(slice(a - f, a - f + max(b - a, 0)))
        img = np.zeros((image.shape[0], *self.sample_size), dtype=np.float32)
        lab = np.zeros(self.sample_size, dtype=labels.dtype)
        into, outof = (slice(None), *dst), (slice(None), *src)
        img[into] = image[outof]
        lab[tuple(dst)] = labels[tuple(src)]
        return img, lab

    def sample(self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
               force_foreground: bool = False,
               class_locations: Mapping[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A random (or foreground-centred) sample: image (C, T', H', W') float32, labels (T', H', W')."""
        voxel = None
        if force_foreground:
            locs = foreground_locations(labels) if class_locations is None else class_locations
            eligible = sorted(int(k) for k, v in locs.items() if int(k) > 0 and len(v))
            if eligible:
                chosen = np.asarray(locs[eligible[int(rng.integers(len(eligible)))]]).reshape(-1, 3)
                voxel = chosen[int(rng.integers(len(chosen)))]
        return self.crop(image, labels, self.patch_start(labels.shape, rng, voxel))


def forced_position(position: int, batch_size: int, rng: np.random.Generator) -> bool:
    """Whether the sample at ``position`` of a batch must contain foreground (module docstring)."""
    if batch_size == 1:
        return bool(rng.random() < OVERSAMPLE_FOREGROUND)
    return position >= round(batch_size * (1 - OVERSAMPLE_FOREGROUND))


class TrainPatchDataset(IterableDataset):
    """An epoch of random training samples {"image": (C, T, H, W) float32, "labels": (T, H, W) int64}.

    ``samples_per_epoch`` counts all ranks and must be a multiple of ``world_size * batch_size``; this
    rank yields ``samples_per_epoch / world_size`` of them (see the module docstring for the seeding and
    the split across ranks and workers). ``transforms`` (e.g. :func:`~.augment.build_train_transforms`)
    maps {"image", "label": (1, ...)} to ``patch_size``; its ``input_size`` attribute, when present, is
    the size to sample. Call :meth:`set_epoch` before each epoch (or pass ``epoch``).
    """

    def __init__(self, cases: Sequence[Any], patch_size: Sequence[int], batch_size: int, samples_per_epoch: int,
                 transforms: Callable | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, start_batch: int = 0) -> None:
        super().__init__()
        if not cases:
            raise LoaderError("no training cases given: preprocess the data set first")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise LoaderError(f"batch_size {batch_size}, rank {rank}, world_size {world_size}: need batch_size >= 1"
                              " and 0 <= rank < world_size")
        if samples_per_epoch < 1 or samples_per_epoch % (world_size * batch_size):
            raise LoaderError(f"samples_per_epoch {samples_per_epoch} must be a positive multiple of world_size × "
                              f"batch_size = {world_size * batch_size} (iterations × batch_size × world_size)")
        self.cases = [as_case(c) for c in cases]
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size, self.samples_per_epoch = int(batch_size), int(samples_per_epoch)
        self.transforms, self.seed, self.epoch = transforms, int(seed), int(epoch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_batch = int(start_batch)  # resuming mid-epoch: skip the batches already trained on
        self.sampler = PatchSampler(self.patch_size, sample_size=getattr(transforms, "input_size", None))
        channels = {load_case_arrays(c.image, c.labels)[0].shape[0] for c in self.cases}
        if len(channels) > 1:
            raise LoaderError(f"the preprocessed cases have different channel counts {sorted(channels)}; "
                              "every case needs the same channels (preprocess them with one plans.json)")
        self.locations = [case_locations(c) for c in self.cases]  # main process: workers inherit them
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memory maps are reopened in each worker
        return state

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank yields per epoch."""
        return self.samples_per_epoch // self.world_size

    def __len__(self) -> int:
        return self.samples_per_rank - self.start_batch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples the next iteration yields."""
        self.epoch = int(epoch)

    def _arrays_of(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._arrays:
            self._arrays[k] = load_case_arrays(self.cases[k].image, self.cases[k].labels)
        return self._arrays[k]

    def sample(self, j: int) -> dict[str, torch.Tensor]:
        """Sample ``j`` (0 <= j < samples_per_rank) of this rank and epoch; deterministic."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank * self.samples_per_rank + j])
        forced = forced_position(j % self.batch_size, self.batch_size, rng)
        k = int(rng.integers(len(self.cases)))
        image, labels = self._arrays_of(k)
        img, lab = self.sampler.sample(image, labels, rng, force_foreground=forced, class_locations=self.locations[k])
        if self.transforms is not None:
            set_random_state(self.transforms, int(rng.integers(2**32 - 1)))
            out = self.transforms({"image": img, "label": lab[None]})
            img, lab = out["image"], out["label"][0]
        img_t, lab_t = torch.as_tensor(img, dtype=torch.float32), torch.as_tensor(np.asarray(lab), dtype=torch.int64)
        if tuple(img_t.shape[1:]) != self.patch_size or tuple(lab_t.shape) != self.patch_size:
            raise LoaderError(f"the transforms returned image {tuple(img_t.shape)} and labels {tuple(lab_t.shape)}, "
                              f"not patch size {self.patch_size}: build them with the same patch size")
        return {"image": img_t.contiguous(), "labels": lab_t.contiguous()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for b in range(self.start_batch + worker, self.samples_per_rank // self.batch_size, workers):
            for j in range(b * self.batch_size, (b + 1) * self.batch_size):
                yield self.sample(j)


def make_train_loader(cases: Sequence[Any], *, patch_size: Sequence[int], batch_size: int, iterations: int,
                      transforms: Callable | None, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 2, pin_memory: bool = False, start_iteration: int = 0) -> DataLoader:
    """Exactly ``iterations`` batches {"image": (B, C, T, H, W) float32, "labels": (B, T, H, W) int64} for
    this rank and epoch, made in ``num_workers`` background processes (0: in this process; same batches).

    Build a new loader for every epoch (workers are not persistent, so each epoch is seeded afresh).
    ``start_iteration`` > 0 resumes an epoch: the loader yields batches ``start_iteration`` ..
    ``iterations - 1``, exactly those a full epoch would have yielded there.
    """
    if iterations < 1 or num_workers < 0 or not 0 <= start_iteration < iterations:
        raise LoaderError(f"iterations ({iterations}) must be >= 1, num_workers ({num_workers}) >= 0 and "
                          f"start_iteration ({start_iteration}) in 0..iterations-1")
    dataset = TrainPatchDataset(cases, patch_size, batch_size, iterations * batch_size * world_size,
                                transforms=transforms, seed=seed, rank=rank, world_size=world_size, epoch=epoch,
                                start_batch=start_iteration)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=2 if num_workers > 0 else None, drop_last=False)
