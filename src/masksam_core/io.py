"""Reading and writing 3D images and label maps with their geometry (NIfTI, 3D TIFF).

One module serves the command line, the trainer and the napari plugin.

Axis convention (project-wide): an array in memory has axes **(Z, Y, X)**, axis 0 the slice axis.

* NIfTI: nibabel's array has the file's voxel axes (i, j, k). ``read_image`` returns
  ``data.transpose(2, 1, 0)``, so ``array[z, y, x] == nibabel_array[x, y, z]`` with
  (i, j, k) = (x, y, z); writing transposes back. ``ImageGeometry.affine`` is the file's own
  affine and maps the *file* voxel index (i, j, k) = (x, y, z) -- the reversed array index -- to
  world millimetres: ``world = affine @ [x, y, z, 1]``.
* TIFF: tifffile's stack is already (Z, Y, X); the affine is ``diag(sx, sy, sz, 1)``, so the same
  rule (file index = reversed array index) holds for both formats.

``spacing`` is (sz, sy, sx) in mm: the lengths of the affine's columns k, j, i.

Sidecar files: a TIFF's spacing can come from ``<file>.json`` (``scan.tif.json``) or, as nnU-Net v2
writes it, ``<stem>.json`` (``scan.json``), holding ``{"spacing": [sz, sy, sx]}``; class names
are written to ``<stem>.classes.json``. Readers are chosen by :func:`image_format`.

DICOM (read only, through SimpleITK): a series folder or one ``.dcm`` file, read as (Z, Y, X) along the
slice normal with an RAS affine; the rules are in :mod:`masksam_core.io_dicom`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import tifffile

from .errors import MaskSAMError
from .files import IMAGE_SUFFIXES, NIFTI_SUFFIXES, TIFF_SUFFIXES, atomic_path, split_suffix
from .io_tiff import tiff_spacing

__all__ = ["CT_WINDOW", "ImageGeometry", "classes_sidecar", "compare_geometry", "image_format",
           "read_classes_sidecar", "read_geometry", "read_image", "spacing_sidecar", "write_image", "write_labels"]

CT_WINDOW = (-160.0, 240.0)  # how CT is shown (napari, the demo montage): soft tissue, level 40 HU, width 400 HU
SUPPORTED = "NIfTI (.nii, .nii.gz), 3D TIFF (.tif, .tiff) or DICOM (.dcm, or a series folder)"


@dataclass
class ImageGeometry:
    """Where a (Z, Y, X) array lives in the world, and how to write it back.

    affine: (4, 4) float64, file voxel index (i, j, k) = (x, y, z) -> world mm (see module doc).
    spacing: (sz, sy, sx) mm. shape: (Z, Y, X). format: ``'nifti'``, ``'tiff'`` or ``'dicom'``.
    header: the nibabel header (NIfTI; for DICOM a fresh one holding the affine) or None.
    source: the file or DICOM folder read, or None.
    """

    affine: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    format: str = "nifti"
    header: Any = field(default=None, repr=False)
    source: Path | None = None

    @classmethod
    def from_spacing(cls, shape: tuple[int, ...], spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
                     format: str = "nifti") -> ImageGeometry:
        """Axis-aligned geometry for a (Z, Y, X) array of ``shape`` with (sz, sy, sx) ``spacing``."""
        sz, sy, sx = (float(s) for s in spacing)
        return cls(np.diag([sx, sy, sz, 1.0]), (sz, sy, sx), _shape3(shape), format)

    @property
    def origin(self) -> np.ndarray:
        """World position (mm) of voxel (0, 0, 0), shape (3,)."""
        return self.affine[:3, 3].copy()


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise MaskSAMError(f"expected a 3D (Z, Y, X) shape, got {tuple(shape)}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


# --------------------------------------------------------------------------- paths


def image_format(path: str | os.PathLike) -> str:
    """``'nifti'``, ``'tiff'`` or ``'dicom'`` (a folder or ``.dcm`` file) from ``path``'s suffix."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if path.is_dir() or name.endswith(".dcm"):
        return "dicom"
    raise MaskSAMError(f"{path}: unsupported file type; give a {SUPPORTED} file")


def spacing_sidecar(path: str | os.PathLike) -> Path:
    """The spacing sidecar written next to a TIFF: ``scan.tif`` -> ``scan.tif.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def classes_sidecar(path: str | os.PathLike) -> Path:
    """The class-names sidecar of a label file: ``seg.nii.gz`` -> ``seg.classes.json``."""
    path = Path(path)
    return path.with_name(split_suffix(path)[0] + ".classes.json")


def read_classes_sidecar(path: str | os.PathLike) -> dict[int, str] | None:
    """Class id -> name from the ``.classes.json`` sidecar of label file ``path``, None without one;
    OSError when it cannot be read, ValueError when it is not ``{"1": "liver", ...}``."""
    sidecar = classes_sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        return {int(k): str(v) for k, v in json.loads(sidecar.read_text(encoding="utf-8")).items()}
    except (TypeError, AttributeError) as error:
        raise ValueError(str(error)) from error


# --------------------------------------------------------------------------- reading


def _check_3d(shape: tuple[int, ...], path: Path, order: str) -> None:
    if len(shape) != 3:
        kind = f"{len(shape)}D" if len(shape) else "empty"
        raise MaskSAMError(
            f"{path}: found a {kind} image of shape {tuple(shape)}; expected a 3D volume "
            f"({order}). Give one 3D file per channel (nnU-Net layout: case_0000, case_0001, ...), "
            "and stack 2D slices into a 3D file first.")


def _nifti_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop singleton axes beyond the third ((X, Y, Z, 1) is a 3D volume)."""
    return tuple(shape[:3]) if len(shape) > 3 and set(shape[3:]) == {1} else tuple(shape)


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image):  # a Nifti2Image is one too
            raise TypeError(f"not a NIfTI image but {type(image).__name__}")
        return image
    except Exception as error:  # nibabel raises many types for broken files
        raise MaskSAMError(f"{path}: cannot read this NIfTI file ({error}); the file is corrupt, "
                           "truncated or not NIfTI: re-export or re-download it") from error


def _nifti_geometry(img: Any, path: Path) -> ImageGeometry:
    if img.get_data_dtype().fields is not None:  # RGB24 / RGBA32: one record of colour values per voxel
        raise MaskSAMError(f"{path}: a colour (RGB) NIfTI image; MaskSAM segments grey-value scans: give the "
                           "scan itself, not a coloured rendering of it")
    shape = _nifti_shape(img.shape)
    _check_3d(shape, path, "NIfTI axes i, j, k")
    affine = np.asarray(img.affine, dtype=np.float64)
    sx, sy, sz = (float(v) for v in nib.affines.voxel_sizes(affine))
    return ImageGeometry(affine, (sz, sy, sx), _shape3(shape[::-1]), "nifti", img.header, path)


def _read_nifti(path: Path) -> tuple[np.ndarray, ImageGeometry]:
    img = _load_nifti(path)
    geometry = _nifti_geometry(img, path)
    try:
        data = np.asanyarray(img.dataobj)  # scaled by scl_slope/inter; raw dtype when unscaled
    except Exception as error:
        raise MaskSAMError(f"{path}: the voxel data cannot be read ({error}); the file is corrupt "
                           "or truncated: re-export or re-download it") from error
    data = data.reshape(_nifti_shape(data.shape))
    return np.ascontiguousarray(data.transpose(2, 1, 0)), geometry


def _tiff(path: Path, load: bool) -> tuple[np.ndarray, ImageGeometry]:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if series.axes.endswith("S"):  # (..., Y, X, samples): colour pixels
                raise MaskSAMError(f"{path}: a colour (RGB) image of shape {series.shape}; "
                                   "save a greyscale 3D stack (Z, Y, X) instead")
            _check_3d(tuple(series.shape), path, f"Z, Y, X; this file's axes are {series.axes}")
            if series.axes[0] == "T":  # an ImageJ time series ("frames") or OME SizeT
                raise MaskSAMError(f"{path}: {series.shape[0]} time points of 2D images (axes {series.axes}), not a "
                                   "3D scan; if these planes are Z slices, re-save the file as a Z stack (Fiji: "
                                   "Image > Properties, slices = their number, frames = 1; tifffile: "
                                   "metadata={'axes': 'ZYX'})")
            if series.axes[0] == "C":  # tifffile's default for any 3D ImageJ or OME array: read as Z
                warnings.warn(f"{path}: the file calls its {series.shape[0]} planes channels (axes {series.axes}); "
                              "reading them as Z slices. Save the stack with axes ZYX to say so", stacklevel=3)
            spacing = tiff_spacing(path, tif, (spacing_sidecar(path),
                                               path.with_name(split_suffix(path)[0] + ".json")))
            data = np.ascontiguousarray(series.asarray()) if load else np.empty(0)  # empty: geometry only
    except MaskSAMError:
        raise
    except Exception as error:
        raise MaskSAMError(f"{path}: cannot read this TIFF file ({error}); the file is corrupt, "
                           "truncated or not a TIFF: re-export it") from error
    sz, sy, sx = spacing
    geometry = ImageGeometry(np.diag([sx, sy, sz, 1.0]), spacing, _shape3(series.shape), "tiff", None, path)
    return data, geometry


# --------------------------------------------------------------------------- DICOM

def _dicom() -> Any:
    from . import io_dicom  # SimpleITK is only needed for DICOM input

    return io_dicom


_READERS: dict[str, tuple[Callable[[Path], tuple[np.ndarray, ImageGeometry]],
                          Callable[[Path], ImageGeometry]]] = {
    "nifti": (_read_nifti, lambda path: _nifti_geometry(_load_nifti(path), path)),
    "tiff": (lambda path: _tiff(path, load=True), lambda path: _tiff(path, load=False)[1]),
    "dicom": (lambda path: _dicom()._read_dicom(path), lambda path: _dicom()._dicom_series(path)[1]),
}


def _existing(path: str | os.PathLike) -> tuple[Path, str]:
    path = Path(path)
    fmt = image_format(path)
    if not path.exists():
        raise MaskSAMError(f"{path}: file not found; check the path")
    if fmt not in _READERS:
        raise MaskSAMError(f"{path}: {fmt.upper()} input is not supported here; convert it to "
                           f"{SUPPORTED} (e.g. dcm2niix for DICOM)")
    return path, fmt


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageGeometry]:
    """Read a 3D image or label map: (array (Z, Y, X), geometry).

    NIfTI values are scaled as nibabel does (integer files without scaling stay integer); TIFF
    spacing comes from a sidecar JSON, ImageJ metadata or defaults to 1.0 mm with a warning.
    Raises MaskSAMError for missing, unsupported, corrupt, 2D or 4D+ files.
    """
    path, fmt = _existing(path)
    return _READERS[fmt][0](path)


def read_geometry(path: str | os.PathLike) -> ImageGeometry:
    """The geometry of an image file, reading only its header (no voxel data)."""
    path, fmt = _existing(path)
    return _READERS[fmt][1](path)


def compare_geometry(a: ImageGeometry, b: ImageGeometry, *, spacing_rtol: float = 1e-3,
                     origin_atol: float = 1e-2, direction_atol: float = 1e-3) -> str | None:
    """Why ``a`` and ``b`` do not describe the same voxel grid, or None when they do (in tolerance)."""
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape} (Z, Y, X)"
    if not np.allclose(a.spacing, b.spacing, rtol=spacing_rtol, atol=0):
        return (f"spacing {np.round(a.spacing, 4).tolist()} vs {np.round(b.spacing, 4).tolist()} "
                "mm (sz, sy, sx)")
    if not np.allclose(a.origin, b.origin, rtol=0, atol=origin_atol):
        return f"origin {np.round(a.origin, 3).tolist()} vs {np.round(b.origin, 3).tolist()} mm"
    da = a.affine[:3, :3] / np.maximum(np.linalg.norm(a.affine[:3, :3], axis=0), 1e-12)
    db = b.affine[:3, :3] / np.maximum(np.linalg.norm(b.affine[:3, :3], axis=0), 1e-12)
    if not np.allclose(da, db, rtol=0, atol=direction_atol):
        return f"axis directions differ ({np.round(da, 3).tolist()} vs {np.round(db, 3).tolist()})"
    return None


# --------------------------------------------------------------------------- writing


def _output_format(path: Path) -> str:
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise MaskSAMError(f"{path}: cannot write this file type; name it .nii.gz, .nii, .tif or .tiff")
    return image_format(path)


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    for target in paths:
        if target.exists() and not overwrite:
            raise MaskSAMError(f"{target} already exists; pass --overwrite (overwrite=True) to "
                               "replace it, or choose another output name")


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as error:
        raise MaskSAMError(f"{path}: cannot write ({error}); check the folder exists, is writable "
                           "and has free space") from error


def _write_json(path: Path, content: dict[str, Any]) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8"))


def _save_nifti(tmp: Path, data_zyx: np.ndarray, geometry: ImageGeometry, intent: str) -> None:
    """Write (Z, Y, X) data as NIfTI with ``geometry``'s header and exact affine, unscaled."""
    data = data_zyx.transpose(2, 1, 0)  # -> file order (i, j, k) = (x, y, z)
    header, affine = geometry.header, np.asarray(geometry.affine, dtype=np.float64)
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    if not isinstance(header, nib.Nifti1Header):
        header = klass(data, affine).header  # fresh header: sform code 2 (aligned)
    header = header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent(intent)
    header["cal_min"], header["cal_max"] = 0.0, 0.0
    if not np.array_equal(header.get_best_affine(), affine):  # a changed affine: keep the codes
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        header.set_sform(affine, code=scode or 2)
        if qcode:
            header.set_qform(affine, code=qcode)
    img = klass(data, None, header=header)  # affine None: the header is written verbatim
    img.set_data_dtype(data.dtype)
    img.to_filename(tmp)


def _save_tiff(tmp: Path, data_zyx: np.ndarray, geometry: ImageGeometry) -> None:
    """Write (Z, Y, X) data as an ImageJ hyperstack with its spacing in mm."""
    sz, sy, sx = geometry.spacing
    tifffile.imwrite(tmp, data_zyx, imagej=True, resolution=(1.0 / sx, 1.0 / sy),
                     metadata={"spacing": sz, "unit": "mm", "axes": "ZYX"})


def _write_volume(path: Path, data: np.ndarray, geometry: ImageGeometry, overwrite: bool,
                  intent: str, extra: dict[Path, dict[str, Any]]) -> Path:
    fmt = _output_format(path)
    if fmt == "tiff":
        extra = {spacing_sidecar(path): {"spacing": [float(s) for s in geometry.spacing]}, **extra}
    _refuse_existing([path, *extra], overwrite)
    if fmt == "nifti":
        _atomic(path, lambda tmp: _save_nifti(tmp, data, geometry, intent))
    else:
        _atomic(path, lambda tmp: _save_tiff(tmp, data, geometry))
    for sidecar, content in extra.items():
        _write_json(sidecar, content)
    return path


def _check_shape(array: np.ndarray, geometry: ImageGeometry, what: str) -> None:
    if array.ndim != 3 or tuple(array.shape) != tuple(geometry.shape):
        raise MaskSAMError(f"{what} of shape {tuple(array.shape)} do not match the image geometry "
                           f"{tuple(geometry.shape)} (Z, Y, X); write one 3D volume of the image's "
                           "shape")


def write_labels(path: str | os.PathLike, labels: np.ndarray, geometry: ImageGeometry, *,
                 class_names: dict[int, str] | None = None, overwrite: bool = False) -> Path:
    """Write a label map (Z, Y, X) of integers >= 0 with ``geometry``; returns ``path``.

    NIfTI: the geometry's header and exact affine (qform/sform codes kept), dtype uint8 when the
    maximum is below 256 else int16, no intensity scaling. TIFF: uint8/uint16 ImageJ stack with
    spacing plus the ``<file>.json`` sidecar. ``class_names`` go to ``<stem>.classes.json``.
    The file is written to a temporary name in the same folder and renamed (atomic).
    """
    path, labels = Path(path), np.asarray(labels)
    _check_shape(labels, geometry, "labels")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise MaskSAMError(f"labels have dtype {labels.dtype}; pass integer class ids (e.g. the "
                           "argmax of the probabilities)")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    limit = 32767 if _output_format(path) == "nifti" else 65535
    if low < 0 or high > limit:
        raise MaskSAMError(f"label values must lie in 0..{limit}, found {low}..{high}")
    dtype = np.uint8 if high < 256 else (np.int16 if limit == 32767 else np.uint16)
    extra = {}
    if class_names is not None:
        names = {str(int(k)): str(v) for k, v in sorted(class_names.items())}
        check_classes_sidecar(path, names)
        extra[classes_sidecar(path)] = names
    return _write_volume(path, labels.astype(dtype), geometry, overwrite, "label", extra)


def check_classes_sidecar(path: Path, names: dict[str, str]) -> None:
    """Refuse to rewrite the class names of another label file that shares ``path``'s stem
    (``seg.nii.gz`` and ``seg.tif`` both use ``seg.classes.json``) with different names."""
    sidecar = classes_sidecar(path)
    stem = split_suffix(path)[0]
    others = [path.with_name(stem + suffix) for suffix in IMAGE_SUFFIXES]
    others = [o for o in others if o.name != path.name and o.exists()]
    if not others or not sidecar.is_file():
        return
    try:
        current = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if current != names:
        raise MaskSAMError(f"{sidecar.name} holds the class names of {others[0].name}, which differ from these "
                           f"labels'; writing {path.name} would rename its classes: save it under another name "
                           f"(e.g. {stem}_2{split_suffix(path)[1]})")


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: ImageGeometry, *,
                overwrite: bool = False) -> Path:
    """Write a float image (Z, Y, X) as float32 with ``geometry`` (atomic, like write_labels)."""
    path, array = Path(path), np.asarray(array)
    _check_shape(array, geometry, "image values")
    return _write_volume(path, array.astype(np.float32), geometry, overwrite, "none", {})
