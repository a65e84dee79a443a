"""The plugin's reader, writer and sample data (napari_masksam._reader/_writer/_sample_data).

References are independent of the plugin: nibabel's own affine and array (transposed to Z, Y, X),
tifffile stacks, SimpleITK-written DICOM series, ``np.percentile``; files written through napari's
save API are read back with nibabel.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from geometry import rotation
from masksam_core.errors import MaskSAMError
from masksam_core.io import ImageGeometry, classes_sidecar
from masksam_core.io import write_labels as core_write_labels
from napari_masksam._reader import napari_get_reader
from napari_masksam._sample_data import SAMPLE_CLASS_NAMES, abdomen_ct, sample_paths
from napari_masksam._writer import write_labels

PLUGIN = "napari-masksam"
SHAPE = (7, 9, 11)  # (Z, Y, X)


def _oblique_affine(spacing_xyz=(0.8, 1.1, 2.5), origin=(-40.0, 25.0, 12.5)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(0.3, -0.2, 0.5) @ np.diag(spacing_xyz)
    affine[:3, 3] = origin
    return affine


def _nifti(path: Path, array_zyx: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array_zyx.transpose(2, 1, 0), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.to_filename(path)
    return path


def _ct(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.integers(-100, 200, size=shape).astype(np.int16)
    array[:, 0, :] = -1000  # air
    array[:, -1, :] = 1500  # bone
    return array


def _read(path) -> list:
    reader = napari_get_reader(str(path))
    assert callable(reader), f"no reader for {path}"
    return reader(str(path))


def _dicom_series(folder: Path, array: np.ndarray, spacing_xyz=(0.7, 0.9, 2.5), origin=(-10.0, 20.0, 30.0)):
    """One SimpleITK-written file per slice (axial, LPS), names not in slice order."""
    sitk = pytest.importorskip("SimpleITK")
    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.9"
    for i in range(img.GetDepth()):
        slc = img[:, :, i]
        position = img.TransformIndexToPhysicalPoint((0, 0, i))
        for key, value in {"0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.2.{i}",
                           "0008|0060": "CT", "0020|000d": f"{uid}.1", "0020|000e": uid,
                           "0020|0013": str(i + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0032": "\\".join(f"{v:.6f}" for v in position)}.items():
            slc.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{(i * 37) % 11:04d}.dcm"))
        writer.Execute(slc)


# --------------------------------------------------------------------------- reader: refusals


def _unreadable(tmp_path: Path, kind: str):
    if kind == "text":
        (tmp_path / "notes.txt").write_text("not an image")
        return str(tmp_path / "notes.txt")
    if kind == "tiff_2d":
        tifffile.imwrite(tmp_path / "slice.tif", np.zeros((16, 16), np.uint8))
        return str(tmp_path / "slice.tif")
    if kind == "tiff_rgb":
        tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 16, 16, 3), np.uint8), photometric="rgb")
        return str(tmp_path / "rgb.tif")
    if kind == "tiff_time":
        tifffile.imwrite(tmp_path / "movie.tif", np.zeros((3, 16, 16), np.uint16), imagej=True,
                         metadata={"axes": "TYX"})
        return str(tmp_path / "movie.tif")
    if kind in ("dicom_one_slice_file", "dicom_one_slice_folder"):
        folder = tmp_path / "xray"
        _dicom_series(folder, _ct(shape=(1, 9, 11)))
        return str(folder if kind.endswith("folder") else next(folder.iterdir()))
    if kind == "nifti_rgb":
        rgb = np.zeros((4, 5, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.Nifti1Image(rgb, np.eye(4)).to_filename(tmp_path / "rendering.nii.gz")
        return str(tmp_path / "rendering.nii.gz")
    if kind == "empty_folder":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty")
    if kind == "folder_without_dicom":
        folder = tmp_path / "docs"
        folder.mkdir()
        (folder / "a.txt").write_text("hello")
        (folder / "b.dcm").write_bytes(b"\xff" * 300)  # a .dcm name, no DICOM content
        tifffile.imwrite(folder / "c.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
        return str(folder)
    if kind == "dicom_only_in_subfolder":
        _dicom_series(tmp_path / "study" / "series", _ct((3, 6, 5)))
        return str(tmp_path / "study")
    if kind == "missing":
        return str(tmp_path / "missing.nii.gz")
    if kind == "corrupt_nifti":
        (tmp_path / "corrupt.nii.gz").write_bytes(gzip.compress(b"\x00garbage" * 50))
        return str(tmp_path / "corrupt.nii.gz")
    if kind == "not_gzip_nifti":
        (tmp_path / "bad.nii.gz").write_bytes(b"plain bytes, not gzip")
        return str(tmp_path / "bad.nii.gz")
    if kind == "nifti_4d":
        nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)).to_filename(tmp_path / "t.nii.gz")
        return str(tmp_path / "t.nii.gz")
    if kind == "stack_of_volumes":
        paths = [_nifti(tmp_path / f"s{i}.nii.gz", _ct(), np.eye(4)) for i in range(2)]
        return [str(p) for p in paths]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["text", "tiff_2d", "tiff_rgb", "tiff_time", "empty_folder", "folder_without_dicom",
                                  "dicom_only_in_subfolder", "missing", "corrupt_nifti", "not_gzip_nifti",
                                  "nifti_4d", "stack_of_volumes", "dicom_one_slice_file", "dicom_one_slice_folder",
                                  "nifti_rgb"])
def test_get_reader_refuses_what_it_cannot_read(tmp_path, kind):
    assert napari_get_reader(_unreadable(tmp_path, kind)) is None


def test_truncated_nifti_raises_a_clear_error(tmp_path):
    path = _nifti(tmp_path / "cut.nii", _ct(), np.eye(4))
    path.write_bytes(path.read_bytes()[:600])  # header intact, voxels cut off
    reader = napari_get_reader(str(path))  # the header alone looks fine
    assert callable(reader)
    with pytest.raises(MaskSAMError, match="corrupt"):
        reader(str(path))


# --------------------------------------------------------------------------- reader: layers


def test_oblique_nifti_keeps_its_affine_and_spacing(tmp_path):
    affine = _oblique_affine()
    path = _nifti(tmp_path / "case_7.nii.gz", _ct(), affine)
    [(data, kwargs, kind)] = _read(path)
    ref = nib.load(path)
    assert kind == "image" and kwargs["name"] == "case_7"
    assert np.array_equal(data, np.asarray(ref.dataobj).transpose(2, 1, 0))
    assert np.allclose(kwargs["scale"], (2.5, 1.1, 0.8), atol=1e-6)  # (sz, sy, sx)
    geometry = kwargs["metadata"]["masksam"]
    assert isinstance(geometry, ImageGeometry) and geometry.shape == SHAPE
    assert np.array_equal(geometry.affine, ref.affine)
    assert geometry.header is not None and int(geometry.header["sform_code"]) == 1


def test_ct_gets_a_soft_tissue_window_and_mr_percentiles(tmp_path):
    [(_, ct, _)] = _read(_nifti(tmp_path / "ct.nii.gz", _ct(), np.eye(4)))
    assert ct["contrast_limits"] == (-160.0, 240.0) and ct["colormap"] == "gray"
    mr_array = np.random.default_rng(1).gamma(2.0, 80.0, size=SHAPE).astype(np.float32)
    [(_, mr, _)] = _read(_nifti(tmp_path / "mr.nii.gz", mr_array, np.eye(4)))
    assert np.allclose(mr["contrast_limits"], np.percentile(mr_array, [0.5, 99.5]), rtol=1e-5)


def test_a_crop_of_a_scan_lies_on_the_scan(tmp_path):
    """Layers sit at their first voxel's position along the scan's own axes: an ROI cut from a
    flipped, oblique scan (as viewers save them) lands on the scan's own voxels in napari's world."""
    affine = _oblique_affine()
    affine[:3, 0] *= -1  # the file's x axis runs the other way (as in LPS-stored data)
    scan = _nifti(tmp_path / "scan.nii.gz", _ct(), affine)
    roi = nib.load(scan).slicer[2:8, 3:7, 1:5]  # nibabel moves the origin to voxel (x, y, z) = (2, 3, 1)
    roi.to_filename(tmp_path / "roi.nii.gz")
    [(_, whole, _)] = _read(scan)
    [(_, part, _)] = _read(tmp_path / "roi.nii.gz")
    world = lambda kw, zyx: np.asarray(kw["scale"]) * np.asarray(zyx) + np.asarray(kw["translate"])  # noqa: E731
    assert np.allclose(world(part, (0, 0, 0)), world(whole, (1, 3, 2)))
    assert np.allclose(world(part, (3, 2, 5)), world(whole, (4, 5, 7)))
    assert not np.allclose(whole["translate"], 0)


def test_nan_voxels_get_contrast_limits_from_the_finite_ones(tmp_path):
    array = np.random.default_rng(2).gamma(2.0, 80.0, size=SHAPE).astype(np.float32)
    array[0, :3, :3] = np.nan  # outside the field of view
    [(_, mr, _)] = _read(_nifti(tmp_path / "mr.nii.gz", array, np.eye(4)))
    finite = array[np.isfinite(array)]
    assert np.allclose(mr["contrast_limits"], np.percentile(finite, [0.5, 99.5]), rtol=1e-5)
    [(_, empty, _)] = _read(_nifti(tmp_path / "nan.nii.gz", np.full(SHAPE, np.nan, np.float32), np.eye(4)))
    assert empty["contrast_limits"] == (0.0, 1.0)


def test_tiff_spacing_from_sidecar(tmp_path):
    array = np.random.default_rng(2).integers(0, 4000, size=SHAPE).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", array)
    (tmp_path / "stack.tif.json").write_text(json.dumps({"spacing": [2.0, 0.5, 0.25]}))
    [(data, kwargs, kind)] = _read(tmp_path / "stack.tif")
    assert kind == "image" and kwargs["name"] == "stack"
    assert np.array_equal(data, array) and kwargs["scale"] == (2.0, 0.5, 0.25)
    assert np.array_equal(kwargs["metadata"]["masksam"].affine, np.diag([0.25, 0.5, 2.0, 1.0]))


def test_dicom_folder_and_file(tmp_path):
    array = _ct((5, 8, 6))
    _dicom_series(tmp_path / "series_a", array)
    [(data, kwargs, kind)] = _read(tmp_path / "series_a")
    assert kind == "image" and kwargs["name"] == "series_a"
    assert np.array_equal(data, array)
    assert np.allclose(kwargs["scale"], (2.5, 0.9, 0.7), atol=1e-5)
    geometry = kwargs["metadata"]["masksam"]
    assert geometry.format == "dicom"
    assert np.allclose(geometry.affine[:3, 3], [10.0, -20.0, 30.0], atol=1e-4)  # LPS -> RAS
    one_file = min((tmp_path / "series_a").glob("*.dcm"))
    [(again, _, _)] = _read(one_file)
    assert np.array_equal(again, array)
    # several files of the series picked together (napari passes a list when stacking)
    files = [str(p) for p in sorted((tmp_path / "series_a").glob("*.dcm"))]
    reader = napari_get_reader(files)
    assert callable(reader) and np.array_equal(reader(files)[0][0], array)


def test_label_map_with_classes_sidecar_opens_as_labels(tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 3:6, 4:8] = 2
    labels[0, 0, 0] = 1
    affine = _oblique_affine()
    geometry = ImageGeometry(affine, (2.5, 1.1, 0.8), SHAPE)
    path = core_write_labels(tmp_path / "seg.nii.gz", labels, geometry,
                             class_names={0: "background", 1: "liver", 2: "tumour"})
    [(data, kwargs, kind)] = _read(path)
    assert kind == "labels" and kwargs["name"] == "seg"
    assert np.array_equal(data, labels)
    assert list(kwargs["features"]["index"]) == [0, 1, 2]
    assert list(kwargs["features"]["name"]) == ["background", "liver", "tumour"]
    assert np.array_equal(kwargs["metadata"]["masksam"].affine, nib.load(path).affine)
    assert np.allclose(kwargs["scale"], (2.5, 1.1, 0.8), atol=1e-6)
    # the same file without the sidecar is a plain image
    classes_sidecar(path).unlink()
    assert _read(path)[0][2] == "image"


# --------------------------------------------------------------------------- writer (direct calls)


def test_writer_uses_the_stored_geometry_and_writes_class_names(tmp_path):
    src = _nifti(tmp_path / "scan.nii.gz", _ct(), _oblique_affine())
    [(_, image_kwargs, _)] = _read(src)
    labels = np.zeros(SHAPE, np.int32)
    labels[1:4, 2:5, 3:9] = 1
    meta = {"scale": image_kwargs["scale"], "metadata": image_kwargs["metadata"],
            "features": {"index": [0, 1], "name": ["background", "kidney"]}}
    out = tmp_path / "out" / "seg.nii.gz"
    out.parent.mkdir()
    out.write_bytes(b"old file")  # napari's dialog has confirmed replacing it
    assert write_labels(str(out), labels, meta) == [str(out)]
    written = nib.load(out)
    assert np.array_equal(written.affine, nib.load(src).affine)
    assert np.array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), labels)
    assert json.loads(classes_sidecar(out).read_text()) == {"0": "background", "1": "kidney"}
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_writer_falls_back_to_scale_and_translate(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 3
    stale = ImageGeometry(_oblique_affine(), (2.5, 1.1, 0.8), SHAPE)  # another shape: not this layer's
    meta = {"scale": (3.0, 2.0, 0.5), "translate": (10.0, -5.0, 1.0), "metadata": {"masksam": stale}}
    with pytest.warns(UserWarning, match="do not match"), pytest.warns(UserWarning, match="no open scan layer"):
        write_labels(str(tmp_path / "seg.nii.gz"), labels, meta)
    expected = np.array([[0.5, 0, 0, 1.0], [0, 2.0, 0, -5.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]])
    assert np.allclose(nib.load(tmp_path / "seg.nii.gz").affine, expected)
    names = json.loads((tmp_path / "seg.classes.json").read_text())
    assert names == {"0": "background", "1": "class_1", "2": "class_2", "3": "class_3"}


def test_writer_tiff_and_errors(tmp_path):
    labels = np.zeros(SHAPE, np.uint16)
    labels[3, 4, 5] = 300
    meta = {"scale": (2.0, 0.5, 0.25), "metadata": {"class_names": ["background", "cell"]}}
    write_labels(str(tmp_path / "seg.tif"), labels, meta)
    assert np.array_equal(tifffile.imread(tmp_path / "seg.tif"), labels)
    assert json.loads((tmp_path / "seg.tif.json").read_text()) == {"spacing": [2.0, 0.5, 0.25]}
    assert json.loads((tmp_path / "seg.classes.json").read_text())["1"] == "cell"
    with pytest.raises(MaskSAMError, match="NIfTI"):
        write_labels(str(tmp_path / "seg.png"), labels, meta)
    with pytest.raises(MaskSAMError, match="3D"):
        write_labels(str(tmp_path / "t.nii.gz"), np.zeros((2, *SHAPE), np.uint8), meta)
    with pytest.raises(MaskSAMError, match=r"0..32767"):
        write_labels(str(tmp_path / "neg.nii.gz"), -labels.astype(np.int32), meta)


# --------------------------------------------------------------------------- sample data


def test_sample_data_files_and_layers(shared_data):
    image_path, labels_path = sample_paths()
    source = shared_data / "Dataset501_AbdomenCT"
    assert image_path.read_bytes() == (source / "imagesTr" / "abdct_001_0000.nii.gz").read_bytes()
    assert labels_path.read_bytes() == (source / "labelsTr" / "abdct_001.nii.gz").read_bytes()
    names = json.loads((source / "dataset.json").read_text())["labels"]
    assert list(SAMPLE_CLASS_NAMES) == sorted(names, key=names.get)
    assert (image_path.parent / "NOTICE").is_file() and (image_path.parent / "README.md").is_file()

    (ct, ct_kwargs, ct_kind), (labels, labels_kwargs, labels_kind) = abdomen_ct()
    assert (ct_kind, labels_kind) == ("image", "labels")
    assert ct.shape == labels.shape == (112, 101, 122)
    assert ct_kwargs["scale"] == labels_kwargs["scale"] == (3.0, 3.0, 3.0)
    assert ct_kwargs["contrast_limits"] == (-160.0, 240.0)
    assert list(labels_kwargs["features"]["name"]) == list(SAMPLE_CLASS_NAMES)
    assert set(np.unique(labels)) == set(range(9))
    for kwargs in (ct_kwargs, labels_kwargs):
        assert np.array_equal(kwargs["metadata"]["masksam"].affine, nib.load(image_path).affine)


@pytest.mark.slow
def test_wheel_ships_the_sample_data(repo_root, tmp_path):
    # build from a copy: other builds may be using the checkout's build/ folder
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "napari.yaml"):
        shutil.copy2(repo_root / name, tree / name)
    shutil.copytree(repo_root / "src", tree / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(tree)],
                            check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("napari_masksam-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for path in sample_paths():
            assert zf.read(f"masksam_core/assets/{path.name}") == path.read_bytes()
        for name in ("abdomen_ct_labels.classes.json", "NOTICE", "README.md"):
            assert f"masksam_core/assets/{name}" in names


# --------------------------------------------------------------------------- in napari


@pytest.mark.gui
def test_open_sample_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "abdomen_ct")
    image, labels = viewer.layers["abdomen_ct"], viewer.layers["abdomen_ct_labels"]
    assert image.__class__.__name__ == "Image" and labels.__class__.__name__ == "Labels"
    assert tuple(image.scale) == tuple(labels.scale) == (3.0, 3.0, 3.0)
    assert tuple(image.contrast_limits) == (-160.0, 240.0)
    assert list(labels.features["name"]) == list(SAMPLE_CLASS_NAMES)
    assert list(labels.features["index"]) == list(range(9))


@pytest.mark.gui
def test_read_segment_save_keeps_the_source_affine(make_napari_viewer, tmp_path):
    from napari_masksam._layers import show_labels

    src = _nifti(tmp_path / "scan.nii.gz", _ct(), _oblique_affine())
    viewer = make_napari_viewer()
    [image] = viewer.open(str(src), plugin=PLUGIN)
    assert image.name == "scan" and np.allclose(image.scale, (2.5, 1.1, 0.8))
    labels = np.zeros(SHAPE, np.int32)
    labels[2:6, 1:7, 2:9] = 1
    labels[0, 0, :3] = 2
    layer = show_labels(viewer, image, labels, ["background", "liver", "lesion"])
    out = tmp_path / "saved" / "scan_seg.nii.gz"
    out.parent.mkdir()
    assert layer.save(str(out), plugin=PLUGIN) == [str(out)]
    written = nib.load(out)
    assert np.array_equal(written.affine, nib.load(src).affine)
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1
    assert np.array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), labels)
    assert json.loads(classes_sidecar(out).read_text()) == {"0": "background", "1": "liver", "2": "lesion"}
    # ... and it opens again as labels with its names, on top of the scan
    [again] = viewer.open(str(out), plugin=PLUGIN)
    assert again.__class__.__name__ == "Labels" and list(again.features["name"])[1:] == ["liver", "lesion"]
    assert np.allclose(again.scale, image.scale)


@pytest.mark.gui
def test_labels_drawn_in_napari_are_saved_on_the_scans_grid(make_napari_viewer, tmp_path):
    """Layers > New Labels Layer copies the scan layer's placement but not its metadata: the saved
    file still takes the scan's exact affine and header, and opens again on top of the scan."""
    src = _nifti(tmp_path / "scan.nii.gz", _ct(), _oblique_affine())
    viewer = make_napari_viewer()
    [image] = viewer.open(str(src), plugin=PLUGIN)
    viewer.layers.selection.active = image
    viewer._new_labels()  # what the menu item and the layer-list button call
    drawn = viewer.layers[-1]
    assert drawn.__class__.__name__ == "Labels" and "masksam" not in drawn.metadata
    drawn.data[2:4, 3:6, 4:8] = 1
    out = tmp_path / "drawn.nii.gz"
    assert drawn.save(str(out), plugin=PLUGIN) == [str(out)]
    written = nib.load(out)
    assert np.array_equal(written.affine, nib.load(src).affine)
    assert int(written.header["sform_code"]) == 1
    assert np.array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), drawn.data)
    [again] = viewer.open(str(out), plugin=PLUGIN)
    assert np.allclose(again.scale, image.scale) and np.allclose(again.translate, image.translate)
    # a second scan of the same shape elsewhere makes the choice ambiguous: the layer's own placement
    other = _oblique_affine(origin=(5.0, 5.0, 5.0))
    viewer.open(str(_nifti(tmp_path / "other.nii.gz", _ct(), other)), plugin=PLUGIN)
    viewer.layers["other"].translate = image.translate  # both now lie exactly where the drawing lies
    out2 = tmp_path / "drawn2.nii.gz"
    with pytest.warns(UserWarning, match="no open scan layer lies where 'scan - Labels' lies"):
        drawn.save(str(out2), plugin=PLUGIN)
    assert not np.allclose(nib.load(out2).affine, nib.load(src).affine)


@pytest.mark.gui
def test_a_rotated_layer_without_a_file_keeps_its_rotation(make_napari_viewer):
    from napari_masksam._layers import geometry_of

    viewer = make_napari_viewer()
    rotate = np.eye(4)
    rotate[1:3, 1:3] = [[0.0, -1.0], [1.0, 0.0]]  # 90 degrees in the (y, x) plane
    layer = viewer.add_image(np.zeros((3, 4, 5), np.float32), scale=(2.0, 1.0, 0.5), affine=rotate)
    geometry = geometry_of(layer)
    assert np.allclose(geometry.spacing, (2.0, 1.0, 0.5))
    for zyx in [(0, 0, 0), (1, 2, 3), (2, 3, 4)]:  # the file affine maps (x, y, z) where napari shows (z, y, x)
        assert np.allclose((geometry.affine @ [*zyx[::-1], 1.0])[:3][::-1], layer.data_to_world(zyx))


@pytest.mark.gui
def test_save_plain_labels_layer_with_its_scale(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = np.zeros((4, 6, 5), np.uint8)
    data[1:3, 2:4, 1:4] = 1
    layer = viewer.add_labels(data, scale=(4.0, 0.5, 0.5), translate=(8.0, 2.0, -1.0), name="drawn")
    out = tmp_path / "drawn.nii"
    with pytest.warns(UserWarning, match="no open scan layer lies where 'drawn' lies"):
        assert layer.save(str(out), plugin=PLUGIN) == [str(out)]
    expected = np.array([[0.5, 0, 0, -1.0], [0, 0.5, 0, 2.0], [0, 0, 4.0, 8.0], [0, 0, 0, 1]])
    assert np.allclose(nib.load(out).affine, expected)
    assert np.array_equal(np.asarray(nib.load(out).dataobj).transpose(2, 1, 0), data)
    assert json.loads(classes_sidecar(out).read_text()) == {"0": "background", "1": "class_1"}


@pytest.mark.gui
def test_napari_shows_the_reader_error(make_napari_viewer, tmp_path, monkeypatch):
    from napari.components import viewer_model
    from napari.errors import ReaderPluginError

    path = _nifti(tmp_path / "cut.nii", _ct(), np.eye(4))
    path.write_bytes(path.read_bytes()[:600])
    viewer = make_napari_viewer()
    with pytest.raises(MaskSAMError, match="corrupt or truncated"):
        viewer.open(str(path), plugin=PLUGIN)
    # MaskSAM chosen as the preferred reader of .nii files: File > Open's dialog shows this text
    monkeypatch.setattr(viewer_model, "get_preferred_reader", lambda _: PLUGIN)
    with pytest.raises(ReaderPluginError) as caught:
        viewer.open(str(path), plugin=None)
    assert "MaskSAMError" in str(caught.value) and "corrupt or truncated" in str(caught.value)
    assert len(viewer.layers) == 0
