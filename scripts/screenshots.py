#!/usr/bin/env python
"""Screenshots of the napari-masksam widgets for docs/napari.md, each taken after a real run on the
sample CT (File > Open Sample > Abdominal CT, 8 organs).

    python scripts/screenshots.py                  # about 10 min on 2 CPU cores; a GPU is used when present
    python scripts/screenshots.py --quick --out /tmp/shots
    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py   # without pyvirtualdisplay

Without a display (a Linux server) the script starts a virtual one (Xvfb through ``pyvirtualdisplay``);
``xvfb-run`` as above does the same. It opens napari, loads the sample CT with its organ labels, docks
each widget from the plugin's manifest and drives it as a user would (the widgets' own controls, the
Run/Start buttons, waiting in the Qt event loop until the job ends):

* ``napari_reader.png``: the sample CT and its organ labels (at opacity 0.5);
* ``napari_train.png``: the ``tiny`` preset trained on the open layers (3 epochs x 30 iterations);
* ``napari_segment.png``: the bundled model ``abdomen-ct-lite`` (the widget's default) segmenting the CT
  (no mirroring, step size 0.5), or the run given by ``--segment-run``;
* ``napari_box_prompt.png``: LiteMedSAM (``lite``) on rectangles around the spleen and the right kidney,
  over 5 slices.

The PNGs in ``--out`` (default ``docs/images``) are replaced. Runs and the remembered-runs list go to a
temporary folder (``MASKSAM_CACHEDIR`` points there), so the user's own list of runs is untouched.
Training is seeded (seed 0). The pictures show axial slice 90 in the radiological orientation (the
Segment picture: the slice where the model marks the most voxels, 90 when it marks none).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SLICE = 90  # axial slice (Z) through the liver, spleen, both kidneys, stomach, pancreas and aorta
BOX_ORGANS = (1, 2)  # label values of the spleen and the right kidney in the sample labels
BOX_MARGIN = 1  # voxels around an organ's bounding box on the slice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder of the PNGs")
    parser.add_argument("--quick", action="store_true",
                        help="1 epoch x 10 iterations, step size 1, boxes on one slice (a few minutes on a CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    parser.add_argument("--size", type=int, nargs=2, default=(1400, 900), metavar=("W", "H"),
                        help="window size in pixels (default: 1400 900)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with the training run")
    parser.add_argument("--segment-run", type=Path, default=None, metavar="RUN",
                        help="segment with this run folder or model file instead of the bundled model")
    return parser.parse_args(argv)


def ensure_display(size: tuple[int, int]) -> Any:
    """Start a virtual X display on a Linux machine without one; returns it (or None)."""
    if not sys.platform.startswith("linux") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    try:
        from pyvirtualdisplay import Display
    except ImportError:
        sys.exit("no display: run under xvfb-run -a -s '-screen 0 1600x1000x24' python scripts/screenshots.py, "
                 "or pip install pyvirtualdisplay (and apt-get install xvfb)")
    display = Display(visible=False, size=(size[0] + 200, size[1] + 100), color_depth=24)
    display.start()
    return display


class Shooter:
    """The viewer, the Qt event loop and the timings of one screenshot session."""

    def __init__(self, out: Path, size: tuple[int, int]) -> None:
        import napari
        from napari.settings import get_settings
        from qtpy.QtWidgets import QApplication

        get_settings().application.gui_notification_level = "error"  # no info pop-ups over the pictures

        self.out = out
        self.viewer = napari.Viewer(title="napari-masksam", show=True)
        self.viewer.window.resize(*size)
        self.app = QApplication.instance()
        self.timings: dict[str, float] = {}
        self.written: list[Path] = []
        self.docked: Any = None

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Run the Qt event loop until ``done()`` is true; exit with a message after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                sys.exit(f"{what}: not done after {timeout:.0f} s")
            self.app.processEvents()
            time.sleep(0.02)

    def settle(self, seconds: float = 1.0) -> None:
        """Let Qt lay out and draw everything (the canvas, the plot, the progress bar)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.app.processEvents()
            time.sleep(0.02)

    def dock(self, name: str) -> tuple[Any, Any]:
        """Dock the plugin's widget ``name`` (as Plugins > MaskSAM > name does), the only one docked."""
        if self.docked is not None:  # the previous step's widget
            self.viewer.window.remove_dock_widget(self.docked)
        self.docked, widget = self.viewer.window.add_plugin_dock_widget("napari-masksam", name)
        return self.docked, widget

    def shoot(self, name: str) -> Path:
        """Screenshot of the whole window into ``<out>/napari_<name>.png``."""
        self.viewer.reset_view()  # fill the canvas, which a docked widget narrows
        self.settle(1.5)
        path = self.out / f"napari_{name}.png"
        self.viewer.window.screenshot(path=str(path), flash=False, canvas_only=False)
        self.written.append(path)
        print(f"  wrote {path}", flush=True)
        return path

    def timed(self, what: str, start: float) -> None:
        self.timings[what] = time.perf_counter() - start
        print(f"  {what}: {self.timings[what]:.1f} s", flush=True)


def go_to_slice(viewer: Any, image: Any, z: int) -> None:
    """Show axial slice ``z`` as a radiologist would (anterior up, the patient's right on the left),
    filling the canvas. The sample is stored RAS: +Y anterior, +X the patient's right."""
    viewer.dims.set_point(0, image.data_to_world([z, 0, 0])[0])
    camera = getattr(viewer, "scene", viewer).camera  # napari >= 0.9: viewer.scene.camera
    if hasattr(camera, "orientation2d"):  # napari >= 0.6
        camera.orientation2d = ("up", "left")
    viewer.reset_view()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of one shape (1 when both are empty)."""
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def reader_step(shot: Shooter) -> tuple[Any, Any]:
    """Open the sample CT as File > Open Sample does; screenshot of the two layers."""
    start = time.perf_counter()
    image, labels = shot.viewer.open_sample("napari-masksam", "abdomen_ct")
    labels.opacity = 0.5
    go_to_slice(shot.viewer, image, SLICE)
    shot.viewer.layers.selection.active = labels
    shot.timed("open the sample", start)
    shot.shoot("reader")
    return image, labels


def train_step(shot: Shooter, runs: Path, device: str, epochs: int, iters: int) -> Path:
    """Train the ``tiny`` preset on the open layers with the Train widget; screenshot after the run."""
    from napari_masksam._train_widget import LAYERS

    _, widget = shot.dock("Train (MaskSAM)")
    widget.source.value = LAYERS  # picks the CT and the labels layer on its grid
    widget.preset.value = "tiny"
    widget.epochs.value, widget.iters.value = epochs, iters
    widget.device.value = device
    widget.workers.value = 0  # advanced setting: no loader processes beside the Qt application
    run = runs / "abdomen_ct-tiny"
    widget.out.value = run
    start = time.perf_counter()
    widget.start_button.native.click()
    shot.wait_until(lambda: widget.job is not None and not widget.running, 3600, "training")
    if widget.job.error is not None or not (run / "checkpoint_last.pt").is_file():
        sys.exit(f"training failed: {widget.status.value}")
    shot.timed(f"train tiny, {epochs} x {iters} iterations", start)
    print(f"  {widget.status.value} | {widget.stats.value}", flush=True)
    shot.shoot("train")
    return run


def segment_step(shot: Shooter, image: Any, labels: Any, model: str, device: str, step_size: float) -> None:
    """Segment the CT with ``model`` (a value of the widget's model list); screenshot of the result on
    the slice where it marks the most voxels, with the sample's labels as outlines."""
    _, widget = shot.dock("Segment (MaskSAM)")
    widget.image.value = image
    matching = [c for c in widget.model.combo.choices if str(c) == model]
    if not matching:
        sys.exit(f"{model} is not in the Segment widget's model list: {widget.model.combo.choices}")
    widget.model.value = matching[0]
    widget.device.value = device
    widget.tta.value = False
    widget.step_size.value = step_size
    start = time.perf_counter()
    widget.panel.run_button.native.click()
    shot.wait_until(lambda: widget.job is not None and widget.job.done, 3600, "segmentation")
    if widget.job.error is not None:
        sys.exit(f"segmentation failed: {widget.job.error}")
    shot.timed("segment the CT", start)
    result = shot.viewer.layers[f"{image.name} [MaskSAM]"]
    names = list(result.features["name"])
    scores = [f"{n} {dice(result.data == names.index(n), labels.data == v):.2f}"
              for v, n in enumerate(labels.features["name"]) if v and n in names]
    print(f"  Dice against the sample labels: {', '.join(scores)}", flush=True)
    found = np.asarray(result.data) > 0
    found[~np.asarray(labels.data).any(axis=(1, 2))] = False  # slices without organs do not count
    z = int(found.sum(axis=(1, 2)).argmax()) if found.any() else SLICE
    print(f"  shown on slice {z}, where the model marks the most voxels", flush=True)
    go_to_slice(shot.viewer, image, z)
    labels.contour, labels.opacity = 1, 1.0  # the sample's own labels as outlines, for comparison
    result.opacity = 0.5
    shot.viewer.layers.selection.active = result
    shot.shoot("segment")
    result.visible = labels.visible = False


def box_step(shot: Shooter, image: Any, labels: Any, device: str, half_depth: int) -> None:
    """Rectangles around the spleen and the right kidney on the current slice; LiteMedSAM over
    ``SLICE ± half_depth``; screenshot of the two masks."""
    _, widget = shot.dock("Box prompt (MaskSAM)")
    widget.image.value = image
    if widget.model.value != "lite":
        sys.exit("LiteMedSAM ('lite') is not installed: pip install 'napari-masksam[lite]'")
    widget.device.value = device
    go_to_slice(shot.viewer, image, SLICE)
    widget.follow.value = False
    widget.z0.value, widget.z1.value = SLICE - half_depth, SLICE + half_depth
    shapes = widget.add_boxes_layer()  # the image's transform: data coordinates = voxel indices
    expected = []
    for organ in BOX_ORGANS:
        ys, xs = np.nonzero(np.asarray(labels.data[SLICE]) == organ)
        y0, y1 = int(ys.min()) - BOX_MARGIN, int(ys.max()) + BOX_MARGIN  # inclusive voxel indices
        x0, x1 = int(xs.min()) - BOX_MARGIN, int(xs.max()) + BOX_MARGIN
        corners = [(y0 - 0.5, x0 - 0.5), (y0 - 0.5, x1 + 0.5), (y1 + 0.5, x1 + 0.5), (y1 + 0.5, x0 - 0.5)]
        shapes.add_rectangles(np.array([[SLICE, y, x] for y, x in corners], dtype=float))  # voxel edges
        expected.append((SLICE - half_depth, SLICE + half_depth + 1, y0, x0, y1 + 1, x1 + 1))
    if widget.voxel_boxes() != expected:
        sys.exit(f"the rectangles map to {widget.voxel_boxes()}, not {expected}")
    start = time.perf_counter()
    widget.panel.run_button.native.click()
    shot.wait_until(lambda: widget.job is not None and widget.job.done, 3600, "box prompt")
    if widget.job.error is not None:
        sys.exit(f"box prompt failed: {widget.job.error}")
    shot.timed(f"box prompt, {len(BOX_ORGANS)} boxes x {2 * half_depth + 1} slices", start)
    result = shot.viewer.layers[f"{image.name} [boxes]"]
    z = slice(SLICE - half_depth, SLICE + half_depth + 1)
    names = list(labels.features["name"])
    scores = [f"{names[organ]} {dice(np.asarray(result.data[z]) == k, np.asarray(labels.data[z]) == organ):.3f}"
              for k, organ in enumerate(BOX_ORGANS, 1)]
    print(f"  Dice on slices {z.start}..{z.stop - 1} against the sample labels: {', '.join(scores)}", flush=True)
    result.opacity = 0.5
    shapes.mode = "select"
    shot.viewer.layers.selection.active = shapes
    shot.shoot("box_prompt")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    display = ensure_display(tuple(args.size))
    work = Path(tempfile.mkdtemp(prefix="masksam-screenshots-"))
    os.environ["MASKSAM_CACHEDIR"] = str(work / "cache")  # before the plugin reads its run list
    os.environ["NAPARI_CONFIG"] = str(work / "napari_settings.yaml")  # napari's defaults, not the user's
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    epochs, iters = (1, 10) if args.quick else (3, 30)
    print(f"screenshots into {args.out}; runs in {work}", flush=True)
    total = time.perf_counter()
    shot = Shooter(args.out, tuple(args.size))
    try:
        image, labels = reader_step(shot)
        train_step(shot, work / "runs", args.device, epochs, iters)
        if args.segment_run is not None:
            from napari_masksam import _models

            _models.add_run(args.segment_run)  # as Browse... in the Segment widget does
            model = str(args.segment_run.expanduser().resolve())
        else:
            from masksam_core.runs import bundled_models

            model = str(bundled_models()["abdomen-ct-lite"])  # the widget's default
        segment_step(shot, image, labels, model, args.device, 1.0 if args.quick else 0.5)
        box_step(shot, image, labels, args.device, 0 if args.quick else 2)
    finally:
        shot.viewer.close()
        if display is not None:
            display.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    shot.timings["total"] = time.perf_counter() - total
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in shot.timings.items()))
    print("images: " + ", ".join(p.name for p in shot.written))


if __name__ == "__main__":
    main()
