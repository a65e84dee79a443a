"""Run files (typed, unchanged on disk), model files (`masksam-core export`), bundled-model names, and the size
of the `lite` preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.runs import write_tiny_run

from masksam_core.cli import main
from masksam_core.errors import MaskSAMError
from masksam_core.inference.predictor import Predictor
from masksam_core.runs import (
    MODEL_KIND,
    BuildSpec,
    RunFile,
    bundled_models,
    export_model,
    find_model,
    load_checkpoint,
    model_card_path,
    resolve_run,
)


@pytest.fixture
def tiny_run(tmp_path):
    return write_tiny_run(tmp_path / "run")


def test_export_writes_a_small_fp16_model_that_predicts_like_the_run(tiny_run, tmp_path):
    out = export_model(tiny_run, tmp_path / "model.pt")
    ckpt = load_checkpoint(out).to_dict()
    run = load_checkpoint(resolve_run(tiny_run)).to_dict()
    assert ckpt["kind"] == "masksam-model"
    assert ckpt["model"].keys() == run["model"].keys()
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["class_names"] == run["class_names"] and ckpt["plans"] == run["plans"]
    assert "optimizer" not in ckpt and "path" not in ckpt["base_weights"]
    for key, value in run["model"].items():  # fp16 rounding only
        torch.testing.assert_close(ckpt["model"][key].float(), value.float(), rtol=1e-3, atol=1e-3)

    volume = np.random.default_rng(0).normal(300, 100, size=(5, 40, 36)).astype(np.float32)
    a = Predictor(tiny_run, device="cpu").predict(volume, (2.0, 1.5, 1.5), tta=False)
    b = Predictor(out, device="cpu").predict(volume, (2.0, 1.5, 1.5), tta=False)
    assert b.class_names == a.class_names and b.labels.shape == a.labels.shape
    assert (a.labels == b.labels).mean() > 0.99


def test_export_cli_keeps_existing_files_and_refuses_model_files(tiny_run, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(tiny_run), "-o", str(out), "--fp32"]) == 0
    assert load_checkpoint(out).model["first_conv.proj.weight"].dtype == torch.float32
    before = out.read_bytes()
    assert main(["export", str(tiny_run), "-o", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(tiny_run), "-o", str(out), "--overwrite"]) == 0
    with pytest.raises(MaskSAMError, match="already a model file"):
        export_model(out, tmp_path / "again.pt")


def test_bundled_names_resolve_and_other_values_stay_paths(tmp_path):
    assert find_model(tmp_path / "x.pt") == tmp_path / "x.pt"
    for name, path in bundled_models().items():
        assert resolve_run(name) == path and path.is_file()
        assert model_card_path(name).is_file()
    with pytest.raises(MaskSAMError, match="no bundled model"):
        model_card_path("no-such-model")


def test_lite_preset_ships_in_15_mb():
    from masksam_core.modeling import build_model

    model = build_model("lite", pretrained=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable * 2 <= 15e6  # fp16 bytes of a model file


def test_model_files_are_readable_like_any_new_file(tiny_run, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        out = export_model(tiny_run, tmp_path / "model.pt")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # others can read a model file meant for sharing


def _saved(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_run_files_read_and_write_back_the_same_dict(tiny_run, tmp_path):
    files = [resolve_run(tiny_run), export_model(tiny_run, tmp_path / "model.pt"), *bundled_models().values()]
    assert len(files) == 3  # the bundled model is installed
    for file in files:
        saved = _saved(file)
        again = RunFile.from_dict(saved).to_dict()
        assert list(again) == list(saved) and again == saved, file
        assert load_checkpoint(file).to_dict().keys() == saved.keys()


def test_a_new_model_file_is_laid_out_as_export_always_wrote_it():
    build = BuildSpec(preset="tiny", overrides={}, num_classes=2, in_channels=1, prompt_mode="auto")
    model = RunFile(kind=MODEL_KIND, format=1, model={}, build=build, plans={}, class_names=["a", "b"],
                    base_weights={"name": "tiny"}, summary={})
    assert list(model.to_dict()) == ["kind", "format", "model", "build", "base_weights", "sam", "plans", "class_names",
                                     "summary"]
    assert model.to_dict()["build"] == {"preset": "tiny", "overrides": {}, "num_classes": 2, "in_channels": 1,
                                        "prompt_mode": "auto"}


def test_incomplete_files_are_clear_errors(tmp_path):
    from masksam_core.files import atomic_save

    atomic_save({"kind": "masksam-run", "format": 1, "model": {}}, tmp_path / "bad.pt")
    with pytest.raises(MaskSAMError, match="incomplete"):
        load_checkpoint(tmp_path / "bad.pt")
