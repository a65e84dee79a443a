"""DICOM series reading (io.read_image on a folder or a .dcm file).

Reference: the same volume written by SimpleITK as NIfTI (SimpleITK converts its LPS geometry to
RAS itself) and read back through the NIfTI path; plus hand-computed affines for an axial series.
The series are written slice by slice with SimpleITK's GDCM writer, under shuffled file names.
"""

from __future__ import annotations

import random

import nibabel as nib
import numpy as np
import pytest

from geometry import rotation
from masksam_core.errors import MaskSAMError
from masksam_core.io import image_format, read_geometry, read_image, write_labels

sitk = pytest.importorskip("SimpleITK")

SHAPE = (6, 9, 7)  # (Z, Y, X)
SPACING_XYZ = (0.7, 0.9, 2.5)
ORIGIN_LPS = (-10.0, 20.0, 30.0)


DIRECTIONS = {
    "axial": np.eye(3),
    "oblique": rotation(0.3, -0.2, 0.6),
    "reversed": np.diag([1.0, 1.0, -1.0]),  # slices numbered against the normal (row x col)
}


def _volume(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    data = np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.int16)
    data[0, 0, 0] = 3000  # a marker that breaks every symmetry
    return data


def _image(array: np.ndarray, direction: np.ndarray, spacing=SPACING_XYZ, origin=ORIGIN_LPS):
    img = sitk.GetImageFromArray(array)  # array (Z, Y, X) -> image index (x, y, z)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction.flatten().tolist())
    return img


def _write_series(folder, img, *, uid: str = "1.2.826.0.1.3680043.2.1125.7", description: str = "test",
                  skip: tuple[int, ...] = (), positions: dict[int, int] | None = None) -> list:
    """One file per slice, named and written in shuffled order; ``skip`` drops slices, ``positions``
    writes slice i at the position of slice j (duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = img.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    order = [i for i in range(img.GetDepth()) if i not in skip]
    random.Random(1).shuffle(order)
    names = []
    for n, i in enumerate(order):
        where = (positions or {}).get(i, i)
        slc = img[:, :, i]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.2.{i}", "0008|0060": "CT",
            "0008|103e": description, "0020|000d": f"{uid}.1", "0020|000e": uid, "0020|0013": str(i + 1),
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10f}" for v in img.TransformIndexToPhysicalPoint((0, 0, where))),
        }
        for key, value in tags.items():
            slc.SetMetaData(key, value)
        name = folder / f"IM{(n * 7919) % 1000:04d}_{uid[-1]}.dcm"  # not in slice order
        writer.SetFileName(str(name))
        writer.Execute(slc)
        names.append(name)
    return names


def _reference(tmp_path, img):
    sitk.WriteImage(img, str(tmp_path / "reference.nii.gz"))
    return read_image(tmp_path / "reference.nii.gz")


@pytest.mark.parametrize("kind", list(DIRECTIONS))
def test_series_matches_simpleitk_nifti_conversion(tmp_path, kind):
    array = _volume()
    img = _image(array, DIRECTIONS[kind])
    _write_series(tmp_path / "series", img)
    got, geometry = read_image(tmp_path / "series")
    ref, ref_geometry = _reference(tmp_path, img)
    assert image_format(tmp_path / "series") == "dicom" and geometry.format == "dicom"
    assert got.dtype == np.int16 and got.shape == SHAPE == geometry.shape
    assert np.allclose(geometry.spacing, SPACING_XYZ[::-1], atol=1e-5)
    if kind == "reversed":  # read along +normal: the slice order flips, the world stays put
        assert np.array_equal(got, ref[::-1])
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1, SHAPE[0] - 1  # file index z -> Z-1-z
        assert np.allclose(geometry.affine, ref_geometry.affine @ flip, atol=1e-4)
    else:
        assert np.array_equal(got, ref)
        assert np.allclose(geometry.affine, ref_geometry.affine, atol=1e-4)
    # the marker voxel lands at the same RAS point as SimpleITK's own LPS position says
    lps = np.array(img.TransformIndexToPhysicalPoint((0, 0, 0)))
    z = SHAPE[0] - 1 if kind == "reversed" else 0
    assert got[z, 0, 0] == 3000
    assert np.allclose(geometry.affine @ [0, 0, z, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4)


def test_axial_affine_by_hand(tmp_path):
    _write_series(tmp_path / "s", _image(_volume(), np.eye(3)))
    geometry = read_geometry(tmp_path / "s")
    sx, sy, sz = SPACING_XYZ
    ox, oy, oz = ORIGIN_LPS
    expected = np.array([[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1]])
    assert np.allclose(geometry.affine, expected, atol=1e-6)
    assert nib.aff2axcodes(geometry.affine) == ("L", "P", "S")


def test_read_geometry_matches_read_image_and_file_selects_series(tmp_path):
    files = _write_series(tmp_path / "s", _image(_volume(), DIRECTIONS["oblique"]))
    _, full = read_image(tmp_path / "s")
    header_only = read_geometry(tmp_path / "s")
    assert np.array_equal(full.affine, header_only.affine)
    assert (full.shape, full.spacing) == (header_only.shape, header_only.spacing)
    via_file, geometry = read_image(files[0])  # one .dcm file: its whole series
    assert via_file.shape == SHAPE and np.array_equal(geometry.affine, full.affine)


def test_labels_for_dicom_written_as_nifti_with_its_geometry(tmp_path):
    img = _image(_volume(), DIRECTIONS["oblique"])
    _write_series(tmp_path / "s", img)
    array, geometry = read_image(tmp_path / "s")
    labels = (array > 500).astype(np.uint8)
    write_labels(tmp_path / "seg.nii.gz", labels, geometry)
    seg = nib.load(tmp_path / "seg.nii.gz")
    assert np.allclose(seg.affine, geometry.affine, atol=1e-4)
    assert int(seg.header["sform_code"]) == 1 and int(seg.header["qform_code"]) == 1
    assert np.array_equal(np.asarray(seg.dataobj).transpose(2, 1, 0), labels)
    back = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))  # SimpleITK sees the series' own LPS geometry
    assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-3)
    assert np.allclose(back.GetDirection(), img.GetDirection(), atol=1e-4)
    assert np.allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-4)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskSAMError, match="no DICOM series found in this folder"):
        read_image(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    (tmp_path / "text" / "fake.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(MaskSAMError, match="no DICOM series found"):
        read_geometry(tmp_path / "text")
    with pytest.raises(MaskSAMError, match="not a readable DICOM image file"):
        read_image(tmp_path / "text" / "fake.dcm")


def test_two_series_in_one_folder(tmp_path):
    a = _write_series(tmp_path / "mixed", _image(_volume(0), np.eye(3)), uid="1.2.3.41", description="axial")
    _write_series(tmp_path / "mixed", _image(_volume(1, (3, 9, 7)), np.eye(3)), uid="1.2.3.42",
                  description="localizer")
    with pytest.raises(MaskSAMError, match=r"2 DICOM series.*1\.2\.3\.41 \(6 files, axial\).*1\.2\.3\.42 "
                                           r"\(3 files, localizer\).*Give one file"):
        read_image(tmp_path / "mixed")
    array, _ = read_image(a[0])
    assert np.array_equal(array, _volume(0))


def test_missing_duplicate_and_single_slices(tmp_path):
    img = _image(_volume(), np.eye(3))
    _write_series(tmp_path / "gap", img, skip=(3,))
    with pytest.raises(MaskSAMError, match=r"unevenly spaced \(2\.500 to 5\.000 mm; missing slices\?\)"):
        read_image(tmp_path / "gap")
    _write_series(tmp_path / "dup", img, positions={4: 3})
    with pytest.raises(MaskSAMError, match="share one position"):
        read_image(tmp_path / "dup")
    _write_series(tmp_path / "one", img, skip=(1, 2, 3, 4, 5))
    with pytest.raises(MaskSAMError, match="one 2D slice"):
        read_image(tmp_path / "one")
