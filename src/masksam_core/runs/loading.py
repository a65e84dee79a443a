"""Reading run files and rebuilding the trained network from them.

Files are read with ``weights_only=True`` (no code runs while unpickling). A run is rebuilt from its
``build`` on the frozen base weights it was trained on: those of the weights cache (or a file given),
checked against the sha256 the run recorded, or the random ones the file itself carries (``tiny``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MaskSAMError
from .finding import resolve_run
from .runfile import FORMAT, MODEL_KIND, RUN_KIND, RunFile

if TYPE_CHECKING:
    import torch

    from ..modeling.masksam import MaskSAM


def load_checkpoint(path: str | Path) -> RunFile:
    """Read a run checkpoint or model file (``weights_only=True``) with clear errors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MaskSAMError(f"checkpoint not found: {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means a bad file
        raise MaskSAMError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); the file is corrupt or "
            "not a MaskSAM checkpoint: use checkpoint_best.pt / checkpoint_last.pt of a run folder"
        ) from None
    if not isinstance(saved, dict) or saved.get("kind") not in (RUN_KIND, MODEL_KIND):
        raise MaskSAMError(f"{path} is not a MaskSAM run checkpoint or model file (made by `masksam-core train` "
                           "or `masksam-core export`)")
    if saved.get("format", 0) > FORMAT:
        raise MaskSAMError(f"{path} was written by a newer napari-masksam: upgrade the package to read it")
    try:
        return RunFile.from_dict(saved)
    except (KeyError, TypeError) as error:
        raise MaskSAMError(f"{path} is incomplete ({type(error).__name__}: {error}): the file is damaged; use "
                           "another checkpoint of the run, or export the model again") from None


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


def load_run(path: str | os.PathLike[str], *, base_checkpoint: str | os.PathLike[str] | None = None,
             device: torch.device | str = "cpu") -> tuple[MaskSAM, RunFile]:
    """Rebuild a trained MaskSAM from a run folder, checkpoint or model file, or a bundled model's name,
    in eval mode.

    The frozen base weights come from the weights cache (or ``base_checkpoint``) and must
    have the sha256 recorded at training time; random base weights (``tiny``) are stored
    in the file itself. Returns (model, run file).
    """
    from .. import weights
    from ..modeling import build_model

    file = resolve_run(path)
    run = load_checkpoint(file)
    base = run.base_weights or {}
    pretrained = run.sam is None
    model = build_model(run.build.preset, base_checkpoint, pretrained=pretrained, **run.build.model_kwargs())
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
    if run.sam is not None:  # random base weights (tiny) travel with the run
        load_state(model.sam, run.sam, strict=True, source=file)
    load_trainable(model, run.model, source=file)
    return model.to(device).eval(), run
