"""Dice and HD95 (mm) of label maps against ground truth, and ``masksam-core evaluate``.

Definitions (binary masks ``pred``, ``truth`` of one class, same (Z, Y, X) shape, spacing (sz, sy, sx) mm):

* Dice = 2 |P ∩ T| / (|P| + |T|).
* Surface of a mask: its voxels removed by one binary erosion with the **face-connected** (6-neighbour)
  structure, the image outside counted as background (a mask touching the image edge has surface there).
* Directed surface distances P→T: for every surface voxel of P, the Euclidean distance in mm to the
  nearest surface voxel of T (``scipy.ndimage.distance_transform_edt(~surface_T, sampling=spacing)``).
* HD95 = 95th percentile (numpy's linear interpolation) of the **union** of both directed sets. This is
  medpy's ``hd95`` exactly. MONAI's ``compute_hausdorff_distance(percentile=95)`` instead takes the larger
  of the two directed 95th percentiles; its directed values equal ours.

Empty masks: see :data:`EMPTY_RULE`. All scoring code uses numpy and scipy only.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import MaskSAMError
from .files import atomic_write_text, is_image_name, split_suffix
from .io import ImageGeometry, classes_sidecar, compare_geometry, read_classes_sidecar, read_image

__all__ = ["EMPTY_RULE", "add_cli", "case_scores", "dice", "evaluate_folders", "hd95",
           "image_diagonal", "load_class_names", "surface_distances"]

EMPTY_RULE = (
    "Class absent from both prediction and ground truth: Dice 1.0 and HD95 0.0 for that case, but the "
    "pair is excluded from the per-class means and counted in n_absent. Class in exactly one of them: "
    "Dice 0.0 and HD95 = the diagonal of the image extent in mm, sqrt(sum((shape*spacing)^2)) (larger "
    "than any real surface distance), included in the means.")
HD95_DEFINITION = (
    "95th percentile (linear interpolation) of the union of both directed surface-distance sets in mm; "
    "surfaces from one face-connected binary erosion (medpy.metric.binary.hd95 exactly)")
_FACE = ndi.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------- metrics


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as boolean arrays of one shape, else MaskSAMError."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise MaskSAMError(f"prediction shape {pred.shape} differs from ground truth {truth.shape}; "
                           "compare masks on the same voxel grid")
    return pred, truth


def _spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    """``ndim`` positive finite floats, else MaskSAMError."""
    values = tuple(float(s) for s in np.ravel(spacing))
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise MaskSAMError(f"spacing must be {ndim} positive numbers in mm (sz, sy, sx), got {spacing!r}")
    return values


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty (see :data:`EMPTY_RULE`)."""
    pred, truth = _pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def image_diagonal(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """Diagonal of the image extent in mm: sqrt(sum((shape_i * spacing_i)^2))."""
    return float(np.sqrt(np.sum((np.asarray(shape, float) * np.asarray(spacing, float)) ** 2)))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` removed by one face-connected erosion (outside the image = background)."""
    structure = _FACE if mask.ndim == 3 else ndi.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndi.binary_erosion(mask, structure=structure)


def _crop(pred: np.ndarray, truth: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of pred | truth. Both masks are empty outside it, so erosions (border counted as
    background) and distances to the nearest surface voxel are the same inside the box as in full."""
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(np.logical_or(pred, truth)))


def surface_distances(pred: np.ndarray, truth: np.ndarray,
                      spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred→truth (Np,), truth→pred (Nt,)) in mm of two non-empty masks."""
    pred, truth = _pair(pred, truth)
    spacing = _spacing(spacing, pred.ndim)
    if not pred.any() or not truth.any():
        raise MaskSAMError("surface distances need two non-empty masks; see EMPTY_RULE for empty ones")
    pred, truth = pred[box := _crop(pred, truth)], truth[box]
    surf_p, surf_t = _surface(pred), _surface(truth)
    to_truth = ndi.distance_transform_edt(~surf_t, sampling=spacing)[surf_p]
    to_pred = ndi.distance_transform_edt(~surf_p, sampling=spacing)[surf_t]
    return to_truth, to_pred


def _scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...],
            full_shape: tuple[int, ...]) -> dict[str, Any]:
    """{'dice', 'hd95', 'absent'} under EMPTY_RULE; ``full_shape`` sets the worst-case diagonal."""
    has_p, has_t = bool(pred.any()), bool(truth.any())
    if not has_p and not has_t:
        return {"dice": 1.0, "hd95": 0.0, "absent": True}
    if has_p != has_t:
        return {"dice": 0.0, "hd95": image_diagonal(full_shape, spacing), "absent": False}
    both = np.concatenate(surface_distances(pred, truth, spacing))
    return {"dice": dice(pred, truth), "hd95": float(np.percentile(both, 95)), "absent": False}


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """HD95 in mm of two boolean masks with voxel ``spacing`` (sz, sy, sx) (module docstring).

    Both empty: 0.0; exactly one empty: :func:`image_diagonal` of the masks' shape (see EMPTY_RULE).
    """
    pred, truth = _pair(pred, truth)
    return float(_scores(pred, truth, _spacing(spacing, pred.ndim), pred.shape)["hd95"])


def _as_labels(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as non-negative integers (bool -> uint8, integral floats -> int64), else MaskSAMError."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise MaskSAMError(f"{what} has non-integer values; store integer class ids")
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise MaskSAMError(f"{what} has dtype {array.dtype}; store integer class ids")
    if array.size and array.min() < 0:
        raise MaskSAMError(f"{what} has negative values; class ids are 0..C-1")
    return array


def case_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                class_ids: list[int] | None = None) -> dict[int, dict[str, Any]]:
    """Scores of every class of two (Z, Y, X) label maps: class id -> {'dice', 'hd95', 'absent'}.

    ``class_ids`` (background 0 excluded) defaults to the non-zero values found in either map; a value
    in a map outside ``class_ids`` raises MaskSAMError (wrong class names or wrong files).
    """
    pred, truth = _as_labels(np.asarray(pred), "prediction"), _as_labels(np.asarray(truth), "ground truth")
    if pred.shape != truth.shape:
        raise MaskSAMError(f"prediction shape {pred.shape} differs from ground truth {truth.shape}")
    spacing = _spacing(spacing, pred.ndim)
    boxes = [ndi.find_objects(labels) for labels in (pred, truth)]
    found = sorted({i + 1 for objects in boxes for i, box in enumerate(objects) if box is not None})
    if class_ids is None:
        class_ids = found
    elif unknown := sorted(set(found) - set(class_ids)):
        raise MaskSAMError(f"label values {unknown} are not among the classes {sorted(class_ids)}; pass "
                           "the data set's dataset.json with --dataset-json, or check the files")
    result = {}
    for c in sorted(c for c in class_ids if c > 0):
        spans = [objects[c - 1] for objects in boxes if c <= len(objects) and objects[c - 1] is not None]
        box = tuple(slice(min(s[a].start for s in spans), max(s[a].stop for s in spans))
                    for a in range(pred.ndim)) if spans else tuple(slice(0, 0) for _ in pred.shape)
        result[c] = _scores(pred[box] == c, truth[box] == c, spacing, pred.shape)
    return result


# --------------------------------------------------------------------------- folders


def _list_cases(folder: Path, what: str) -> dict[str, Path]:
    """Case name -> label file, named as nnU-Net names them (``abdct_001.nii.gz`` -> ``abdct_001``)."""
    if not folder.is_dir():
        raise MaskSAMError(f"{folder}: {what} folder not found; give a folder of label files")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_image_name(path) or path.name.startswith(".") or not path.is_file():
            continue
        if (case := split_suffix(path)[0]) in cases:
            raise MaskSAMError(f"{folder}: case {case} has two files ({cases[case].name}, {path.name}); "
                               "keep one")
        cases[case] = path
    return cases


def load_class_names(dataset_json: str | os.PathLike) -> dict[int, str]:
    """Class id -> name from a dataset.json's ``labels`` {name: int} (a data set folder works too)."""
    path = Path(dataset_json)
    path = path / "dataset.json" if path.is_dir() else path
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
        names = {int(v): str(k) for k, v in labels.items() if not isinstance(v, bool)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise MaskSAMError(f"{path}: cannot read class names ({error!r}); give a dataset.json with "
                           "\"labels\": {\"background\": 0, \"liver\": 1, ...}") from error
    if len(names) != len(labels):
        raise MaskSAMError(f"{path}: labels must map each name to one integer, got {labels!r}")
    return names


def _sidecar_names(predictions: dict[str, Path]) -> dict[int, str] | None:
    """Class names from the first prediction's ``.classes.json`` sidecar, or None."""
    for path in predictions.values():
        try:
            names = read_classes_sidecar(path)
        except ValueError as error:
            raise MaskSAMError(f"{classes_sidecar(path)}: expected {{\"1\": \"liver\", ...}} ({error}); fix or "
                               "delete it, or pass --dataset-json") from error
        if names is not None:
            return names
    return None


def _evaluate_case(case: str, pred_path: Path, gt_path: Path,
                   class_ids: list[int] | None) -> dict[str, Any]:
    """{'case', 'scores': {id: scores}} or {'case', 'error'} for one case (runs in worker processes)."""
    try:
        truth, gt_geometry = read_image(gt_path)
        pred, pred_geometry = read_image(pred_path)
        if pred_geometry.format == gt_geometry.format:
            why = compare_geometry(pred_geometry, gt_geometry)
        else:  # TIFF carries no origin or directions: compare the grid only
            why = compare_geometry(ImageGeometry.from_spacing(pred_geometry.shape, pred_geometry.spacing),
                                   ImageGeometry.from_spacing(gt_geometry.shape, gt_geometry.spacing))
        if why is not None:
            raise MaskSAMError(f"prediction and ground truth are on different voxel grids ({why}); "
                               "predict on the ground truth's image or resample")
        scores = case_scores(pred, truth, gt_geometry.spacing, class_ids)
    except MaskSAMError as error:
        return {"case": case, "error": str(error)}
    return {"case": case, "scores": scores}


def _mean(values: list[float]) -> float | None:
    """The mean, or None (JSON null) for no values."""
    return float(np.mean(values)) if values else None


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, *,
                     class_names: dict[int, str] | None = None, dataset_json: Any = None,
                     num_workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Score every ground-truth case ``{case}{ending}`` in ``gt_dir`` against ``pred_dir/{case}*``.

    ``gt_dir`` may be a data set folder (dataset.json + labelsTr). Class names: ``class_names``, else
    ``dataset_json``, else a prediction's ``.classes.json`` sidecar, else ``class_{id}``. Spacing comes
    from the ground truth. Cases that cannot be scored (unreadable file, different voxel grid, unknown
    label value) are listed in ``failed`` and the rest go on. Returns a JSON-able summary (``None``
    where a mean has no values): ``mean_dice``/``mean_hd95`` (means over classes of the per-class
    means, background excluded), ``per_class`` (name -> id, dice, hd95, n, n_absent), ``cases`` (case,
    per_class: name -> dice, hd95, absent), ``empty_rule`` (:data:`EMPTY_RULE`), ``missing_predictions``,
    ``predictions_without_gt``, ``failed`` (case, error).
    """
    gt_dir = Path(gt_dir)
    if (gt_dir / "dataset.json").is_file() and (gt_dir / "labelsTr").is_dir():  # a data set folder
        gt_dir, dataset_json = gt_dir / "labelsTr", dataset_json or gt_dir / "dataset.json"
    truths, preds = _list_cases(gt_dir, "ground truth"), _list_cases(Path(pred_dir), "prediction")
    if class_names is None and dataset_json is not None:
        class_names = load_class_names(dataset_json)
    if class_names is None:
        class_names = _sidecar_names(preds)
    matched = sorted(set(truths) & set(preds))
    if not matched:
        raise MaskSAMError(f"no prediction in {pred_dir} matches a ground-truth file in {gt_dir}; "
                           "predictions must be named {case}.nii.gz as the ground truth is")
    ids = None if class_names is None else sorted(c for c in class_names if c != 0)
    jobs = [(case, preds[case], truths[case], ids) for case in matched]
    results: list[dict[str, Any]] = []
    from tqdm.auto import tqdm
    bar = tqdm(total=len(jobs), desc="evaluate", unit="case", disable=not progress, file=sys.stderr)
    pool = ProcessPoolExecutor(min(num_workers, len(jobs))) if num_workers > 1 else None
    try:
        for result in (pool.map if pool else map)(_evaluate_case, *zip(*jobs, strict=True)):
            results.append(result)
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    good = [r for r in results if "scores" in r]
    ids = ids if ids is not None else sorted({c for r in good for c in r["scores"]})
    names = {c: (class_names or {}).get(c, f"class_{c}") for c in ids}
    if len(set(names.values())) != len(names):
        raise MaskSAMError(f"class names are not unique: {names}; fix the dataset.json or sidecar")
    absent = {"dice": 1.0, "hd95": 0.0, "absent": True}
    cases = [{"case": r["case"], "per_class": {names[c]: dict(r["scores"].get(c, absent)) for c in ids}}
             for r in good]
    per_class: dict[str, dict[str, Any]] = {}
    for c in ids:
        scored = [s for case in cases if not (s := case["per_class"][names[c]])["absent"]]
        per_class[names[c]] = {"id": c, "dice": _mean([s["dice"] for s in scored]),
                               "hd95": _mean([s["hd95"] for s in scored]), "n": len(scored),
                               "n_absent": len(cases) - len(scored)}
    valid = [v for v in per_class.values() if v["n"]]
    return {
        "mean_dice": _mean([v["dice"] for v in valid]), "mean_hd95": _mean([v["hd95"] for v in valid]),
        "per_class": per_class, "cases": cases, "num_cases": len(cases),
        "empty_rule": EMPTY_RULE, "hd95_definition": HD95_DEFINITION,
        "missing_predictions": sorted(set(truths) - set(preds)),
        "predictions_without_gt": sorted(set(preds) - set(truths)),
        "failed": [{"case": r["case"], "error": r["error"]} for r in results if "error" in r],
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
    }


# --------------------------------------------------------------------------- output and CLI


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as a clear error when the folder is not writable."""
    try:
        atomic_write_text(path, text)
    except OSError as error:
        raise MaskSAMError(f"{path}: cannot write ({error}); check the folder is writable") from error


def summary_csv(summary: dict[str, Any]) -> str:
    """One row per case and class: case, class_id, class, dice, hd95_mm, absent."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["case", "class_id", "class", "dice", "hd95_mm", "absent"])
    for case in summary["cases"]:
        for name, s in case["per_class"].items():
            writer.writerow([case["case"], summary["per_class"][name]["id"], name, repr(s["dice"]),
                             repr(s["hd95"]), int(s["absent"])])
    return out.getvalue()


def format_table(summary: dict[str, Any]) -> str:
    """The per-class means as a small text table, then the mean over classes."""
    num = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    width = max([5, *(len(n) for n in summary["per_class"])])
    rows = [f"{'class':<{width}}  {'Dice':>6}  {'HD95 mm':>8}  {'n':>4}  {'absent':>6}"]
    for name, v in summary["per_class"].items():
        rows.append(f"{name:<{width}}  {num(v['dice'], '.4f'):>6}  {num(v['hd95'], '.2f'):>8}  "
                    f"{v['n']:>4}  {v['n_absent']:>6}")
    rows.append(f"{'mean':<{width}}  {num(summary['mean_dice'], '.4f'):>6}  "
                f"{num(summary['mean_hd95'], '.2f'):>8}  {summary['num_cases']:>4} case(s)")
    return "\n".join(rows)


def _cli_evaluate(args: argparse.Namespace) -> int:
    """Run ``masksam-core evaluate``: refuse existing outputs, score, write, print; the exit status."""
    outputs = [Path(args.output)] + ([Path(args.csv)] if args.csv else [])
    for path in outputs:
        if path.exists() and not args.overwrite:
            raise MaskSAMError(f"{path} already exists; pass --overwrite to replace it")
    summary = evaluate_folders(args.pred, args.gt, dataset_json=args.dataset_json,
                               num_workers=args.num_workers, progress=not args.quiet)
    _write_atomic(outputs[0], json.dumps(summary, indent=2) + "\n")
    if args.csv:
        _write_atomic(outputs[1], summary_csv(summary))
    print("\n".join([format_table(summary)]
                    + [f"missing prediction: {c} (in {summary['gt_dir']}, not in {args.pred})"
                       for c in summary["missing_predictions"]]
                    + [f"prediction without ground truth (ignored): {c}"
                       for c in summary["predictions_without_gt"]]
                    + [f"failed: {f['case']}: {f['error']}" for f in summary["failed"]]))
    print(f"summary written to {outputs[0]}" + (f", rows to {outputs[1]}" if args.csv else ""))
    return 1 if summary["failed"] or summary["missing_predictions"] else 0


def add_cli(subparsers: Any) -> None:
    """Register ``masksam-core evaluate``."""
    parser = subparsers.add_parser(
        "evaluate", help="Dice and HD95 (mm) of predicted label maps against ground truth",
        description="Score predicted label maps ({case}.nii.gz, .tif, ...) against ground-truth files of "
        "the same names: Dice and HD95 in mm (spacing of the ground truth) per case and class, means per "
        "class and over classes. HD95: " + HD95_DEFINITION + ". Empty masks: " + EMPTY_RULE + " Exits "
        "with 1 when a case failed or a prediction is missing.")
    parser.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label maps")
    parser.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth label maps "
                        "(or a data set folder: its labelsTr and dataset.json)")
    parser.add_argument("--dataset-json", metavar="FILE", help="dataset.json naming the classes (default: "
                        "the predictions' .classes.json sidecar, else class_1, class_2, ...)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="summary JSON to write")
    parser.add_argument("--csv", metavar="FILE", help="also write one CSV row per case and class")
    parser.add_argument("--num-workers", type=int, default=1, metavar="N", help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cli_evaluate)
