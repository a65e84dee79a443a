"""``masksam-core train``: train MaskSAM on a data set in the nnU-Net raw layout."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..devices import DEVICE_CHOICES
from ..modeling.presets import PRESETS


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .trainer import TrainConfig, Trainer

    config = TrainConfig(
        dataset=args.dataset, out=args.out, preset=args.preset, epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, device=args.device, amp=args.amp, prompt_mode=args.prompt_mode,
        val_cases=tuple(args.val_cases or ()), val_fraction=args.val_fraction, val_every=args.val_every,
        seed=args.seed, resume=args.resume, base_checkpoint=args.base_checkpoint,
        time_limit=args.time_limit, num_workers=args.num_workers, grad_checkpointing=args.grad_checkpointing,
        patch_size=tuple(args.patch_size) if args.patch_size else None, num_queries=args.num_queries,
        cache_dir=args.cache_dir,
    )
    trainer = Trainer(config)
    interrupted = []

    def on_sigint(signum: int, frame: object) -> None:
        if interrupted:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        interrupted.append(signum)
        print("\nstopping after this iteration and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)
        trainer.request_stop("interrupted")

    previous = signal.signal(signal.SIGINT, on_sigint)
    show = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints
    bar = None
    try:
        for event in trainer.run():
            if not show:
                continue
            if event.kind == "setup":
                tqdm.write(event.message)
            elif event.kind == "iteration":
                if bar is None:
                    bar = tqdm(total=event.iterations, desc=f"epoch {event.epoch + 1}/{event.epochs}",
                               unit="it", dynamic_ncols=True, initial=event.iteration - 1)
                bar.update(1)
                bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}")
            elif event.kind == "epoch":
                if bar is not None:
                    bar.close()
                    bar = None
                m = event.metrics or {}
                dice = f", val mean Dice {m['val_mean_dice']:.3f}" if "val_mean_dice" in m else ""
                tqdm.write(f"epoch {event.epoch}/{event.epochs}: loss {event.loss:.4f}{dice} ({m.get('seconds', 0):.0f} s)")
            else:
                if bar is not None:
                    bar.close()
                    bar = None
                tqdm.write(event.message)
    finally:
        if bar is not None:
            bar.close()
        signal.signal(signal.SIGINT, previous)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--preset", default="lite", choices=list(PRESETS), help="model preset (default: lite)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write (created if missing)")
    p.add_argument("--epochs", type=int, help="epochs (default: the preset's); with --resume, extends a run")
    p.add_argument("--iters-per-epoch", type=int, default=250, help="iterations per epoch (default: 250)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per iteration and GPU (default: 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate of AdamW (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: 0.01)")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default: auto)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision (default: auto = bf16 on CUDA, off elsewhere)")
    p.add_argument("--prompt-mode", default="auto", choices=["auto", "gt"],
                   help="auto: learned prompt generator (MaskSAM); gt: prompts from the labels (box-prompt model)")
    p.add_argument("--val-cases", nargs="+", metavar="CASE", help="case ids held out for validation")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="without --val-cases: fraction of cases held out, or for a single-case data set the "
                   "fraction of its slices (a slab at the end) (default: 0.2; 0 = no validation)")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from checkpoint_last.pt")
    p.add_argument("--base-checkpoint", metavar="PATH", help="local file with the base SAM weights (skips the download)")
    p.add_argument("--time-limit", type=float, metavar="MINUTES", help="save and stop after this many minutes")
    p.add_argument("--num-workers", type=int, default=2, help="background data-loading processes (default: 2)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute encoder blocks in backward to save memory")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("T", "H", "W"), help="override the preset's patch size")
    p.add_argument("--num-queries", type=int, help="override the preset's number of queries")
    p.add_argument("--cache-dir", metavar="DIR", help="preprocessed-data cache (default: RUN_DIR/preprocessed)")
    p.set_defaults(func=run)


