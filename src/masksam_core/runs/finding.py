"""Finding runs: a run folder's checkpoint, the bundled models by name, and a run's prompt mode.

Nothing here imports torch, so the napari plugin can list runs without loading the network code.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from importlib import resources
from pathlib import Path

from ..errors import MaskSAMError

#: Bundled model name -> file in ``masksam_core/assets`` (its model card: the same name, ``.md``).
BUNDLED: dict[str, str] = {"abdomen-ct-lite": "abdomen-ct-lite.pt"}

#: The checkpoints of a run folder, in the order a run is loaded from them.
CHECKPOINT_NAMES = ("checkpoint_best.pt", "checkpoint_last.pt")

_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def asset_path(name: str) -> Path:
    """A real file system path of the packaged file ``masksam_core/assets/name`` (extracted once from
    a zipped install). The file may not exist: callers check."""
    resource = resources.files("masksam_core").joinpath("assets").joinpath(name)
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


def find_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A bundled model's file for its name; any other value is returned as a path."""
    text = str(name_or_path)
    if text in BUNDLED and not Path(text).exists():
        path = asset_path(BUNDLED[text])
        if not path.is_file():
            raise MaskSAMError(f"the bundled model {text!r} is missing from this installation ({path}): "
                               "reinstall napari-masksam")
        return path
    return Path(name_or_path)


def _folder_checkpoint(folder: Path) -> Path | None:
    """A run folder's checkpoint_best.pt, else its checkpoint_last.pt, else None."""
    return next((folder / name for name in CHECKPOINT_NAMES if (folder / name).is_file()), None)


def resolve_run(path: str | os.PathLike[str]) -> Path:
    """The file of a run folder (its checkpoint_best.pt, else checkpoint_last.pt), a checkpoint or model
    file, or the name of a bundled model (``abdomen-ct-lite``); raises for a folder without checkpoints."""
    path = find_model(path)
    if path.is_dir():
        found = _folder_checkpoint(path)
        if found is None:
            raise MaskSAMError(f"{path} holds no checkpoint_best.pt or checkpoint_last.pt: is it a training run "
                               "folder?")
        return found
    return path


def checkpoint_of(path: str | os.PathLike) -> Path | None:
    """The checkpoint a run folder (``checkpoint_best.pt``, else ``checkpoint_last.pt``) or ``.pt``
    file stands for, or None when ``path`` is neither (no error: for listing what may be a run)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _folder_checkpoint(path)
    return path if path.is_file() and path.suffix == ".pt" else None


def run_prompt_mode(path: str | os.PathLike) -> str | None:
    """``auto`` or ``gt`` from the run's ``config.json`` (the trainer writes it), None when unknown.
    Reads the small settings file, not the checkpoint, so that listing runs stays quick."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        mode = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("prompt_mode")
    except (OSError, ValueError, AttributeError):
        return None
    return str(mode) if mode else None
