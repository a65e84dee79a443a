"""``masksam-core export``: a trained run as a model file, for sharing and prediction.

A model file is a run file of kind ``masksam-model``: the trainable weights (fp16 unless exported
with ``--fp32``), ``build``, ``base_weights`` (without the machine's path), ``plans``,
``class_names`` and a ``summary`` of the training, and no optimiser state, so it is megabytes where
a run checkpoint is several times larger.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import MaskSAMError, check_output_folder
from .finding import resolve_run
from .loading import load_checkpoint
from .runfile import FORMAT, MODEL_KIND, RunFile


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """Training settings without the machine's paths (the data set keeps its folder name)."""
    config = {k: v for k, v in config.items() if k not in ("out", "base_checkpoint", "cache_dir")}
    if config.get("dataset"):
        config["dataset"] = Path(str(config["dataset"])).name
    return config


def _summary(run: RunFile) -> dict[str, Any]:
    """Epochs trained, the best scored epoch's validation Dice, training time and portable settings."""
    history: list[dict[str, Any]] = run.history or []
    scored = [row for row in history if row.get("val_mean_dice") is not None]
    best = max(scored, key=lambda row: row["val_mean_dice"]) if scored else None
    return {
        "epochs": run.epoch,
        "best_epoch": best.get("epoch") if best else None,
        "val_mean_dice": best.get("val_mean_dice") if best else None,
        "val_dice": best.get("val_dice") if best else None,
        "seconds": sum(float(row.get("seconds", 0.0)) for row in history),
        "config": _portable(run.config or {}),
    }


def export_model(run: str | Path, out: str | Path, *, half: bool = True, overwrite: bool = False) -> Path:
    """Write the model file of a run folder or checkpoint to ``out`` (atomically); returns ``out``."""
    import torch

    from ..files import atomic_save

    out = Path(out)
    if out.is_dir():
        raise MaskSAMError(f"{out} is a folder: give the model file's name, e.g. {out / 'model.pt'}")
    if out.suffix != ".pt":
        raise MaskSAMError(f"{out}: name the model file .pt (e.g. {out.with_name(out.name.split('.')[0] + '.pt')}), "
                           "the name predict, the napari widgets and Browse... look for")
    if out.exists() and not overwrite:
        raise MaskSAMError(f"{out} exists: choose another name or pass --overwrite")
    check_output_folder(out.parent, "-o (its folder)")
    saved = load_checkpoint(resolve_run(run))
    if saved.is_model_file:
        raise MaskSAMError(f"{run} is already a model file")
    dtype = torch.float16 if half else torch.float32
    model = RunFile(
        kind=MODEL_KIND, format=FORMAT,
        model={k: v.to(dtype) if v.is_floating_point() else v for k, v in saved.model.items()},
        build=saved.build, base_weights={k: v for k, v in (saved.base_weights or {}).items() if k != "path"},
        sam=saved.sam, plans=saved.plans, class_names=saved.class_names, summary=_summary(saved),
    )
    atomic_save(model.to_dict(), out)
    return out


def _cli_export(args: argparse.Namespace) -> int:
    out = export_model(args.run, args.out, half=not args.fp32, overwrite=args.overwrite)
    print(f"model file written: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained run as a small model file for sharing and prediction",
                       description="Write the model file of a run (its trainable weights in fp16, plans and class "
                                   "names, no optimiser state): what `predict -m` and the napari plugin need.")
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a training run folder or checkpoint file")
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="model file to write (.pt)")
    p.add_argument("--fp32", action="store_true", help="keep the weights in fp32 (default: fp16, half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=_cli_export)
