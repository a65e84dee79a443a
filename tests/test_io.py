"""Image I/O: NIfTI/TIFF reading and writing with exact geometry (references: nibabel, tifffile)."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import tifffile

from geometry import rotation
from masksam_core import io as mio
from masksam_core.errors import MaskSAMError
from masksam_core.io import (
    ImageGeometry,
    classes_sidecar,
    compare_geometry,
    read_geometry,
    read_image,
    spacing_sidecar,
    write_image,
    write_labels,
)


def _affine(kind: str) -> np.ndarray:
    affine = np.eye(4)
    if kind == "oblique":
        affine[:3, :3] = rotation(0.2, -0.35, 0.5) @ np.diag([0.7, 0.8, 2.5])
        affine[:3, 3] = [-12.5, 30.25, 7.0]
    elif kind == "lps":
        affine[:3, :3] = np.diag([-0.9, -0.9, 3.0])
        affine[:3, 3] = [120.0, 95.5, -40.0]
    else:  # ras
        affine[:3, :3] = np.diag([1.5, 1.25, 4.0])
        affine[:3, 3] = [-80.0, -60.0, 10.0]
    return affine


# nibabel array (file order i, j, k) with a cube of 3 at i 2:4, j 1:3, k 4:6 and a marker voxel
SHAPE_IJK = (9, 7, 8)
CUBE = (slice(2, 4), slice(1, 3), slice(4, 6))


def _source(path, kind: str, dtype=np.int16, qcode: int = 1, scode: int = 4):
    data = np.zeros(SHAPE_IJK, dtype=dtype)
    data[CUBE] = 3
    data[8, 0, 0] = 1  # breaks every symmetry of the axes
    img = nib.Nifti1Image(data, _affine(kind))
    img.header.set_qform(_affine(kind), code=qcode)
    img.header.set_sform(_affine(kind), code=scode)
    nib.save(img, path)
    return data, nib.load(path)


@pytest.mark.parametrize("kind", ["oblique", "lps", "ras"])
def test_nifti_round_trip_keeps_affine_codes_and_voxels(tmp_path, kind):
    data, ref = _source(tmp_path / "in.nii.gz", kind)
    array, geometry = read_image(tmp_path / "in.nii.gz")
    assert array.shape == SHAPE_IJK[::-1] == geometry.shape
    assert np.array_equal(array, data.transpose(2, 1, 0))  # array[z, y, x] == nib[x, y, z]
    assert array[4, 1, 2] == 3 and array[0, 0, 8] == 1
    assert np.array_equal(geometry.affine, ref.affine)
    columns = np.linalg.norm(_affine(kind)[:3, :3], axis=0)  # (sx, sy, sz)
    np.testing.assert_allclose(geometry.spacing, columns[::-1], rtol=1e-6)

    write_labels(tmp_path / "out.nii.gz", (array == 3).astype(np.int64), geometry)
    out = nib.load(tmp_path / "out.nii.gz")
    assert np.array_equal(out.affine, ref.affine)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 4
    assert np.array_equal(out.header.get_qform(), ref.header.get_qform())
    expected = np.zeros(SHAPE_IJK, np.uint8)
    expected[CUBE] = 1
    assert np.array_equal(np.asanyarray(out.dataobj), expected)  # the cube on its own voxels
    again, geometry2 = read_image(tmp_path / "out.nii.gz")
    assert np.array_equal(again, array == 3) and np.array_equal(geometry2.affine, geometry.affine)


def test_qform_only_file_keeps_its_codes(tmp_path):
    _, ref = _source(tmp_path / "in.nii", "oblique", qcode=2, scode=0)
    array, geometry = read_image(tmp_path / "in.nii")
    write_labels(tmp_path / "out.nii", array, geometry)
    out = nib.load(tmp_path / "out.nii")
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (2, 0)
    assert np.array_equal(out.affine, ref.affine)


def test_changed_affine_is_written_with_original_codes(tmp_path):
    _source(tmp_path / "in.nii.gz", "lps")
    array, geometry = read_image(tmp_path / "in.nii.gz")
    geometry.affine = geometry.affine.copy()
    geometry.affine[:3, 3] += [1.0, -2.0, 0.5]
    write_labels(tmp_path / "out.nii.gz", array, geometry)
    out = nib.load(tmp_path / "out.nii.gz")
    assert np.array_equal(out.affine, geometry.affine)
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 4)


def test_scaled_source_reads_scaled_and_labels_are_written_unscaled(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    array, geometry = read_image(tmp_path / "scaled.nii.gz")
    assert np.allclose(array, data.transpose(2, 1, 0) * 2.0 + 1.0)  # scaled like nibabel
    labels = np.arange(24).reshape(4, 3, 2) % 5
    write_labels(tmp_path / "lab.nii.gz", labels, geometry)
    out = nib.load(tmp_path / "lab.nii.gz")
    assert out.get_data_dtype() == np.uint8
    assert out.dataobj.slope == 1.0 and out.dataobj.inter == 0.0
    back, _ = read_image(tmp_path / "lab.nii.gz")
    assert back.dtype == np.uint8 and np.array_equal(back, labels)


def test_label_dtype_follows_max_value(tmp_path):
    geometry = ImageGeometry.from_spacing((2, 3, 4), (2.0, 1.0, 0.5))
    labels = np.zeros((2, 3, 4), np.int64)
    labels[0, 0, 0] = 300
    write_labels(tmp_path / "big.nii.gz", labels, geometry)
    assert nib.load(tmp_path / "big.nii.gz").get_data_dtype() == np.int16
    back, back_geometry = read_image(tmp_path / "big.nii.gz")
    assert np.issubdtype(back.dtype, np.integer) and np.array_equal(back, labels)
    assert back_geometry.spacing == (2.0, 1.0, 0.5)


def test_write_labels_rejects_bad_input(tmp_path):
    geometry = ImageGeometry.from_spacing((2, 3, 4))
    with pytest.raises(MaskSAMError, match=r"\(3, 3, 4\) do not match .*\(2, 3, 4\)"):
        write_labels(tmp_path / "a.nii.gz", np.zeros((3, 3, 4), int), geometry)
    with pytest.raises(MaskSAMError, match="integer class ids"):
        write_labels(tmp_path / "a.nii.gz", np.zeros((2, 3, 4)), geometry)
    with pytest.raises(MaskSAMError, match=r"0..32767"):
        write_labels(tmp_path / "a.nii.gz", -np.ones((2, 3, 4), int), geometry)
    with pytest.raises(MaskSAMError, match=r"name it .nii.gz"):
        write_labels(tmp_path / "a.png", np.zeros((2, 3, 4), int), geometry)


def test_class_names_sidecar(tmp_path):
    geometry = ImageGeometry.from_spacing((2, 3, 4))
    path = write_labels(tmp_path / "seg.nii.gz", np.zeros((2, 3, 4), int), geometry,
                        class_names={1: "liver", 0: "background"})
    assert classes_sidecar(path) == tmp_path / "seg.classes.json"
    assert json.loads(classes_sidecar(path).read_text()) == {"0": "background", "1": "liver"}
    # seg.tif would share seg.classes.json: the same names may, other names would rename seg.nii.gz's classes
    write_labels(tmp_path / "seg.tif", np.zeros((2, 3, 4), int), geometry, overwrite=True,  # as napari's writer
                 class_names={0: "background", 1: "liver"})
    with pytest.raises(MaskSAMError, match=r"seg.classes.json holds the class names of seg.nii.gz.*seg_2.tif"):
        write_labels(tmp_path / "seg.tif", np.zeros((2, 3, 4), int), geometry, overwrite=True,
                     class_names={0: "background", 1: "box 1"})
    assert json.loads(classes_sidecar(path).read_text()) == {"0": "background", "1": "liver"}
    (tmp_path / "seg.tif").unlink()
    write_labels(tmp_path / "seg.nii.gz", np.zeros((2, 3, 4), int), geometry, overwrite=True,  # alone: renamed freely
                 class_names={0: "background", 1: "spleen"})
    assert json.loads(classes_sidecar(path).read_text())["1"] == "spleen"


def test_write_image_float_round_trip(tmp_path):
    _source(tmp_path / "in.nii.gz", "oblique")
    _, geometry = read_image(tmp_path / "in.nii.gz")
    values = np.random.default_rng(0).random(geometry.shape)
    write_image(tmp_path / "prob.nii.gz", values, geometry)
    back, back_geometry = read_image(tmp_path / "prob.nii.gz")
    assert back.dtype == np.float32 and np.array_equal(back, values.astype(np.float32))
    assert np.array_equal(back_geometry.affine, geometry.affine)


def test_tiff_round_trip_with_sidecar_and_imagej_spacing(tmp_path):
    labels = np.zeros((5, 6, 7), np.int32)
    labels[1:3, 2:4, 3:6] = 2
    geometry = ImageGeometry.from_spacing(labels.shape, (2.5, 0.8, 0.7), format="tiff")
    path = write_labels(tmp_path / "seg.tif", labels, geometry)
    assert json.loads(spacing_sidecar(path).read_text()) == {"spacing": [2.5, 0.8, 0.7]}
    assert np.array_equal(tifffile.imread(path), labels)  # (Z, Y, X) on disk, as tifffile reads it
    back, back_geometry = read_image(path)
    assert back.dtype == np.uint8 and np.array_equal(back, labels)
    assert back_geometry.spacing == (2.5, 0.8, 0.7) and back_geometry.format == "tiff"
    assert np.array_equal(back_geometry.affine, np.diag([0.7, 0.8, 2.5, 1.0]))
    spacing_sidecar(path).unlink()  # now from the ImageJ tags alone
    _, imagej_geometry = read_image(path)
    np.testing.assert_allclose(imagej_geometry.spacing, (2.5, 0.8, 0.7), rtol=1e-6)


def test_tiff_imagej_units_and_nnunet_sidecar(tmp_path):
    stack = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
    tifffile.imwrite(tmp_path / "um.tif", stack, imagej=True, resolution=(1 / 500.0, 1 / 250.0),
                     metadata={"spacing": 2000.0, "unit": "micron", "axes": "ZYX"})
    array, geometry = read_image(tmp_path / "um.tif")
    assert np.array_equal(array, stack)
    np.testing.assert_allclose(geometry.spacing, (2.0, 0.25, 0.5), rtol=1e-6)  # um -> mm
    (tmp_path / "um.json").write_text(json.dumps({"spacing": [4.0, 1.0, 1.5]}))  # nnU-Net's name
    assert read_image(tmp_path / "um.tif")[1].spacing == (4.0, 1.0, 1.5)


def test_ome_tiff_physical_sizes(tmp_path):
    stack = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
    sizes = {"PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"}
    tifffile.imwrite(tmp_path / "cells.ome.tif", stack, metadata={"axes": "ZYX", **sizes})  # Z, Y in the default um
    array, geometry = read_image(tmp_path / "cells.ome.tif")
    assert np.array_equal(array, stack)
    np.testing.assert_allclose(geometry.spacing, (2e-3, 5e-4, 2.5e-4), rtol=1e-9)
    tifffile.imwrite(tmp_path / "partial.ome.tif", stack, metadata={"axes": "ZYX", "PhysicalSizeX": 0.5})
    with pytest.warns(UserWarning, match="no spacing found"):  # not all three sizes: not used
        assert read_image(tmp_path / "partial.ome.tif")[1].spacing == (1.0, 1.0, 1.0)


def test_tiff_without_spacing_warns(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tiff", np.zeros((3, 4, 5), np.float32), photometric="minisblack")
    with pytest.warns(UserWarning, match="no spacing found"):
        _, geometry = read_image(tmp_path / "plain.tiff")
    assert geometry.spacing == (1.0, 1.0, 1.0) and geometry.shape == (3, 4, 5)


def test_atomic_write_refuses_overwrite_and_leaves_no_temp(tmp_path):
    geometry = ImageGeometry.from_spacing((2, 3, 4))
    first = np.ones((2, 3, 4), int)
    write_labels(tmp_path / "seg.nii.gz", first, geometry)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]
    with pytest.raises(MaskSAMError, match="--overwrite"):
        write_labels(tmp_path / "seg.nii.gz", first * 2, geometry)
    assert np.array_equal(read_image(tmp_path / "seg.nii.gz")[0], first)
    write_labels(tmp_path / "seg.nii.gz", first * 2, geometry, overwrite=True)
    assert np.array_equal(read_image(tmp_path / "seg.nii.gz")[0], first * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    geometry = ImageGeometry.from_spacing((2, 3, 4))
    write_labels(tmp_path / "seg.tif", np.ones((2, 3, 4), int), geometry)
    before = (tmp_path / "seg.tif").read_bytes()

    def broken(path, *args, **kwargs):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mio.tifffile, "imwrite", broken)
    with pytest.raises(MaskSAMError, match="free space"):
        write_labels(tmp_path / "seg.tif", np.zeros((2, 3, 4), int), geometry, overwrite=True)
    assert (tmp_path / "seg.tif").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.tif", "seg.tif.json"]


def test_corrupt_files_name_the_file(tmp_path):
    _source(tmp_path / "good.nii.gz", "ras")
    raw = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MaskSAMError, match=r"cut\.nii\.gz.*(corrupt|truncated)"):
        read_image(tmp_path / "cut.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 3))
    with pytest.raises(MaskSAMError, match=r"junk\.nii\.gz"):
        read_image(tmp_path / "junk.nii.gz")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(MaskSAMError, match=r"junk\.tif.*TIFF"):
        read_image(tmp_path / "junk.tif")


def test_2d_and_4d_images_are_rejected_with_their_shape(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((16, 12), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(MaskSAMError, match=r"2D image of shape \(16, 12\); expected a 3D volume"):
        read_image(tmp_path / "slice.nii.gz")
    tifffile.imwrite(tmp_path / "slice.tif", np.zeros((16, 12), np.uint8))
    with pytest.raises(MaskSAMError, match=r"2D image of shape \(16, 12\)"):
        read_image(tmp_path / "slice.tif")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((16, 12, 3), np.uint8), photometric="rgb")
    with pytest.raises(MaskSAMError, match=r"colour \(RGB\) image of shape \(16, 12, 3\)"):
        read_image(tmp_path / "rgb.tif")
    tifffile.imwrite(tmp_path / "tyx.tif", np.zeros((3, 16, 12), np.uint16), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(MaskSAMError, match=r"3 time points of 2D images \(axes TYX\), not a 3D scan; if these"):
        read_image(tmp_path / "tyx.tif")
    tifffile.imwrite(tmp_path / "cyx.tif", np.zeros((3, 16, 12), np.uint16), imagej=True)  # tifffile's default: CYX
    with pytest.warns(UserWarning, match=r"calls its 3 planes channels \(axes CYX\); reading them as Z slices"):
        assert read_image(tmp_path / "cyx.tif")[0].shape == (3, 16, 12)
    rgb = np.zeros((4, 5, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.Nifti1Image(rgb, np.eye(4)).to_filename(tmp_path / "rgb.nii.gz")
    with pytest.raises(MaskSAMError, match=r"a colour \(RGB\) NIfTI image"):
        read_image(tmp_path / "rgb.nii.gz")
    tifffile.imwrite(tmp_path / "zyx.tif", np.zeros((3, 16, 12), np.uint16), imagej=True, metadata={"axes": "ZYX"})
    assert read_image(tmp_path / "zyx.tif")[0].shape == (3, 16, 12)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(MaskSAMError, match=r"4D image of shape \(4, 5, 6, 2\).*one 3D file per channel"):
        read_image(tmp_path / "t.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), np.eye(4)), tmp_path / "s.nii.gz")
    assert read_image(tmp_path / "s.nii.gz")[0].shape == (6, 5, 4)  # trailing 1: still 3D


def test_missing_unsupported_and_dicom_inputs(tmp_path):
    with pytest.raises(MaskSAMError, match="file not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(MaskSAMError, match="unsupported file type"):
        read_image(tmp_path / "x.png")
    (tmp_path / "series").mkdir()
    with pytest.raises(MaskSAMError, match="no DICOM series found"):
        read_image(tmp_path / "series")


def test_read_geometry_matches_read_image(tmp_path):
    _source(tmp_path / "in.nii.gz", "oblique")
    _, full = read_image(tmp_path / "in.nii.gz")
    header_only = read_geometry(tmp_path / "in.nii.gz")
    assert np.array_equal(full.affine, header_only.affine)
    assert (full.shape, full.spacing) == (header_only.shape, header_only.spacing)


def test_compare_geometry_tolerances():
    a = ImageGeometry.from_spacing((4, 5, 6), (3.0, 1.0, 1.0))
    b = ImageGeometry.from_spacing((4, 5, 6), (3.0 * (1 + 1e-5), 1.0, 1.0))
    b.affine[:3, 3] += 0.005
    assert compare_geometry(a, b) is None
    c = ImageGeometry.from_spacing((4, 5, 6), (3.01, 1.0, 1.0))
    assert "spacing" in compare_geometry(a, c)
    d = ImageGeometry.from_spacing((4, 5, 6), (3.0, 1.0, 1.0))
    d.affine[0, 3] = 0.05
    assert "origin" in compare_geometry(a, d)
    e = ImageGeometry.from_spacing((4, 5, 6), (3.0, 1.0, 1.0))
    e.affine[:3, :3] = np.diag([-1.0, 1.0, 3.0])
    assert "directions" in compare_geometry(a, e)
    assert "shape" in compare_geometry(a, ImageGeometry.from_spacing((4, 5, 7), (3.0, 1.0, 1.0)))


def test_real_scan_reads_as_zyx_with_spacing(shared_data, tmp_path):
    path = shared_data / "Dataset501_AbdomenCT" / "imagesTr" / "abdct_001_0000.nii.gz"
    ref = nib.load(path)
    array, geometry = read_image(path)
    assert geometry.shape == ref.shape[::-1] == array.shape
    assert geometry.spacing == (3.0, 3.0, 3.0)
    assert array.dtype == np.int16 and np.array_equal(array, np.asanyarray(ref.dataobj).transpose(2, 1, 0))
    label_path = shared_data / "Dataset501_AbdomenCT" / "labelsTr" / "abdct_001.nii.gz"
    labels, label_geometry = read_image(label_path)
    assert labels.dtype == np.uint8
    write_labels(tmp_path / "copy.nii.gz", labels, label_geometry)
    out = nib.load(tmp_path / "copy.nii.gz")
    assert np.array_equal(out.affine, nib.load(label_path).affine)
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(nib.load(label_path).dataobj))
