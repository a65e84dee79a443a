"""The tiny preset really learns: a 3D phantom segmented on a held-out case.

Measured on 2 CPU cores (seed 0): after 300 iterations with augmentation the held-out Dice is about
0.36 (ball) and 0.41 (box), from about 0.0 before training; the goal of Dice > 0.9 within a couple of
minutes is not reached yet (the same model reaches 0.94 / 0.98 on its training patches without
augmentation after 300 iterations). The bar below guards that learning happens at all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from masksam_core.training.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from phantom import make_phantom_dataset  # noqa: E402


@pytest.mark.slow
def test_tiny_learns_a_phantom(tmp_path):
    """300 iterations (about 3 minutes on 2 CPU cores): held-out Dice well above an untrained model's."""
    data = make_phantom_dataset(tmp_path / "Dataset900_Phantom", cases=3)
    config = TrainConfig(
        dataset=str(data), out=str(tmp_path / "run"), preset="tiny", epochs=3, iters_per_epoch=100,
        lr=2e-3, num_workers=0, val_cases=("ph_002",), seed=0,
    )
    events = list(Trainer(config).run())
    assert events[-1].kind == "done"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["loss"] < rows[0]["loss"]
    assert final["val_dice"]["ball"] > 0.2 and final["val_dice"]["box"] > 0.2, final["val_dice"]
