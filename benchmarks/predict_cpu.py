"""Whole-volume prediction time and peak memory on the sample abdominal CT.

For each model, TTA setting and compile setting, one subprocess predicts
../shared/data/Dataset501_AbdomenCT's scan (122×101×112 voxels, 3 mm) with ``Predictor`` and reports
wall time, windows, the preprocessing time (``preprocessing_s``), the first window batch apart
(``first_batch_s``: with ``--compile on`` it holds the compilation), the mean seconds per window
after it, and the process's peak resident memory. ``tiny`` is an untrained run (the speed does not
depend on the weights), made once with ``masksam-core train --epochs 1 --iters-per-epoch 1`` and
cached in ``--work``; ``lite`` is the bundled model ``abdomen-ct-lite``.

``--max-windows N`` stops a setting after N window batches and gives the whole-volume time as
preprocessing + first batch + the other windows × their mean time (marked ``estimate``; the
resampling back, about a second, is then left out). Writes JSON and a markdown table.

    python benchmarks/predict_cpu.py [--presets tiny lite] [--tta off on] [--step-size 0.5]
        [--max-windows N] [--compile off on] [--amp auto] [--device cpu] [--data ../shared/data]
        [--work /tmp/masksam-bench]
        [--out benchmarks/results/predict_cpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

from masksam_core.devices import AMP_CHOICES

CHILD = r"""
import json, resource, sys, time
import torch
from masksam_core.inference.predictor import Predictor
from masksam_core.io import read_image
run, image, tta, device = sys.argv[1], sys.argv[2], sys.argv[3] == "on", sys.argv[4]
step, max_windows, compile = float(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "on"
amp = sys.argv[8]
volume, geometry = read_image(image)
predictor = Predictor(run, device=device, compile=compile, amp=amp)
start = time.perf_counter()
marks = []
gen = predictor.predict_iter(volume, geometry.spacing, tta=tta, step_size=step)
while True:
    try:
        progress = next(gen)
    except StopIteration:
        break
    marks.append((progress.done, progress.total, time.perf_counter() - start))
    if max_windows and progress.done >= max_windows and progress.done < progress.total:
        gen.close()
        break
seconds = time.perf_counter() - start
# marks[0]: the preprocessing done (0 windows); marks[1]: the first batch (with --compile, the compilation)
prep, total = marks[0][2], marks[0][1]
first_done, first = marks[1][0], marks[1][2] - prep
done = marks[-1][0]
per_window = (marks[-1][2] - marks[1][2]) / (done - first_done) if done > first_done else first / first_done
estimate = done < total
if estimate:
    seconds = prep + first + per_window * (total - first_done)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "preprocessing_s": prep, "windows": total, "windows_timed": done,
                  "seconds_per_window": per_window, "first_batch_s": first, "compiled": compile, "estimate": estimate,
                  "precision": str(predictor.amp or torch.float32).removeprefix("torch."),
                  "peak_rss_mb": peak_mb, "threads": torch.get_num_threads()}))
"""


BUNDLED = {"lite": "abdomen-ct-lite"}  # presets measured with their bundled model


def make_run(preset: str, data: Path, work: Path) -> Path | str:
    if preset in BUNDLED:
        return BUNDLED[preset]
    run = work / f"run_{preset}"
    if not (run / "checkpoint_last.pt").exists():
        subprocess.run([sys.executable, "-m", "masksam_core", "train", str(data), "--preset", preset,
                        "--out", str(run), "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "1",
                        "--val-fraction", "0", "--num-workers", "0", "--device", "cpu"], check=True)
    return run


def _estimate_note(row: dict) -> str:
    """The note "(estimate from N windows)" of a row timed with --max-windows; empty otherwise."""
    return f" (estimate from {row['windows_timed']:d} windows)" if row["estimate"] else ""


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "lite"])
    parser.add_argument("--tta", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--step-size", type=float, default=0.5, help="window step (0.5: half overlap)")
    parser.add_argument("--max-windows", type=int, default=0, help="time this many window batches, then estimate")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                        help="Predictor(compile=...): torch.compile the network (default: off)")
    parser.add_argument("--amp", nargs="+", default=["auto"], choices=AMP_CHOICES,
                        help="Predictor(amp=...): autocast precision (default: auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/masksam-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_cpu")
    args = parser.parse_args(argv)
    dataset = args.data / "Dataset501_AbdomenCT"
    image = dataset / "imagesTr" / "abdct_001_0000.nii.gz"
    rows = []
    for preset in args.presets:
        run = make_run(preset, dataset, args.work)
        for tta in args.tta:
            for compile, amp in itertools.product(args.compile, args.amp):
                out = subprocess.run([sys.executable, "-c", CHILD, str(run), str(image), tta, args.device,
                                      str(args.step_size), str(args.max_windows), compile, amp],
                                     check=True, capture_output=True, text=True, encoding="utf-8")
                row = {"preset": preset, "model": str(run), "tta": tta, "step_size": args.step_size,
                       **json.loads(out.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(row, flush=True)
    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": torch.get_num_threads(), "torch": torch.__version__, "device": args.device}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"Machine: {machine['processor']}, {machine['cpus']} threads, torch {machine['torch']}, "
             f"device {args.device}.", "",
             "| preset | TTA | precision | compiled | step | windows | first batch (s) | seconds per window "
             "| whole CT (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['tta']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | "
              f"{r['step_size']} | {r['windows']} | "
              f"{r['first_batch_s']:.1f} | {r['seconds_per_window']:.2f} | "
              f"{r['seconds']:.1f}{_estimate_note(r)} | "
              f"{r['peak_rss_mb']:.0f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
