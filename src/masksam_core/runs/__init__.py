"""Runs and model files: the one home of what training saves and what prediction loads.

A *run* is the folder ``masksam-core train --out`` (or the napari Train widget) writes; its
``checkpoint_best.pt`` and ``checkpoint_last.pt`` are run checkpoints (small: trainable weights only,
plus the training state needed to resume). A *model file* is what prediction needs and nothing of
training (``masksam-core export``). Both are run files (:class:`RunFile`, layout in
:mod:`.runfile`). Everything that reads a run (``Predictor``, ``masksam-core predict -m``,
``BoxPrompter``, the napari widgets) reads a model file as well, and a bundled model by its name
(:data:`BUNDLED`)::

    masksam-core export RUN_DIR -o my-model.pt
    masksam-core predict -i scan.nii.gz -o out/ -m my-model.pt
    masksam-core predict -i scan.nii.gz -o out/ -m abdomen-ct-lite

* :mod:`.runfile`: :class:`RunFile` and :class:`BuildSpec`, the typed file;
* :mod:`.finding`: run folders, bundled models, :func:`resolve_run`, :func:`checkpoint_of`,
  :func:`run_prompt_mode` (no torch import);
* :mod:`.loading`: :func:`load_checkpoint`, :func:`load_run` and the strict state loaders;
* :mod:`.export`: :func:`export_model` and ``masksam-core export``.
"""

from __future__ import annotations

from .export import export_model
from .finding import (
    BUNDLED,
    CHECKPOINT_NAMES,
    asset_path,
    bundled_models,
    checkpoint_of,
    find_model,
    model_card_path,
    resolve_run,
    run_prompt_mode,
)
from .loading import (
    base_weights_info,
    load_checkpoint,
    load_run,
    load_state,
    load_trainable,
)
from .runfile import FORMAT, MODEL_KIND, RUN_KIND, BuildSpec, RunFile

__all__ = ["BUNDLED", "CHECKPOINT_NAMES", "FORMAT", "MODEL_KIND", "RUN_KIND", "BuildSpec", "RunFile", "asset_path",
           "base_weights_info", "bundled_models", "checkpoint_of", "export_model", "find_model", "load_checkpoint",
           "load_run", "load_state", "load_trainable", "model_card_path", "resolve_run", "run_prompt_mode"]
