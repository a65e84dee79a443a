"""Sample data: one abdominal CT (3 mm) with 8 organ labels, shipped in ``masksam_core/assets/``.

Source: TotalSegmentator 2.18.0 (Apache-2.0); the labels are its predictions (silver standard),
remapped to the Synapse/BTCV organs. See ``masksam_core/assets/README.md`` and ``NOTICE`` beside it.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

from ._reader import LayerData, read_layer_data

__all__ = ["SAMPLE_CLASS_NAMES", "abdomen_ct", "sample_paths"]

SAMPLE_CLASS_NAMES: tuple[str, ...] = ("background", "spleen", "kidney_right", "kidney_left", "gallbladder",
                                       "liver", "stomach", "pancreas", "aorta")
"""Class names of the sample labels, row i = label value i."""

IMAGE_FILE = "abdomen_ct.nii.gz"
LABELS_FILE = "abdomen_ct_labels.nii.gz"

_files = contextlib.ExitStack()
atexit.register(_files.close)


def _resource(name: str) -> Path:
    """A real file system path of the packaged file ``masksam_core/assets/name``."""
    resource = resources.files("masksam_core").joinpath("assets", name)
    if isinstance(resource, Path):
        return resource
    return _files.enter_context(resources.as_file(resource))  # a zipped install: extract once


def sample_paths() -> tuple[Path, Path]:
    """(image path, labels path) of the sample CT and its organ label map (NIfTI, same affine)."""
    return _resource(IMAGE_FILE), _resource(LABELS_FILE)


def abdomen_ct() -> list[LayerData]:
    """napari sample: [(CT (Z, Y, X) int16 HU, image kwargs, "image"),
    (organ labels (Z, Y, X) uint8, labels kwargs with features and geometry, "labels")]."""
    image_path, labels_path = sample_paths()
    return [read_layer_data(image_path), read_layer_data(labels_path)]  # the labels' sidecar names the organs
