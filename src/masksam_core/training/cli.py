"""``masksam-core train``: train MaskSAM on a data set in the nnU-Net raw layout."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from ..devices import AMP_CHOICES, DEVICE_CHOICES, distributed_env
from ..modeling.presets import PRESETS

# always it/s (tqdm's default switches to s/it below 1 it/s), then loss and lr from the postfix
EXIT_STOPPED = 75  # stopped by --time-limit (or another rank) with a checkpoint saved: resume later (EX_TEMPFAIL)
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


def _duration(seconds: float) -> str:
    """'42 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def epoch_line(event: Any, eta_seconds: float | None) -> str:
    """One line per finished epoch: 'epoch 3/20: loss 1.2345, lr 8.71e-04, val mean Dice 0.812 (41 s, ...)'."""
    m = event.metrics or {}
    dice = f", val mean Dice {m['val_mean_dice']:.3f}" if "val_mean_dice" in m else ""
    left = f", about {_duration(eta_seconds)} left" if eta_seconds is not None and event.epoch < event.epochs else ""
    return (f"epoch {event.epoch}/{event.epochs}: loss {event.loss:.4f}, lr {event.lr:.2e}{dice} "
            f"({_duration(m.get('seconds', 0.0))}{left})")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .trainer import TrainConfig, Trainer

    config = TrainConfig(
        dataset=args.dataset, out=args.out, preset=args.preset, epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, device=args.device, amp=args.amp, prompt_mode=args.prompt_mode,
        val_cases=tuple(args.val_cases) if args.val_cases else None, val_fraction=args.val_fraction,
        val_every=args.val_every, seed=args.seed, resume=args.resume, base_checkpoint=args.base_checkpoint,
        time_limit=args.time_limit, num_workers=args.num_workers, grad_checkpointing=args.grad_checkpointing,
        compile=args.compile,
        patch_size=tuple(args.patch_size) if args.patch_size else None, num_queries=args.num_queries,
        sam_image_size=args.sam_image_size, augmentation=args.augmentation, cache_dir=args.cache_dir,
    )
    trainer = Trainer(config)
    signals: list[int] = []
    show = distributed_env()[0] == 0  # under torchrun only rank 0 prints

    def on_signal(signum: int, frame: object) -> None:
        if signals:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        signals.append(signum)
        if show:
            print("\nstopping: a checkpoint is saved after the current iteration or validation window (while "
                  "the data are prepared: training will not start); Ctrl-C again to abort",
                  file=sys.stderr, flush=True)
        trainer.request_stop("interrupted" if signum == signal.SIGINT else f"stopped by signal {signum}")

    # Ctrl-C, and SIGTERM (what torchrun and batch schedulers send before killing a job), save and stop.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    epoch_seconds: list[float] = []
    stopped = False
    try:
        for event in trainer.run():
            stopped = stopped or event.kind == "stopped"
            if not show:
                continue
            if event.kind == "epoch_start":
                bar = tqdm(total=event.iterations, initial=event.iteration, unit="it", dynamic_ncols=True,
                           desc=f"epoch {event.epoch + 1}/{event.epochs}", bar_format=BAR_FORMAT, file=sys.stderr)
            elif event.kind == "validation":
                if bar is None:
                    bar = tqdm(total=event.iterations, unit="window", dynamic_ncols=True, file=sys.stderr,
                               desc=f"validation {event.epoch}/{event.epochs}", bar_format=BAR_FORMAT)
                bar.update(event.iteration - bar.n)
            elif event.kind == "iteration":
                if bar is not None:
                    bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
                    bar.update(1)
                    if event.iteration >= event.iterations:  # validation follows: stop the clock
                        bar.close()
                        bar = None
            elif event.kind == "epoch":
                if bar is not None:
                    bar.close()
                    bar = None
                epoch_seconds.append(float((event.metrics or {}).get("seconds", 0.0)))
                eta = sum(epoch_seconds[-5:]) / len(epoch_seconds[-5:]) * (event.epochs - event.epoch)
                tqdm.write(epoch_line(event, eta), file=sys.stdout)
            else:
                if bar is not None:
                    bar.close()
                    bar = None
                tqdm.write(event.message, file=sys.stdout)
    finally:
        if bar is not None:
            bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not stopped:
        return 0
    return 128 + signals[0] if signals else EXIT_STOPPED  # a shell's `train ... && export` goes no further


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from ..data.augment import AUGMENTATIONS

    p = subparsers.add_parser(
        "train",
        help="train MaskSAM on a data set (nnU-Net raw layout)",
        description=(
            "Train MaskSAM on DATASET_DIR (dataset.json, imagesTr/, labelsTr/ as nnU-Net v2). The data set is "
            "checked first, then planned and preprocessed (cached in RUN_DIR/preprocessed), then trained with "
            "AdamW and the poly schedule. RUN_DIR receives plans.json, checkpoint_last.pt, checkpoint_best.pt, "
            "metrics.jsonl and curves.png. Ctrl-C saves a checkpoint; --resume continues. For several GPUs: "
            "torchrun --nproc_per_node=N -m masksam_core train ..."
        ),
    )
    p.add_argument("dataset", metavar="DATASET_DIR", help="data set folder with dataset.json, imagesTr, labelsTr")
    p.add_argument("--preset", choices=list(PRESETS), help="model preset (default: lite)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write (created if missing)")
    p.add_argument("--epochs", type=int, help="epochs (default: the preset's); with --resume, extends a run")
    p.add_argument("--iters-per-epoch", type=int, help="iterations per epoch (default: 250)")
    p.add_argument("--batch-size", type=int, help="patches per iteration and GPU (default: 2)")
    p.add_argument("--lr", type=float, help="initial learning rate of AdamW (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0.01)")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default: auto)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision (default: auto = bf16 on CUDA, off elsewhere)")
    p.add_argument("--prompt-mode", choices=["auto", "gt"],
                   help="auto: learned prompt generator (MaskSAM); gt: prompts from the labels (box-prompt "
                   "model) (default: auto)")
    p.add_argument("--val-cases", nargs="+", metavar="CASE", help="case ids held out for validation")
    p.add_argument("--val-fraction", type=float,
                   help="without --val-cases: fraction of cases held out, or for a single-case data set the "
                   "fraction of its slices (a slab at the end) (default: 0.2; 0 = no validation)")
    p.add_argument("--val-every", type=int, help="validate every N epochs (default: 1)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from checkpoint_last.pt, with its settings (the model, data and "
                   "optimisation flags may be left out; a different value is an error); a larger --epochs extends it")
    p.add_argument("--base-checkpoint", metavar="PATH", help="local file with the base SAM weights (skips the download)")
    p.add_argument("--time-limit", type=float, metavar="MINUTES", help="save and stop after this many minutes")
    p.add_argument("--num-workers", type=int, default=2, help="background data-loading processes (default: 2)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute the frozen encoder's blocks, the prompt generator's stages and the mask decoder "
                        "(4 queries at a time) in the backward pass: the same gradients for about a third more time "
                        "per step and a fraction of the memory (lite, batch 2, CPU: 9 instead of 23 GiB) "
                        "(default: on for CPUs when a step's activations would take more than half the free "
                        "memory, else off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network: a slow first step, then faster ones on GPUs "
                        "(on CPUs it does not pay)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("T", "H", "W"), help="override the preset's patch size")
    p.add_argument("--sam-image-size", type=int, metavar="S",
                   help="side of each slice as SAM sees it (default: the preset's, scaled with --patch-size: "
                        "lite with --patch-size 4 128 128 runs LiteMedSAM at 128x128)")
    p.add_argument("--num-queries", type=int, help="override the preset's number of queries")
    p.add_argument("--augmentation", choices=list(AUGMENTATIONS),
                   help="training augmentation (default: full): " + "; ".join(f"{k}: {v}" for k, v in AUGMENTATIONS.items()))
    p.add_argument("--cache-dir", metavar="DIR", help="preprocessed-data cache (default: RUN_DIR/preprocessed)")
    p.set_defaults(func=run)


