"""``masksam-core demo``: the bundled model on the bundled sample CT.

Writes to ``OUT_DIR``:

* ``abdomen_ct_labels_pred.nii.gz``: the predicted label map, on the CT's grid with its exact affine,
  and ``abdomen_ct_labels_pred.classes.json``: its class names;
* ``montage.png``: axial, coronal and sagittal views through the centre of the organs, the CT in
  greys with the predicted organs in colour and a legend;
* ``dice.csv`` and ``dice.md``: Dice and HD95 (mm) per organ against the sample's labels. For a model
  trained on the sample's own data set (such as the bundled one) they say so, and where its training
  held out the last slices (``--val-fraction``), a second Dice column scores those slices alone: only
  that column measures the model on data it did not see.

The sample CT and its labels ship in ``masksam_core/assets`` (see its README.md: TotalSegmentator's
example CT, Apache-2.0, silver-standard labels).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MaskSAMError, check_output_folder
from .files import atomic_path, atomic_write_text
from .io import CT_WINDOW
from .progress import drive

__all__ = ["DEMO_MODEL", "OUTPUTS", "demo_iter", "montage", "run_demo", "sample_paths"]

DEMO_MODEL = "abdomen-ct-lite"
OUTPUTS = ("abdomen_ct_labels_pred.nii.gz", "abdomen_ct_labels_pred.classes.json", "montage.png", "dice.csv",
           "dice.md")
IMAGE_FILE, LABELS_FILE = "abdomen_ct.nii.gz", "abdomen_ct_labels.nii.gz"
SAMPLE_CLASSES = ("background", "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
                  "aorta")
"""Class names of the sample labels, index = label value."""
SAMPLE_DATASET = "Dataset501_AbdomenCT"
"""The data set (nnU-Net layout) whose one case is the sample CT and its labels (docs/training.md)."""


def sample_paths() -> tuple[Path, Path]:
    """(image, labels) paths of the bundled sample CT and its organ label map (NIfTI, same affine)."""
    from .runs import asset_path

    return asset_path(IMAGE_FILE), asset_path(LABELS_FILE)


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Voxel (z, y, x) at the centre of the labelled voxels (the volume's centre when there are none)."""
    found = np.argwhere(labels > 0)
    if found.size == 0:
        z, y, x = (int(n // 2) for n in labels.shape)
        return z, y, x
    z, y, x = (int(v) for v in np.round(found.mean(axis=0)))
    return z, y, x


def _display_views(image: np.ndarray, labels: np.ndarray, affine: np.ndarray
                   ) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(name, image, labels, pixel height / width) of the axial, coronal and sagittal views through the
    centre of the labels, in radiological display: patient right on the left, anterior and superior up."""
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(affine)
    zooms = np.empty(3)
    zooms[ornt[:, 0].astype(int)] = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    img, lab = (apply_orientation(np.transpose(a, (2, 1, 0)), ornt) for a in (image, labels))  # RAS+ (x, y, z)
    cx, cy, cz = _centre(lab)
    zx, zy, zz = zooms
    return [("axial", img[:, :, cz].T[::-1, ::-1], lab[:, :, cz].T[::-1, ::-1], zy / zx),
            ("coronal", img[:, cy, :].T[::-1, ::-1], lab[:, cy, :].T[::-1, ::-1], zz / zx),
            ("sagittal", img[cx, :, :].T[::-1, ::-1], lab[cx, :, :].T[::-1, ::-1], zz / zy)]


def montage(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], class_names: list[str],
            path: str | os.PathLike, *, affine: np.ndarray | None = None, title: str = "",
            window: tuple[float, float] = CT_WINDOW) -> Path:
    """Save a PNG of axial, coronal and sagittal views of ``image`` (Z, Y, X) with ``labels`` over it.

    Views pass through the centre of the labelled voxels in radiological display (patient right on
    the left, anterior and superior up) when ``affine`` (file voxel (i, j, k) -> world RAS mm, as in
    :class:`~masksam_core.io.ImageGeometry`) is given, else as if the axes were RAS with ``spacing``
    (sz, sy, sx); pixels keep their true aspect. The CT is windowed to ``window`` (HU), each class of
    ``class_names`` (index = label value; background not drawn) has its colour, with a legend.
    Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    path = Path(path)
    sz, sy, sx = spacing
    if affine is None:
        affine = np.diag([sx, sy, sz, 1.0])
    colours = plt.get_cmap("tab10")(np.arange(max(len(class_names), 2)) % 10)
    cmap = ListedColormap(colours[1:] if len(colours) > 1 else colours)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    for ax, (name, img, lab, aspect) in zip(axes, _display_views(image, labels, affine), strict=True):
        ax.imshow(np.clip(img, *window), cmap="gray", aspect=aspect, interpolation="nearest")
        shown = np.ma.masked_where(lab == 0, lab - 1)
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=max(len(class_names) - 2, 1), alpha=0.55,
                  aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    present = sorted(int(v) for v in np.unique(labels) if v > 0)
    handles = [Patch(color=colours[v], label=class_names[v] if v < len(class_names) else str(v)) for v in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path


def held_out_slices(config: dict[str, Any], depth: int) -> tuple[int, int] | None:
    """The slices ``[start, depth)`` of the sample that a model trained with ``config`` (its
    ``masksam-core train`` settings) held out, when it was trained on the sample's data set with
    ``--val-fraction`` and no ``--val-cases``; else None. The slab is the trainer's own
    (:func:`~masksam_core.training.data_setup.slab_start`; the sample is at its plans' 3 mm, so its
    preprocessed slices are these)."""
    from .training.data_setup import slab_start

    fraction = float(config.get("val_fraction") or 0.0)
    if not trained_on_sample(config) or config.get("val_cases") or not 0 < fraction < 1:
        return None
    start = slab_start(depth, fraction)
    return (start, depth) if 0 < start < depth else None


def trained_on_sample(config: dict[str, Any]) -> bool:
    """Whether ``config`` (``masksam-core train`` settings) trained on the sample's data set."""
    return Path(str(config.get("dataset") or "")).name == SAMPLE_DATASET


def _fmt(v: Any) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _mean(values: list[Any]) -> float:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else float("nan")


def _dice_table(scores: dict[int, dict[str, Any]], class_names: list[str],
                held_out: dict[int, dict[str, Any]] | None = None, slab: tuple[int, int] | None = None,
                note: str = "") -> tuple[str, str]:
    """CSV and Markdown tables of Dice and HD95 per class, with a column of Dice on the held-out slab
    (``held_out``, same class keys) when given, and ``note`` below the Markdown table. A class absent
    from both label maps shows "–" and is left out of the mean (evaluation.EMPTY_RULE)."""
    def kept(score: dict[str, Any], key: str) -> Any:  # absent from both maps: "–", left out of the mean
        return None if score.get("absent") else score[key]

    names = [class_names[c] if c < len(class_names) else str(c) for c in scores]
    columns = [("dice", "Dice", [kept(scores[c], "dice") for c in scores], True),
               ("hd95_mm", "HD95 (mm)", [kept(scores[c], "hd95") for c in scores], False)]
    if held_out is not None:
        start, stop = slab or (0, 0)
        columns.append(("dice_held_out", f"Dice on slices {start}–{stop - 1} (held out)",
                        [kept(held_out[c], "dice") for c in scores], True))
    rows = [[n, *(_fmt(values[i]) for _, _, values, _ in columns)] for i, n in enumerate(names)]
    means = [_fmt(_mean(values)) if averaged else "" for _, _, values, averaged in columns]
    csv = "".join(",".join(row) + "\n" for row in [["organ", *(key for key, *_ in columns)], *rows, ["mean", *means]])
    md = "| organ | " + " | ".join(title for _, title, *_ in columns) + " |\n|" + "---|" * (len(columns) + 1) + "\n"
    md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    md += "| **mean** | " + " | ".join(f"**{m}**" if m else "" for m in means) + " |\n"
    if note:
        md += f"\n{note}\n"
    return csv, md


def _sample_note(model: str | os.PathLike, config: dict[str, Any], slab: tuple[int, int] | None) -> str:
    name = Path(str(model)).name
    if slab is not None:
        return (f"{name} was trained on this CT, on slices 0–{slab[0] - 1}; slices {slab[0]}–{slab[1] - 1} "
                "were held out. Only the last column scores it on slices it did not see (an organ absent from "
                "them scores 0 where it is wrongly found there, – where it is not, left out of the mean); "
                "expect less on other scans.")
    if trained_on_sample(config):
        return f"{name} was trained on this CT: these scores do not measure it on scans it did not see."
    return ""


def demo_iter(out: str | os.PathLike, *, model: str | os.PathLike = DEMO_MODEL, device: str = "auto",
              tta: bool = False, step_size: float = 1.0, overwrite: bool = False,
              base_checkpoint: str | os.PathLike | None = None,
              amp: str = "auto") -> Generator[Any, None, dict[str, Any]]:
    """Run the demo, yielding the prediction's progress; returns ``{'outputs': {...}, 'dice': {...}, ...}``."""
    from .evaluation import case_scores
    from .inference.predictor import Predictor
    from .io import read_image, write_labels

    out = Path(out)
    check_output_folder(out, "--out")
    existing = [out / name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise MaskSAMError(f"{out} already holds demo results ({existing[0].name}, ...): pass --overwrite or "
                           "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    image_path, labels_path = sample_paths()
    image, geometry = read_image(image_path)
    truth, _ = read_image(labels_path)
    predictor = Predictor(model, device=device, base_checkpoint=base_checkpoint, amp=amp)
    prediction = yield from predictor.predict_iter(image, geometry.spacing, tta=tta, step_size=step_size)
    names = list(prediction.class_names)
    write_labels(out / OUTPUTS[0], prediction.labels, geometry, class_names=dict(enumerate(names)), overwrite=True)
    montage(image, prediction.labels, geometry.spacing, names, out / OUTPUTS[2], affine=geometry.affine,
            title=f"MaskSAM demo: {Path(str(model)).name} on the sample CT")
    truth = np.asarray(truth).astype(np.int64)
    ids = sorted(set(range(len(names))) | {int(v) for v in np.unique(truth)})
    scores = case_scores(prediction.labels, truth, geometry.spacing, class_ids=ids)
    table_names = names + [SAMPLE_CLASSES[i] if i < len(SAMPLE_CLASSES) else str(i)
                           for i in range(len(names), ids[-1] + 1)]
    slab = held_out_slices(predictor.training_config, truth.shape[0])
    held = None
    if slab is not None:
        part = slice(*slab)
        held = case_scores(prediction.labels[part], truth[part], geometry.spacing, class_ids=ids)
    csv, md = _dice_table(scores, table_names, held, slab, _sample_note(model, predictor.training_config, slab))
    for name, text in ((OUTPUTS[3], csv), (OUTPUTS[4], md)):
        atomic_write_text(out / name, text)
    return {"outputs": {name: out / name for name in OUTPUTS},
            "dice": {table_names[c]: s["dice"] for c, s in scores.items()},
            "dice_held_out": None if held is None else {table_names[c]: s["dice"] for c, s in held.items()},
            "held_out_slices": slab, "table": md}


def run_demo(out: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """:func:`demo_iter` without progress (for scripts and tests)."""
    return drive(demo_iter(out, **kwargs))


def _cli_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    gen = demo_iter(args.out, model=args.model, device=args.device, tta=args.tta, step_size=args.step_size,
                    overwrite=args.overwrite, base_checkpoint=args.base_checkpoint, amp=args.amp)
    with tqdm(desc="demo: segmenting the sample CT", unit="window", dynamic_ncols=True) as bar:
        def show(progress: Any) -> None:
            bar.total, bar.n = progress.total, progress.done
            bar.refresh()

        result = drive(gen, show)
    print(result["table"])
    for path in result["outputs"].values():
        print(f"wrote {path}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from .devices import AMP_CHOICES, AMP_HELP, DEVICE_CHOICES

    p = sub.add_parser("demo", help="segment the bundled sample CT with the bundled model (labels, montage, Dice)",
                       description="Segment the bundled sample abdominal CT with the bundled model and write the "
                                   "labels (NIfTI), a PNG montage and a Dice table against the sample's labels.")
    p.add_argument("--out", default="masksam_demo", metavar="DIR", help="output folder (default: masksam_demo)")
    p.add_argument("--model", default=DEMO_MODEL, help=f"bundled model name, run folder or model file "
                                                       f"(default: {DEMO_MODEL})")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default: auto)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=AMP_HELP + " (default: auto)")
    p.add_argument("--tta", action="store_true", help="average the 8 mirrored passes (8x slower; one pass for models "
                        "trained with --augmentation no-mirror)")
    p.add_argument("--step-size", type=float, default=1.0,
                   help="window step as a fraction of the patch (default: 1.0, windows side by side; 0.5 = "
                        "half-overlapping as `predict` does, about 2x slower)")
    p.add_argument("--base-checkpoint", metavar="PATH", help="local file with the base SAM weights")
    p.add_argument("--overwrite", action="store_true", help="replace earlier demo results in --out")
    p.set_defaults(func=_cli_demo)
