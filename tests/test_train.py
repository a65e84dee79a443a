"""``masksam-core train``: resuming after kill -9 and Ctrl-C, extending a run, DDP, errors, load_run, progress.

The references are independent of the code under test: a run that never stopped (same seed, CPU) for
resumed runs, rank 0 against rank 1 for DDP, hand-computed poly learning rates (Eq. 2), and the file
system (audit hooks) for which rank writes. Runs use the ``tiny`` preset with one 2×64×64 patch per
iteration and 2 iterations per epoch; those that start processes are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from masksam_core.cli import main
from masksam_core.errors import MaskSAMError
from masksam_core.runs import RunFile, load_run
from masksam_core.training.config import TrainConfig
from masksam_core.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from phantom import make_phantom_dataset

SETTINGS = ["--preset", "tiny", "--iters-per-epoch", "2", "--batch-size", "1", "--patch-size", "2", "64", "64",
            "--val-fraction", "0", "--seed", "3", "--device", "cpu"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset900_Phantom", cases=3, shape=(64, 64, 8))


def command(dataset: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    return [sys.executable, "-m", "masksam_core", "train", str(dataset), "--out", str(out),
            "--num-workers", str(workers), *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, env=ENV)


def finish(cmd: list[str], log: Path, timeout: float = 600) -> tuple[int, str, str]:
    proc = start(cmd, log)
    rc = proc.wait(timeout)
    return rc, log.with_suffix(".out").read_text(encoding="utf-8"), log.with_suffix(".err").read_text(encoding="utf-8")


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: 4 epochs without a stop."""
    run = tmp_path_factory.mktemp("straight") / "run"
    rc, out, err = finish(command(phantom, run, *SETTINGS, "--epochs", "4"), run.parent / "log")
    assert rc == 0, err[-3000:]
    return {"run": run, "out": out, "err": err}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_after_two_epochs_then_resume_equals_straight_run(phantom, straight, tmp_path, workers):
    run = tmp_path / "run"
    proc = start(command(phantom, run, *SETTINGS, "--epochs", "4", workers=workers), tmp_path / "first")
    wait_for(lambda: len(metrics(run)) >= 2, proc, "metrics.jsonl showed 2 epochs")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    killed = checkpoint(run)
    assert (killed["epoch"], killed["iteration"]) == (2, 0)
    # resume with only what it needs: the settings come from the checkpoint
    rc, _, err = finish(command(phantom, run, "--resume", "--device", "cpu", workers=workers), tmp_path / "second")
    assert rc == 0, err[-3000:]
    final, reference = checkpoint(run), checkpoint(straight["run"])
    assert final["epoch"] == 4
    assert_same_weights(final["model"], reference["model"])
    with pytest.raises(AssertionError):  # training moved the weights: equality above is not trivial
        assert_same_weights(killed["model"], reference["model"])
    rows, ref_rows = metrics(run), metrics(straight["run"])
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref_rows]


@pytest.mark.slow
def test_ctrl_c_mid_epoch_saves_and_resume_equals_straight_run(phantom, straight, tmp_path):
    run = tmp_path / "run"
    proc = start(command(phantom, run, *SETTINGS, "--epochs", "4"), tmp_path / "first")
    err_log = tmp_path / "first.err"
    wait_for(lambda: "epoch 2/4:" in err_log.read_text(encoding="utf-8"), proc, "epoch 2 started")
    proc.send_signal(signal.SIGINT)  # during the first of the epoch's two iterations
    assert proc.wait(300) == 128 + signal.SIGINT, err_log.read_text(encoding="utf-8")[-3000:]  # not "finished"
    out, err = (tmp_path / "first.out").read_text(encoding="utf-8"), err_log.read_text(encoding="utf-8")
    assert "stopping: a checkpoint is saved after the current iteration or validation window" in err
    assert re.search(r"interrupted: saved .*checkpoint_last\.pt at epoch 2, iteration 1; continue with --resume", out)
    stopped = checkpoint(run)
    assert (stopped["epoch"], stopped["iteration"]) == (1, 1)
    assert [r["epoch"] for r in metrics(run)] == [1]
    rc, _, err = finish(command(phantom, run, *SETTINGS, "--resume"), tmp_path / "second")
    assert rc == 0, err[-3000:]
    assert_same_weights(checkpoint(run)["model"], checkpoint(straight["run"])["model"])
    rows, ref_rows = metrics(run), metrics(straight["run"])
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # epoch 2 counts both its halves
    assert rows[1]["iterations"] == 2


@pytest.mark.slow
def test_compiled_training_follows_the_plain_run(phantom, straight, tmp_path):
    """--compile (torch.compile, inductor) trains the same model as the plain run, within float rounding."""
    run = tmp_path / "run"
    rc, _, err = finish(command(phantom, run, *SETTINGS, "--epochs", "4", "--compile"), tmp_path / "log")
    assert rc == 0, err[-3000:]
    losses = [r["loss"] for r in metrics(run)]
    reference = [r["loss"] for r in metrics(straight["run"])]
    assert len(losses) == len(reference) == 4
    np.testing.assert_allclose(losses, reference, rtol=1e-3)
    final, ref = checkpoint(run)["model"], checkpoint(straight["run"])["model"]
    assert final.keys() == ref.keys()
    for key in final:
        if final[key].is_floating_point():
            diff = torch.linalg.vector_norm((final[key] - ref[key]).float())
            assert diff <= 1e-3 * torch.linalg.vector_norm(ref[key].float()) + 1e-6, key


def test_progress_output_shows_loss_lr_and_rate(phantom, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(phantom), "--out", str(run), *SETTINGS, "--epochs", "2", "--num-workers", "0"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    rows = metrics(run)
    assert len(lines) == len(rows) == 2
    for line, row in zip(lines, rows, strict=True):
        m = re.fullmatch(r"epoch (\d)/2: loss (\d+\.\d{4}), lr (\S+) \((\d+) s(, about .+ left)?\)", line)
        assert m, line
        assert int(m.group(1)) == row["epoch"]
        assert float(m.group(2)) == pytest.approx(row["loss"], abs=5e-5)
        assert float(m.group(3)) == pytest.approx(1e-3 * (1 - (row["epoch"] - 1) / 2) ** 0.9, rel=1e-2)  # Eq. 2
        assert (m.group(5) is None) == (row["epoch"] == 2)  # the time left, until the last epoch
    # the bar: always it/s (also below 1 it/s), the last iteration's loss, and the lr
    bars = re.findall(r"epoch 1/2: 100%\|[^|]*\| 2/2 \[[0-9:]+<[0-9:]+,\s+[0-9.]+it/s, loss=(\d+\.\d{4}), "
                      r"lr=1\.00e-03\]", err)
    assert bars, err[-2000:]
    assert re.search(r"epoch 2/2: 100%.*lr=5\.36e-04\]", err)
    assert "s/it" not in err


@pytest.mark.slow
def test_resume_with_more_epochs_extends_a_finished_run(phantom, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(phantom), "--out", str(run), *SETTINGS, "--epochs", "1", "--num-workers", "0"]) == 0
    first = metrics(run)
    assert main(["train", str(phantom), "--out", str(run), "--resume", "--epochs", "2", "--num-workers", "0"]) == 0
    rows = metrics(run)
    assert rows[0] == first[0]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(1e-3)
    assert rows[1]["lr"] == pytest.approx(1e-3 * 0.5 ** 0.9)  # Eq. 2 over the new total of 2 epochs
    state = checkpoint(run)
    assert (state["epoch"], state["scheduler"]["max_epochs"], len(state["history"])) == (2, 2, 2)
    capsys.readouterr()
    # finished: nothing to do, said clearly; a smaller --epochs is an error
    assert main(["train", str(phantom), "--out", str(run), "--resume", "--num-workers", "0"]) == 0
    assert "has already trained 2 epochs: pass a larger --epochs" in capsys.readouterr().out
    assert main(["train", str(phantom), "--out", str(run), "--resume", "--epochs", "1"]) == 1
    assert "has already trained 2 epochs: pass --epochs 3 or more" in capsys.readouterr().err
    assert main(["train", str(phantom), "--out", str(run), "--resume", "--epochs", "3", "--batch-size", "2"]) == 1
    assert "was trained with --batch-size 1, not 2" in capsys.readouterr().err
    assert len(metrics(run)) == 2


def test_time_limit_stops_and_saves(phantom, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", str(phantom), "--out", str(run), *SETTINGS, "--epochs", "4", "--num-workers", "0",
               "--time-limit", "0.0001"])
    assert rc == 75  # EX_TEMPFAIL: saved, to be resumed
    out = capsys.readouterr().out
    assert "time limit of 0.0001 minutes reached: saved" in out and "epoch 1, iteration 1" in out
    state = checkpoint(run)
    assert (state["epoch"], state["iteration"], state["partial"]["iterations"]) == (0, 1, 1)
    assert metrics(run) == []


@pytest.fixture(scope="module")
def trained(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """An in-process tiny run of one epoch (with validation on one case)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    trainer = Trainer(TrainConfig(str(phantom), str(run), preset="tiny", epochs=1, iters_per_epoch=2, batch_size=1,
                                  patch_size=(2, 64, 64), val_cases=("ph_002",), device="cpu", num_workers=0, seed=5))
    events = list(trainer.run())
    assert events[-1].kind == "done"
    return trainer


def test_load_run_rebuilds_the_trained_model(trained):
    model, ckpt = load_run(trained.out)
    assert ckpt.class_names == ["background", "ball", "box"]
    assert_same_weights(model.trainable_state_dict(), trained.model.trainable_state_dict())
    assert_same_weights(model.sam.state_dict(), trained.model.sam.state_dict())
    x = torch.randn(1, 1, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    trained.model.eval()
    with torch.no_grad():
        a, b = model(x), trained.model(x)
    for key in ("pred_logits", "pred_masks"):
        assert torch.equal(a[key], b[key]), key
    assert "val_mean_dice" in metrics(trained.out)[0]
    assert sorted(p.name for p in trained.out.iterdir() if p.is_file()) == [
        "checkpoint_best.pt", "checkpoint_last.pt", "config.json", "curves.png", "metrics.jsonl", "plans.json"]


def test_cpu_runs_recompute_when_the_activations_would_crowd_the_memory(phantom, tmp_path, trained, monkeypatch):
    from masksam_core.training import memory

    assert not trained.model.grad_checkpointing  # tiny: a few MiB of activations, plenty of memory

    def train(name: str, **setting) -> tuple[Trainer, list]:
        trainer = Trainer(TrainConfig(str(phantom), str(tmp_path / name), preset="tiny", epochs=1, iters_per_epoch=1,
                                      batch_size=1, patch_size=(2, 64, 64), val_fraction=0, device="cpu",
                                      num_workers=0, **setting))
        events = list(trainer.run())
        assert events[-1].kind == "done"
        return trainer, [e.message for e in events]

    monkeypatch.setattr(memory, "available_memory", lambda: 2**20)  # 1 MiB free
    crowded, messages = train("crowded")
    assert crowded.model.grad_checkpointing and crowded.model.encoder_adapters.grad_checkpointing
    assert crowded.model.prompt_generator.grad_checkpointing
    assert any(re.search(r"with gradient checkpointing \(activations of about [0-9.]+ GiB per step, 0\.0 GiB "
                         r"free; --no-grad-checkpointing turns it off\)", m) for m in messages), messages
    told, messages = train("told", grad_checkpointing=False)
    assert not told.model.grad_checkpointing and not any("gradient checkpointing" in m for m in messages)


def test_activation_count_of_a_lite_step():
    from masksam_core.training.memory import activation_bytes, cpu_recompute_reason

    one = activation_bytes("lite", 1, num_classes=9, in_channels=1, prompt_mode="auto")
    two = activation_bytes("lite", 2, num_classes=9, in_channels=1, prompt_mode="auto")
    assert 12 * 2**30 < one < 15 * 2**30  # 12.6 GiB counted on real tensors (docs/benchmarks.md)
    assert two == pytest.approx(2 * one, rel=0.02)
    gt = activation_bytes("tiny", 1, num_classes=3, in_channels=2, prompt_mode="gt")
    assert 0 < gt < 2**30
    assert cpu_recompute_reason(two, 24 * 2**30) is not None and cpu_recompute_reason(two, 128 * 2**30) is None
    assert "free memory unknown" in cpu_recompute_reason(gt, None)


def test_a_trained_checkpoint_reads_as_a_run_file_and_back_unchanged(trained):
    saved = checkpoint(trained.out)
    run = RunFile.from_dict(saved)
    assert run.kind == "masksam-run" and run.epoch == 1 and run.build.preset == "tiny"
    again = run.to_dict()
    assert list(again) == list(saved) and again == saved


def test_errors_are_clear(phantom, tmp_path, capsys, trained):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "checkpoint_last.pt").write_bytes(b"")
    assert main(["train", str(phantom), "--out", str(run), *SETTINGS]) == 1
    assert "already holds a run (checkpoint_last.pt): pass --resume" in capsys.readouterr().err

    assert main(["train", str(phantom), "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert "nothing to resume:" in capsys.readouterr().err and not (tmp_path / "none").exists()

    assert main(["train", str(phantom), "--out", str(tmp_path / "q"), *SETTINGS, "--num-queries", "2"]) == 1
    assert "--num-queries 2 is less than the data set's 3 classes" in capsys.readouterr().err

    assert main(["train", str(phantom), "--out", str(tmp_path / "lr"), *SETTINGS, "--lr", "-1"]) == 1
    assert "--lr -1.0 is out of range: it must be positive" in capsys.readouterr().err
    for flags, text in ((["--epochs", "0"], "--epochs 0 is out of range: it must be 1 or more"),
                        (["--val-fraction", "1.5"], "--val-fraction 1.5 is out of range: it must be at least 0"),
                        (["--val-fraction", "-0.2"], "--val-fraction -0.2 is out of range"),
                        (["--weight-decay", "-1"], "--weight-decay -1.0 is out of range: it must be 0 or more"),
                        (["--patch-size", "0", "0", "0"], "--patch-size 0 0 0 is out of range: it must be 3 positive")):
        assert main(["train", str(phantom), "--out", str(tmp_path / "bad"), *SETTINGS, *flags]) == 1, flags
        assert text in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()

    other = make_phantom_dataset(tmp_path / "Dataset901_Other", cases=2, shape=(64, 64, 8))
    cache = sorted(p.name for p in (trained.out / "preprocessed").iterdir())
    assert main(["train", str(other), "--out", str(trained.out), "--resume"]) == 1
    assert (f"{trained.out} was trained on Dataset900_Phantom, not Dataset901_Other (its cases: ph_000, ph_001, "
            "ph_002): resume with the data set the run began with") in capsys.readouterr().err
    assert sorted(p.name for p in (trained.out / "preprocessed").iterdir()) == cache  # the run's cache untouched

    import shutil

    moved = shutil.copytree(phantom, tmp_path / "Dataset900_Moved")  # the same cases under another name
    run = shutil.copytree(trained.out, tmp_path / "run_copy")
    events = list(Trainer(TrainConfig(str(moved), str(run), resume=True, epochs=2, num_workers=0)).run())
    assert events[-1].kind == "done"
    assert any("the data set is now Dataset900_Moved (the run began on Dataset900_Phantom, with the same cases)"
               in e.message for e in events)

    assert main(["train", str(phantom), "--out", str(trained.out), "--resume", "--preset", "lite"]) == 1
    assert "was trained with --preset tiny, not lite" in capsys.readouterr().err

    assert main(["train", str(phantom), "--out", str(trained.out), "--resume", "--augmentation", "none"]) == 1
    assert "was trained with --augmentation full, not none" in capsys.readouterr().err
    with pytest.raises(MaskSAMError, match="--augmentation spatial is unknown: choose one of full, no-mirror"):
        list(Trainer(TrainConfig(str(phantom), str(tmp_path / "aug"), preset="tiny", augmentation="spatial")).run())
    assert not (tmp_path / "aug").exists()


def test_a_compile_failure_is_a_clear_error(phantom, tmp_path, capsys, monkeypatch):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise torch._dynamo.exc.TorchDynamoException("no working C++ compiler\nlong log")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    assert main(["train", str(phantom), "--out", str(tmp_path / "run"), *SETTINGS, "--epochs", "1", "--compile"]) == 1
    err = capsys.readouterr().err
    assert "torch.compile could not compile the network on cpu (no working C++ compiler)" in err
    assert "train without --compile" in err and "long log" not in err


def test_broken_data_set_is_reported_before_anything_heavy(phantom, tmp_path, capsys):
    import shutil

    broken = tmp_path / "Dataset901_Broken"
    shutil.copytree(phantom, broken)
    (broken / "labelsTr" / "ph_001.nii.gz").unlink()
    run = tmp_path / "run"
    t0 = time.monotonic()
    assert main(["train", str(broken), "--out", str(run), *SETTINGS]) == 1
    err = capsys.readouterr().err
    assert "ph_001" in err and "problem" in err
    assert not run.exists() or not any(run.iterdir())  # nothing planned, preprocessed or saved
    assert time.monotonic() - t0 < 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_parameters(phantom, tmp_path):
    run, out = tmp_path / "run", tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(Path(__file__).parent / "ddp_worker.py"), str(out), "--",
           str(phantom), "--out", str(run), *SETTINGS, "--epochs", "2", "--num-workers", "0",
           "--val-cases", "ph_002"]
    rc, stdout, stderr = finish(cmd, tmp_path / "torchrun")
    assert rc == 0, stderr[-4000:]
    assert [(out / f"rc_rank{r}.txt").read_text(encoding="utf-8") for r in (0, 1)] == ["0", "0"]
    a, b = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert_same_weights(a, b)
    assert_same_weights(a, checkpoint(run)["model"])
    writes = [json.loads((out / f"writes_rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert writes[0] and writes[1] == []  # only rank 0 writes files
    assert stdout.count("finished 2 epochs") == 1 and stdout.count("epoch 1/2: loss") == 1
    assert "(2 processes)" in stdout
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_mean_dice" in r for r in rows)


def test_loader_leaves_the_global_rng_alone(phantom, tmp_path):
    """Criterion point sampling draws from the global RNG, saved in checkpoints: starting an epoch's loader
    must not draw from it, or a run resumed mid-epoch would sample other points than a straight one."""
    from masksam_core.training.config import resolve_config
    from masksam_core.training.data_setup import prepare_data

    config = resolve_config(TrainConfig(str(phantom), str(tmp_path / "run"), preset="tiny", iters_per_epoch=2,
                                        batch_size=1, patch_size=(2, 64, 64), val_fraction=0, num_workers=0))
    data = prepare_data(config, tmp_path / "run", patch_size=(2, 64, 64))
    before = torch.get_rng_state()
    batches = list(data.loader(epoch=1, start_iteration=1))
    assert len(batches) == 1 and torch.equal(before, torch.get_rng_state())
    plain = torch.utils.data.DataLoader(data.loader(epoch=1).dataset, batch_size=1)
    iter(plain)  # what a DataLoader without its own generator does
    assert not torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("patch,dummy_2d", [((2, 64, 64), True), ((8, 16, 16), False)])
def test_augmentation_follows_the_patch_shape_as_nnunet(phantom, tmp_path, patch, dummy_2d):
    """nnU-Net's "dummy 2D" augmentation (rotation about the slice axis only, T' = T) is chosen by the patch
    (max / T > 3), not by the spacing: with the phantom's near-isotropic spacing a 2-slice patch still gets
    in-plane rotations only, never 3D ones cut from a 40-slice region that is mostly padding."""
    from masksam_core.training.config import resolve_config
    from masksam_core.training.data_setup import prepare_data

    config = resolve_config(TrainConfig(str(phantom), str(tmp_path / "run"), preset="tiny", patch_size=patch,
                                        val_fraction=0, num_workers=0))
    data = prepare_data(config, tmp_path / "run", patch_size=patch)
    assert data.plans.stats.anisotropic is False
    spatial = data.transforms.steps[0][1]
    assert spatial.anisotropic is dummy_2d
    assert (data.transforms.input_size[0] == patch[0]) is dummy_2d
    assert [name for name, _ in data.transforms.steps][-3:] == ["mirror0", "mirror1", "mirror2"]


def test_augmentation_setting_reaches_the_loader(phantom, tmp_path):
    from masksam_core.data.plans import load_plans
    from masksam_core.training.config import resolve_config
    from masksam_core.training.data_setup import prepare_data

    config = resolve_config(TrainConfig(str(phantom), str(tmp_path / "run"), preset="tiny", patch_size=(2, 64, 64),
                                        val_fraction=0, num_workers=0, augmentation="intensity"))
    data = prepare_data(config, tmp_path / "run", patch_size=(2, 64, 64))
    spatial = data.transforms.steps[0][1]
    assert (spatial.p_rotation, spatial.p_scaling) == (0.0, 0.0)
    assert data.transforms.input_size == (2, 64, 64)  # nothing to rotate: no context around the patch
    assert not any(name.startswith("mirror") for name, _ in data.transforms.steps)
    assert data.transforms.steps[1][1].prob == 0.1  # noise as nnU-Net
    # test-time augmentation mirrors only where training did (nnU-Net's inference_allowed_mirroring_axes)
    assert data.plans.mirror_axes == () == load_plans(tmp_path / "run" / "plans.json").mirror_axes
    full = resolve_config(TrainConfig(str(phantom), str(tmp_path / "full"), preset="tiny", patch_size=(2, 64, 64),
                                      val_fraction=0, num_workers=0))
    assert prepare_data(full, tmp_path / "full", patch_size=(2, 64, 64)).plans.mirror_axes == (0, 1, 2)


def test_a_smaller_patch_scales_the_slice_sam_sees(phantom, tmp_path):
    """--patch-size keeps the preset's upsampling (lite at 4x128x128 runs LiteMedSAM at 128x128, a quarter
    of the work); the slice side is stored with the model, kept on resume, and a different one refused."""
    from masksam_core.modeling.presets import get_preset, slice_size

    assert slice_size(get_preset("lite"), None, None) == 256
    assert slice_size(get_preset("lite"), (4, 128, 128), None) == 128
    assert slice_size(get_preset("acdc"), (4, 128, 128), None) == 512  # keeps acdc's 4x upsampling
    assert slice_size(get_preset("lite"), (4, 128, 128), 256) == 256  # explicit: 2x upsampling

    run = tmp_path / "run"
    small = ["--preset", "tiny", "--iters-per-epoch", "1", "--batch-size", "1", "--patch-size", "2", "32", "32",
             "--val-fraction", "0", "--device", "cpu"]
    rc, _, err = finish(command(phantom, run, *small, "--epochs", "1"), tmp_path / "log1")
    assert rc == 0, err[-3000:]
    model, ckpt = load_run(run)
    assert ckpt.build.overrides["sam_image_size"] == 32
    assert model.sam.image_size == 32 and tuple(model.patch_size) == (2, 32, 32)
    rc, _, err = finish(command(phantom, run, "--resume", "--epochs", "2"), tmp_path / "log2")
    assert rc == 0, err[-3000:]
    model, ckpt = load_run(run)
    assert ckpt.epoch == 2 and model.sam.image_size == 32
    rc, _, err = finish(command(phantom, run, "--resume", "--epochs", "3", "--sam-image-size", "64"), tmp_path / "log3")
    assert rc != 0 and "--sam-image-size 32" in err and "Traceback" not in err


def test_validation_of_classes_absent_everywhere_is_none_without_warnings():
    """A class missing from every held-out volume (and not predicted) scores None, quietly."""
    import warnings

    from masksam_core.modeling import build_model
    from masksam_core.training.metrics import validate

    torch.manual_seed(0)
    model = build_model("tiny", pretrained=False, num_classes=3, patch_size=(2, 32, 32))
    image = np.zeros((1, 2, 32, 32), np.float32)
    labels = np.zeros((2, 32, 32), np.int16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = validate(model, [(image, labels)], ["background", "a", "b"], torch.device("cpu"), None)
    # a constant image gives one label everywhere: whatever it is, a and b score 0 (predicted, absent) or None
    assert set(result["val_dice"]) == {"a", "b"}
    assert all(v is None or v == 0.0 for v in result["val_dice"].values())
    assert result["val_mean_dice"] == 0.0


def test_curves_keep_zero_dice_and_leave_absent_classes_as_gaps(tmp_path):
    from masksam_core.training.metrics import curve_series, write_curves

    rows = [
        {"epoch": 1, "loss": 2.0, "loss_ce": 1.5, "val_dice": {"liver": 0.0, "spleen": None}, "val_mean_dice": 0.0},
        {"epoch": 2, "loss": 1.0, "loss_ce": 0.5, "val_dice": {"liver": 0.8, "spleen": 0.0}, "val_mean_dice": 0.4},
    ]
    losses, dice = curve_series(rows)
    assert losses == {"loss": [2.0, 1.0], "loss_ce": [1.5, 0.5]}
    assert list(dice) == ["liver", "spleen", "mean"]
    assert dice["liver"] == [0.0, 0.8] and dice["mean"] == [0.0, 0.4]
    assert np.isnan(dice["spleen"][0]) and dice["spleen"][1] == 0.0
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_curves(metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temporary left


def test_patch_fit_note_suggests_the_smallest_halved_patch_that_holds_the_median_slice():
    from masksam_core.training.data_setup import patch_fit_note

    note = patch_fit_note((4, 256, 256), [112.0, 101.0, 122.0])  # the sample CT at 3 mm under lite's patch
    assert "--patch-size 4 128 128" in note and "101x122" in note and "4x fewer" in note
    assert "--patch-size 4 64 64" in patch_fit_note((4, 256, 256), [40.0, 60.0, 50.0])
    assert patch_fit_note((4, 256, 256), [112.0, 129.0, 122.0]) == ""  # 128 would cut the slices
    assert patch_fit_note((4, 256, 256), [112.0, 300.0, 300.0]) == ""
    assert "--patch-size 9 64 64 " in patch_fit_note((9, 512, 512), [8.0, 10.0, 10.0])  # never below 64
    assert patch_fit_note((4, 64, 64), [8.0, 10.0, 10.0]) == ""
    assert patch_fit_note((4, 192, 192), [8.0, 10.0, 10.0]) == ""  # 96 is no multiple of 64 (lite needs one)


def test_validation_reports_progress_and_a_stop_ends_it(phantom, tmp_path):
    """Validation yields its windows; a stop request during it ends the run after that window,
    with the epoch's training saved (unscored) and resumable; one before training saves nothing."""
    config = dict(preset="tiny", epochs=3, iters_per_epoch=1, batch_size=1, patch_size=(2, 64, 64),
                  val_cases=("ph_002",), device="cpu", num_workers=0, seed=5)
    early = Trainer(TrainConfig(str(phantom), str(tmp_path / "early"), **config))
    early.request_stop("interrupted")
    events = list(early.run())
    assert events[-1].kind == "stopped"
    assert "interrupted before training began: nothing was trained" in events[-1].message
    assert not (tmp_path / "early" / "checkpoint_last.pt").exists()
    assert not [e for e in events if e.kind == "iteration"]

    trainer = Trainer(TrainConfig(str(phantom), str(tmp_path / "run"), **config))
    kinds, windows = [], []
    for event in trainer.run():
        kinds.append(event.kind)
        if event.kind == "validation":
            windows.append((event.iteration, event.iterations))
            trainer.request_stop("interrupted")
    assert windows == [(1, windows[0][1])] and windows[0][1] > 1  # the stop came after the first window
    assert kinds[-2:] == ["epoch", "stopped"]
    state = checkpoint(tmp_path / "run")
    assert (state["epoch"], state["iteration"]) == (1, 0)
    assert [("val_dice" in row) for row in metrics(tmp_path / "run")] == [False]
    resumed = Trainer(TrainConfig(str(phantom), str(tmp_path / "run"), resume=True, num_workers=0, device="cpu"))
    events = list(resumed.run())
    assert events[-1].kind == "done" and [r["epoch"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    assert "val_dice" in metrics(tmp_path / "run")[-1]

    last = Trainer(TrainConfig(str(phantom), str(tmp_path / "last"), **{**config, "epochs": 1}))
    events = []
    for event in last.run():
        events.append(event)
        if event.kind == "validation":
            last.request_stop("interrupted")
    assert events[-1].kind == "stopped"  # not "done": the final model was never scored
    assert "trained all 1 epochs, but the last one's validation was cut short" in events[-1].message


def test_validation_keeps_no_graph_and_the_time_limit_ends_it(phantom, tmp_path, monkeypatch):
    """Validation runs without autograd (its memory stays that of inference) and --time-limit cuts it
    short like a stop; an epoch without a score never becomes checkpoint_best.pt."""
    from masksam_core.modeling.masksam import MaskSAM

    grad_seen = []
    forward = MaskSAM.forward

    def recording(self, *args, **kwargs):
        grad_seen.append((self.training, torch.is_grad_enabled()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MaskSAM, "forward", recording)
    config = dict(preset="tiny", iters_per_epoch=1, batch_size=1, patch_size=(2, 64, 64), val_cases=("ph_002",),
                  device="cpu", num_workers=0, seed=5)
    trainer = Trainer(TrainConfig(str(phantom), str(tmp_path / "run"), epochs=3, time_limit=1e-9, **config))
    events = list(trainer.run())
    validation = [e for e in events if e.kind == "validation"]
    assert [(e.iteration, e.epoch) for e in validation] == [(1, 1)]  # cut after its first window
    assert events[-1].kind == "stopped" and "time limit" in events[-1].message
    assert (False, False) in grad_seen and all(grad for training, grad in grad_seen if training)
    assert not any(grad for training, grad in grad_seen if not training)
    assert (tmp_path / "run" / "checkpoint_last.pt").exists()
    assert not (tmp_path / "run" / "checkpoint_best.pt").exists()  # epoch 1 was not scored


def test_val_every_is_kept_on_resume_and_slabs_of_other_fractions_stay_apart(tmp_path):
    from masksam_core.training.config import resolve_config
    from masksam_core.training.data_setup import prepare_data

    saved = {"val_every": 2, "preset": "tiny"}
    assert resolve_config(TrainConfig("d", "o", resume=True), saved).val_every == 2
    with pytest.raises(MaskSAMError, match="was trained with --val-every 2, not 1"):
        resolve_config(TrainConfig("d", "o", resume=True, val_every=1), saved)
    assert resolve_config(TrainConfig("d", "o")).val_every == 1

    one = make_phantom_dataset(tmp_path / "Dataset902_One", cases=1, shape=(64, 64, 12))
    cache = tmp_path / "shared_cache"
    parts = {}
    for fraction in (0.25, 0.5):
        config = TrainConfig(str(one), str(tmp_path / f"run{fraction}"), preset="tiny", val_fraction=fraction,
                             cache_dir=str(cache), num_workers=0, batch_size=1, iters_per_epoch=1)
        config = resolve_config(config)
        data = prepare_data(config, Path(config.out), patch_size=(2, 64, 64))
        parts[fraction] = data.train_cases[0].image
    assert parts[0.25] != parts[0.5]
    assert np.load(parts[0.25]).shape[1] == 9 and np.load(parts[0.5]).shape[1] == 6  # each run's own slab
