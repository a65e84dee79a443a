"""One rank of the DDP test: ``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT -- ARGS``.

Runs ``masksam-core train ARGS`` through the real command line (``masksam_core.cli.main``) and then
writes into OUT:

* ``rank{r}.pt``: this rank's ``model.trainable_state_dict()`` at the end of training;
* ``writes_rank{r}.json``: every file this rank opened for writing, created, renamed or made a folder
  of under the run folder, seen through Python's audit hooks (so no writer can hide from it);
* ``rc_rank{r}.txt``: the command's exit status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _writes_under(root: Path, log: list[str]):
    root_text = str(root.resolve())

    def is_under(path: object) -> bool:
        if isinstance(path, (str, bytes, os.PathLike)):
            text = os.fsdecode(os.fspath(path))
            return os.path.abspath(text).startswith(root_text)
        return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and is_under(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & WRITE_FLAGS):
                log.append(f"open {args[0]} {mode} {flags}")
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree") and is_under(args[0]):
            log.append(f"{event} {args[0]}")

    return hook


def main() -> int:
    out = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1:]
    run_dir = Path(argv[argv.index("--out") + 1])
    rank = int(os.environ["RANK"])

    import torch

    from masksam_core.cli import main as cli_main
    from masksam_core.training import trainer as trainer_mod

    made: list[trainer_mod.Trainer] = []
    init = trainer_mod.Trainer.__init__

    def recording_init(self: trainer_mod.Trainer, config: trainer_mod.TrainConfig) -> None:
        init(self, config)
        made.append(self)

    trainer_mod.Trainer.__init__ = recording_init  # type: ignore[method-assign]
    writes: list[str] = []
    sys.addaudithook(_writes_under(run_dir, writes))
    rc = cli_main(["train", *argv])
    snapshot = list(writes)  # what follows is this script's own output, not the trainer's
    out.mkdir(parents=True, exist_ok=True)
    torch.save(made[0].model.trainable_state_dict(), out / f"rank{rank}.pt")
    (out / f"writes_rank{rank}.json").write_text(json.dumps(snapshot))
    (out / f"rc_rank{rank}.txt").write_text(str(rc))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
