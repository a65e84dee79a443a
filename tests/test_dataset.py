"""The nnU-Net v2 raw layout and ``masksam-core check``: each broken-data-set case gives its message."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from masksam_core.cli import main
from masksam_core.data.dataset import DatasetError, Problem, check_dataset, load_checked_dataset, load_dataset

SHAPE = (6, 5, 4)  # nibabel (i, j, k)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
LABELS = {"background": 0, "liver": 1, "spleen": 2}


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _label(value: int = 1, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[1:3, 1:3, 1:3] = value
    return label


def make_dataset(root: Path, cases=("case_a", "case_b"), channels=("CT",), labels=None,
                 ending=".nii.gz", **extra) -> Path:
    """A valid tiny data set: every case has every channel and a label with values 1 and 2."""
    root.mkdir(parents=True)
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {str(i): n for i, n in enumerate(channels)},
            "labels": labels or LABELS, "numTraining": len(cases), "file_ending": ending, **extra}
    (root / "dataset.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for case in cases:
        label = _label()
        label[4, 3, 3] = 2
        for c in range(len(channels)):
            _nifti(root / "imagesTr" / f"{case}_{c:04d}{ending}", rng.normal(size=SHAPE).astype(np.float32))
        _nifti(root / "labelsTr" / f"{case}{ending}", label)
    return root


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "Dataset900_Synth")


def _only(problems: list[Problem], path: Path, *fragments: str) -> None:
    """Exactly one problem, on ``path``, one line, containing every fragment."""
    assert len(problems) == 1, [str(p) for p in problems]
    problem = problems[0]
    assert problem.path == path and "\n" not in str(problem) and str(problem).startswith(str(path))
    for fragment in fragments:
        assert fragment in problem.message, problem.message


def test_valid_dataset_loads_and_checks_clean(ds):
    assert check_dataset(ds) == []
    spec = load_dataset(ds)
    assert spec.name == "Dataset900_Synth" and spec.channel_names == {0: "CT"}
    assert spec.class_names == ["background", "liver", "spleen"] and spec.num_classes == 3
    assert [c.id for c in spec.cases] == ["case_a", "case_b"]
    assert spec.cases[0].images == [ds / "imagesTr" / "case_a_0000.nii.gz"]
    assert spec.cases[0].label == ds / "labelsTr" / "case_a.nii.gz"


def test_cli_ok_summary_and_exit_code(ds, capsys):
    assert main(["check", str(ds)]) == 0
    assert capsys.readouterr().out.strip() == "Dataset900_Synth: 2 cases, 1 channel (CT), 3 classes: OK"


def test_cli_lists_problems_one_per_line(ds, capsys):
    (ds / "labelsTr" / "case_a.nii.gz").unlink()
    (ds / "imagesTr" / "case_b_0000.nii.gz").unlink()
    assert main(["check", str(ds)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1] == "Dataset900_Synth: 2 problems found"
    assert all(line.startswith(str(ds)) for line in lines[:-1])


def test_cli_help_explains_the_checks(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("dataset.json", "NaN", "empty", "consecutive", "geometry", "--quick"):
        assert phrase in text


def test_missing_dataset_json(ds):
    (ds / "dataset.json").unlink()
    _only(check_dataset(ds), ds / "dataset.json", "missing; create it", "channel_names")
    with pytest.raises(DatasetError, match=r"dataset.json: missing"):
        load_dataset(ds)


def test_missing_folder_and_invalid_json(tmp_path, ds):
    _only(check_dataset(tmp_path / "nowhere"), tmp_path / "nowhere", "folder not found")
    (ds / "dataset.json").write_text("{'labels': 1,}")
    _only(check_dataset(ds), ds / "dataset.json", "not valid JSON")


@pytest.mark.parametrize("key", ["channel_names", "labels", "file_ending"])
def test_missing_key(ds, key):
    meta = json.loads((ds / "dataset.json").read_text())
    del meta[key]
    (ds / "dataset.json").write_text(json.dumps(meta))
    _only(check_dataset(ds), ds / "dataset.json", f"missing key '{key}'", f'"{key}":')


def test_nnunet_v1_modality_hint(tmp_path):
    root = make_dataset(tmp_path / "D")
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = meta.pop("channel_names")
    (root / "dataset.json").write_text(json.dumps(meta))
    _only(check_dataset(root), root / "dataset.json", "'modality' is called 'channel_names'")


def test_missing_channel_file(tmp_path):
    root = make_dataset(tmp_path / "D", channels=("T1", "T2"))
    (root / "imagesTr" / "case_b_0001.nii.gz").unlink()
    _only(check_dataset(root), root / "imagesTr" / "case_b_0001.nii.gz", "missing channel 1 (T2) of case case_b")


def test_label_without_images(ds):
    _nifti(ds / "labelsTr" / "case_c.nii.gz", _label())
    problems = check_dataset(ds)
    _only(problems, ds / "labelsTr" / "case_c.nii.gz")
    assert str(problems[0]).endswith("label without image; add imagesTr/case_c_0000.nii.gz or remove the label")


def test_num_training_mismatch(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    meta["numTraining"] = 3
    (ds / "dataset.json").write_text(json.dumps(meta))
    _only(check_dataset(ds), ds / "dataset.json", "numTraining is 3 but the data set holds 2 case(s)")


def test_a_data_set_without_cases(ds, capsys):
    for folder in ("imagesTr", "labelsTr"):
        for f in (ds / folder).iterdir():
            f.unlink()
    _only(check_dataset(ds), ds / "imagesTr", "no cases: put each case's images in imagesTr as {case}_0000.nii.gz")
    assert main(["check", str(ds)]) == 1  # not "OK": train would refuse it


def test_images_without_label(ds):
    (ds / "labelsTr" / "case_b.nii.gz").unlink()
    _only(check_dataset(ds), ds / "imagesTr" / "case_b_0000.nii.gz", "image without label",
          "add labelsTr/case_b.nii.gz")


def test_image_label_shape_mismatch(ds):
    _nifti(ds / "labelsTr" / "case_a.nii.gz", _label(shape=(6, 5, 5)))
    _only(check_dataset(ds), ds / "labelsTr" / "case_a.nii.gz", "label shape (5, 5, 6)", "(4, 5, 6)")


@pytest.mark.parametrize("change, bad, what", [
    ("origin", 0.5, "origin"), ("origin", 0.001, None),
    ("spacing", 1.01, "spacing"), ("spacing", 1.00001, None), ("flip", None, "directions"),
])
def test_image_label_affine_mismatch(ds, change, bad, what):
    affine = AFFINE.copy()
    if change == "origin":
        affine[:3, 3] += bad
    elif change == "spacing":
        affine[0, 0] *= bad
    else:
        affine[1, 1] = -1.0
    _nifti(ds / "labelsTr" / "case_a.nii.gz", _label(), affine)
    problems = check_dataset(ds, deep=False)
    if what is None:
        assert problems == []  # within the tolerance
    else:
        _only(problems, ds / "labelsTr" / "case_a.nii.gz", "label geometry differs", what)


def test_channels_with_different_shapes(tmp_path):
    root = make_dataset(tmp_path / "D", channels=("T1", "T2"))
    _nifti(root / "imagesTr" / "case_a_0001.nii.gz", np.zeros((6, 5, 3), np.float32))
    _only(check_dataset(root), root / "imagesTr" / "case_a_0001.nii.gz", "channel shape (3, 5, 6)",
          "case_a_0000.nii.gz (4, 5, 6)")


def test_label_values_absent_from_dataset_json(ds):
    _nifti(ds / "labelsTr" / "case_b.nii.gz", _label(value=7))
    _only(check_dataset(ds), ds / "labelsTr" / "case_b.nii.gz", "label values [7] are not in",
          "[0, 1, 2]")


def test_label_values_not_consecutive(tmp_path):
    root = make_dataset(tmp_path / "D", labels={"background": 0, "liver": 1, "spleen": 2, "kidney": 4})
    _only(check_dataset(root), root / "dataset.json", "[0, 1, 2, 4] are not consecutive from 0",
          "0..3")
    with pytest.raises(DatasetError, match="not consecutive"):
        _ = load_dataset(root).class_names


def test_nan_and_infinite_voxels(ds):
    image = np.zeros(SHAPE, np.float32)
    image[0, 0, 0], image[1, 0, 0], image[2, 0, 0] = np.nan, np.inf, -np.inf
    _nifti(ds / "imagesTr" / "case_a_0000.nii.gz", image)
    _only(check_dataset(ds), ds / "imagesTr" / "case_a_0000.nii.gz", "1 NaN and 2 infinite voxels")
    assert check_dataset(ds, deep=False) == []  # a header-only check does not see voxels


def test_empty_label_map(ds):
    _nifti(ds / "labelsTr" / "case_a.nii.gz", np.zeros(SHAPE, np.uint8))
    _only(check_dataset(ds), ds / "labelsTr" / "case_a.nii.gz", "empty (all background)")


def test_non_integer_float_labels(ds):
    _nifti(ds / "labelsTr" / "case_a.nii.gz", _label().astype(np.float32) * 0.5)
    _only(check_dataset(ds), ds / "labelsTr" / "case_a.nii.gz", "non-integer values")


def test_unreadable_and_truncated_files(ds):
    raw = (ds / "imagesTr" / "case_a_0000.nii.gz").read_bytes()
    (ds / "imagesTr" / "case_a_0000.nii.gz").write_bytes(raw[: len(raw) // 2])
    (ds / "labelsTr" / "case_b.nii.gz").write_bytes(b"this is not an image")
    problems = check_dataset(ds)
    assert [p.path.name for p in problems] == ["case_a_0000.nii.gz", "case_b.nii.gz"]
    assert all("corrupt" in p.message for p in problems)


def test_wrong_file_ending_and_bad_names(ds):
    _nifti(ds / "imagesTr" / "case_c_0000.nii", np.zeros(SHAPE, np.float32))
    _nifti(ds / "imagesTr" / "case_d.nii.gz", np.zeros(SHAPE, np.float32))
    _nifti(ds / "imagesTr" / "case_e_0001.nii.gz", np.zeros(SHAPE, np.float32))
    problems = {p.path.name: p.message for p in check_dataset(ds, deep=False)}
    assert "does not end with file_ending '.nii.gz'" in problems["case_c_0000.nii"]
    assert "{case}_{XXXX}.nii.gz" in problems["case_d.nii.gz"]
    assert "channel 0001 but dataset.json channel_names has 1" in problems["case_e_0001.nii.gz"]
    assert len(problems) == 3


def test_unsupported_file_ending(tmp_path):
    root = make_dataset(tmp_path / "D")
    meta = json.loads((root / "dataset.json").read_text())
    meta["file_ending"] = ".mha"
    (root / "dataset.json").write_text(json.dumps(meta))
    _only(check_dataset(root), root / "dataset.json", "file_ending '.mha' is not supported")


def test_tiff_dataset_is_valid(tmp_path):
    root = tmp_path / "Dataset901_Tiff"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "EM"}, "labels": {"background": 0, "cell": 1}, "file_ending": ".tif"}))
    for folder, name, data in (("imagesTr", "c1_0000", np.ones((4, 5, 6), np.float32)),
                               ("labelsTr", "c1", _label(shape=(4, 5, 6)))):
        tifffile.imwrite(root / folder / f"{name}.tif", data, imagej=True, resolution=(1.0, 1.0),
                         metadata={"spacing": 2.0, "unit": "mm", "axes": "ZYX"})
    assert check_dataset(root) == []
    (root / "labelsTr" / "c1.tif.json").write_text(json.dumps({"spacing": [2.0, 1.0, 1.1]}))
    _only(check_dataset(root), root / "labelsTr" / "c1.tif", "spacing [2.0, 1.0, 1.1] vs [2.0, 1.0, 1.0]")


def test_load_checked_dataset_refuses_problems(ds):
    assert load_checked_dataset(ds).num_classes == 3
    (ds / "labelsTr" / "case_a.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"(?s)1 problem\(s\).*image without label"):
        load_checked_dataset(ds)


@pytest.mark.parametrize("name, n_cases, n_classes", [
    ("Dataset501_AbdomenCT", 1, 9), ("Dataset502_AbdomenMR", 1, 9), ("Dataset503_Lesions", 5, 2)])
def test_real_datasets_have_no_problems(shared_data, name, n_cases, n_classes):
    assert check_dataset(shared_data / name) == []
    spec = load_dataset(shared_data / name)
    assert (len(spec.cases), spec.num_classes) == (n_cases, n_classes)
    if name == "Dataset501_AbdomenCT":
        assert spec.class_names[:3] == ["background", "spleen", "kidney_right"]
