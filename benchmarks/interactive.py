"""Simulated annotator for interactive 3D annotation (box + propagation + corrective clicks).

Per object of every case of a data set in the nnU-Net layout: a box on the object's middle slice
(the ground-truth box there), propagation through the volume, then up to ``--clicks`` corrective
clicks, each at the centre of the largest error region of the worst slice (the slice with the most
wrong voxels; positive where the object was missed, negative where it was wrongly added; the centre
is the point farthest from the region's border), re-propagating after each. The baseline is one 3D
box: the object's full bounding box repeated on every slice of its z-range (BoxPrompter's Box prompt).
Several propagation / click-rule variants run on the same cached embeddings.

    python benchmarks/interactive.py --data ../shared/data/Dataset501_AbdomenCT --out benchmarks/results \
        [--name interactive_abdomen_ct] [--model lite] [--clicks 5] [--variants box:box+local,mask:box+local]

Writes ``NAME.json`` (top level: ``mean_dice_box``, ``mean_dice_clicks`` (index k = after k clicks),
``median_click_seconds``, ``objects``, and every variant under ``variants``), ``NAME.md`` and
``NAME.png`` (Dice against clicks) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from masksam_core.inference.clicks import Click, mask_box
from masksam_core.inference.interactive import InteractiveSession, PropagationSettings
from masksam_core.inference.slice_cache import SliceEncoder
from masksam_core.io import read_image
from masksam_core.modeling.backbone import load_sam_backbone


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def next_click(pred: np.ndarray, truth: np.ndarray) -> Click | None:
    """The simulated annotator's click: centre of the largest error region of the worst slice."""
    wrong = pred ^ truth
    per_slice = wrong.sum(axis=(1, 2))
    if per_slice.max() == 0:
        return None
    z = int(per_slice.argmax())
    best = None
    for region, positive in ((truth[z] & ~pred[z], True), (pred[z] & ~truth[z], False)):
        labels, n = ndimage.label(region)
        for i in range(1, n + 1):
            comp = labels == i
            if best is None or comp.sum() > best[0].sum():
                best = (comp, positive)
    comp, positive = best
    dist = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return Click(z, int(y), int(x), positive)


def middle_box(truth: np.ndarray) -> tuple[int, tuple[int, int, int, int]]:
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    mid = (int(zs[0]) + int(zs[-1])) // 2
    z = int(zs[np.abs(zs - mid).argmin()])
    return z, mask_box(truth[z])


def box3d_dice(encoder: SliceEncoder, truth: np.ndarray) -> float:
    """One 3D box: the object's full bounding box on every slice of its z-range."""
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    box = mask_box(truth.any(axis=0))
    pred = np.zeros_like(truth)
    for z in range(int(zs[0]), int(zs[-1]) + 1):
        pred[z] = encoder.decode(z, box).mask
    return dice(pred, truth)


def run_object(session: InteractiveSession, truth: np.ndarray, clicks: int) -> dict:
    z, box = middle_box(truth)
    start = time.perf_counter()
    ann = session.start({z: box})
    seconds = [time.perf_counter() - start]
    scores, click_seconds, done = [dice(ann.mask(), truth)], [], []
    for _ in range(clicks):
        click = next_click(ann.mask(), truth)
        if click is None:
            break
        session.encoder.embedding(click.z)  # timed once its slice is encoded
        gen, start = session.click_iter(ann, click), time.perf_counter()
        next(gen)
        click_seconds.append(time.perf_counter() - start)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            ann = stop.value
        seconds.append(time.perf_counter() - start)
        scores.append(dice(ann.mask(), truth))
        done.append([click.z, click.y, click.x, "+" if click.positive else "-"])
    scores += [scores[-1]] * (clicks + 1 - len(scores))  # no error left: the score stays
    return {"key_slice": z, "box": list(box), "dice": scores, "clicks": done, "click_seconds": click_seconds,
            "seconds": seconds}


def cases(data: Path) -> list[tuple[str, Path, Path]]:
    out = []
    for label in sorted((data / "labelsTr").glob("*.nii.gz")):
        name = label.name[: -len(".nii.gz")]
        out.append((name, data / "imagesTr" / f"{name}_0000.nii.gz", label))
    return out


def summary(objects: list[dict], clicks: int) -> dict:
    curves = np.array([o["dice"] for o in objects])
    times = [t for o in objects for t in o["click_seconds"]]
    return {"mean_dice_box": float(curves[:, 0].mean()),
            "mean_dice_clicks": [float(v) for v in curves.mean(axis=0)],
            "median_click_seconds": float(np.median(times)) if times else None,
            "median_propagation_seconds": float(np.median([o["seconds"][0] for o in objects]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default=None)
    p.add_argument("--model", default="lite")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto")
    p.add_argument("--window", default="auto")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep slice embeddings here between runs (one file per case, model and window)")
    p.add_argument("--variants", default="box:box+local,mask:box+local",
                   help="comma-separated PROPAGATION:RULE (propagation: box | mask = box + previous mask prompt)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    sam = load_sam_backbone(args.model)
    results: dict = {"variants": {f"{a}:{b}": {"objects": []} for a, b in variants}, "box3d": []}
    for name, image_path, label_path in cases(args.data):
        volume = read_image(image_path)[0]
        labels = read_image(label_path)[0]
        encoder = SliceEncoder(volume, sam, device=args.device, amp=args.amp, window=args.window)
        stored = args.cache_dir / f"{name}_{args.model}_{args.window}.pt" if args.cache_dir else None
        if stored is not None and stored.exists():
            for z, emb in torch.load(stored, weights_only=True).items():
                encoder.cache.put(int(z), emb)
        for value in [int(v) for v in np.unique(labels) if v != 0]:
            truth = labels == value
            base = {"case": name, "label": value}
            results["box3d"].append({**base, "dice": box3d_dice(encoder, truth)})
            for a, b in variants:
                session = InteractiveSession(encoder, PropagationSettings(mask_prompt=a == "mask", click_rule=b))
                obj = {**base, **run_object(session, truth, args.clicks)}
                results["variants"][f"{a}:{b}"]["objects"].append(obj)
                if stored is not None:
                    stored.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({z: encoder.cache.get(z) for z in encoder.cache.slices()}, stored)
                print(f"{name} label {value} {a}:{b}: box3d {results['box3d'][-1]['dice']:.3f} "
                      f"dice {' '.join(f'{d:.3f}' for d in obj['dice'])} clicks {obj['click_seconds']}", flush=True)
    for v in results["variants"].values():
        v.update(summary(v["objects"], args.clicks))
    write(args, results, variants)


def write(args: argparse.Namespace, results: dict, variants: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_key = f"{variants[0][0]}:{variants[0][1]}"
    top = {k: results["variants"][main_key][k] for k in
           ("mean_dice_box", "mean_dice_clicks", "median_click_seconds", "median_propagation_seconds")}
    out = {**top, "variant": main_key, "mean_dice_box3d": float(np.mean([o["dice"] for o in results["box3d"]])),
           "objects": results["variants"][main_key]["objects"], "box3d": results["box3d"],
           "variants": {k: {kk: vv for kk, vv in v.items() if kk != "objects"} | {"objects": v["objects"]}
                        for k, v in results["variants"].items()},
           "data": str(args.data), "model": args.model, "device": args.device, "window": args.window,
           "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__}
    name = args.name or f"interactive_{args.data.name}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    rows = ["| variant (propagation:click rule) | 3D box | box + propagation | " +
            " | ".join(f"{k} click{'s' if k > 1 else ''}" for k in range(1, args.clicks + 1)) +
            " | median click s | median propagation s |", "|---" * (args.clicks + 5) + "|"]
    for key, v in results["variants"].items():
        rows.append(f"| {key} | {out['mean_dice_box3d']:.3f} | " +
                    " | ".join(f"{d:.3f}" for d in v["mean_dice_clicks"]) +
                    f" | {v['median_click_seconds'] or float('nan'):.2f} | {v['median_propagation_seconds']:.1f} |")
    rows += ["", "| case | label | 3D box | " + " | ".join(f"{k} clicks" for k in range(args.clicks + 1)) + " |",
             "|---" * (args.clicks + 4) + "|"]
    for o, b in zip(out["objects"], out["box3d"], strict=True):
        rows.append(f"| {o['case']} | {o['label']} | {b['dice']:.3f} | " + " | ".join(f"{d:.3f}" for d in o["dice"])
                    + " |")
    (args.out / f"{name}.md").write_text("\n".join(rows) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, v in results["variants"].items():
        ax.plot(range(args.clicks + 1), v["mean_dice_clicks"], marker="o", label=key)
    ax.axhline(out["mean_dice_box3d"], color="grey", ls="--", label="one 3D box")
    ax.set(xlabel="corrective clicks per object", ylabel="mean Dice", title=args.data.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / f"{name}.png", dpi=120)
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
