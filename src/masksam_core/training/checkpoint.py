"""Training checkpoints: small (trainable weights only), atomic, and enough to resume or predict.

A checkpoint is a dict saved with ``torch.save``:

* ``format``: :data:`FORMAT`; ``kind``: ``"masksam-run"``;
* ``model``: the trainable state (``MaskSAM.trainable_state_dict()``), never SAM's weights;
* ``build``: the arguments that rebuild the network (preset, overrides, num_classes,
  in_channels, prompt_mode);
* ``base_weights``: name and sha256 of the frozen base weights it was trained on;
* ``plans``: the preprocessing plans; ``class_names``;
* ``optimizer``, ``scheduler``, ``scaler``, ``rng``: the training state;
* ``rng_ranks``: under DDP, every rank's RNG state (rank order);
* ``epoch`` (epochs finished), ``iteration`` (iterations finished in the current epoch),
  ``partial`` (loss sums, iterations and seconds of that unfinished epoch),
  ``best`` (best validation score so far), ``history`` (the metrics of every finished
  epoch: ``metrics.jsonl`` is rewritten from it on resume), ``config`` (the training settings);
* ``sam``: the frozen base weights only when they are random (``tiny``), else ``None``.

Files are written to a temporary name in the same folder and renamed, so a crash never
leaves a half-written checkpoint. Files are read with ``weights_only=True``.
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

FORMAT = 1

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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a run checkpoint (``weights_only=True``) with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise MaskSAMError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise MaskSAMError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); the file is corrupt or "
            "not a MaskSAM checkpoint: use checkpoint_best.pt / checkpoint_last.pt of a run folder"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in ("masksam-run", "masksam-model"):
        raise MaskSAMError(f"{path} is not a MaskSAM run checkpoint or model file (made by `masksam-core train` "
                           "or `masksam-core export`)")
    if ckpt.get("format", 0) > FORMAT:
        raise MaskSAMError(f"{path} was written by a newer napari-masksam: upgrade the package to read it")
    return ckpt


def base_weights_info(sam: torch.nn.Module) -> dict[str, Any]:
    """Name and sha256 of the frozen base weights a model was built on (``None``: random)."""
    from .. import weights

    source = getattr(sam, "weights", None)
    if not source:
        return {"name": sam.name, "sha256": None, "path": None}
    name, path = source["name"], source["path"]
    entry = weights.WEIGHTS.get(name)
    if entry is not None and Path(path).stat().st_size == entry.size and weights.is_cached(name):
        digest = entry.sha256
    else:
        digest = weights.sha256sum(path)
    return {"name": name, "sha256": digest, "path": path}


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], *, strict: bool, source: Any) -> None:
    """``module.load_state_dict`` with a clear error when a tensor's shape does not fit (a checkpoint made
    with other settings, or a ``tiny`` run made by a version whose random backbone had other widths)."""
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else str(error))
        raise MaskSAMError(
            f"{source} does not fit this model ({first}): it was made with other settings or by another "
            "version of napari-masksam; train it again with this version"
        ) from None


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: Any = "checkpoint") -> None:
    """Load a trainable-only state dict; every non-SAM key must match exactly."""
    expected = {k for k in model.state_dict() if not k.startswith("sam.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MaskSAMError(
            f"{source} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected "
            f"parameters, e.g. {(missing + unexpected)[:3]}): was it trained with other settings?"
        )
    load_state(model, state, strict=False, source=source)


def run_state(trainer: Any, data: Any, *, epoch: int, iteration: int, best: float, rngs: list[Any],
              partial: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint dict (module docstring) of a :class:`~.trainer.Trainer` and its ``DataBundle``;
    ``rngs``: every rank's :func:`rng_state`."""
    sam = trainer.model.sam
    return {
        "kind": "masksam-run",
        "format": FORMAT,
        "model": trainer.model.trainable_state_dict(),
        "build": {
            "preset": trainer.preset.name,
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in trainer.overrides.items()},
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "prompt_mode": trainer.config.prompt_mode,
        },
        "base_weights": base_weights_info(sam),
        # random base weights (the tiny backbone) cannot be fetched again: keep them
        "sam": None if sam.weights else {k: v for k, v in sam.state_dict().items()},
        "plans": data.plans.to_dict(),
        "class_names": data.class_names,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": {"epoch": epoch, "max_epochs": trainer.epochs, "base_lr": trainer.config.lr},
        "scaler": trainer.scaler.state_dict(),
        "rng": rngs[0],
        "rng_ranks": rngs,
        "epoch": epoch,
        "iteration": iteration,
        "partial": partial,
        "best": best,
        "history": trainer.history,
        "config": json.loads(json.dumps(dataclasses.asdict(trainer.config), default=str)),
    }


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


def resolve_run(path: str | Path) -> Path:
    """A run folder (its checkpoint_best.pt, else checkpoint_last.pt), a checkpoint or model file, or the
    name of a bundled model (``abdomen-ct-lite``)."""
    from ..models import find_model

    path = find_model(path)
    if path.is_dir():
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            if (path / name).is_file():
                return path / name
        raise MaskSAMError(f"{path} holds no checkpoint_best.pt or checkpoint_last.pt: is it a training run folder?")
    return path


def load_run(path: str | Path, *, base_checkpoint: str | Path | None = None,
             device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained MaskSAM from a run folder or checkpoint file, in eval mode.

    The frozen base weights come from the weights cache (or ``base_checkpoint``) and must
    have the sha256 recorded at training time; random base weights (``tiny``) are stored
    in the checkpoint itself. Returns (model, checkpoint dict).
    """
    from .. import weights
    from ..modeling import build_model

    file = resolve_run(path)
    ckpt = load_checkpoint(file)
    build = ckpt["build"]
    base = ckpt.get("base_weights") or {}
    pretrained = ckpt.get("sam") is None
    model = build_model(build["preset"], base_checkpoint, num_classes=build["num_classes"],
                        in_channels=build["in_channels"], prompt_mode=build["prompt_mode"],
                        pretrained=pretrained, **build["overrides"])
    if pretrained:
        src = model.sam.weights or {}
        expected = base.get("sha256")
        entry = weights.WEIGHTS.get(src.get("name", ""))
        found = entry.sha256 if entry is not None and base_checkpoint is None else weights.sha256sum(src["path"])
        if expected and found != expected:
            raise MaskSAMError(
                f"{file} was trained on base weights {base.get('name')} with sha256 {expected[:12]}..., but "
                f"{src.get('path')} has sha256 {found[:12]}...: pass the original file with --base-checkpoint"
            )
    else:
        load_state(model.sam, ckpt["sam"], strict=True, source=file)
    load_trainable(model, ckpt["model"], source=file)
    return model.to(device).eval(), ckpt
