"""Zero-shot box prompts on the five lesion scans of ../shared/data/Dataset503_Lesions.

Protocol (as the reference LiteMedSAM measurement quoted in docs/benchmarks.md): on every slice that contains
lesion, one box = the slice's lesion bounding box + 2 px on each side (clipped to the image),
given to ``BoxPrompter`` (default model ``lite``) as a one-slice box. Reported per scan: the mean
of the per-slice Dice scores, their range, and the 3D Dice of the stacked slice masks against the
whole lesion label. Writes JSON and a markdown table.

    python benchmarks/lesion_box_prompts.py [--data ../shared/data] [--model lite] [--device cpu]
        [--amp auto|bf16|off] [--out benchmarks/results/lesion_box_prompts]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from masksam_core.devices import AMP_CHOICES
from masksam_core.inference.box_prompt import BoxPrompter
from masksam_core.io import read_image

MARGIN = 2


def tight_boxes(lesion: np.ndarray, margin: int = MARGIN) -> list[tuple[int, ...]]:
    """One half-open box (z, z+1, y0, x0, y1, x1) per slice of ``lesion`` (Z, Y, X) with lesion."""
    _, h, w = lesion.shape
    boxes = []
    for z in np.nonzero(lesion.any(axis=(1, 2)))[0]:
        ys, xs = np.nonzero(lesion[z])
        boxes.append((int(z), int(z) + 1, max(int(ys.min()) - margin, 0), max(int(xs.min()) - margin, 0),
                      min(int(ys.max()) + 1 + margin, h), min(int(xs.max()) + 1 + margin, w)))
    return boxes


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def run_case(prompter: BoxPrompter, image_path: Path, label_path: Path) -> dict:
    image, geometry = read_image(image_path)
    lesion = read_image(label_path)[0] > 0
    boxes = tight_boxes(lesion)
    start = time.perf_counter()
    labels = prompter.segment(image, boxes)
    seconds = time.perf_counter() - start
    pred = labels > 0
    slices = [{"z": b[0], "box": list(b), "dice": dice(pred[b[0]], lesion[b[0]]),
               "lesion_voxels": int(lesion[b[0]].sum()), "predicted_voxels": int(pred[b[0]].sum())} for b in boxes]
    scores = [s["dice"] for s in slices]
    return {"case": label_path.name.split(".")[0], "shape_zyx": list(image.shape),
            "spacing_zyx": list(geometry.spacing), "slices_with_lesion": len(boxes),
            "mean_slice_dice": float(np.mean(scores)), "min_slice_dice": float(min(scores)),
            "max_slice_dice": float(max(scores)), "dice_3d": dice(pred, lesion),
            "seconds": seconds, "seconds_per_slice": seconds / len(boxes), "slices": slices}


def markdown(results: dict) -> str:
    rows = ["| scan | shape (Z, Y, X) | slices with lesion | mean per-slice Dice | range | 3D Dice |",
            "|---|---|---|---|---|---|"]
    for c in results["cases"]:
        rows.append(f"| {c['case']} | {' × '.join(map(str, c['shape_zyx']))} | {c['slices_with_lesion']} | "
                    f"{c['mean_slice_dice']:.3f} | {c['min_slice_dice']:.2f}–{c['max_slice_dice']:.2f} | "
                    f"{c['dice_3d']:.3f} |")
    s = results["summary"]
    rows.append(f"| **all** | | {s['slices']} | {s['mean_slice_dice_pooled']:.3f} (pooled), "
                f"{s['mean_of_case_means']:.3f} (mean of scans) | {s['min_slice_dice']:.2f}–"
                f"{s['max_slice_dice']:.2f} | {s['mean_dice_3d']:.3f} (mean) |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                        help="BoxPrompter's precision (auto: bf16 on GPUs and on CPUs with native bf16)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lesion_box_prompts")
    args = parser.parse_args()
    root = args.data / "Dataset503_Lesions"
    prompter = BoxPrompter(args.model, device=args.device, amp=args.amp)
    cases = []
    for label_path in sorted((root / "labelsTr").glob("*.nii.gz")):
        image_path = root / "imagesTr" / label_path.name.replace(".nii.gz", "_0000.nii.gz")
        cases.append(run_case(prompter, image_path, label_path))
        c = cases[-1]
        print(f"{c['case']}: {c['slices_with_lesion']} slices, mean per-slice Dice {c['mean_slice_dice']:.3f}, "
              f"3D Dice {c['dice_3d']:.3f} ({c['seconds_per_slice']:.1f} s/slice)", flush=True)
    scores = [s["dice"] for c in cases for s in c["slices"]]
    results = {
        "protocol": f"per slice with lesion: lesion bounding box + {MARGIN} px, one box per slice; zero-shot",
        "model": args.model, "device": args.device, "torch_threads": torch.get_num_threads(),
        "precision": str(prompter.amp or torch.float32).removeprefix("torch."),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "summary": {"slices": len(scores), "mean_slice_dice_pooled": float(np.mean(scores)),
                    "mean_of_case_means": float(np.mean([c["mean_slice_dice"] for c in cases])),
                    "min_slice_dice": float(min(scores)), "max_slice_dice": float(max(scores)),
                    "mean_dice_3d": float(np.mean([c["dice_3d"] for c in cases]))},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
