"""Training state: the run checkpoint a :class:`~.trainer.Trainer` saves, every RNG state, the metrics
file, and atomic writes.

The checkpoint is a run file (:class:`~masksam_core.runs.RunFile`, kind ``"masksam-run"``): the
trainable weights, how to rebuild the network, the plans and class names, and the training state
(optimiser, scheduler, scaler, every rank's RNG state, the epoch and iteration reached, the loss sums
of an unfinished epoch, the best score, the history and the settings). Reading runs lives in
:mod:`masksam_core.runs`.

Files are written through :func:`masksam_core.files.atomic_save`, so a crash never leaves a
half-written checkpoint. Files are read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write_text
from ..runs import FORMAT, RUN_KIND, BuildSpec, RunFile, base_weights_info


def rng_state() -> dict[str, Any]:
    """Every random generator the training loop uses, as tensors and plain values."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: the MT19937 state tuple
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
        sam=None if sam.weights else dict(sam.state_dict()),
        plans=data.plans.to_dict(),
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
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


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
