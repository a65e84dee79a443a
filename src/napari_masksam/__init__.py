"""napari plugin for MaskSAM segmentation (widgets, reader, writer, sample data)."""

__version__ = "0.1.0"
