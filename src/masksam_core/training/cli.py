"""``masksam-core train``: train MaskSAM on a data set in the nnU-Net raw layout."""

from __future__ import annotations

import argparse
import signal
import sys

from ..devices import distributed_env
from .config import TrainConfig, add_arguments
from .events import epoch_line

# always it/s (tqdm's default switches to s/it below 1 it/s), then loss and lr from the postfix
EXIT_STOPPED = 75  # stopped by --time-limit (or another rank) with a checkpoint saved: resume later (EX_TEMPFAIL)
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .trainer import Trainer

    config = TrainConfig.from_args(args)
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
    add_arguments(p)
    p.set_defaults(func=run)


