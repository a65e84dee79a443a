"""Sample data: one abdominal CT (3 mm) with 8 organ labels, shipped in ``masksam_core/assets/``.

Source: TotalSegmentator 2.18.0 (Apache-2.0); the labels are its predictions (silver standard),
remapped to the Synapse/BTCV organs. See ``masksam_core/assets/README.md`` and ``NOTICE`` beside it.
"""

from __future__ import annotations

from masksam_core.demo import SAMPLE_CLASSES, sample_paths

from ._reader import LayerData, read_layer_data

__all__ = ["SAMPLE_CLASS_NAMES", "abdomen_ct", "sample_paths"]

SAMPLE_CLASS_NAMES: tuple[str, ...] = SAMPLE_CLASSES
"""Class names of the sample labels, row i = label value i."""


def abdomen_ct() -> list[LayerData]:
    """napari sample: [(CT (Z, Y, X) int16 HU, image kwargs, "image"),
    (organ labels (Z, Y, X) uint8, labels kwargs with features and geometry, "labels")]."""
    image_path, labels_path = sample_paths()
    return [read_layer_data(image_path), read_layer_data(labels_path)]  # the labels' sidecar names the organs
