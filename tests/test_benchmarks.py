"""The benchmark suite (benchmarks/run.py): a fast end-to-end run, its FLOP count and nnU-Net's plan."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The ``benchmarks`` package (the repository root on sys.path while these tests run)."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        yield importlib.import_module("benchmarks.run")
    finally:
        sys.path.remove(str(REPO_ROOT))


def test_suite_smoke(bench, tmp_path):
    """encoder + predict (with nnU-Net, with and without TTA) + train on tiny sizes: files and numbers."""
    results = bench.main(["--device", "cpu", "--parts", "encoder,predict,train", "--backbones", "tiny",
                          "--presets", "tiny", "--volume", "4", "32", "32", "--warmup", "1", "--repeats", "1",
                          "--matmul-size", "128", "--threads", "1", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "suite_cpu.json").read_text(encoding="utf-8"))
    assert on_disk["settings"]["volume"] == [4, 32, 32]
    assert {"machine", "matmul", "encoder", "predict", "train", "nnunet_plan", "flops_method"} <= set(on_disk)
    assert bench.failed(results) == []

    assert on_disk["matmul"]["status"] == "ok" and on_disk["matmul"]["tflops"] > 0
    (enc,) = on_disk["encoder"]
    assert (enc["backbone"], enc["image_size"], enc["status"]) == ("tiny", 64, "ok")
    for key in ("gflop_per_image", "images_per_s", "ms_per_image", "tflops", "fraction_of_matmul"):
        assert enc[key] > 0, key
    assert enc["ms_per_image"] == pytest.approx(1000 / enc["images_per_s"])

    rows = {(r["model"], r["tta"]): r for r in on_disk["predict"]}
    assert set(rows) == {(m, t) for m in ("nnunet_3d_fullres", "masksam_tiny") for t in (False, True)}
    for (_, tta), row in rows.items():
        assert row["status"] == "ok", row
        assert row["windows"] == 1  # the 4×32×32 volume fits in one window of either model
        assert row["network_passes"] == (8 if tta else 1)
        assert 0 < row["windows_s"] <= row["seconds"]
        assert row["peak_memory_gib"] > 0
    assert rows[("masksam_tiny", False)]["patch_size"] == [4, 64, 64]
    assert rows[("masksam_tiny", False)]["precision"] in ("float32", "bfloat16")  # Predictor's auto on this CPU
    assert on_disk["nnunet_plan"]["patch_size"] == [4, 32, 32]  # planned for this volume

    (train,) = on_disk["train"]
    assert train["status"] == "ok" and train["batch_size"] == 2
    assert train["seconds_per_step"] > 0 and train["peak_memory_gib"] > 0 and train["trainable_params_m"] > 0

    md = (tmp_path / "suite_cpu.md").read_text(encoding="utf-8")
    for header in ("| backbone | input |", "| model | patch | windows |", "| preset | patch |"):
        assert header in md
    assert "| tiny | 64² | 1 |" in md and "| nnunet_3d_fullres | 4×32×32 | 1 |" in md
    assert "| masksam_tiny | 4×64×64 | 1 |" in md and "| tiny | 4×64×64 |" in md


def _vit_flops(image: int, patch: int, dim: int, depth: int, window: int, globals_: tuple[int, ...],
               out: int = 256) -> int:
    """SAM ViT encoder FLOPs written out by hand (2 per multiply-add): patch embedding, per block
    qkv + projection (on window-padded tokens in windowed blocks), attention Q·Kᵀ and A·V, decomposed
    relative-position terms, MLP, then the 1×1 and 3×3 neck convolutions."""
    side = image // patch
    tokens = side * side
    total = 2 * tokens * (patch * patch * 3) * dim
    for block in range(depth):
        if block in globals_:
            n_windows, size = 1, side
        else:
            padded = -(-side // window) * window
            n_windows, size = (padded // window) ** 2, window
        n = size * size
        total += n_windows * (2 * n * dim * 4 * dim + 4 * n * n * dim + 4 * n * size * dim)
        total += 2 * tokens * dim * 8 * dim
    total += 2 * tokens * dim * out + 2 * tokens * 9 * out * out
    return total


def test_encoder_flops_match_hand_count(bench):
    from benchmarks._bench_encoder import encoder_flops

    expected = _vit_flops(1024, 16, 768, 12, 14, (2, 5, 8, 11))
    assert encoder_flops("vit_b", 1024) == expected
    assert expected / 1e9 == pytest.approx(972.08, abs=0.01)  # docs/benchmarks.md: ViT-B 1024² 972 GFLOP


def test_nnunet_plan_for_default_ct(bench):
    """nnU-Net's planner rules give the documented 3d_fullres network for 128×512×512 at 3×0.78×0.78 mm."""
    import torch
    from benchmarks._bench_nnunet import DEFAULT_PLAN, build_plain_unet, plan_3d_fullres

    plan = plan_3d_fullres((128, 512, 512), (3.0, 0.78, 0.78), num_classes=14)
    assert plan == DEFAULT_PLAN
    net = build_plain_unet(plan, 1, 14, device="meta")
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(30.7e6, rel=0.01)
    out = net(torch.empty(1, 1, *plan.patch_size, device="meta"))
    assert tuple(out.shape) == (1, 14, *plan.patch_size)


def test_missing_package_is_a_clear_error(bench, monkeypatch, tmp_path):
    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dynamic_network_architectures" else real(name, *a))
    with pytest.raises(SystemExit, match="pip download --no-deps"):
        bench.main(["--device", "cpu", "--parts", "predict", "--out", str(tmp_path)])
    assert not (tmp_path / "suite_cpu.json").exists()
    # without the comparison the same package is not needed
    settings = bench.resolve(bench.parse_args(["--parts", "predict", "--no-nnunet"]), torch.device("cpu"))
    bench.check_packages(settings)


def test_missing_module_of_a_part_is_named(bench, monkeypatch, tmp_path):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "masksam_core.training.trainer":
            raise ModuleNotFoundError("No module named 'monai'", name="monai")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(SystemExit, match=r"monai \(needed by: train\)"):
        bench.main(["--device", "cpu", "--parts", "encoder,train", "--out", str(tmp_path)])
    assert not (tmp_path / "suite_cpu.json").exists()


def test_tta_limit_skips_and_records_the_estimate(bench, tmp_path):
    results = bench.main(["--device", "cpu", "--parts", "predict", "--no-nnunet", "--presets", "tiny",
                          "--volume", "4", "32", "32", "--tta-limit", "0", "--tag", "limit", "--threads", "1",
                          "--out", str(tmp_path)])
    plain, tta = results["predict"]
    assert (plain["tta"], plain["status"], tta["tta"], tta["status"]) == (False, "ok", True, "skipped")
    assert tta["estimate_s"] == pytest.approx(8 * plain["windows_s"])
    assert bench.failed(results) == []
    assert "skipped (~" in (tmp_path / "suite_cpu_limit.md").read_text(encoding="utf-8")


def test_compile_switch_compiles_encoder_and_predictor(bench, tmp_path, monkeypatch):
    import torch

    compiled = []  # the compiled path itself is checked against the plain one in test_predict
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(type(module).__name__) or module)
    results = bench.main(["--device", "cpu", "--parts", "encoder,predict", "--backbones", "tiny", "--no-nnunet",
                          "--presets", "tiny", "--volume", "4", "32", "32", "--no-tta", "--compile", "--warmup", "1",
                          "--repeats", "1", "--matmul-size", "256", "--threads", "1", "--tag", "compiled",
                          "--out", str(tmp_path)])
    assert bench.failed(results) == []
    (encoder,), (predict,) = results["encoder"], results["predict"]
    assert encoder["status"] == predict["status"] == "ok"
    assert encoder["compiled"] and predict["compiled"] and results["settings"]["compile"]
    assert encoder["first_call_s"] > 0 and predict["first_call_s"] > 0
    assert len(compiled) == 2 and compiled[1] == "MaskSAM", compiled  # the encoder, then the predictor's network
    assert ", torch.compile." in (tmp_path / "suite_cpu_compiled.md").read_text(encoding="utf-8")


def test_predict_cpu_estimates_the_whole_ct_from_its_first_windows(bench, shared_data, tmp_path):
    """benchmarks/predict_cpu.py on the sample CT with an untrained tiny run, stopped after 3 windows."""
    predict_cpu = importlib.import_module("benchmarks.predict_cpu")
    out = tmp_path / "predict_cpu"
    (row,) = predict_cpu.main(["--presets", "tiny", "--tta", "off", "--max-windows", "3", "--data", str(shared_data),
                               "--work", str(tmp_path / "work"), "--out", str(out)])
    assert (row["preset"], row["tta"], row["compiled"], row["estimate"]) == ("tiny", "off", False, True)
    assert row["windows"] == 495 and row["windows_timed"] == 3  # 122×101×112 at 3 mm, 4×64×64 windows
    # the preprocessing and the first window, then 494 windows at the mean time of windows 2 and 3
    want = row["preprocessing_s"] + row["first_batch_s"] + 494 * row["seconds_per_window"]
    assert row["seconds"] == pytest.approx(want)
    assert row["seconds_per_window"] > 0 and row["peak_rss_mb"] > 100
    assert json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["rows"] == [row]
    assert row["precision"] in ("float32", "bfloat16")  # the Predictor's choice on this CPU
    assert f"| tiny | off | {row['precision']} | no | 0.5 | 495 |" in out.with_suffix(".md").read_text(encoding="utf-8")


def test_gpu_session_script_is_valid_bash_and_explains_itself():
    import subprocess

    script = REPO_ROOT / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2
    for word in ("prepare", "run OUT STEP", "checks", "encoder", "predict", "train", "TIME_LIMIT"):
        assert word in usage.stdout, word
    wrong = subprocess.run(["bash", str(script), "run"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "usage" in wrong.stderr


def test_grad_checkpointing_cuts_nothing_but_memory(bench, tmp_path):
    """The train part with --grad-checkpointing: the same training (losses after the same steps), the flag recorded."""
    common = ["--device", "cpu", "--parts", "train", "--presets", "tiny", "--warmup", "1", "--repeats", "2",
              "--threads", "1", "--out", str(tmp_path)]
    plain = bench.main([*common, "--tag", "plain"])["train"][0]
    recomputed = bench.main([*common, "--tag", "gc", "--grad-checkpointing"])["train"][0]
    assert plain["status"] == recomputed["status"] == "ok"
    assert plain["grad_checkpointing"] is False and recomputed["grad_checkpointing"] is True
    assert recomputed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    md = (tmp_path / "suite_cpu_gc.md").read_text(encoding="utf-8")
    assert "encoder blocks, prompt-generator stages and mask decoder recomputed in backward" in md
