"""The Train (MaskSAM) widget and the layers -> data-set export.

Training runs use the ``tiny`` preset with 2×32×32 patches, batch size 1, a few iterations and no
loader processes, on a 2-case phantom (``tests/phantom.py``) or a 24×40×40 crop of the real CT.
References: the files on disk (read back with ``masksam_core.io``), ``masksam-core check`` on the
export, the run list of ``_models``, and the labels remapped by hand from the class names.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from masksam_core.data.dataset import check_dataset
from masksam_core.errors import MaskSAMError
from masksam_core.io import ImageGeometry, read_image
from napari_masksam._dataset_export import check_split, export_layers_dataset, layers_training_data

sys.path.insert(0, str(Path(__file__).parent))
from phantom import make_phantom_dataset

CT = "Dataset501_AbdomenCT"
CROP = (slice(76, 100), slice(30, 70), slice(40, 80))  # (Z, Y, X): 7 of the 8 organs, no spleen


@pytest.fixture(scope="module")
def ct_crop(shared_data: Path) -> tuple[np.ndarray, np.ndarray, ImageGeometry, list[str]]:
    """(image, labels, geometry of the crop, the data set's class names)."""
    image, geometry = read_image(shared_data / CT / "imagesTr" / "abdct_001_0000.nii.gz")
    labels, _ = read_image(shared_data / CT / "labelsTr" / "abdct_001.nii.gz")
    meta = json.loads((shared_data / CT / "dataset.json").read_text())
    names = sorted(meta["labels"], key=meta["labels"].get)
    start = np.array([CROP[2].start, CROP[1].start, CROP[0].start, 1.0])  # file index (x, y, z)
    affine = geometry.affine.copy()
    affine[:3, 3] = (geometry.affine @ start)[:3]
    crop_geometry = replace(geometry, affine=affine, shape=image[CROP].shape)
    return np.ascontiguousarray(image[CROP]), np.ascontiguousarray(labels[CROP]), crop_geometry, names


# --------------------------------------------------------------------------- export (no GUI)


def test_export_writes_a_checked_dataset_with_the_scans_geometry(ct_crop, tmp_path):
    image, labels, geometry, names = ct_crop
    root = export_layers_dataset(image, labels, names, tmp_path / "run", geometry=geometry)
    assert root == tmp_path / "run" / "dataset"
    assert check_dataset(root) == []
    meta = json.loads((root / "dataset.json").read_text())
    present = [names[v] for v in np.unique(labels)]
    assert "spleen" not in present and len(present) == 8
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {n: i for i, n in enumerate(present)}
    assert (meta["numTraining"], meta["file_ending"]) == (1, ".nii.gz")
    written, g = read_image(root / "imagesTr" / "case_000_0000.nii.gz")
    np.testing.assert_array_equal(written, image)
    np.testing.assert_allclose(g.affine, geometry.affine, atol=1e-4)
    assert g.spacing == pytest.approx(geometry.spacing)
    written_labels, gl = read_image(root / "labelsTr" / "case_000.nii.gz")
    expected = np.vectorize(lambda v: present.index(names[v]))(labels)
    np.testing.assert_array_equal(written_labels, expected)
    np.testing.assert_allclose(gl.affine, geometry.affine, atol=1e-4)


def test_export_of_non_ct_arrays_and_names(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 800, (10, 12, 14)).astype(np.float32)  # MR-like: no air, no bone
    labels = np.zeros(image.shape, np.int32)
    labels[2:8, 3:6, 4:9] = 7
    labels[2:8, 7:10, 4:9] = 3
    data = layers_training_data(image, labels, ["bg", "a", "a", "b"])  # duplicate names; 7 unnamed
    assert data.class_names == ["bg", "b", "class_7"]
    assert data.dropped == ("a", "a")
    assert set(np.unique(data.labels)) == {0, 1, 2} and data.labels.dtype == np.uint8
    assert data.geometry.spacing == (1.0, 1.0, 1.0)
    root = export_layers_dataset(image, labels, ["bg", "liver", "liver", "liver"], tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"}
    assert meta["labels"] == {"bg": 0, "liver": 1, "class_7": 2}
    assert check_dataset(root) == []
    with pytest.raises(MaskSAMError, match="already holds a data set"):
        export_layers_dataset(image, labels, None, tmp_path)
    export_layers_dataset(image, labels, None, tmp_path, overwrite=True)


@pytest.mark.parametrize("case, message", [
    ("none", "no labels layer"), ("shape", "shape"), ("empty", "empty"), ("negative", "negative"),
    ("float", "dtype"), ("2d", "3D scan"),
])
def test_export_refuses_bad_labels(case, message, tmp_path):
    image = np.zeros((6, 8, 8), np.float32)
    labels = {"none": None, "shape": np.ones((6, 8, 9), np.uint8), "empty": np.zeros((6, 8, 8), np.uint8),
              "negative": np.full((6, 8, 8), -1, np.int32), "float": np.ones((6, 8, 8), np.float32),
              "2d": np.ones((8, 8), np.uint8)}[case]
    with pytest.raises(MaskSAMError, match=message):
        export_layers_dataset(image[0] if case == "2d" else image, labels, None, tmp_path)
    assert not (tmp_path / "dataset").exists()


def test_check_split_names_classes_missing_from_training_slices():
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[1, 0, 0], labels[9, 0, 0] = 1, 2  # class 2 only in the last 20 % of the slices
    assert check_split(labels, ["background", "a", "b"], 0.2) == ["b"]
    assert check_split(labels, ["background", "a", "b"], 0.0) == []
    labels[1, 0, 0] = 0
    with pytest.raises(MaskSAMError, match="held out for validation"):
        check_split(labels, ["background", "a", "b"], 0.2)


# --------------------------------------------------------------------------- the widget


@pytest.fixture
def runs(monkeypatch, tmp_path):
    """An empty run list in a temporary cache; one torch thread."""
    import torch

    from napari_masksam import _models

    monkeypatch.setenv("MASKSAM_CACHEDIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_models, "_session", [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _models
    torch.set_num_threads(threads)


@pytest.fixture
def notes():
    from napari.utils.notifications import notification_manager

    notification_manager.records.clear()
    return notification_manager.records


def make_widget(viewer, out: Path, *, epochs: int = 1, iters: int = 3, queries: int = 3):
    from napari_masksam._train_widget import TrainWidget

    widget = TrainWidget(viewer)
    widget.preset.value = "tiny"
    widget.epochs.value, widget.iters.value = epochs, iters
    widget.batch_size.value, widget.patch_size.value, widget.queries.value = 1, "2 32 32", queries
    widget.workers.value, widget.device.value = 0, "cpu"
    widget.out.value = out
    return widget


def train(qtbot, widget, timeout: float = 90.0) -> None:
    job = widget.start()
    assert job is not None, widget.panel.status.value
    qtbot.waitUntil(lambda: not widget.running, timeout=int(timeout * 1000))
    assert job.error is None, widget.panel.status.value


@pytest.mark.gui
def test_train_from_a_dataset_folder(make_napari_viewer, qtbot, tmp_path, runs, notes):
    viewer = make_napari_viewer()
    data = make_phantom_dataset(tmp_path / "Dataset900_Phantom", cases=2, shape=(32, 32, 8))
    out = tmp_path / "run"
    widget = make_widget(viewer, out)
    widget.dataset.value = data
    train(qtbot, widget)
    assert (out / "checkpoint_last.pt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and "val_mean_dice" in rows[0]
    assert runs.known_runs()[0] == out.resolve()
    assert widget.plot.iter_x == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert np.isfinite(widget.plot.iter_loss).all()
    assert widget.plot.epoch_loss == pytest.approx([rows[0]["loss"]])
    assert widget.plot.dice == pytest.approx([rows[0]["val_mean_dice"]])
    assert len(widget.plot.iter_line.get_xdata()) == 3
    assert widget.panel.progress.value == widget.panel.progress.max == 3
    assert "it/s" in widget.stats.value and "loss" in widget.stats.value
    assert any(str(out.resolve()) in str(n.message) and "finished" in str(n.message) for n in notes)
    assert widget.start() is None  # the folder now holds a run: not without 'resume'
    assert "already holds a training run" in str(notes[-1].message)


@pytest.mark.gui
def test_train_from_layers_of_a_real_ct_crop(make_napari_viewer, qtbot, tmp_path, runs, notes, ct_crop):
    from napari_masksam._layers import image_layer_kwargs
    from napari_masksam._train_widget import LAYERS

    image, labels, geometry, names = ct_crop
    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((4, 5, 6), np.uint8), name="other")
    layer = viewer.add_image(image, **image_layer_kwargs(image, geometry, "ct crop"))
    viewer.add_labels(labels, name="organs", scale=layer.scale,
                      features={"index": np.arange(len(names)), "name": names})
    out = tmp_path / "run"
    widget = make_widget(viewer, out, iters=2, queries=0)
    widget.source.value = LAYERS
    assert widget.image.value is layer and widget.labels_layer.value.name == "organs"
    assert "last 20%" in widget.split_info.value
    train(qtbot, widget)
    assert check_dataset(out / "dataset") == []
    meta = json.loads((out / "dataset" / "dataset.json").read_text())
    assert list(meta["labels"]) == [names[v] for v in np.unique(labels)]
    _, written = read_image(out / "dataset" / "imagesTr" / "case_000_0000.nii.gz")
    np.testing.assert_allclose(written.affine, geometry.affine, atol=1e-4)
    assert (out / "checkpoint_last.pt").is_file() and (out / "metrics.jsonl").is_file()
    assert runs.known_runs()[0] == out.resolve()
    assert len(widget.plot.iter_loss) == 2 and len(widget.plot.epoch_loss) == 1

    # a later session resumes it: on the data it began with, whatever layers the controls now show
    exported = (out / "dataset" / "labelsTr" / "case_000.nii.gz").read_bytes()
    fresh = make_widget(viewer, out, epochs=2, iters=2, queries=0)
    fresh.source.value = LAYERS
    fresh.labels_layer.value = viewer.layers["other"]  # another shape: would not even export
    fresh.resume.value = True
    config, layers = fresh.plan()
    assert layers is None and Path(config.dataset) == out / "dataset" and config.resume
    train(qtbot, fresh)
    assert (out / "dataset" / "labelsTr" / "case_000.nii.gz").read_bytes() == exported
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.gui
def test_stop_saves_a_checkpoint_and_ends_soon(make_napari_viewer, qtbot, tmp_path, runs, notes):
    import torch

    viewer = make_napari_viewer()
    data = make_phantom_dataset(tmp_path / "Dataset900_Phantom", cases=2, shape=(32, 32, 8))
    out = tmp_path / "run"
    widget = make_widget(viewer, out, epochs=3, iters=200)
    widget.dataset.value = data
    job = widget.start()
    qtbot.waitUntil(lambda: len(widget.plot.iter_x) >= 2, timeout=60_000)
    widget.stop()
    t0 = time.monotonic()
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert time.monotonic() - t0 < 10
    assert job.error is None
    state = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and 2 <= state["iteration"] < 200
    assert runs.known_runs()[0] == out.resolve()
    assert any("stopped" in str(n.message) for n in notes)
    widget.resume.value = True  # resuming needs the run's own settings, so no preset etc. are passed
    config, layers = widget.plan()
    assert config.resume and config.preset is None and layers is None and Path(config.dataset) == data

    other = make_widget(viewer, tmp_path / "aborted")
    other.dataset.value = data
    other.start()
    other.stop()  # before the first iteration: nothing to save, so abort
    qtbot.waitUntil(lambda: not other.running, timeout=30_000)
    assert not (tmp_path / "aborted" / "checkpoint_last.pt").exists()
    assert runs.known_runs() == [out.resolve()]


@pytest.mark.gui
def test_the_widget_starts_at_the_new_run_defaults(make_napari_viewer, tmp_path, monkeypatch):
    from masksam_core.modeling.presets import PRESETS
    from masksam_core.training import TrainConfig
    from masksam_core.training.config import NEW_RUN_DEFAULTS, widget_options
    from napari_masksam._train_widget import TrainWidget, default_preset

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _, widget = make_napari_viewer().window.add_plugin_dock_widget("napari-masksam", "Train (MaskSAM)")
    assert isinstance(widget, TrainWidget)
    settings = widget._settings()
    assert settings.pop("preset") == default_preset() and widget.epochs.value == PRESETS[default_preset()].epochs
    assert settings == {k: NEW_RUN_DEFAULTS[k] for k in settings}
    assert (widget.workers.value, widget.device.value) == (TrainConfig.num_workers, TrainConfig.device)
    assert (widget.minutes.value or None) is TrainConfig.time_limit  # 0: no limit
    for box, name in ((widget.epochs, "epochs"), (widget.iters, "iters_per_epoch"), (widget.minutes, "time_limit"),
                      (widget.batch_size, "batch_size"), (widget.queries, "num_queries"), (widget.lr, "lr"),
                      (widget.val_fraction, "val_fraction"), (widget.workers, "num_workers")):
        options = widget_options(name)
        assert (box.min, box.max) == (options["min"], options["max"]), name
        assert box.step == options.get("step", box.step), name


@pytest.mark.gui
def test_bad_input_becomes_a_notification(make_napari_viewer, tmp_path, runs, notes, monkeypatch):
    from napari_masksam._train_widget import LAYERS, TrainWidget

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-masksam", "Train (MaskSAM)")  # as napari.yaml says
    assert isinstance(widget, TrainWidget)
    assert Path(widget.out.value).parent == tmp_path / "home" / "masksam-runs"
    assert widget.preset.value in ("lite", "tiny")

    def refused(text: str) -> None:
        notes.clear()
        assert widget.start() is None and not widget.running
        assert len(notes) == 1 and text in str(notes[0].message), [str(n.message) for n in notes]

    refused("choose a data-set folder")  # the default data-set folder is no data set
    broken = tmp_path / "broken"
    (broken / "imagesTr").mkdir(parents=True)
    widget.dataset.value = broken  # a data set with problems: the checker's first ones
    refused("the data set has problems: ")
    widget.source.value = LAYERS
    refused("no image layer")
    viewer.add_image(np.zeros((6, 8, 8), np.float32), name="scan")
    widget.image.value = viewer.layers["scan"]
    refused("no labels layer")
    viewer.add_labels(np.ones((6, 8, 9), np.uint8), name="wrong")
    refused("shape")
    viewer.add_labels(np.zeros((6, 8, 8), np.uint8), name="empty")
    widget.labels_layer.value = viewer.layers["empty"]
    refused("empty")
    viewer.layers["empty"].data[1:3, 2:4, 2:4] = 1
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    widget.out.value = full
    refused("not empty")
    (full / "checkpoint_last.pt").write_bytes(b"")
    refused("already holds a training run")
    widget.out.value = tmp_path / "new"
    widget.resume.value = True
    refused("nothing to resume")
    widget.resume.value = False
    widget.advanced.value = True
    assert not widget.augmentation.native.isHidden() and widget.augmentation.value == "full"
    widget.augmentation.value = "no-mirror"
    assert widget.plan()[0].augmentation == "no-mirror"  # the setting reaches the trainer
    widget.patch_size.value = "4 64"
    refused("patch size")
    assert not (tmp_path / "new").exists() and not (tmp_path / "home" / "masksam-runs").exists()


@pytest.mark.gui
def test_closing_the_widget_saves_and_a_failed_start_frees_the_folder(make_napari_viewer, qtbot, tmp_path, runs,
                                                                      notes, monkeypatch):
    import torch

    from masksam_core.errors import MaskSAMError
    from masksam_core.training import trainer as trainer_module

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    data = make_phantom_dataset(tmp_path / "Dataset900_Phantom", cases=2, shape=(32, 32, 8))
    widget = make_widget(viewer, tmp_path / "unused", epochs=3, iters=200)
    widget._auto_out = True  # as opened: the folder follows the data set's name
    widget.dataset.value = data
    real_run = trainer_module.Trainer.run

    def failing_run(self):
        Path(self.config.out).mkdir(parents=True)
        (Path(self.config.out) / "plans.json").write_text("{}")  # a failed start leaves files behind
        raise MaskSAMError("boom")
        yield  # a generator, as the real one

    monkeypatch.setattr(trainer_module.Trainer, "run", failing_run)
    job = widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    first = Path(widget._out)
    assert job.error is not None and (first / "plans.json").exists()
    monkeypatch.setattr(trainer_module.Trainer, "run", real_run)
    job = widget.start()  # not refused as "not empty": a new automatic folder
    assert job is not None and Path(widget._out) != first
    qtbot.waitUntil(lambda: len(widget.plot.iter_x) >= 2, timeout=60_000)
    widget.native.close()
    widget.native.deleteLater()  # the dock (or napari) closed while training
    qtbot.waitUntil(lambda: job.done, timeout=60_000)
    out = Path(widget._out)
    state = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and 2 <= state["iteration"] < 200  # stopped soon, with a checkpoint
    assert runs.known_runs()[0] == out.resolve()  # and listed, though the widget is gone
