"""Dice and HD95 against independent oracles (medpy, MONAI, hand-computed values), and the evaluate CLI.

medpy and MONAI are test-only oracles here: masksam_core.evaluation computes with scipy alone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from medpy.metric.binary import dc as medpy_dice
from medpy.metric.binary import hd as medpy_hd
from medpy.metric.binary import hd95 as medpy_hd95
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage as ndi

from masksam_core.cli import main
from masksam_core.errors import MaskSAMError
from masksam_core.evaluation import (
    EMPTY_RULE,
    case_scores,
    dice,
    evaluate_folders,
    hd95,
    image_diagonal,
    surface_distances,
)
from masksam_core.io import ImageGeometry, read_image, write_labels

SPACINGS = [(2.5, 0.7, 1.1), (5.0, 0.8, 0.8), (1.0, 1.0, 1.0)]


def blobs(seed: int, shape: tuple[int, int, int] = (18, 22, 26), sigma: float = 2.0) -> np.ndarray:
    """A random smooth-edged boolean mask (several blobs, some touching the image edge)."""
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), sigma) > 0.5 + 0.01 * (seed % 3)


def monai_input(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask)[None, None].float()


def cropped_medpy_hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """medpy's hd95 on a 2-voxel margin around both masks (same value, much faster on big volumes)."""
    found = np.nonzero(pred | truth)
    box = tuple(slice(max(int(i.min()) - 2, 0), int(i.max()) + 3) for i in found)
    assert pred[box].sum() == pred.sum() and truth[box].sum() == truth.sum()
    return medpy_hd95(pred[box], truth[box], voxelspacing=spacing)


# --------------------------------------------------------------------------- metrics vs oracles


@pytest.mark.parametrize("seed", range(5))
def test_dice_matches_medpy_and_monai(seed):
    pred, truth = blobs(seed), blobs(seed + 100)
    ours = dice(pred, truth)
    assert ours == pytest.approx(medpy_dice(pred, truth), rel=1e-12)
    assert ours == pytest.approx(compute_dice(monai_input(pred), monai_input(truth)).item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_hd95_equals_medpy_exactly_on_random_masks(seed):
    pred, truth = blobs(seed), blobs(seed + 100)
    spacing = SPACINGS[seed % len(SPACINGS)]
    assert pred.any() and truth.any()
    assert hd95(pred, truth, spacing) == pytest.approx(medpy_hd95(pred, truth, voxelspacing=spacing),
                                                       rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_directed_distances_match_monai(seed):
    """MONAI's directed HD95 is our per-direction percentile; its symmetric one the larger of the two."""
    pred, truth = blobs(seed), blobs(seed + 50)
    spacing = SPACINGS[seed]
    to_truth, to_pred = surface_distances(pred, truth, spacing)
    p_t = compute_hausdorff_distance(monai_input(pred), monai_input(truth), include_background=True,
                                     percentile=95, directed=True, spacing=spacing).item()
    t_p = compute_hausdorff_distance(monai_input(truth), monai_input(pred), include_background=True,
                                     percentile=95, directed=True, spacing=spacing).item()
    sym = compute_hausdorff_distance(monai_input(pred), monai_input(truth), include_background=True,
                                     percentile=95, spacing=spacing).item()
    assert np.percentile(to_truth, 95) == pytest.approx(p_t, rel=1e-5)
    assert np.percentile(to_pred, 95) == pytest.approx(t_p, rel=1e-5)
    assert max(p_t, t_p) == pytest.approx(sym, rel=1e-6)
    assert max(to_truth.max(), to_pred.max()) == pytest.approx(medpy_hd(pred, truth, spacing), rel=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_cube_hand_computed(axis, k):
    """A 6-voxel cube shifted by k voxels along one axis: HD95 = k * spacing[axis], Dice = (6-k)/6."""
    spacing = (2.5, 0.7, 1.1)
    truth = np.zeros((20, 20, 20), bool)
    truth[5:11, 5:11, 5:11] = True
    pred = np.roll(truth, k, axis=axis)
    assert hd95(pred, truth, spacing) == pytest.approx(k * spacing[axis], rel=1e-12)
    assert dice(pred, truth) == pytest.approx((6 - k) / 6)


def test_face_connected_surface_single_voxel_and_plate():
    """Surface = voxels removed by one face-connected erosion (a 3x3x3 cube keeps only its centre)."""
    cube = np.zeros((7, 7, 7), bool)
    cube[2:5, 2:5, 2:5] = True
    to_truth, to_pred = surface_distances(cube, cube, (1.0, 1.0, 1.0))
    assert len(to_truth) == len(to_pred) == 26 and not to_truth.any()
    point = np.zeros_like(cube)
    point[3, 3, 3] = True  # the eroded centre is not on the surface: nearest surface voxel 1 voxel away
    assert surface_distances(point, cube, (2.0, 3.0, 4.0))[0].tolist() == [2.0]


def test_empty_rules():
    spacing = (2.0, 1.0, 0.5)
    empty, full = np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool)
    full[1:3, 1:3, 1:3] = True
    diagonal = np.sqrt(8.0 ** 2 + 5.0 ** 2 + 3.0 ** 2)
    assert image_diagonal(empty.shape, spacing) == pytest.approx(diagonal)
    assert (dice(empty, empty), hd95(empty, empty, spacing)) == (1.0, 0.0)
    assert (dice(full, empty), hd95(full, empty, spacing)) == (0.0, pytest.approx(diagonal))
    assert (dice(empty, full), hd95(empty, full, spacing)) == (0.0, pytest.approx(diagonal))
    with pytest.raises(MaskSAMError, match="non-empty"):
        surface_distances(empty, full, spacing)
    with pytest.raises(MaskSAMError, match="shape"):
        dice(full, full[:3])
    with pytest.raises(MaskSAMError, match="spacing"):
        hd95(full, full, (1.0, 0.0, 1.0))


def test_case_scores_cropped_equal_full_volume_oracle():
    """Per-class scores of label maps (computed on bounding boxes) equal medpy on the full masks."""
    spacing = (3.0, 0.9, 1.2)
    truth = blobs(1).astype(np.uint8) + 2 * blobs(2)  # values 0..3
    pred = blobs(3).astype(np.uint8) + 2 * blobs(4)
    pred[pred == 1] = 0  # class 1 only in the truth
    scores = case_scores(pred, truth, spacing, [1, 2, 3, 4])
    for c in (2, 3):
        assert scores[c]["dice"] == pytest.approx(medpy_dice(pred == c, truth == c), rel=1e-12)
        assert scores[c]["hd95"] == pytest.approx(medpy_hd95(pred == c, truth == c, spacing), rel=1e-12)
    assert scores[1] == {"dice": 0.0, "hd95": pytest.approx(image_diagonal(truth.shape, spacing)),
                         "absent": False}
    assert scores[4] == {"dice": 1.0, "hd95": 0.0, "absent": True}
    assert sorted(case_scores(pred, truth, spacing)) == [1, 2, 3]
    with pytest.raises(MaskSAMError, match=r"label values \[3\]"):
        case_scores(pred, truth, spacing, [1, 2])
    with pytest.raises(MaskSAMError, match="non-integer"):
        case_scores(pred + 0.5, truth, spacing)


def test_real_masks_against_medpy(shared_data):
    """Real organ and lesion masks against their eroded and shifted selves (3 mm and 0.8x0.8x6.5 mm)."""
    for path, label in [(shared_data / "Dataset501_AbdomenCT/labelsTr/abdct_001.nii.gz", 5),  # liver
                        (shared_data / "Dataset501_AbdomenCT/labelsTr/abdct_001.nii.gz", 7),  # pancreas
                        (shared_data / "Dataset503_Lesions/labelsTr/lesion_001_brain1.nii.gz", 1)]:
        labels, geometry = read_image(path)
        truth = labels == label
        assert truth.any()
        assert (dice(truth, truth), hd95(truth, truth, geometry.spacing)) == (1.0, 0.0)
        for pred in (ndi.binary_erosion(truth, iterations=2), np.roll(truth, (1, -2, 3), axis=(0, 1, 2))):
            assert pred.any()
            assert dice(pred, truth) == pytest.approx(medpy_dice(pred, truth), rel=1e-12)
            assert hd95(pred, truth, geometry.spacing) == pytest.approx(
                cropped_medpy_hd95(pred, truth, geometry.spacing), rel=1e-12)


# --------------------------------------------------------------------------- folders and CLI


SPACING = (4.0, 1.0, 0.5)  # (sz, sy, sx)
NAMES = {0: "background", 1: "liver", 2: "tumour"}


def _labels() -> np.ndarray:
    labels = np.zeros((10, 16, 18), np.uint8)
    labels[2:7, 3:11, 4:12] = 1
    labels[3:5, 5:8, 6:9] = 2
    return labels


def _folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """gt: a (perfect), b (shifted 2 voxels in x, no tumour), c (no prediction), d (corrupt prediction),
    e (prediction on another grid); pred also holds x (no ground truth)."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    geometry = ImageGeometry.from_spacing((10, 16, 18), SPACING)
    labels = _labels()
    b = labels.copy()
    b[b == 2] = 1
    for case, truth in {"a": labels, "b": b, "c": labels, "d": labels, "e": labels}.items():
        write_labels(gt / f"{case}.nii.gz", truth, geometry)
    write_labels(pred / "a.nii.gz", labels, geometry)
    write_labels(pred / "b.nii.gz", np.roll(b, 2, axis=2), geometry)
    (pred / "d.nii.gz").write_bytes(b"not a nifti file at all")
    write_labels(pred / "e.nii.gz", labels[:, :, :-1], ImageGeometry.from_spacing((10, 16, 17), SPACING))
    write_labels(pred / "x.nii.gz", labels, geometry)
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {v: k for k, v in NAMES.items()}}))
    return pred, gt, dataset_json


def test_evaluate_folders_values(tmp_path):
    pred, gt, dataset_json = _folders(tmp_path)
    summary = evaluate_folders(pred, gt, dataset_json=dataset_json, progress=False)
    json.dumps(summary, allow_nan=False)
    b_liver = _labels() > 0
    b_dice = medpy_dice(np.roll(b_liver, 2, axis=2), b_liver)
    b_hd95 = medpy_hd95(np.roll(b_liver, 2, axis=2), b_liver, voxelspacing=SPACING)
    assert b_hd95 == pytest.approx(1.0)  # 2 voxels of 0.5 mm along x
    assert [c["case"] for c in summary["cases"]] == ["a", "b"]
    assert summary["cases"][0]["per_class"] == {"liver": {"dice": 1.0, "hd95": 0.0, "absent": False},
                                                "tumour": {"dice": 1.0, "hd95": 0.0, "absent": False}}
    assert summary["cases"][1]["per_class"]["liver"] == {"dice": pytest.approx(b_dice),
                                                         "hd95": pytest.approx(b_hd95), "absent": False}
    assert summary["cases"][1]["per_class"]["tumour"]["absent"] is True
    liver, tumour = summary["per_class"]["liver"], summary["per_class"]["tumour"]
    assert (liver["n"], liver["n_absent"], tumour["n"], tumour["n_absent"]) == (2, 0, 1, 1)
    assert liver["dice"] == pytest.approx((1 + b_dice) / 2) and tumour["dice"] == 1.0
    assert summary["mean_dice"] == pytest.approx((liver["dice"] + 1.0) / 2)  # absent tumour excluded
    assert summary["mean_hd95"] == pytest.approx((b_hd95 / 2 + 0.0) / 2)
    assert summary["empty_rule"] == EMPTY_RULE
    assert summary["missing_predictions"] == ["c"] and summary["predictions_without_gt"] == ["x"]
    failed = {f["case"]: f["error"] for f in summary["failed"]}
    assert sorted(failed) == ["d", "e"]
    assert "cannot read" in failed["d"] and "different voxel grids" in failed["e"]
    parallel = evaluate_folders(pred, gt, dataset_json=dataset_json, num_workers=2, progress=False)
    assert parallel == summary


def test_class_names_sidecar_default_and_dataset_folder(tmp_path):
    geometry = ImageGeometry.from_spacing((10, 16, 18), SPACING)
    gt, pred = tmp_path / "ds" / "labelsTr", tmp_path / "pred"
    write_labels(gt / "a.nii.gz", _labels(), geometry)
    write_labels(pred / "a.nii.gz", _labels(), geometry)
    assert list(evaluate_folders(pred, gt, progress=False)["per_class"]) == ["class_1", "class_2"]
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"labels": {"bg": 0, "x": 1, "y": 2}}))
    assert list(evaluate_folders(pred, tmp_path / "ds", progress=False)["per_class"]) == ["x", "y"]
    write_labels(pred / "a.nii.gz", _labels(), geometry, class_names=NAMES, overwrite=True)
    summary = evaluate_folders(pred, gt, progress=False)
    assert list(summary["per_class"]) == ["liver", "tumour"] and summary["mean_dice"] == 1.0
    with pytest.raises(MaskSAMError, match="no prediction"):
        evaluate_folders(tmp_path / "ds", gt, progress=False)
    (pred / "a.nii.gz").unlink()  # a TIFF prediction of a NIfTI truth: compared on shape and spacing
    shifted = np.roll(_labels(), 1, axis=0)
    write_labels(pred / "a.tif", shifted, ImageGeometry.from_spacing((10, 16, 18), SPACING, "tiff"))
    summary = evaluate_folders(pred, gt, progress=False)
    assert summary["failed"] == [] and summary["per_class"]["liver"]["hd95"] == pytest.approx(
        medpy_hd95(shifted == 1, _labels() == 1, voxelspacing=SPACING))


def test_cli_end_to_end(tmp_path, capsys):
    pred, gt, dataset_json = _folders(tmp_path)
    out, table = tmp_path / "out" / "summary.json", tmp_path / "rows.csv"
    args = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--dataset-json", str(dataset_json),
            "-o", str(out), "--csv", str(table), "--quiet"]
    assert main(args) == 1  # c missing, d and e failed
    printed = capsys.readouterr().out
    assert "liver" in printed and "missing prediction: c" in printed and "failed: d" in printed
    summary = json.loads(out.read_text())
    assert {"mean_dice", "mean_hd95", "per_class", "cases", "empty_rule", "missing_predictions",
            "failed"} <= set(summary)
    assert summary == json.loads(json.dumps(evaluate_folders(pred, gt, dataset_json=dataset_json,
                                                             progress=False)))
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["class"], r["absent"]) for r in rows] == [
        ("a", "liver", "0"), ("a", "tumour", "0"), ("b", "liver", "0"), ("b", "tumour", "1")]
    assert float(rows[2]["hd95_mm"]) == pytest.approx(summary["cases"][1]["per_class"]["liver"]["hd95"])
    before = out.read_text()
    out.write_text("{}")
    assert main(args) == 1 and "already exists" in capsys.readouterr().err
    assert out.read_text() == "{}"
    assert main([*args, "--overwrite"]) == 1 and out.read_text() == before
    for case in "cde":  # all present and readable: exit 0
        (pred / f"{case}.nii.gz").unlink(missing_ok=True)
        (gt / f"{case}.nii.gz").unlink()
    assert main([*args, "--overwrite"]) == 0
    assert not list(out.parent.glob(".*tmp"))
