"""DICOM series reading for :mod:`masksam_core.io` (through SimpleITK/GDCM, imported on use).

Read only: a folder holding the files of one series, or one ``.dcm``
file, which selects the series it belongs to among the files of its folder (subfolders are not
searched). A folder with several series is an error that lists them (series UID, file count,
description): pass one file of the wanted series, or move each series into its own folder. Slices
are sorted by their position along the slice normal (ImagePositionPatient projected on the cross
product of the ImageOrientationPatient row and column directions); unevenly spaced or duplicated
positions (missing slices, several echoes or time points in one series) are an error. The array is
(Z, Y, X) with Z along the normal, spacing (sz, sy, sx) from PixelSpacing and the position step, and
the affine is converted from DICOM's LPS world to NIfTI's RAS world (x and y negated), so
``world_ras = affine @ [x, y, z, 1]`` as for NIfTI; its third column is the actual step between
slice positions (a tilted-gantry series keeps its shear). Results for a DICOM input are written as
NIfTI (or TIFF) with that affine and a fresh header (qform/sform code 1, scanner); writing DICOM
(e.g. DICOM-SEG) is not supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .errors import MaskSAMError
from .io import SUPPORTED, ImageGeometry

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_DICOM_HELP = "convert it with dcm2niix, or export the series to NIfTI"


def _sitk() -> Any:
    try:
        import SimpleITK
    except ImportError as error:
        raise MaskSAMError("reading DICOM needs SimpleITK: pip install SimpleITK (or convert the series to "
                           "NIfTI with dcm2niix)") from error
    return SimpleITK


def _dicom_files(path: Path) -> list[str]:
    """The files of the one DICOM series at ``path`` (a folder, or one file of the series), unsorted."""
    sitk = _sitk()
    folder, wanted = (path, None) if path.is_dir() else (path.parent, path)
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM prints "No Series were found" on stderr
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if wanted is not None:
        series = {u: f for u, f in series.items() if any(Path(n).samefile(wanted) for n in f)}
        if not series:
            raise MaskSAMError(f"{path}: not a readable DICOM image file; {_DICOM_HELP}")
    if not series:
        raise MaskSAMError(f"{path}: no DICOM series found in this folder (subfolders are not searched); give "
                           f"the folder that directly holds the .dcm files of one series, or a {SUPPORTED} file")
    if len(series) > 1:
        listing = "; ".join(f"{uid} ({len(f)} files, {_dicom_description(f[0], path)})"
                            for uid, f in series.items())
        raise MaskSAMError(f"{path}: {len(series)} DICOM series in one folder: {listing}. Give one file of the "
                           "series you want (e.g. FOLDER/IM0001.dcm), or move each series into its own folder")
    return list(next(iter(series.values())))


def _dicom_header(file: str, path: Path) -> Any:
    """SimpleITK's reader of ``file`` with its header read (no pixel data)."""
    reader = _sitk().ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise MaskSAMError(f"{path}: cannot read the DICOM header of {file} ({error}); the file is corrupt "
                           f"or not DICOM: remove it, or {_DICOM_HELP}") from error
    return reader


def _dicom_description(file: str, path: Path) -> str:
    reader = _dicom_header(file, path)
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else "no description"


def _dicom_series(path: Path) -> tuple[list[str], ImageGeometry]:
    """(files sorted along the slice normal, geometry) of the DICOM series at ``path``, from headers only."""
    files = _dicom_files(path)
    infos = [_dicom_header(f, path) for f in files]
    first = infos[0]
    if first.GetNumberOfComponents() != 1:
        raise MaskSAMError(f"{path}: a colour (RGB) DICOM series; give a greyscale series")
    size = first.GetSize()
    direction = np.asarray(first.GetDirection(), dtype=np.float64).reshape(3, 3)  # columns: row, col, normal
    sx, sy, sz = (float(v) for v in first.GetSpacing())
    if len(files) == 1:  # a multi-frame file: SimpleITK gives the geometry of the whole volume
        if size[2] < 2:
            raise MaskSAMError(f"{path}: the DICOM series has one 2D slice; a 3D volume needs a series of "
                               "several slices (or one multi-frame file)")
        axes = direction * np.array([sx, sy, sz])
        origin = np.asarray(first.GetOrigin(), dtype=np.float64)
    else:
        if any(i.GetSize()[:2] != size[:2] for i in infos):
            raise MaskSAMError(f"{path}: the slices of this DICOM series differ in size; {_DICOM_HELP}")
        origins = np.array([i.GetOrigin() for i in infos], dtype=np.float64)
        order = np.argsort(origins @ direction[:, 2], kind="stable")
        files, origins = [files[i] for i in order], origins[order]
        steps = np.diff(origins @ direction[:, 2])
        if steps.min() < 1e-3:
            raise MaskSAMError(f"{path}: several slices of this DICOM series share one position (several "
                               "echoes, time points or acquisitions in one series?); split it, or "
                               f"{_DICOM_HELP}")
        if steps.max() - steps.min() > max(0.05 * steps.mean(), 0.01):
            raise MaskSAMError(f"{path}: the slices of this DICOM series are unevenly spaced ({steps.min():.3f} "
                               f"to {steps.max():.3f} mm; missing slices?); {_DICOM_HELP}")
        step = (origins[-1] - origins[0]) / (len(files) - 1)
        axes = np.column_stack([direction[:, 0] * sx, direction[:, 1] * sy, step])
        origin = origins[0]
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = _LPS_TO_RAS @ axes, _LPS_TO_RAS @ origin
    header = nib.Nifti1Header()
    header.set_sform(affine, code=1)
    vx, vy, vz = np.linalg.norm(affine[:3, :3], axis=0)
    unit = affine[:3, :3] / np.array([vx, vy, vz])
    if np.allclose(unit.T @ unit, np.eye(3), atol=1e-6):
        header.set_qform(affine, code=1)  # a qform cannot hold a shear (tilted gantry)
    depth = len(files) if len(files) > 1 else size[2]
    return files, ImageGeometry(affine, (float(vz), float(vy), float(vx)), (depth, size[1], size[0]), "dicom",
                                header, path)


def _read_dicom(path: Path) -> tuple[np.ndarray, ImageGeometry]:
    files, geometry = _dicom_series(path)
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)  # in our order: along the slice normal
    try:
        data = sitk.GetArrayFromImage(reader.Execute())  # (Z, Y, X), rescale slope/intercept applied
    except RuntimeError as error:
        raise MaskSAMError(f"{path}: cannot read the DICOM pixel data ({error}); {_DICOM_HELP}") from error
    if data.shape != geometry.shape:
        raise MaskSAMError(f"{path}: DICOM pixel data of shape {data.shape} do not match the headers "
                           f"{geometry.shape}; {_DICOM_HELP}")
    return np.ascontiguousarray(data), geometry


# format -> (reader of (array (Z, Y, X), geometry), reader of the geometry alone)
