"""The MaskSAM trainer: a plain class whose ``run()`` is a generator of progress events.

``Trainer(TrainConfig(...)).run()`` checks the data set, plans and preprocesses it
(cached), builds the model, and trains with AdamW and the paper's poly schedule,
validating per epoch and writing RUN_DIR. The command line drives the generator
with a progress bar; the napari Train widget drives it in a worker thread. Call
``request_stop()`` (Ctrl-C, the Stop button, or ``--time-limit``) to save a
checkpoint and end cleanly; ``TrainConfig(resume=True)`` continues from it, with
the settings of the run (those left ``None``) and the same data and random numbers
as a run that never stopped. Under ``torchrun`` the same code trains with
DistributedDataParallel.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..data.plans import Plans
from ..devices import autocast_dtype, available_devices, compile_errors, reuse_freed_memory
from ..errors import MaskSAMError, check_output_folder
from ..files import atomic_save, atomic_write_json
from ..modeling import build_model, gt_prompts
from ..modeling.presets import get_preset, slice_size
from ..progress import relay
from ..runs import RunFile, load_checkpoint, load_state, load_trainable
from . import checkpoint as ckpt_io
from . import distributed as dist
from .config import ResolvedConfig, TrainConfig, check_ranges, resolve_config
from .data_setup import DataBundle, patch_fit_note, prepare_data
from .events import TrainEvent
from .metrics import validate_on_main, write_curves


def poly_lr(base_lr: float, epoch: int, max_epochs: int, exponent: float = 0.9) -> float:
    """The paper's Eq. 2: lr(e) = base · (1 − e / MAX_EPOCH)^0.9."""
    return base_lr * (1 - min(epoch, max_epochs) / max_epochs) ** exponent


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self._resolved: ResolvedConfig | None = None
        self.out = Path(config.out)
        self._stop = False
        self._stop_reason = ""
        self.history: list[dict[str, Any]] = []

    def request_stop(self, reason: str = "stopped by the user") -> None:
        """Finish the current iteration, save a checkpoint and end."""
        self._stop, self._stop_reason = True, reason

    @property
    def resolved(self) -> ResolvedConfig:
        """The settings with the run's (or the new-run) values filled in; set when the run starts."""
        if self._resolved is None:
            raise RuntimeError("the settings are resolved when run() starts")
        return self._resolved

    # ------------------------------------------------------------------ set-up
    def _settings(self) -> dict[str, Any]:
        c = self.resolved
        overrides = dict(c.overrides)
        if c.patch_size is not None:
            overrides["patch_size"] = tuple(c.patch_size)
        preset = get_preset(c.preset)
        side = slice_size(preset, overrides.get("patch_size"), c.sam_image_size)
        if "sam_image_size" not in overrides and side != preset.sam_image_size:
            overrides["sam_image_size"] = side
        if c.num_queries is not None:
            overrides["num_queries"] = c.num_queries
        return overrides

    def _build(self, data: DataBundle, device: torch.device, saved: RunFile | None) -> None:
        c = self.resolved
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
        self.model = build_model(
            c.preset, c.base_checkpoint, num_classes=data.num_classes, in_channels=data.in_channels,
            prompt_mode=c.prompt_mode, progress=dist.is_main(), **self.overrides,
        ).to(device)
        if saved is not None and saved.sam is not None:  # random base weights (tiny) travel with the run
            load_state(self.model.sam, saved.sam, strict=True, source=self.out / "checkpoint_last.pt")
        self.recompute_reason = None
        if c.grad_checkpointing is None and device.type == "cpu":
            from .memory import activation_bytes, available_memory, cpu_recompute_reason

            activations = activation_bytes(c.preset, c.batch_size, num_classes=data.num_classes,
                                           in_channels=data.in_channels, prompt_mode=c.prompt_mode, **self.overrides)
            # every process of a CPU run shares this machine's memory
            self.recompute_reason = cpu_recompute_reason(activations * dist.world_size(), available_memory())
        self.model.set_grad_checkpointing(bool(c.grad_checkpointing) or self.recompute_reason is not None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, eps=1e-4, weight_decay=c.weight_decay)
        from .criterion import HungarianMatcher, SetCriterion, loss_weights

        num_points = int(self.overrides.get("num_points", self.preset.num_points))
        self.criterion = SetCriterion(
            data.num_classes, HungarianMatcher(num_points=num_points), num_points=num_points
        ).to(device)  # its no-object class weight must live where the logits are
        mask_weight = float(self.overrides.get("mask_loss_weight", self.preset.mask_loss_weight))
        self.weights = loss_weights(mask_weight=mask_weight)
        self.amp = autocast_dtype(device, c.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.net = dist.wrap(self.model, device)
        if c.compile:  # the training forward through torch.compile (compiled on the first step)
            # torch.compile of a module returns a module (OptimizedModule); its stub says any callable
            self.net = cast(torch.nn.Module, torch.compile(self.net))

    def _start(self, last_path: Path) -> RunFile | None:
        """Check RUN_DIR against --resume; resolve the settings; returns the checkpoint when resuming."""
        c = self.config
        check_output_folder(self.out, "--out")
        if not c.resume and last_path.exists():
            raise MaskSAMError(
                f"{self.out} already holds a run (checkpoint_last.pt): pass --resume to continue it, "
                "or choose another --out folder"
            )
        if c.resume and not last_path.exists():
            raise MaskSAMError(f"nothing to resume: {last_path} does not exist (drop --resume to start a new run)")
        saved = load_checkpoint(last_path) if c.resume else None
        if saved is not None:
            build = saved.build
            preset = get_preset(build.preset)
            config = dict(saved.config or {})  # the model's settings as built, the rest as configured
            config.update(preset=preset.name, prompt_mode=build.prompt_mode,
                          patch_size=build.overrides.get("patch_size", preset.patch_size),
                          num_queries=build.overrides.get("num_queries", preset.num_queries),
                          sam_image_size=build.overrides.get("sam_image_size", preset.sam_image_size))
            self.config = self._resolved = resolve_config(c, config)
            done, total = int(saved.epoch or 0), int((saved.scheduler or {})["max_epochs"])
            if c.epochs is not None and c.epochs < done:
                raise MaskSAMError(f"{self.out} has already trained {done} epochs: pass --epochs {done + 1} or "
                                   "more to extend it")
            self.epochs = total if c.epochs is None else c.epochs
            self.history = list(saved.history or ckpt_io.read_metrics(self.out / "metrics.jsonl", done))
        else:
            self.config = self._resolved = resolve_config(c)
            self.epochs = get_preset(self._resolved.preset).epochs if c.epochs is None else c.epochs
        check_ranges(self.config, self.epochs)
        return saved

    # ------------------------------------------------------------------ loop
    def run(self) -> Generator[TrainEvent, None, Path]:
        """Train, yielding :class:`TrainEvent` s; returns the best (or, when stopped, the last) checkpoint."""
        name = self.config.device
        on_cpu = (available_devices()[0] if name == "auto" else name.split(":", 1)[0]) == "cpu"
        try:
            with reuse_freed_memory(on_cpu):  # CPU steps reuse freed memory (no fresh pages per tensor)
                return (yield from self._run())
        finally:
            dist.shutdown()  # after an error too, so that no process group is left behind

    def _run(self) -> Generator[TrainEvent, None, Path]:
        rank, world, device = dist.init(self.config.device)
        last_path = self.out / "checkpoint_last.pt"
        saved = self._start(last_path)
        c = self.resolved
        torch.manual_seed(c.seed + rank)
        np.random.seed(c.seed + rank)
        data = yield from self._prepare(saved, device)
        if data is None:  # stopped before the model was built
            return last_path
        start_epoch, start_iter, best, partial = 0, 0, -math.inf, None
        if saved is not None:
            start_epoch, start_iter, best, partial = self._resume(saved, rank, world)
        elif dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", dataclasses.asdict(c), newline=False, default=str)
            ckpt_io.write_metrics(self.out / "metrics.jsonl", [])  # no lines left from a run that never saved
        yield TrainEvent("setup", epoch=start_epoch, epochs=self.epochs,
                         message=f"{len(data.train_cases)} training and {len(data.val_volumes)} validation volumes; "
                         f"training on {device}" + (f" ({world} processes)" if world > 1 else "")
                         + (" with gradient checkpointing" if self.model.grad_checkpointing else "")
                         + (f" ({self.recompute_reason}; --no-grad-checkpointing turns it off)"
                            if self.recompute_reason else ""))
        if start_epoch >= self.epochs:
            dist.cleanup()
            yield TrainEvent("done", start_epoch, self.epochs, message=f"{self.out} has already trained "
                             f"{start_epoch} epochs: pass a larger --epochs with --resume to train longer")
            return self.out / "checkpoint_best.pt"
        return (yield from self._epochs(data, device, start_epoch, start_iter, best, partial))

    def _prepare(self, saved: RunFile | None, device: torch.device) -> Generator[TrainEvent, None, DataBundle | None]:
        """Check, plan and preprocess the data, then build the model; None when a stop came before the build."""
        c = self.resolved
        yield TrainEvent("setup", message=f"checking and preparing {c.dataset}")
        plans = Plans.from_dict(saved.plans) if saved is not None else None
        data = prepare_data(c, self.out, patch_size=self._patch_size(), plans=plans)
        (stop_now,) = dist.any_flags(self._stop)  # asked to stop while the data were prepared
        if stop_now:  # before the model is built (and its weights perhaps downloaded)
            dist.cleanup()
            kept = "the run's checkpoint is unchanged; continue with --resume" if saved is not None else \
                "nothing was trained or saved; the preprocessed data are kept for the next start"
            yield TrainEvent("stopped", int(saved.epoch or 0) if saved else 0, self.epochs,
                             message=f"{self._reason()} before training began: {kept}")
            return None
        self._build(data, device, saved)
        if data.note:
            yield TrainEvent("setup", message=data.note)
        stats = data.plans.stats
        fit = patch_fit_note(self._patch_size(), stats.median_shape) if stats is not None else ""
        if fit and saved is None and c.patch_size is None and "patch_size" not in c.overrides:
            yield TrainEvent("setup", message=fit)
        return data

    def _epochs(self, data: DataBundle, device: torch.device, start_epoch: int, start_iter: int, best: float,
                partial: dict[str, Any] | None) -> Generator[TrainEvent, None, Path]:
        """Train from ``start_epoch`` (iteration ``start_iter``, ``partial`` its sums so far) to the last epoch."""
        c, last_path = self.resolved, self.out / "checkpoint_last.pt"
        t0 = time.monotonic()
        unscored = False
        for epoch in range(start_epoch, self.epochs):
            lr = poly_lr(c.lr, epoch, self.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            first = start_iter if epoch == start_epoch else 0
            part = partial if epoch == start_epoch and partial else {}
            trained = yield from self._train_epoch(data, device, epoch, first, part, lr, best, t0)
            if trained is None:  # stopped mid-epoch, saved
                return last_path
            n_iter, sums, epoch_start, stop = trained
            metrics: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "iterations": n_iter}
            metrics.update({k: v / max(n_iter, 1) for k, v in sums.items()})
            unscored = False
            if data.val_volumes and ((epoch + 1) % c.val_every == 0 or epoch + 1 == self.epochs):
                scores = yield from self._validate(data, device, epoch + 1, t0)
                unscored = scores is None
                metrics.update(scores or {})
            metrics["seconds"] = time.monotonic() - epoch_start
            # with validation data only scored epochs compete (Dice); without, the training loss does
            score = metrics.get("val_mean_dice", -math.inf if data.val_volumes else -metrics.get("loss", math.inf))
            improved = score > best
            best = max(best, score)
            self.history.append(metrics)
            self._save(data, epoch + 1, 0, best, improved=improved)
            yield TrainEvent("epoch", epoch + 1, self.epochs, n_iter, c.iters_per_epoch,
                             metrics.get("loss", float("nan")), lr, metrics)
            (stop,) = dist.any_flags(stop or self._stop or self._time_up(t0))
            if stop and epoch + 1 < self.epochs:
                yield TrainEvent("stopped", epoch + 1, self.epochs,
                                 message=f"{self._reason()}: saved {last_path} after epoch {epoch + 1}; "
                                 "continue with --resume")
                dist.cleanup()
                return last_path
        dist.cleanup()
        if unscored:  # the last epoch's validation was cut short: trained, saved, not scored
            yield TrainEvent("stopped", self.epochs, self.epochs,
                             message=f"{self._reason()}: trained all {self.epochs} epochs, but the last one's "
                             "validation was cut short, so it is not scored (checkpoint_best.pt is the best scored "
                             f"epoch; checkpoint_last.pt the last) in {self.out}")
            return last_path
        yield TrainEvent("done", self.epochs, self.epochs, message=f"finished {self.epochs} epochs in {self.out}")
        return self.out / "checkpoint_best.pt"

    def _train_epoch(self, data: DataBundle, device: torch.device, epoch: int, first: int, part: dict[str, Any],
                     lr: float, best: float, t0: float
                     ) -> Generator[TrainEvent, None, tuple[int, dict[str, float], float, bool] | None]:
        """The iterations of ``epoch`` from ``first`` (``part``: the sums of those before it); returns
        (iterations, the ranks' mean loss sums, the epoch's start time, stop asked on its last iteration),
        or None when a stop ended the run mid-epoch (saved)."""
        c, last_path = self.resolved, self.out / "checkpoint_last.pt"
        sums: dict[str, float] = dict(part.get("sums", {}))
        n_iter = int(part.get("iterations", 0))
        epoch_start = time.monotonic() - float(part.get("seconds", 0.0))
        yield TrainEvent("epoch_start", epoch, self.epochs, first, c.iters_per_epoch, lr=lr)
        self.net.train()
        stop = False
        for it, batch in enumerate(data.loader(epoch=epoch, start_iteration=first), start=first):
            losses, total = self._forward(batch, device)
            if any(dist.any_flags(not bool(torch.isfinite(total)))):
                raise MaskSAMError(
                    "the training loss became NaN or infinite; lower --lr, check the data with "
                    "`masksam-core check`, or use --amp off"
                )
            self._backward(total)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            n_iter += 1
            yield TrainEvent("iteration", epoch, self.epochs, it + 1, c.iters_per_epoch, losses["loss"], lr)
            (stop,) = dist.any_flags(self._stop or self._time_up(t0))  # every rank stops at the same step
            if stop and it + 1 < c.iters_per_epoch:
                # the ranks' mean: each resumes from it, and the epoch's mean over ranks stays exact
                partial = {"sums": dist.mean_dict(sums), "iterations": n_iter,
                           "seconds": time.monotonic() - epoch_start}
                self._save(data, epoch, it + 1, best, partial=partial)
                yield TrainEvent("stopped", epoch, self.epochs, it + 1, c.iters_per_epoch,
                                 message=f"{self._reason()}: saved {last_path} at epoch {epoch + 1}, "
                                 f"iteration {it + 1}; continue with --resume")
                dist.cleanup()
                return None
        return n_iter, dist.mean_dict(sums), epoch_start, stop

    def _time_up(self, t0: float) -> bool:
        limit = self.config.time_limit
        return limit is not None and time.monotonic() - t0 > limit * 60

    def _reason(self) -> str:
        if self._stop_reason:
            return self._stop_reason
        if self.config.time_limit is not None:
            return f"time limit of {self.config.time_limit:g} minutes reached"
        return "stopped on another rank"

    def _patch_size(self) -> tuple[int, int, int]:
        t, h, w = self._settings().get("patch_size", get_preset(self.resolved.preset).patch_size)
        return t, h, w

    def _forward(self, batch: dict[str, torch.Tensor],
                 device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
        """Losses of one batch (image (B, C, T, H, W), labels (B, T, H, W)): (named floats, weighted total)."""
        from .criterion import weighted_total

        x = batch["image"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            prompts = gt_prompts(y, self.model.num_classes) if self.model.prompt_mode == "gt" else None
            with compile_errors(device, "train without --compile (same model)"):
                out = self.net(x, prompts)
        num_masks = None
        if dist.world_size() > 1:  # Mask2Former: normalise by the mean number of target masks over ranks
            counts = torch.zeros(y.shape[0] * y.shape[1], self.model.num_classes, device=y.device)
            counts.scatter_(1, y.reshape(counts.shape[0], -1), 1.0)  # (B*T, C): class present on slice
            num_masks = dist.mean(counts.sum()).clamp(min=1.0)
        losses = self.criterion(out, y, num_masks=num_masks)
        total = weighted_total(losses, self.weights)
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(total.detach())
        return values, total

    def _backward(self, total: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 12.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _validate(self, data: DataBundle, device: torch.device, epoch: int,
                  t0: float) -> Generator[TrainEvent, None, dict | None]:
        """``validation`` events (windows done of all) while rank 0 scores; None if a stop (or the time
        limit) cut it short."""
        gen = validate_on_main(self.model, data.val_volumes, data.class_names, device, self.amp,
                               lambda: self._stop or self._time_up(t0))
        return (yield from relay(gen, lambda item: TrainEvent("validation", epoch, self.epochs, *item)))

    def _save(self, data: DataBundle, epoch: int, iteration: int, best: float, *, improved: bool = False,
              partial: dict[str, Any] | None = None) -> None:
        """checkpoint_last.pt (and _best when improved), then metrics.jsonl and curves.png; rank 0 writes,
        every rank must call it (it gathers their RNG states)."""
        rngs = dist.gather_objects(ckpt_io.rng_state())
        if not dist.is_main():
            return
        state = ckpt_io.run_state(self, data, epoch=epoch, iteration=iteration, best=best, rngs=rngs,
                                  partial=partial)
        atomic_save(state, self.out / "checkpoint_last.pt")
        if partial is not None:
            return
        if improved:
            atomic_save(state, self.out / "checkpoint_best.pt")
        ckpt_io.write_metrics(self.out / "metrics.jsonl", self.history)
        write_curves(self.out / "metrics.jsonl", self.out / "curves.png")

    def _resume(self, state: RunFile, rank: int, world: int) -> tuple[int, int, float, dict | None]:
        """Load weights, optimiser, scaler and RNG states; returns (epoch, iteration, best, partial)."""
        if state.optimizer is None or state.scaler is None or state.rng is None or state.best is None:
            raise MaskSAMError(f"{self.out / 'checkpoint_last.pt'} holds no training state to resume from")
        load_trainable(self.model, state.model, source=self.out / "checkpoint_last.pt")
        self.optimizer.load_state_dict(state.optimizer)
        self.scaler.load_state_dict(state.scaler)
        rngs = state.rng_ranks or [state.rng]
        ckpt_io.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
        epoch, iteration = int(state.epoch or 0), int(state.iteration or 0)
        if iteration >= int(self.resolved.iters_per_epoch):
            raise MaskSAMError(f"the checkpoint stopped at iteration {iteration} of its epoch but an epoch has "
                               f"{self.resolved.iters_per_epoch}: resume with its --iters-per-epoch")
        if dist.is_main():
            ckpt_io.write_metrics(self.out / "metrics.jsonl", self.history)  # drops lines of epochs redone
        return epoch, iteration, float(state.best), state.partial
