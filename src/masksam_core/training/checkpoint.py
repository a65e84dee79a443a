"""Training state: the run checkpoint a :class:`~.trainer.Trainer` saves, every RNG state, the metrics
file, and atomic writes.

The checkpoint is a run file (:class:`~masksam_core.runs.RunFile`, kind ``"masksam-run"``): the
trainable weights, how to rebuild the network, the plans and class names, and the training state
(optimiser, scheduler, scaler, every rank's RNG state, the epoch and iteration reached, the loss sums
of an unfinished epoch, the best score, the history and the settings). Reading runs lives in
:mod:`masksam_core.runs`.

Files are written to a temporary name in the same folder and renamed, so a crash never
leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MaskSAMError
from ..runs import FORMAT, RUN_KIND, BuildSpec, RunFile, base_weights_info

# Settings a resumed run takes from its checkpoint when left None (a different value is an error).
NEW_RUN_DEFAULTS: dict[str, Any] = {
    "preset": "lite", "iters_per_epoch": 250, "batch_size": 2, "lr": 1e-3, "weight_decay": 1e-2, "seed": 0,
    "prompt_mode": "auto", "val_cases": (), "val_fraction": 0.2, "patch_size": None, "num_queries": None,
    "sam_image_size": None, "augmentation": "full", "val_every": 1,
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would create it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    """Every random generator the training loop uses, as tensors and plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _python_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_python_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _norm(value: Any) -> Any:
    return [_norm(v) for v in value] if isinstance(value, (list, tuple)) else value


def resolve_config(config: Any, saved: dict[str, Any] | None = None) -> Any:
    """``config`` (a ``TrainConfig``) with every ``None`` of :data:`NEW_RUN_DEFAULTS` filled: from ``saved`` (the
    checkpoint's config) when resuming, else with the defaults. A value given that differs from the
    run's raises :class:`MaskSAMError`: a resumed run trains on exactly as it began."""
    values: dict[str, Any] = {}
    for key, default in NEW_RUN_DEFAULTS.items():
        given = getattr(config, key)
        if saved is None:
            values[key] = default if given is None else given
            continue
        was = saved.get(key, default)
        if given is not None and _norm(given) != _norm(was):
            flag = "--" + key.replace("_", "-")
            raise MaskSAMError(f"{config.out} was trained with {flag} {_norm(was)}, not {_norm(given)}: resume "
                               f"with the same value (or leave {flag} out), or start a new run with another --out")
        values[key] = was if given is None else given
    for key in ("val_cases", "patch_size"):
        values[key] = tuple(values[key]) if values[key] is not None else None
    return dataclasses.replace(config, **values)


def check_ranges(c: Any, epochs: int) -> None:
    """Raise :class:`MaskSAMError` naming the flag and its rule for a resolved ``TrainConfig`` value
    (or ``epochs``) out of range."""
    from ..data.augment import AUGMENTATIONS

    if c.augmentation not in AUGMENTATIONS:
        raise MaskSAMError(f"--augmentation {c.augmentation} is unknown: choose one of {', '.join(AUGMENTATIONS)}")
    positive, at_least_0, at_least_1 = "must be positive", "must be 0 or more", "must be 1 or more"
    for flag, value, ok, rule in (
            ("--epochs", epochs, epochs >= 1, at_least_1),
            ("--iters-per-epoch", c.iters_per_epoch, c.iters_per_epoch >= 1, at_least_1),
            ("--batch-size", c.batch_size, c.batch_size >= 1, at_least_1),
            ("--lr", c.lr, c.lr > 0, positive), ("--weight-decay", c.weight_decay, c.weight_decay >= 0, at_least_0),
            ("--val-every", c.val_every, c.val_every >= 1, at_least_1),
            ("--val-fraction", c.val_fraction, 0 <= c.val_fraction < 1,
             "must be at least 0 (no validation) and below 1 (some data must be left to train on)"),
            ("--num-workers", c.num_workers, c.num_workers >= 0, at_least_0),
            ("--time-limit", c.time_limit, c.time_limit is None or c.time_limit > 0, "must be positive (minutes)"),
            ("--patch-size", c.patch_size, c.patch_size is None or min(c.patch_size) >= 1,
             "must be 3 positive sizes T H W"),
            ("--num-queries", c.num_queries, c.num_queries is None or c.num_queries >= 1, at_least_1),
            ("--sam-image-size", c.sam_image_size, c.sam_image_size is None or c.sam_image_size >= 1, positive)):
        if not ok:
            shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            raise MaskSAMError(f"{flag} {shown} is out of range: it {rule}")


def run_state(trainer: Any, data: Any, *, epoch: int, iteration: int, best: float, rngs: list[Any],
              partial: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint dict (a run file's :meth:`~masksam_core.runs.RunFile.to_dict`) of a
    :class:`~.trainer.Trainer` and its ``DataBundle``; ``rngs``: every rank's :func:`rng_state`."""
    sam = trainer.model.sam
    return RunFile(
        kind=RUN_KIND,
        format=FORMAT,
        model=trainer.model.trainable_state_dict(),
        build=BuildSpec(
            preset=trainer.preset.name,
            overrides={k: list(v) if isinstance(v, tuple) else v for k, v in trainer.overrides.items()},
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            prompt_mode=trainer.config.prompt_mode,
        ),
        base_weights=base_weights_info(sam),
        # random base weights (the tiny backbone) cannot be fetched again: keep them
        sam=None if sam.weights else {k: v for k, v in sam.state_dict().items()},
        plans=data.plans,
        class_names=data.class_names,
        optimizer=trainer.optimizer.state_dict(),
        scheduler={"epoch": epoch, "max_epochs": trainer.epochs, "base_lr": trainer.config.lr},
        scaler=trainer.scaler.state_dict(),
        rng=rngs[0],
        rng_ranks=rngs,
        epoch=epoch,
        iteration=iteration,
        partial=partial,
        best=best,
        history=trainer.history,
        config=json.loads(json.dumps(dataclasses.asdict(trainer.config), default=str)),
    ).to_dict()

def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Write ``metrics.jsonl``: one JSON line per finished epoch, atomically (temporary file, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, path)


def read_metrics(path: Path, epochs: int) -> list[dict[str, Any]]:
    """The metrics lines of epochs 1..``epochs`` in ``metrics.jsonl`` (last one wins per epoch); for
    checkpoints written before they kept their own history."""
    if not path.exists():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(row, dict) and 1 <= int(row.get("epoch", 0)) <= epochs:
            rows[int(row["epoch"])] = row
    return [rows[e] for e in sorted(rows)]
