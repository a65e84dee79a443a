"""Model files: a trained run exported for sharing, and the models bundled with masksam_core.

A *model file* is what prediction needs and nothing of training: a dict saved with ``torch.save``
with ``kind`` ``"masksam-model"``, ``format``, the trainable weights (``model``, fp16 unless
exported with ``--fp32``), ``build``, ``base_weights`` (name and sha256 of the frozen SAM weights
it needs), ``plans``, ``class_names`` and ``summary`` (epochs trained, the best validation score and
the per-class validation Dice of the best epoch, the training settings). It is megabytes where a
run checkpoint, with its optimiser state, is several times larger. Everything that reads a run
(``Predictor``, ``masksam-core predict -m``, ``BoxPrompter``) reads a model file as well, and a
bundled model by its name (:data:`BUNDLED`)::

    masksam-core export RUN_DIR -o my-model.pt
    masksam-core predict -i scan.nii.gz -o out/ -m my-model.pt
    masksam-core predict -i scan.nii.gz -o out/ -m abdomen-ct-lite
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import MaskSAMError, check_output_folder

__all__ = ["BUNDLED", "asset_path", "bundled_models", "export_model", "find_model", "model_card_path"]

#: Bundled model name -> file in ``masksam_core/assets`` (its model card: the same name, ``.md``).
BUNDLED: dict[str, str] = {"abdomen-ct-lite": "abdomen-ct-lite.pt"}

MODEL_KIND = "masksam-model"


_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def asset_path(name: str) -> Path:
    """A real file system path of the packaged file ``masksam_core/assets/name`` (extracted once from
    a zipped install). The file may not exist: callers check."""
    resource = resources.files("masksam_core").joinpath("assets", name)
    if isinstance(resource, Path):
        return resource
    if not resource.is_file():
        return Path(str(resource))
    return _extracted.enter_context(resources.as_file(resource))


def bundled_models() -> dict[str, Path]:
    """Name -> file of every bundled model whose file is installed."""
    return {name: asset_path(file) for name, file in BUNDLED.items() if asset_path(file).is_file()}


def model_card_path(name: str) -> Path:
    """The model card (Markdown) of bundled model ``name``."""
    if name not in BUNDLED:
        raise MaskSAMError(f"no bundled model named {name!r}; bundled: {', '.join(BUNDLED)}")
    return asset_path(Path(BUNDLED[name]).with_suffix(".md").name)


def find_model(name_or_path: str | Path) -> Path:
    """A bundled model's file for its name; any other value is returned as a path."""
    text = str(name_or_path)
    if text in BUNDLED and not Path(text).exists():
        path = asset_path(BUNDLED[text])
        if not path.is_file():
            raise MaskSAMError(f"the bundled model {text!r} is missing from this installation ({path}): "
                               "reinstall napari-masksam")
        return path
    return Path(name_or_path)


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """Training settings without the machine's paths (the data set keeps its folder name)."""
    config = {k: v for k, v in config.items() if k not in ("out", "base_checkpoint", "cache_dir")}
    if config.get("dataset"):
        config["dataset"] = Path(str(config["dataset"])).name
    return config


def export_model(run: str | Path, out: str | Path, *, half: bool = True, overwrite: bool = False) -> Path:
    """Write the model file of a run folder or checkpoint to ``out`` (atomically); returns ``out``."""
    import torch

    from .training.checkpoint import atomic_save, load_checkpoint, resolve_run

    out = Path(out)
    if out.is_dir():
        raise MaskSAMError(f"{out} is a folder: give the model file's name, e.g. {out / 'model.pt'}")
    if out.suffix != ".pt":
        raise MaskSAMError(f"{out}: name the model file .pt (e.g. {out.with_name(out.name.split('.')[0] + '.pt')}), "
                           "the name predict, the napari widgets and Browse... look for")
    if out.exists() and not overwrite:
        raise MaskSAMError(f"{out} exists: choose another name or pass --overwrite")
    check_output_folder(out.parent, "-o (its folder)")
    ckpt = load_checkpoint(resolve_run(run))
    if ckpt.get("kind") == MODEL_KIND:
        raise MaskSAMError(f"{run} is already a model file")
    dtype = torch.float16 if half else torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    history: list[dict[str, Any]] = ckpt.get("history") or []
    scored = [row for row in history if row.get("val_mean_dice") is not None]
    best = max(scored, key=lambda row: row["val_mean_dice"]) if scored else None
    summary = {
        "epochs": ckpt.get("epoch"),
        "best_epoch": best.get("epoch") if best else None,
        "val_mean_dice": best.get("val_mean_dice") if best else None,
        "val_dice": best.get("val_dice") if best else None,
        "seconds": sum(float(row.get("seconds", 0.0)) for row in history),
        "config": _portable(ckpt.get("config") or {}),
    }
    model = {
        "kind": MODEL_KIND, "format": 1, "model": state, "build": ckpt["build"],
        "base_weights": {k: v for k, v in (ckpt.get("base_weights") or {}).items() if k != "path"},
        "sam": ckpt.get("sam"), "plans": ckpt["plans"], "class_names": ckpt["class_names"], "summary": summary,
    }
    atomic_save(model, out)
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
