"""Predictor and ``masksam-core predict``: grids, geometry, TTA, probabilities, cancelling, the CLI.

Two kinds of model:

* a real ``tiny`` MaskSAM with random weights, saved as a run checkpoint (``tiny_run``): checks
  that the whole pipeline runs and gives well-formed results;
* a fake network (``fake_run``) whose semantic scores are σ(∓4·x) of the normalised input, so
  its labels are "normalised intensity > 0": a bright object must come back on exactly its own
  voxels after preprocessing, windows, mirroring and resampling both ways.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from masksam_core.cli import main
from masksam_core.devices import distributed_env
from masksam_core.errors import MaskSAMError
from masksam_core.inference.predict_cli import Case, cases_for_rank, find_cases
from masksam_core.inference.predictor import CPU_QUERY_CHUNK, Cancelled, Predictor, accumulation_device
from masksam_core.runs import FORMAT, RUN_KIND, BuildSpec, RunFile
from runs import make_plans, write_tiny_run


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two spinning threads make a tiny forward 10-50× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeNet(torch.nn.Module):
    """Two queries: query 0 is background with mask -4x, query 1 is 'object' with mask +4x."""

    prompt_mode = "auto"

    def __init__(self, patch_size=(4, 16, 16)):
        super().__init__()
        self.patch_size = patch_size
        self.calls = 0
        self.on_call = None

    def forward(self, x, query_chunk=None):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        b, _, t, _h, _w = x.shape
        logits = torch.tensor([[8.0, -8.0, -8.0], [-8.0, 8.0, -8.0]]).expand(b, t, 2, 3).transpose(1, 2)
        return {"pred_logits": logits, "pred_masks": torch.stack([-4 * x[:, 0], 4 * x[:, 0]], 1)}


@pytest.fixture
def fake_run(monkeypatch):
    """Predictor("fake") loads FakeNet with plans targeting (2.5, 1.5, 1.5) mm; yields the net."""
    net = FakeNet()

    def load_run(path, *, base_checkpoint=None, device="cpu"):
        return net, RunFile(kind=RUN_KIND, format=FORMAT, model={}, build=BuildSpec("tiny", {}, 2, 1, "auto"),
                            plans=make_plans((2.5, 1.5, 1.5)), class_names=["background", "object"])

    monkeypatch.setattr("masksam_core.runs.load_run", load_run)
    return net


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("tiny_run"))


def box_volume(shape=(8, 30, 26), box=(slice(2, 6), slice(8, 20), slice(6, 18))):
    """(Z, Y, X) float32: 100 outside, 500 inside ``box``; and the box mask."""
    mask = np.zeros(shape, bool)
    mask[box] = True
    return np.where(mask, 500.0, 100.0).astype(np.float32), mask


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def assert_object_on_its_voxels(labels, mask):
    """Exact along Z (order 0 both ways); in-plane the border may move by one voxel; Dice > 0.9."""
    from scipy import ndimage

    inplane = np.zeros((1, 3, 3), bool)
    inplane[0] = True
    assert labels[ndimage.binary_erosion(mask, inplane)].all()
    assert not labels[~ndimage.binary_dilation(mask, inplane)].any()
    assert dice(labels > 0, mask) > 0.9


# --------------------------------------------------------------------------- Predictor


def test_tiny_run_anisotropic_input_comes_back_on_its_grid(tiny_run):
    predictor = Predictor(tiny_run, device="cpu")
    assert predictor.class_names == ["background", "object", "other"] and predictor.plans.target_spacing[0] == 2.0
    volume = np.random.default_rng(0).normal(300, 100, (2, 40, 36)).astype(np.float32)  # → (5, 27, 24): 4 windows
    result = predictor.predict(volume, (5.0, 1.0, 1.0), tta=False, batch_size=4, return_probabilities=True)
    assert result.labels.shape == volume.shape and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    probs = result.probabilities
    assert probs.shape == (3, *volume.shape) and probs.dtype == np.float32 and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert (probs.argmax(0) == result.labels).mean() > 0.999  # normalising keeps the argmax
    assert result.class_names == predictor.class_names


def test_tiny_run_tta_on_and_off_both_run(tiny_run, monkeypatch):
    predictor = Predictor(tiny_run, device="cpu")
    calls = []
    scores = predictor._scores
    monkeypatch.setattr(predictor, "_scores", lambda batch: calls.append(len(batch)) or scores(batch))
    volume = np.full((1, 20, 20), 250.0, np.float32)  # (2, 13, 13) at 2 × 1.5 × 1.5 mm: one window
    plain = predictor.predict(volume, (4.0, 1.0, 1.0), tta=False)
    assert calls == [1]
    tta = predictor.predict(volume, (4.0, 1.0, 1.0), tta=True)
    assert calls[1:] == [1] * 8  # 8 mirrored passes of the one window
    assert plain.labels.shape == tta.labels.shape == volume.shape
    assert tta.labels.max() <= 2 and tta.probabilities is None
    # a run trained without mirroring (labels that name a side) gets no mirrored passes
    assert predictor.mirror_axes == (0, 1, 2)
    predictor.mirror_axes = ()
    calls.clear()
    np.testing.assert_array_equal(predictor.predict(volume, (4.0, 1.0, 1.0), tta=True).labels, plain.labels)
    assert calls == [1]


def test_tta_mirrors_only_the_axes_the_run_was_trained_to_mirror():
    from masksam_core.inference.predictor import tta_mirror_axes

    assert tta_mirror_axes({"plans": {"mirror_axes": [2]}, "config": {"augmentation": "full"}}) == (2,)
    assert tta_mirror_axes({"plans": {}, "config": {"augmentation": "no-mirror"}}) == ()  # a run's checkpoint
    assert tta_mirror_axes({"plans": {}, "summary": {"config": {"augmentation": "none"}}}) == ()  # a model file
    assert tta_mirror_axes({"plans": {}, "config": {"augmentation": "full"}}) == (0, 1, 2)
    assert tta_mirror_axes({"plans": {}}) == (0, 1, 2)  # runs from before augmentation levels


def test_query_chunk_defaults_per_device_and_does_not_change_results(tiny_run):
    cpu = Predictor(tiny_run, device="cpu", amp="off")
    assert cpu.query_chunk == CPU_QUERY_CHUNK
    whole = Predictor(tiny_run, device="cpu", amp="off", query_chunk=None)
    assert whole.query_chunk is None
    volume = np.random.default_rng(1).normal(300, 100, (2, 40, 36)).astype(np.float32)
    a = cpu.predict(volume, (5.0, 1.0, 1.0), tta=False, return_probabilities=True)
    b = whole.predict(volume, (5.0, 1.0, 1.0), tta=False, return_probabilities=True)
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-4, atol=1e-6)
    for bad in (0, -2, "all", 1.5):
        with pytest.raises(MaskSAMError, match="query_chunk"):
            Predictor(tiny_run, device="cpu", query_chunk=bad)


def test_compiled_network_gives_the_plain_networks_scores(tiny_run):
    """torch.compile (inductor, C++ on the CPU) against the plain network on the same windows."""
    plain = Predictor(tiny_run, device="cpu", amp="off")  # fp32: the 1e-4 bound
    compiled = Predictor(tiny_run, device="cpu", amp="off", compile=True)
    assert compiled.compiled and not plain.compiled
    # one window per call, as predict() below makes them: a second batch size would compile again
    batch = torch.randn(1, 1, *plain.patch_size, generator=torch.Generator().manual_seed(0))
    want = plain._scores(batch)
    got = compiled._scores(batch)
    assert got.shape == want.shape == (1, len(plain.class_names), *plain.patch_size)
    assert (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item() < 1e-4
    volume = np.random.default_rng(2).normal(300, 100, (2, 40, 36)).astype(np.float32)
    a = plain.predict(volume, (5.0, 1.0, 1.0), tta=False, return_probabilities=True)
    b = compiled.predict(volume, (5.0, 1.0, 1.0), tta=False, return_probabilities=True)
    np.testing.assert_allclose(b.probabilities, a.probabilities, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_the_cpu_stays_close_to_fp32(tiny_run):
    """--amp bf16 (faster on CPUs with native bf16): probabilities within the bf16 bound, same labels almost
    everywhere."""
    plain = Predictor(tiny_run, device="cpu", amp="off")
    assert plain.amp is None
    half = Predictor(tiny_run, device="cpu", amp="bf16")
    assert half.amp == torch.bfloat16
    volume = np.random.default_rng(3).normal(300, 100, (4, 40, 36)).astype(np.float32)
    a = plain.predict(volume, (5.0, 1.0, 1.0), tta=False, return_probabilities=True)
    b = half.predict(volume, (5.0, 1.0, 1.0), tta=False, return_probabilities=True)
    pa, pb = a.probabilities.astype(np.float64), b.probabilities.astype(np.float64)
    assert np.linalg.norm(pb - pa) / np.linalg.norm(pa) < 2e-2
    assert (a.labels == b.labels).mean() > 0.95
    with pytest.raises(MaskSAMError, match=r"unknown mixed-precision setting 'fp8'.*auto, bf16, fp16, off"):
        Predictor(tiny_run, device="cpu", amp="fp8")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_on_cpus_with_native_bf16_only(tiny_run, monkeypatch, native):
    from masksam_core import devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert Predictor(tiny_run, device="cpu").amp == (torch.bfloat16 if native else None)
    assert Predictor(tiny_run, device="cpu", amp="off").amp is None
    # training keeps fp32 on any CPU under auto
    assert devices.autocast_dtype(torch.device("cpu"), "auto") is None


def test_a_compile_failure_is_a_clear_error(tiny_run):
    predictor = Predictor(tiny_run, device="cpu", compile=True)

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("C++ compile error\nlong log")

    predictor._network = broken
    with pytest.raises(MaskSAMError, match=r"torch.compile could not compile .*C\+\+ compile error.*without --compile"):
        predictor._scores(torch.zeros(1, 1, *predictor.patch_size))


def test_reuse_freed_memory_is_nestable_and_thread_safe():
    from masksam_core import devices

    glibc = devices._glibc() is not None
    with devices.reuse_freed_memory() as outer:
        assert outer is glibc
        with devices.reuse_freed_memory() as inner:
            assert inner is glibc
            big = torch.ones(64, 1024, 1024)  # 256 MiB, from the heap while inside
            del big
        assert (1 if glibc else 0) == devices._ALLOCATOR_USERS
    assert devices._ALLOCATOR_USERS == 0
    with devices.reuse_freed_memory(enabled=False) as active:
        assert active is False and devices._ALLOCATOR_USERS == 0

    def use() -> None:
        with devices.reuse_freed_memory():
            torch.ones(8, 1024, 1024).sum()

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert devices._ALLOCATOR_USERS == 0


def test_known_object_lands_on_its_own_voxels(fake_run):
    volume, mask = box_volume()
    for tta in (False, True):
        labels = Predictor("fake", device="cpu").predict(volume, (5.0, 1.0, 1.0), tta=tta, batch_size=3).labels
        assert labels.shape == volume.shape
        assert_object_on_its_voxels(labels, mask)


def test_channel_axis_optional_and_bad_inputs_are_clear(fake_run):
    predictor = Predictor("fake", device="cpu")
    volume, mask = box_volume()
    assert_object_on_its_voxels(predictor.predict(volume[None], (5, 1, 1), tta=False).labels, mask)
    bad = [((volume[None].repeat(2, 0), (5, 1, 1)), "channel"), ((volume[0], (5, 1, 1)), "shape"),
           ((np.full((4, 8, 8), np.nan), (1, 1, 1)), "NaN"), ((volume, (5, 0, 1)), "spacing"),
           ((volume, (5, 1)), "spacing")]
    for (v, spacing), word in bad:
        with pytest.raises(MaskSAMError, match=word):
            predictor.predict(v, spacing)
    for kwargs in ({"step_size": 0.0}, {"step_size": 1.5}, {"batch_size": 0}):
        with pytest.raises(MaskSAMError):
            predictor.predict(volume, (5, 1, 1), **kwargs)


def test_gt_mode_run_points_to_prompt(tmp_path):
    with pytest.raises(MaskSAMError, match="masksam-core prompt"):
        Predictor(write_tiny_run(tmp_path, prompt_mode="gt"), device="cpu")


def test_close_stops_the_generator_within_one_batch(fake_run):
    gen = Predictor("fake", device="cpu").predict_iter(np.zeros((20, 30, 30)), (2.5, 1.5, 1.5), tta=False)
    first = next(gen)
    assert (first.done, fake_run.calls) == (0, 0) and first.total == 9 * 3 * 3  # starts 0,2,..,16 × 0,7,14 × 0,7,14
    assert next(gen).done == 1 and fake_run.calls == 1
    gen.close()
    assert fake_run.calls == 1
    with pytest.raises(StopIteration):
        next(gen)


def test_cancel_event_from_another_thread_stops_within_one_batch(fake_run):
    cancel = threading.Event()
    fake_run.on_call = lambda n: cancel.set()  # cancelled while the first batch runs
    outcome = {}

    def work():
        try:
            Predictor("fake", device="cpu").predict(np.zeros((20, 30, 30)), (2.5, 1.5, 1.5), tta=True,
                                                    batch_size=2, cancel=cancel)
        except Cancelled as error:
            outcome["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert isinstance(outcome.get("error"), MaskSAMError)
    assert fake_run.calls == 8  # the 8 mirrored passes of the first batch, nothing after


def test_accumulation_on_the_gpu_only_when_it_fits(monkeypatch):
    # 3 channels over 10×10×10: (3 + 1) × 1000 × 4 = 16000 bytes; allowed: half the free memory
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (32_000, 10**9))
    assert accumulation_device(cuda, 3, (10, 10, 10)) == cuda
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (31_999, 10**9))
    assert accumulation_device(cuda, 3, (10, 10, 10)) == torch.device("cpu")
    assert accumulation_device(torch.device("cpu"), 3, (10, 10, 10)) == torch.device("cpu")


# --------------------------------------------------------------------------- the command line


OBLIQUE = np.array([[0.8660254, -0.5, 0.0, -40.0], [0.4330127, 0.75, -2.5, 12.5],
                    [0.25, 0.4330127, 4.330127, 7.25], [0.0, 0.0, 0.0, 1.0]])  # columns 1, 1, 5 mm


@pytest.mark.parametrize("affine,codes", [
    (np.diag([1.0, 1.0, 5.0, 1.0]) + np.array([[0, 0, 0, -12.0], [0, 0, 0, 30.5], [0, 0, 0, -7.0], [0] * 4]), "RAS"),
    (np.diag([-1.0, -1.0, 5.0, 1.0]) + np.array([[0, 0, 0, 20.0], [0, 0, 0, 15.0], [0, 0, 0, 3.0], [0] * 4]), "LPS"),
    (OBLIQUE, None),
])
def test_cli_keeps_geometry_and_the_object_stays_put(fake_run, tmp_path, affine, codes, capsys):
    volume, mask = box_volume()
    (tmp_path / "in").mkdir()
    image = nib.Nifti1Image(volume.transpose(2, 1, 0), affine)
    image.header.set_qform(affine, code=1)
    nib.save(image, tmp_path / "in" / "scan_0000.nii.gz")
    if codes:
        assert "".join(nib.aff2axcodes(affine)) == codes
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", "fake",
                 "--device", "cpu", "--no-tta"]) == 0
    src, out = nib.load(tmp_path / "in" / "scan_0000.nii.gz"), nib.load(tmp_path / "out" / "scan.nii.gz")
    assert np.array_equal(out.affine, src.affine) and np.allclose(src.affine, affine, atol=1e-5)
    for get in ("get_sform", "get_qform"):
        (a, code_a), (b, code_b) = getattr(out.header, get)(coded=True), getattr(src.header, get)(coded=True)
        assert np.array_equal(a, b) and code_a == code_b
    labels = np.asarray(out.dataobj).transpose(2, 1, 0)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert_object_on_its_voxels(labels, mask)
    names = json.loads((tmp_path / "out" / "scan.classes.json").read_text())
    assert names == {"0": "background", "1": "object"}


def test_cli_tiff_input_gives_tiff_output(fake_run, tmp_path):
    import tifffile

    from masksam_core.io import read_image

    volume, mask = box_volume()
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "stack.tif", volume)
    (tmp_path / "in" / "stack.tif.json").write_text(json.dumps({"spacing": [5.0, 1.0, 1.0]}))
    assert main(["predict", "-i", str(tmp_path / "in" / "stack.tif"), "-o", str(tmp_path / "out"), "-m", "x",
                 "--device", "cpu", "--no-tta"]) == 0
    labels, geometry = read_image(tmp_path / "out" / "stack.tif")
    assert geometry.spacing == (5.0, 1.0, 1.0)
    assert_object_on_its_voxels(labels, mask)


def write_cases(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    volume, _ = box_volume((4, 16, 16), (slice(1, 3), slice(4, 10), slice(4, 10)))
    for i in range(n):
        nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.diag([1.0, 1.0, 2.5, 1.0])),
                 folder / f"case{i}_0000.nii.gz")
    return [f"case{i}" for i in range(n)]


def test_cli_skips_finished_cases_unless_overwrite(fake_run, tmp_path, capsys):
    write_cases(tmp_path / "in", 2)
    args = ["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", "x", "--no-tta"]
    assert main(args) == 0
    first = (tmp_path / "out" / "case0.nii.gz").stat().st_mtime_ns
    (tmp_path / "out" / "case1.nii.gz").unlink()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 1 existing" in out and "predicted 1," in out
    assert (tmp_path / "out" / "case1.nii.gz").exists()
    assert (tmp_path / "out" / "case0.nii.gz").stat().st_mtime_ns == first
    (tmp_path / "out" / "case0.classes.json").unlink()  # a missing class-names file: case0 is not finished
    assert main(args) == 0
    assert "predicted 1," in capsys.readouterr().out and (tmp_path / "out" / "case0.classes.json").exists()
    assert main([*args, "--save-probabilities"]) == 0  # .npz missing: not finished
    assert "predicted 2," in capsys.readouterr().out
    assert main([*args, "--overwrite", "--save-probabilities"]) == 0
    assert "predicted 2," in capsys.readouterr().out
    with np.load(tmp_path / "out" / "case0.npz") as npz:
        assert npz["probabilities"].dtype == np.float16 and npz["probabilities"].shape == (2, 4, 16, 16)
        np.testing.assert_allclose(npz["probabilities"].astype(np.float32).sum(0), 1.0, atol=2e-3)
        assert list(npz["class_names"]) == ["background", "object"]
        labels = np.asarray(nib.load(tmp_path / "out" / "case0.nii.gz").dataobj).transpose(2, 1, 0)
        assert (npz["probabilities"].argmax(0) == labels).mean() > 0.99  # float16 may tie at borders
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left
    assert main([*args, "--overwrite"]) == 0  # new labels without probabilities: the old ones would mislead
    assert "case0: removed the old case0.npz" in capsys.readouterr().out
    assert not list((tmp_path / "out").glob("*.npz"))


def test_cli_refuses_channels_on_different_grids(fake_run, tmp_path, capsys):
    write_cases(tmp_path / "in", 1)
    moved = np.diag([1.0, 1.0, 2.5, 1.0])
    moved[:3, 3] = (40.0, 0.0, 0.0)
    volume = np.asarray(nib.load(tmp_path / "in" / "case0_0000.nii.gz").dataobj)
    nib.save(nib.Nifti1Image(volume, moved), tmp_path / "in" / "case0_0001.nii.gz")
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", "x"]) == 1
    err = capsys.readouterr().err
    assert "case0_0001.nii.gz: origin" in err and "all channels of a case must share one voxel grid" in err


def test_cli_compile_flag_compiles_the_network(fake_run, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    write_cases(tmp_path / "in", 1)
    args = ["predict", "-i", str(tmp_path / "in"), "-m", "x", "--no-tta"]
    assert main([*args, "-o", str(tmp_path / "plain")]) == 0
    assert compiled == []
    assert main([*args, "-o", str(tmp_path / "compiled"), "--compile"]) == 0
    assert compiled == [fake_run] and fake_run.calls > 0


def test_cli_amp_reaches_the_predictor(fake_run, tmp_path, monkeypatch):
    from masksam_core.inference import predictor as predictor_module

    seen = []
    real_init = predictor_module.Predictor.__init__

    def init(self, *args, **kwargs):
        seen.append(kwargs.get("amp"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(predictor_module.Predictor, "__init__", init)
    write_cases(tmp_path / "in", 1)
    assert main(["predict", "-i", str(tmp_path / "in"), "-m", "x", "--no-tta", "-o", str(tmp_path / "a")]) == 0
    assert main(["predict", "-i", str(tmp_path / "in"), "-m", "x", "--no-tta", "-o", str(tmp_path / "b"),
                 "--amp", "bf16"]) == 0
    assert seen == ["auto", "bf16"]


def test_cli_reports_a_corrupt_file_and_finishes_the_others(fake_run, tmp_path, capsys):
    write_cases(tmp_path / "in", 2)
    (tmp_path / "in" / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", "x", "--no-tta"]) == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["case0.nii.gz", "case1.nii.gz"]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed")]
    assert len(err) == 1 and "broken_0000.nii.gz" in err[0] and "corrupt" in err[0]


def test_find_cases_groups_channels_and_plain_names(tmp_path):
    for name in ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0002.nii.gz", "plain.nii.gz",
                 "stack.tif", "scan_2020.nii", ".hidden_0000.nii.gz", "notes.txt", "dup.nii.gz", "dup_0000.nii",
                 "two_0000.nii.gz", "two_0000.tif", "two_0001.nii.gz"]:
        (tmp_path / name).touch()
    for folder, files in {"series1": ["IM0001", "IM0002"], "series2": ["x.dcm"], "other": ["y.nii.gz"],
                          "out": ["IM1"]}.items():
        (tmp_path / folder).mkdir()
        for f in files:
            (tmp_path / folder / f).touch()
    cases = {c.id: c for c in find_cases(tmp_path, exclude=tmp_path / "out")}
    assert sorted(cases) == ["a", "b", "dup", "plain", "scan_2020", "series1", "series2", "stack", "two"]
    assert "two_0000.nii.gz, two_0000.tif are all channel 0000 of case two; keep one" in cases["two"].problem
    assert [f.name for f in cases["a"].files] == ["a_0000.nii.gz", "a_0001.nii.gz"] and not cases["a"].problem
    assert "b_0001" in cases["b"].problem
    assert cases["dup"].problem and "rename" in cases["dup"].problem
    assert cases["series1"].files == [tmp_path / "series1"] and cases["stack"].is_tiff
    single = find_cases(tmp_path / "a_0001.nii.gz")
    assert len(single) == 1 and [f.name for f in single[0].files] == ["a_0000.nii.gz", "a_0001.nii.gz"]


def test_torchrun_ranks_split_the_cases(fake_run, tmp_path, monkeypatch, capsys):
    cases = [Case(f"c{i}", [Path(f"c{i}.nii.gz")]) for i in range(5)]
    assert [c.id for c in cases_for_rank(cases, 0, 2)] == ["c0", "c2", "c4"]
    assert [c.id for c in cases_for_rank(cases, 1, 2)] == ["c1", "c3"]
    assert [c.id for c in cases_for_rank(cases, 2, 3)] == ["c2"]
    ids = write_cases(tmp_path / "in", 3)
    written = []
    for rank in (1, 0):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        before = set((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else set()
        assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", "x", "--no-tta"]) == 0
        written.append(sorted(p.name for p in set((tmp_path / "out").glob("*.nii.gz")) - before))
        assert f"[rank {rank}/2]" in capsys.readouterr().out
    assert written == [[f"{ids[1]}.nii.gz"], [f"{ids[0]}.nii.gz", f"{ids[2]}.nii.gz"]]
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(MaskSAMError, match="RANK"):
        distributed_env()


def test_cli_refuses_writing_into_the_input_folder(fake_run, tmp_path, capsys):
    write_cases(tmp_path / "in", 1)
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "in"), "-m", "x"]) == 1
    assert "input folder" in capsys.readouterr().err
    assert main(["predict", "-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "o"), "-m", "x"]) == 1


def test_predictor_is_exported_lazily():
    code = ("import sys, masksam_core; assert 'torch' not in sys.modules; "
            "from masksam_core import Predictor; assert 'torch' in sys.modules and Predictor.predict_iter")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- end to end on real data


@pytest.mark.slow
def test_end_to_end_on_abdomen_ct(shared_data, tmp_path, capsys):
    ds = shared_data / "Dataset501_AbdomenCT"
    run = tmp_path / "run"
    assert main(["train", str(ds), "--preset", "tiny", "--out", str(run), "--epochs", "1", "--iters-per-epoch", "2",
                 "--num-workers", "0", "--val-fraction", "0", "--device", "cpu"]) == 0
    out = tmp_path / "pred"
    args = ["predict", "-i", str(ds / "imagesTr"), "-o", str(out), "-m", str(run), "--device", "cpu",
            "--no-tta", "--step-size", "1", "--batch-size", "4"]
    assert main(args) == 0
    scan = nib.load(ds / "imagesTr" / "abdct_001_0000.nii.gz")
    pred = nib.load(out / "abdct_001.nii.gz")
    assert pred.shape == scan.shape and np.array_equal(pred.affine, scan.affine)
    assert np.asarray(pred.dataobj).max() <= 8 and pred.get_data_dtype() == np.uint8
    labels = json.loads((ds / "dataset.json").read_text())["labels"]
    names = json.loads((out / "abdct_001.classes.json").read_text())
    assert names == {str(v): k for k, v in labels.items()}
    if importlib.util.find_spec("masksam_core.evaluation") is None:
        return
    summary = tmp_path / "summary.json"
    assert main(["evaluate", "--pred", str(out), "--gt", str(ds / "labelsTr"), "--dataset-json",
                 str(ds / "dataset.json"), "-o", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert 0.0 <= result["mean_dice"] <= 1.0 and set(result["per_class"]) == set(labels) - {"background"}


@pytest.mark.parametrize("part", ["sam", "model"])
def test_a_checkpoint_whose_shapes_do_not_fit_is_a_clear_error(tmp_path, part):
    """A run whose tensors have other shapes (other settings, or a ``tiny`` run made when its random backbone
    had other widths) is reported by file and tensor, never as a raw size-mismatch traceback."""
    run = write_tiny_run(tmp_path)
    file = run / "checkpoint_last.pt"
    ckpt = torch.load(file, weights_only=False)
    key = next(k for k, v in ckpt[part].items() if v.ndim == 2)
    ckpt[part][key] = ckpt[part][key][:, :1].clone()
    torch.save(ckpt, file)
    with pytest.raises(MaskSAMError, match=r"does not fit this model \(size mismatch for .*train it again"):
        Predictor(run, device="cpu")
