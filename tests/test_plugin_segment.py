"""The Segment widget in a napari viewer: a random-weight ``tiny`` run on a crop of the real CT.

Checks the result layer against a direct ``Predictor.predict`` (same labels, the run's class
names, the image's scale/translate/affine/geometry), that a second run (in the thread worker)
updates the same layer without reloading the model but leaves a hand-corrected one alone, that
Cancel stops within a second, and
that bad input becomes a notification, never an exception.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

import masksam_core
from masksam_core.inference.predictor import Predictor
from masksam_core.io import read_image
from napari_masksam import _models
from napari_masksam._job_widget import device_choices
from napari_masksam._layers import GEOMETRY_KEY, image_layer_kwargs
from napari_masksam._segment_widget import SegmentWidget
from runs import write_tiny_run

pytestmark = pytest.mark.gui

CT = "Dataset501_AbdomenCT/imagesTr/abdct_001_0000.nii.gz"
CLASSES = ["background", "object", "other"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_runs_list(tmp_path, monkeypatch):
    """A fresh remembered-runs list in a temporary cache folder."""
    monkeypatch.setenv("MASKSAM_CACHEDIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_models, "_session", [])
    monkeypatch.setattr(masksam_core, "bundled_models", lambda: {})  # each test sets the list it needs


REAL_BUNDLED_MODELS = masksam_core.bundled_models


def test_the_bundled_model_is_the_default(make_napari_viewer, monkeypatch):
    monkeypatch.setattr(masksam_core, "bundled_models", REAL_BUNDLED_MODELS)
    widget = make_widget(make_napari_viewer())
    assert widget.model.combo.native.currentText() == "abdomen-ct-lite (bundled)"
    assert widget.model.value == masksam_core.bundled_models()["abdomen-ct-lite"]


@pytest.fixture
def notes():
    """The (severity, message) of every napari notification shown during the test."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def keep(event):
        seen.append((str(event.severity), str(event.message)))

    notification_manager.notification_ready.connect(keep)
    yield seen
    notification_manager.notification_ready.disconnect(keep)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="module")
def ct(shared_data):
    return read_image(shared_data / CT)


def crop_layer(viewer, ct, z=(50, 53), y=(40, 52), x=(40, 52), name="ct crop"):
    """An Image layer of a crop of the CT, with the crop's own geometry (origin moved to the crop)."""
    volume, geometry = ct
    crop = np.ascontiguousarray(volume[slice(*z), slice(*y), slice(*x)])
    affine = geometry.affine.copy()
    affine[:3, 3] = geometry.affine[:3, :3] @ np.array([x[0], y[0], z[0]]) + geometry.affine[:3, 3]
    cropped = dataclasses.replace(geometry, affine=affine, shape=crop.shape, header=None)
    kwargs = image_layer_kwargs(crop, cropped, name)
    kwargs["translate"] = tuple(float(v) for v in affine[:3, 3][::-1])  # as if placed in world mm
    return viewer.add_image(crop, **kwargs)


def test_mirroring_is_on_by_default_on_a_gpu_and_off_on_the_cpu(make_napari_viewer, monkeypatch):
    from napari_masksam import _job_widget

    monkeypatch.setattr(_job_widget, "available_devices", lambda: ["cuda", "cpu"])
    widget = make_widget(make_napari_viewer())
    assert widget.device.value == "auto" and widget.tta.value is True  # auto = the GPU
    widget.device.value = "cpu"
    assert widget.tta.value is False
    widget.tta.value = True  # the user's choice stands until the device changes
    assert widget.tta.value is True
    widget.device.value = "cuda"
    assert widget.tta.value is True
    monkeypatch.setattr(_job_widget, "available_devices", lambda: ["cpu"])
    assert make_widget(make_napari_viewer()).tta.value is False


def make_widget(viewer):
    """The widget as napari makes it from the plugin's manifest (it gets a public-only proxy of the viewer)."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-masksam", "Segment (MaskSAM)")
    assert isinstance(widget, SegmentWidget)
    return widget


def errors(notes):
    return [message for severity, message in notes if severity == "error"]


def test_segment_matches_predictor_and_a_second_run_updates_the_layer(make_napari_viewer, qtbot, ct, tiny_run,
                                                                       notes, monkeypatch):
    viewer = make_napari_viewer()
    image = crop_layer(viewer, ct)
    _models.add_run(tiny_run)
    widget = make_widget(viewer)
    assert widget.image.value is image
    assert widget.model.value == str(tiny_run.resolve())
    assert widget.model.combo.native.currentText() == f"run: {tiny_run.name} (trained)"
    widget.tta.value = False

    job = widget.run(sync=True)
    assert job.done and job.error is None and not errors(notes)
    layer = viewer.layers["ct crop [MaskSAM]"]
    expected = Predictor(tiny_run, device="cpu").predict(image.data, image.scale, tta=False).labels
    np.testing.assert_array_equal(layer.data, expected)
    assert list(layer.features["name"]) == CLASSES and list(layer.features["index"]) == [0, 1, 2]
    np.testing.assert_array_equal(layer.scale, image.scale)
    np.testing.assert_array_equal(layer.translate, image.translate)
    np.testing.assert_array_equal(layer.affine.affine_matrix, image.affine.affine_matrix)
    geometry = layer.metadata[GEOMETRY_KEY]
    assert geometry is image.metadata[GEOMETRY_KEY] and geometry.shape == image.data.shape
    assert widget.panel.status.value.startswith("done") and widget.panel.progress.value == widget.panel.progress.max

    loads = []
    monkeypatch.setattr("masksam_core.inference.predictor.Predictor.__init__",
                        lambda *a, **k: loads.append(1) or pytest.fail("the model was loaded again"))
    written = layer.data
    job = widget.run()  # in the thread worker
    assert job.running and not widget.panel.run_button.enabled
    qtbot.waitUntil(lambda: job.done, timeout=60_000)
    assert job.error is None and not errors(notes) and not loads
    assert job.first_yield is not None and job.first_yield < job.seconds
    assert [lay.name for lay in viewer.layers] == ["ct crop", "ct crop [MaskSAM]"]
    assert viewer.layers["ct crop [MaskSAM]"] is layer and layer.data is not written  # the new result
    np.testing.assert_array_equal(layer.data, expected)
    assert widget.panel.run_button.enabled and not widget.panel.cancel_button.enabled

    # the user corrects the result by hand: a further run keeps the corrections and adds a layer
    layer.data[1, 2, 3] = 2 if layer.data[1, 2, 3] != 2 else 1
    corrected = layer.data.copy()
    job = widget.run(sync=True)
    assert job.error is None and not errors(notes)
    assert [lay.name for lay in viewer.layers] == ["ct crop", "ct crop [MaskSAM]", "ct crop [MaskSAM] (2)"]
    np.testing.assert_array_equal(layer.data, corrected)
    np.testing.assert_array_equal(viewer.layers["ct crop [MaskSAM] (2)"].data, expected)
    assert notes[-1] == ("info", "'ct crop [MaskSAM]' was edited since it was made, so it stays as it is; "
                                 "this result is 'ct crop [MaskSAM] (2)'")
    second = viewer.layers["ct crop [MaskSAM] (2)"]
    assert widget.run(sync=True).error is None  # (2) is untouched: the next result replaces it
    assert [lay.name for lay in viewer.layers][-1] == "ct crop [MaskSAM] (2)" and len(viewer.layers) == 3
    second.data[0, 0, 0] = 1 if second.data[0, 0, 0] != 1 else 2  # now that one is corrected too
    assert widget.run(sync=True).error is None
    assert [lay.name for lay in viewer.layers][-1] == "ct crop [MaskSAM] (3)"


def test_cancel_stops_within_a_second(make_napari_viewer, qtbot, ct, tiny_run, notes, monkeypatch):
    calls = []

    def slow_scores(self, batch):  # 50 ms per window batch, and no real network
        calls.append(len(batch))
        time.sleep(0.05)
        return torch.zeros(len(batch), len(self.class_names), *batch.shape[2:])

    monkeypatch.setattr(Predictor, "_scores", slow_scores)
    viewer = make_napari_viewer()
    crop_layer(viewer, ct, z=(40, 60), y=(20, 70), x=(20, 70))  # hundreds of windows: tens of seconds
    _models.add_run(tiny_run)
    widget = make_widget(viewer)
    job = widget.run()
    qtbot.waitUntil(lambda: widget.panel.progress.value >= 3, timeout=60_000)
    assert "windows, ETA" in widget.panel.status.value
    total = widget.panel.progress.max
    start = time.perf_counter()
    widget.panel.cancel_button.native.click()  # as the user
    qtbot.waitUntil(lambda: job.done, timeout=5_000)
    assert time.perf_counter() - start < 1.0
    assert job.cancelled and job.error is None and len(calls) < total
    assert ("info", "Segment (MaskSAM): stopped") in notes and not errors(notes)
    assert "ct crop [MaskSAM]" not in viewer.layers
    assert widget.panel.status.value == "stopped" and widget.panel.run_button.enabled
    done = len(calls)
    qtbot.wait(200)
    assert len(calls) == done  # nothing runs on after the stop

    job = widget.run()  # again, then the dock (or napari) is closed while it runs
    qtbot.waitUntil(lambda: len(calls) >= done + 3, timeout=60_000)
    widget.native.close()
    widget.native.deleteLater()
    qtbot.waitUntil(lambda: job.done, timeout=5_000)
    assert job.cancelled and job.error is None and len(calls) < done + total


def test_bad_input_becomes_a_notification(make_napari_viewer, qtbot, ct, tiny_run, tmp_path, notes, monkeypatch):
    viewer = make_napari_viewer()
    widget = make_widget(viewer)
    job = widget.run()
    assert job.done and "no image layer chosen" in str(job.error)
    assert errors(notes)[-1].startswith("Segment (MaskSAM) failed: no image layer chosen")

    viewer.add_image(np.zeros((20, 30), np.float32), name="flat")
    widget.run()
    assert "'flat' has 2 dimensions" in errors(notes)[-1]

    crop_layer(viewer, ct)
    widget.run()
    assert "no model to choose" in errors(notes)[-1]

    gt_run = write_tiny_run(tmp_path / "gt_run", prompt_mode="gt")
    _models.add_run(gt_run)
    assert widget.model.value == str(gt_run.resolve())  # no config.json: its mode shows only on loading
    job = widget.run()  # the worker loads it and fails
    qtbot.waitUntil(lambda: job.done, timeout=60_000)
    assert "gt-mode run" in errors(notes)[-1] and "masksam-core prompt" in errors(notes)[-1]
    assert widget.panel.status.value.startswith("failed")

    _models.add_run(tiny_run)
    widget.model.value = str(tiny_run.resolve())

    def broken(self, batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(Predictor, "_scores", broken)
    job = widget.run()  # torch's errors are RuntimeErrors: they too must end the job
    qtbot.waitUntil(lambda: job.done, timeout=60_000)
    assert errors(notes)[-1].endswith("unexpected error: RuntimeError: boom")
    assert [lay.name for lay in viewer.layers] == ["flat", "ct crop"]


def test_model_list_bundled_runs_and_browse(make_napari_viewer, tmp_path, tiny_run, monkeypatch, notes):
    import masksam_core

    monkeypatch.setattr(masksam_core, "bundled_models", lambda: {"abdomen-ct": "/models/abdomen"}, raising=False)
    gt_run = tmp_path / "gt_run"
    gt_run.mkdir()
    (gt_run / "checkpoint_last.pt").write_bytes(b"")
    (gt_run / "config.json").write_text(json.dumps({"prompt_mode": "gt"}))
    _models.add_run(gt_run)
    assert _models.model_choices() == [("abdomen-ct (bundled)", "/models/abdomen")]
    assert ("run: gt_run (trained, box prompts)", str(gt_run.resolve())) in _models.box_model_choices()

    widget = make_widget(make_napari_viewer())
    assert widget.model.value == "/models/abdomen"
    assert widget.device.choices[0] == "auto" and widget.device.choices[1:] == tuple(device_choices()[1:])
    assert widget.tta.value is (device_choices()[1] != "cpu") and widget.step_size.value == 0.5
    widget.model.browse.value = tmp_path  # not a run: ignored while typing, explained once chosen
    assert len(_models.known_runs()) == 1 and not notes
    dialog = {"path": str(tmp_path)}
    monkeypatch.setattr(widget.model.browse, "_show_file_dialog", lambda *a, **k: dialog["path"])
    widget.model.browse.choose_btn.changed.emit(True)  # Browse... pressed, tmp_path chosen in the dialog
    assert notes[-1][0] == "warning" and "holds 1: gt_run; choose one of them" in notes[-1][1]
    widget.model.browse.value = tiny_run  # as chosen in the Browse... dialog
    assert _models.known_runs()[0] == tiny_run.resolve()
    assert widget.model.value == str(tiny_run.resolve())
    assert widget.model.combo.choices == ("/models/abdomen", str(tiny_run.resolve()))
    assert json.loads(_models.runs_file().read_text())[0] == str(tiny_run.resolve())
    widget.model.browse.value = gt_run  # a box-prompt run: remembered, listed in the other widget
    text = "added run: gt_run (trained, box prompts): it is listed in the Box prompt widget, not here"
    assert notes[-1] == ("info", text)
    assert widget.model.value == str(tiny_run.resolve())
    dialog["path"] = str(tmp_path / "nothing")  # typed into the dialog
    widget.model.browse.choose_btn.changed.emit(True)
    assert notes[-1] == ("warning", f"{tmp_path / 'nothing'} does not exist: choose a training run folder or a "
                         "checkpoint .pt file")

    newer = write_tiny_run(tmp_path / "newer")  # trained while the widget is open: listed first of the runs
    _models.add_run(newer)
    assert widget.model.combo.choices == ("/models/abdomen", str(newer.resolve()), str(tiny_run.resolve()))
    assert widget.model.value == str(tiny_run.resolve())  # the choice stays


def test_runs_with_the_same_folder_name_stay_apart(tmp_path):
    """Two runs named alike in different places are two entries, each labelled with its path."""
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for run in (first, second):
        run.mkdir(parents=True)
        _models.add_run(run)
    runs = [(label, value) for label, value in _models.model_choices() if value in (str(first), str(second))]
    assert sorted(value for _, value in runs) == [str(first), str(second)]
    assert len({label for label, _ in runs}) == 2
    assert all(value in label for label, value in runs)


def test_reader_segment_writer_keeps_the_source_affine(make_napari_viewer, ct, tiny_run, tmp_path, notes):
    """File > Open (the plugin's reader) -> Segment -> File > Save: the labels file has the scan's affine."""
    import nibabel as nib

    from masksam_core.io import write_image

    volume, geometry = ct
    crop = np.ascontiguousarray(volume[50:53, 40:52, 40:52])
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # oblique in-plane, as scanners write
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([3.0, 3.0, 3.0])
    affine[:3, 3] = (-12.5, 40.0, 7.0)
    source = tmp_path / "scan.nii.gz"
    write_image(source, crop, dataclasses.replace(geometry, affine=affine, shape=crop.shape, header=None))

    viewer = make_napari_viewer()
    [image] = viewer.open(str(source), plugin="napari-masksam")
    _models.add_run(tiny_run)
    widget = make_widget(viewer)
    widget.image.value = image
    widget.tta.value = False
    job = widget.run(sync=True)
    assert job.error is None and not errors(notes)
    labels = viewer.layers["scan [MaskSAM]"]
    assert list(labels.features["name"]) == CLASSES

    out = tmp_path / "scan_labels.nii.gz"
    labels.save(str(out), plugin="napari-masksam")
    saved, scan = nib.load(out), nib.load(source)
    np.testing.assert_array_equal(saved.affine, scan.affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj).transpose(2, 1, 0), labels.data)
