"""napari reader: NIfTI, 3D TIFF and DICOM scans (and MaskSAM label maps) with their geometry.

``napari_get_reader(path)`` decides cheaply, from the name and the file header, whether
MaskSAM reads ``path``; it never raises, and returns ``None`` for anything else (2D or RGB
images, folders without DICOM files, missing or corrupt files), so that napari tries other
readers. The reader function it returns raises :class:`masksam_core.errors.MaskSAMError` with
a message saying what is wrong when reading fails after all (napari shows that message in its
"Choose reader" dialog and offers the other readers).

Layers: a scan is an Image layer with ``scale`` = its spacing (sz, sy, sx) mm, ``translate`` = the
position of its first voxel along its own axes (so a scan and crops of it overlay), a soft-tissue
window for CT or the 0.5--99.5 percentiles otherwise, and its :class:`~masksam_core.io.ImageGeometry`
(affine, NIfTI header, source) in ``metadata["masksam"]``. A file with a class-names sidecar
(``seg.classes.json`` next to ``seg.nii.gz``, as MaskSAM writes them) is a label map: a Labels
layer with ``features`` (``index``, ``name``) and the same geometry metadata.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from masksam_core.errors import MaskSAMError
from masksam_core.files import NIFTI_SUFFIXES, TIFF_SUFFIXES, is_image_name, split_suffix
from masksam_core.io import ImageGeometry, classes_sidecar, read_classes_sidecar, read_geometry, read_image

from ._layers import GEOMETRY_KEY, image_layer_kwargs, scan_translate

__all__ = ["layer_name", "napari_get_reader", "read_layer_data", "read_paths"]

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]
LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[PathOrPaths], list[LayerData]]

_DICOM_SCAN_LIMIT = 256  # files of a folder whose header is checked for the DICOM magic


# --------------------------------------------------------------------------- cheap checks


def _is_dicom_file(path: Path) -> bool:
    """True when ``path`` starts like a DICOM file: the ``DICM`` magic after the 128-byte
    preamble, or (``.dcm`` files without preamble) a group 0002/0008 tag."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    return path.name.lower().endswith(".dcm") and len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")


def _dicom_files_in(folder: Path, enough: int = 2) -> list[Path]:
    """Up to ``enough`` DICOM files directly in ``folder`` (subfolders are not searched)."""
    found: list[Path] = []
    try:
        with os.scandir(folder) as entries:
            for n, entry in enumerate(entries):
                if n >= _DICOM_SCAN_LIMIT or len(found) >= enough:
                    break
                if entry.is_file() and not entry.name.startswith(".") and _is_dicom_file(Path(entry.path)):
                    found.append(Path(entry.path))
    except OSError:
        return []
    return found


def _frames(file: Path) -> int:
    """Frames (slices) in one DICOM file, from its header; 0 when it cannot be read."""
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        reader.ReadImageInformation()
        size = reader.GetSize()
        return int(size[2]) if len(size) > 2 else 1
    except Exception:  # not readable here: the full reader says why, if asked
        return 0


def _holds_dicom_volume(folder: Path, file: Path | None = None) -> bool:
    """True when ``folder`` (holding ``file``, if given) has a 3D DICOM series: several DICOM files,
    or one multi-frame file. A lone 2D slice is left to other readers."""
    files = _dicom_files_in(folder)
    if len(files) >= 2:
        return True
    single = file if file is not None else (files[0] if files else None)
    return single is not None and _frames(single) >= 2


def _readable_tiff(path: Path) -> bool:
    """True for a greyscale 3D TIFF stack (headers only; no pixel data read)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return (len(series.shape) == 3 and not series.axes.endswith("S") and series.axes[0] != "T"
                    and min(series.shape) > 0)  # not colour or a time series (other readers take those)
    except Exception:  # tifffile raises many types for files it cannot parse
        return False


def _readable_nifti(path: Path) -> bool:
    """True for a NIfTI file with a 3D volume (header only)."""
    try:
        read_geometry(path)
    except Exception:  # MaskSAMError, or anything nibabel raises for a broken file
        return False
    return True


def _accepts(path: Path) -> bool:
    """Whether MaskSAM can read ``path``, judged from its name and header alone."""
    name = path.name.lower()
    if path.is_dir():
        return _holds_dicom_volume(path)
    if not path.is_file():
        return False
    if name.endswith(NIFTI_SUFFIXES):
        return _readable_nifti(path)
    if name.endswith(TIFF_SUFFIXES):
        return _readable_tiff(path)
    if name.endswith(".dcm"):
        return _is_dicom_file(path) and _holds_dicom_volume(path.parent, path)
    return False


def _single_path(path: Any) -> Path | None:
    """The one path to read from napari's ``path`` (a str, or a list when stacking), or None.

    A list of several ``.dcm`` files of one folder (files of one series picked together) reads
    as the series of the first; other lists (stacks of volumes) are left to other readers."""
    if isinstance(path, (str, os.PathLike)):
        return Path(path)
    if not isinstance(path, (list, tuple)) or not path:
        return None
    paths = [Path(p) for p in path if isinstance(p, (str, os.PathLike))]
    if len(paths) != len(path):
        return None
    if len(paths) == 1:
        return paths[0]
    if all(p.name.lower().endswith(".dcm") for p in paths) and len({p.parent for p in paths}) == 1:
        return paths[0]
    return None


def napari_get_reader(path: PathOrPaths) -> ReaderFunction | None:
    """A reader function for ``path`` (npe2 ``get_reader``), or None when MaskSAM cannot read it.

    Accepted: NIfTI (``.nii``, ``.nii.gz``) and TIFF (``.tif``, ``.tiff``) files holding a 3D
    greyscale volume, DICOM (a ``.dcm`` file, or a folder directly holding DICOM files). Never
    raises.
    """
    try:
        single = _single_path(path)
        if single is None or not _accepts(single):
            return None
    except Exception:  # get_reader must never raise: napari would abort opening the file
        return None
    return read_paths


# --------------------------------------------------------------------------- reading


def layer_name(path: str | os.PathLike) -> str:
    """Layer name for ``path``: the file name without its image suffix; a DICOM file or folder
    gives the folder's name."""
    path = Path(path)
    if path.is_dir():
        return path.resolve().name or str(path)
    if path.name.lower().endswith(".dcm"):
        return path.resolve().parent.name or path.stem
    return split_suffix(path)[0] if is_image_name(path) else path.stem


def _sidecar_names(path: Path, labels: np.ndarray) -> list[str] | None:
    """Class names (row i = label i) from ``path``'s ``.classes.json`` sidecar, or None without one."""
    if path.is_dir() or path.name.lower().endswith(".dcm"):
        return None
    try:
        table = read_classes_sidecar(path)
    except (OSError, ValueError) as error:
        warnings.warn(f"{classes_sidecar(path)}: cannot read the class names ({error}); using class_1, class_2, ... "
                      'Fix it to {"0": "background", "1": "liver", ...} or delete it', stacklevel=3)
        table = {}
    if table is None:
        return None
    high = int(labels.max()) if labels.size else 0
    n = max([high, *table]) + 1 if table else high + 1
    return [table.get(i, "background" if i == 0 else f"class_{i}") for i in range(n)]


def labels_kwargs(geometry: ImageGeometry, class_names: Sequence[str], name: str) -> dict[str, Any]:
    """Keyword arguments of a Labels layer (Z, Y, X) with ``geometry`` and class names (row i = label i)."""
    names = [str(n) for n in class_names]
    return {"name": name, "scale": tuple(float(s) for s in geometry.spacing), "translate": scan_translate(geometry),
            "metadata": {GEOMETRY_KEY: geometry, "class_names": names},
            "features": {"index": np.arange(len(names)), "name": names}}


def read_layer_data(path: str | os.PathLike, name: str | None = None) -> LayerData:
    """One layer-data tuple for the scan or label map at ``path``; raises MaskSAMError on failure.

    Returns (array (Z, Y, X), layer kwargs, ``"image"`` or ``"labels"``).
    """
    path = Path(path)
    array, geometry = read_image(path)
    name = name or layer_name(path)
    names = _sidecar_names(path, array)
    if names is None:
        return array, image_layer_kwargs(array, geometry, name), "image"
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise MaskSAMError(f"{path}: has a class-names sidecar ({classes_sidecar(path).name}) but "
                               f"non-integer values ({array.dtype}); a label map holds class ids 0, 1, 2, ...: "
                               "delete the sidecar to open it as an image")
        array = rounded.astype(np.int32)
    if array.size and int(array.min()) < 0:
        raise MaskSAMError(f"{path}: a label map with negative values ({int(array.min())}); class ids are 0, "
                           "1, 2, ...: delete the sidecar to open it as an image")
    return array, labels_kwargs(geometry, names, name), "labels"


def read_paths(path: PathOrPaths) -> list[LayerData]:
    """napari reader function: the layer data of ``path`` (see :func:`napari_get_reader`).

    Raises MaskSAMError (with what to do) when the file cannot be read.
    """
    single = _single_path(path)
    if single is None:
        raise MaskSAMError(f"{path}: MaskSAM reads one scan at a time (NIfTI, 3D TIFF or one DICOM "
                           "series); open the files one by one, without stacking")
    try:
        return [read_layer_data(single)]
    except MaskSAMError:
        raise
    except MemoryError as error:
        raise MaskSAMError(f"{single}: not enough memory to read this scan") from error
    except Exception as error:  # a library failure not anticipated by masksam_core.io
        raise MaskSAMError(f"{single}: cannot read this file ({type(error).__name__}: {error}); it may be "
                           "corrupt: re-export it as NIfTI") from error
