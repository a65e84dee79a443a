"""The MaskSAM trainer: a plain class whose ``run()`` is a generator of progress events.

``Trainer(TrainConfig(...)).run()`` checks the data set, plans and preprocesses it
(cached), builds the model, and trains with AdamW and the paper's poly schedule,
validating per epoch and writing RUN_DIR. The command line drives the generator
with a progress bar; the napari Train widget drives it in a worker thread. Call
``request_stop()`` (Ctrl-C, the Stop button, or ``--time-limit``) to save a
checkpoint and end cleanly; ``TrainConfig(resume=True)`` continues from it.
Under ``torchrun`` the same code trains with DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import autocast_dtype, select_device
from ..errors import MaskSAMError
from ..modeling import build_model, gt_prompts, semantic_scores
from ..modeling.presets import get_preset
from . import checkpoint as ckpt_io
from . import distributed as dist
from .data_setup import prepare_data
from .metrics import dice_per_class, write_curves


@dataclass
class TrainConfig:
    """Every training setting; each is a ``masksam-core train`` flag."""

    dataset: str
    out: str
    preset: str = "lite"
    epochs: int | None = None
    iters_per_epoch: int = 250
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-2
    device: str = "auto"
    amp: str = "auto"
    prompt_mode: str = "auto"
    val_cases: tuple[str, ...] = ()
    val_fraction: float = 0.2
    val_every: int = 1
    seed: int = 0
    resume: bool = False
    base_checkpoint: str | None = None
    time_limit: float | None = None
    num_workers: int = 2
    grad_checkpointing: bool = False
    patch_size: tuple[int, int, int] | None = None
    num_queries: int | None = None
    cache_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainEvent:
    """What the trainer reports: ``kind`` is setup, iteration, epoch, stopped or done."""

    kind: str
    epoch: int = 0
    epochs: int = 0
    iteration: int = 0
    iterations: int = 0
    loss: float = float("nan")
    lr: float = float("nan")
    metrics: dict[str, Any] | None = None
    message: str = ""


def poly_lr(base_lr: float, epoch: int, max_epochs: int, exponent: float = 0.9) -> float:
    """The paper's Eq. 2: lr(e) = base · (1 − e / MAX_EPOCH)^0.9."""
    return base_lr * (1 - min(epoch, max_epochs) / max_epochs) ** exponent


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self._stop = False
        self._stop_reason = ""

    def request_stop(self, reason: str = "stopped by the user") -> None:
        """Finish the current iteration, save a checkpoint and end."""
        self._stop, self._stop_reason = True, reason

    # ------------------------------------------------------------------ set-up
    def _settings(self) -> dict[str, Any]:
        c = self.config
        overrides = dict(c.overrides)
        if c.patch_size is not None:
            overrides["patch_size"] = tuple(c.patch_size)
        if c.num_queries is not None:
            overrides["num_queries"] = c.num_queries
        return overrides

    def _build(self, data: Any, device: torch.device) -> None:
        c = self.config
        self.preset = get_preset(c.preset)
        self.overrides = self._settings()
        queries = int(self.overrides.get("num_queries", self.preset.num_queries))
        if queries < data.num_classes:
            if c.num_queries is not None:
                raise MaskSAMError(
                    f"--num-queries {queries} is less than the data set's {data.num_classes} classes: every class "
                    f"on a slice needs its own query; pass --num-queries {data.num_classes} or more"
                )
            self.overrides["num_queries"] = data.num_classes  # the preset has too few for this data set
        self.epochs = c.epochs or self.preset.epochs
        self.model = build_model(
            c.preset, c.base_checkpoint, num_classes=data.num_classes, in_channels=data.in_channels,
            prompt_mode=c.prompt_mode, progress=dist.is_main(), **self.overrides,
        ).to(device)
        if c.grad_checkpointing and hasattr(self.model.encoder_adapters, "grad_checkpointing"):
            self.model.encoder_adapters.grad_checkpointing = True
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, eps=1e-4, weight_decay=c.weight_decay)
        from .criterion import HungarianMatcher, SetCriterion, loss_weights

        num_points = int(self.overrides.get("num_points", self.preset.num_points))
        self.criterion = SetCriterion(
            data.num_classes, HungarianMatcher(num_points=num_points), num_points=num_points
        )
        self.weights = loss_weights(mask_weight=float(self.overrides.get("mask_loss_weight", self.preset.mask_loss_weight)))
        self.amp = autocast_dtype(device, c.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.net = dist.wrap(self.model, device)

    def _checkpoint(self, data: Any, epoch: int, iteration: int, best: float) -> dict[str, Any]:
        sam = self.model.sam
        return {
            "kind": "masksam-run",
            "format": ckpt_io.FORMAT,
            "model": self.model.trainable_state_dict(),
            "build": {
                "preset": self.preset.name,
                "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()},
                "num_classes": data.num_classes,
                "in_channels": data.in_channels,
                "prompt_mode": self.config.prompt_mode,
            },
            "base_weights": ckpt_io.base_weights_info(sam),
            # random base weights (the tiny backbone) cannot be fetched again: keep them
            "sam": None if sam.weights else {k: v for k, v in sam.state_dict().items()},
            "plans": data.plans,
            "class_names": data.class_names,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"epoch": epoch, "max_epochs": self.epochs, "base_lr": self.config.lr},
            "scaler": self.scaler.state_dict(),
            "rng": ckpt_io.rng_state(),
            "epoch": epoch,
            "iteration": iteration,
            "best": best,
            "config": json.loads(json.dumps(dataclasses.asdict(self.config), default=str)),
        }

    # ------------------------------------------------------------------ loop
    def run(self) -> Generator[TrainEvent, None, Path]:
        c = self.config
        rank, world = dist.init()
        device = select_device(c.device) if world == 1 else dist.device_for_rank(c.device)
        torch.manual_seed(c.seed + rank)
        np.random.seed(c.seed + rank)
        last_path = self.out / "checkpoint_last.pt"
        if not c.resume and last_path.exists():
            raise MaskSAMError(
                f"{self.out} already holds a run (checkpoint_last.pt): pass --resume to continue it, "
                "or choose another --out folder"
            )
        if c.resume and not last_path.exists():
            raise MaskSAMError(f"nothing to resume: {last_path} does not exist (drop --resume to start a new run)")

        yield TrainEvent("setup", message=f"checking and preparing {c.dataset}")
        data = prepare_data(c, self.out, resume=c.resume, patch_size=self._patch_size())
        self._build(data, device)
        start_epoch, start_iter, best = 0, 0, -math.inf
        if c.resume:
            start_epoch, start_iter, best = self._resume(last_path)
        elif dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2, default=str))
        yield TrainEvent("setup", epoch=start_epoch, epochs=self.epochs,
                         message=f"{len(data.train_cases)} training and {len(data.val_volumes)} validation volumes; "
                         f"training on {device}")

        t0 = time.monotonic()
        for epoch in range(start_epoch, self.epochs):
            lr = poly_lr(c.lr, epoch, self.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            n_iter = 0
            epoch_start = time.monotonic()
            self.net.train()
            loader = data.loader(epoch=epoch, start_iteration=start_iter if epoch == start_epoch else 0)
            first = start_iter if epoch == start_epoch else 0
            for it, batch in enumerate(loader, start=first):
                losses = self._step(batch, device)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_iter += 1
                yield TrainEvent("iteration", epoch, self.epochs, it + 1, c.iters_per_epoch, losses["loss"], lr)
                if c.time_limit is not None and time.monotonic() - t0 > c.time_limit * 60:
                    self.request_stop(f"time limit of {c.time_limit:g} minutes reached")
                if self._stop and it + 1 < c.iters_per_epoch:
                    self._save(data, epoch, it + 1, best, last_only=True)
                    yield TrainEvent("stopped", epoch, self.epochs, it + 1, c.iters_per_epoch,
                                     message=f"{self._stop_reason}; checkpoint saved at epoch {epoch}, "
                                     f"iteration {it + 1}: continue with --resume")
                    dist.cleanup()
                    return last_path
            metrics: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "iterations": n_iter}
            metrics.update({k: v / max(n_iter, 1) for k, v in sums.items()})
            if data.val_volumes and ((epoch + 1) % c.val_every == 0 or epoch + 1 == self.epochs):
                metrics.update(self._validate(data, device))
            metrics["seconds"] = time.monotonic() - epoch_start
            score = metrics.get("val_mean_dice", -metrics.get("loss", math.inf))
            improved = score > best
            best = max(best, score)
            self._save(data, epoch + 1, 0, best, improved=improved, metrics=metrics)
            yield TrainEvent("epoch", epoch + 1, self.epochs, n_iter, c.iters_per_epoch,
                             metrics.get("loss", float("nan")), lr, metrics)
            start_iter = 0
            if self._stop:
                yield TrainEvent("stopped", epoch + 1, self.epochs,
                                 message=f"{self._stop_reason}; checkpoint saved after epoch {epoch + 1}")
                dist.cleanup()
                return last_path
        dist.cleanup()
        yield TrainEvent("done", self.epochs, self.epochs, message=f"finished {self.epochs} epochs in {self.out}")
        return self.out / "checkpoint_best.pt"

    def _patch_size(self) -> tuple[int, int, int]:
        return tuple(self._settings().get("patch_size", get_preset(self.config.preset).patch_size))  # type: ignore[return-value]

    def _step(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            prompts = gt_prompts(y, self.model.num_classes) if self.model.prompt_mode == "gt" else None
            out = self.net(x, prompts)
        losses = self.criterion(out, y)
        from .criterion import weighted_total

        total = weighted_total(losses, self.weights)
        if not torch.isfinite(total):
            raise MaskSAMError(
                "the training loss became NaN or infinite; lower --lr, check the data with "
                "`masksam-core check`, or use --amp off"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 12.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out_losses = {k: float(v.detach()) for k, v in losses.items()}
        out_losses["loss"] = float(total.detach())
        return out_losses

    @torch.no_grad()
    def _validate(self, data: Any, device: torch.device) -> dict[str, Any]:
        if not dist.is_main():
            dist.barrier()
            return {}
        from ..inference.sliding_window import run as run_windows
        from ..inference.sliding_window import sliding_window

        self.model.eval()
        gt_mode = self.model.prompt_mode == "gt"
        c = self.model.num_classes

        def predictor(window: torch.Tensor) -> torch.Tensor:
            image = window[:, :-1] if gt_mode else window
            prompts = gt_prompts(window[:, -1].round().long(), c) if gt_mode else None
            with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                out = self.model(image, prompts)
            return semantic_scores(out["pred_logits"], out["pred_masks"])

        dices = []
        for image, labels in data.val_volumes:
            volume = torch.from_numpy(np.array(image, dtype=np.float32))
            if gt_mode:
                volume = torch.cat([volume, torch.from_numpy(np.array(labels, dtype=np.float32))[None]])
            scores = run_windows(sliding_window(volume, predictor, self.model.patch_size, device=device,
                                                accumulate_on="cpu", batch_size=1))
            dices.append(dice_per_class(scores.argmax(0).numpy(), np.asarray(labels), c))
        dist.barrier()
        per_class = np.nanmean(np.array(dices, dtype=np.float64), axis=0)
        names = data.class_names
        result = {"val_dice": {names[i]: (None if np.isnan(d) else float(d)) for i, d in enumerate(per_class) if i > 0}}
        fg = per_class[1:]
        result["val_mean_dice"] = float(np.nanmean(fg)) if np.isfinite(fg).any() else 0.0
        return result

    def _save(self, data: Any, epoch: int, iteration: int, best: float, *, last_only: bool = False,
              improved: bool = False, metrics: dict[str, Any] | None = None) -> None:
        if not dist.is_main():
            return
        state = self._checkpoint(data, epoch, iteration, best)
        ckpt_io.atomic_save(state, self.out / "checkpoint_last.pt")
        if last_only:
            return
        if improved:
            ckpt_io.atomic_save(state, self.out / "checkpoint_best.pt")
        if metrics is not None:
            with open(self.out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            write_curves(self.out / "metrics.jsonl", self.out / "curves.png")

    def _resume(self, path: Path) -> tuple[int, int, float]:
        state = ckpt_io.load_checkpoint(path)
        build = state["build"]
        if build["preset"] != self.preset.name or build["prompt_mode"] != self.config.prompt_mode:
            raise MaskSAMError(
                f"{path} was trained with preset {build['preset']!r} in {build['prompt_mode']!r} mode: "
                "resume with the same --preset and --prompt-mode"
            )
        ckpt_io.load_trainable(self.model, state["model"], source=path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(state["rng"])
        epoch, iteration = int(state["epoch"]), int(state["iteration"])
        if dist.is_main():
            ckpt_io.truncate_metrics(self.out / "metrics.jsonl", epoch)
        return epoch, iteration, float(state["best"])
