"""Prediction inside napari's thread worker (the Segment widget) against a direct ``Predictor`` call.

On a crop of the sample CT (../shared/data/Dataset501_AbdomenCT) with a random-weight ``tiny``
run (the speed does not depend on the weights; ``--run`` takes a real one), measures:

(a) latency: Run -> the first progress report shown in the GUI (``Job.first_yield``), once cold
    (the widget loads the model) and then warm (the widget's cached predictor);
(b) throughput: windows/s between the first progress report (after preprocessing) and the
    last one, in the worker (timestamps taken on the GUI thread, as the user sees them) and in
    a direct ``Predictor.predict_iter`` loop on the same volume, run, options and torch threads;
    also the whole call's seconds, and the longest the GUI event loop went without running a
    20 ms timer while the worker ran (the viewer must stay responsive; the first run includes
    making the Labels layer on the GUI thread, timed separately as ``show_result_s``).

Worker and direct runs alternate, ``--repeats`` times each; medians are reported. Needs a
display: run under Xvfb.

    xvfb-run -a python benchmarks/napari_worker.py [--threads 1] [--tta off] [--repeats 3]
        [--crop 50 56 30 60 30 60] [--run RUN_DIR] [--device cpu] [--out benchmarks/results/napari_worker.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in both measurements (default 1)")
    parser.add_argument("--tta", choices=["off", "on"], default="off")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, nargs=6, default=[50, 56, 30, 60, 30, 60],
                        metavar=("Z0", "Z1", "Y0", "Y1", "X0", "X1"), help="half-open voxel crop of the CT")
    parser.add_argument("--run", type=Path, help="a run folder (default: a random-weight tiny run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "napari_worker.json")
    return parser.parse_args()


def windows_per_second(stamps: list[tuple[float, int, int]]) -> float:
    """Windows/s from (time, done, total) reports: first report (0 done) to the last."""
    (t0, d0, _), (t1, d1, _) = stamps[0], stamps[-1]
    return (d1 - d0) / (t1 - t0)


def main() -> None:
    args = parse()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch
    from qtpy.QtCore import QEventLoop, QTimer

    torch.set_num_threads(args.threads)
    import napari

    from masksam_core.inference.predictor import Predictor
    from masksam_core.io import read_image
    from napari_masksam import _models
    from napari_masksam import _segment_widget as segment_widget
    from napari_masksam._layers import image_layer_kwargs
    from napari_masksam._segment_widget import SegmentWidget

    work = Path(tempfile.mkdtemp(prefix="masksam-bench-"))
    os.environ["MASKSAM_CACHEDIR"] = str(work / "cache")  # leave the user's list of runs alone
    if args.run is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from runs import write_tiny_run

        run = write_tiny_run(work / "tiny_run")
    else:
        run = args.run
    volume, geometry = read_image(args.data / "Dataset501_AbdomenCT" / "imagesTr" / "abdct_001_0000.nii.gz")
    z0, z1, y0, y1, x0, x1 = args.crop
    crop = np.ascontiguousarray(volume[z0:z1, y0:y1, x0:x1])
    geometry = dataclasses.replace(geometry, shape=crop.shape, header=None)
    tta = args.tta == "on"

    threads_seen: dict[str, int] = {}
    scores = Predictor._scores

    def counting_scores(self, batch):  # records the torch threads of the thread that runs the network
        where = "direct" if threading.current_thread() is threading.main_thread() else "worker"
        threads_seen.setdefault(where, torch.get_num_threads())
        return scores(self, batch)

    Predictor._scores = counting_scores
    shown: list[float] = []
    show_labels = segment_widget.show_labels

    def timed_show_labels(*a, **k):  # the result display, on the GUI thread
        start = time.perf_counter()
        layer = show_labels(*a, **k)
        shown.append(time.perf_counter() - start)
        return layer

    segment_widget.show_labels = timed_show_labels

    viewer = napari.Viewer(show=False)
    viewer.add_image(crop, **image_layer_kwargs(crop, geometry, "ct crop"))
    _models.add_run(run)
    widget = SegmentWidget(viewer)
    widget.model.value = str(Path(run).resolve())
    widget.device.value = args.device
    widget.tta.value = tta

    def in_worker() -> dict:
        stamps: list[tuple[float, int, int]] = []
        show = widget.panel.show_progress
        widget.panel.show_progress = lambda p: (stamps.append((time.perf_counter(), p.done, p.total)), show(p))
        loop, ticks = QEventLoop(), []
        timer = QTimer()
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start(20)
        finished = widget.panel.finished
        widget.panel.finished = lambda job: (finished(job), loop.quit())
        job = widget.run()
        if not job.done:
            loop.exec()
        timer.stop()
        widget.panel.show_progress, widget.panel.finished = show, finished
        assert job.error is None, job.error
        gaps = np.diff(ticks) if len(ticks) > 1 else np.array([float("nan")])
        return {"first_progress_s": job.first_yield, "seconds": job.seconds, "windows": stamps[-1][2],
                "windows_per_s": windows_per_second(stamps), "max_event_loop_gap_ms": float(gaps.max() * 1e3),
                "show_result_s": shown[-1]}

    direct_predictor = Predictor(run, device=args.device)

    def direct() -> dict:
        stamps: list[tuple[float, int, int]] = []
        start = time.perf_counter()
        gen = direct_predictor.predict_iter(crop, geometry.spacing, tta=tta)
        while True:
            try:
                p = next(gen)
            except StopIteration:
                break
            stamps.append((time.perf_counter(), p.done, p.total))
        return {"first_progress_s": stamps[0][0] - start, "seconds": time.perf_counter() - start,
                "windows": stamps[-1][2], "windows_per_s": windows_per_second(stamps)}

    rows: dict[str, list[dict]] = {"worker": [], "direct": []}
    for i in range(args.repeats):
        rows["worker"].append(in_worker())
        print("worker", i, rows["worker"][-1], flush=True)
        rows["direct"].append(direct())
        print("direct", i, rows["direct"][-1], flush=True)
    viewer.close()

    def median(kind: str, key: str, skip_first: bool = False) -> float:
        values = [r[key] for r in rows[kind]][1 if skip_first and len(rows[kind]) > 1 else 0:]
        return float(statistics.median(values))

    summary = {
        "first_progress_cold_s": rows["worker"][0]["first_progress_s"],
        "first_progress_warm_s": median("worker", "first_progress_s", skip_first=True),
        "first_progress_direct_s": median("direct", "first_progress_s"),
        "worker_windows_per_s": median("worker", "windows_per_s"),
        "direct_windows_per_s": median("direct", "windows_per_s"),
        "worker_seconds_warm": median("worker", "seconds", skip_first=True),
        "direct_seconds": median("direct", "seconds"),
        "max_event_loop_gap_ms_cold": rows["worker"][0]["max_event_loop_gap_ms"],
        "max_event_loop_gap_ms_warm": max(r["max_event_loop_gap_ms"] for r in rows["worker"][1:] or rows["worker"]),
        "show_result_cold_s": rows["worker"][0]["show_result_s"],
    }
    summary["worker_over_direct_throughput"] = summary["worker_windows_per_s"] / summary["direct_windows_per_s"]
    settings = {"crop": args.crop, "shape": list(crop.shape), "spacing": list(geometry.spacing), "tta": tta,
                "device": args.device, "run": "tiny (random weights)" if args.run is None else str(args.run),
                "windows": rows["direct"][0]["windows"], "repeats": args.repeats,
                "torch_threads": {"main": torch.get_num_threads(), "worker": threads_seen.get("worker"),
                                  "direct": threads_seen.get("direct")}}
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "torch": torch.__version__,
               "napari": napari.__version__}
    result = {"machine": machine, "settings": settings, "summary": summary, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"settings": settings, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
