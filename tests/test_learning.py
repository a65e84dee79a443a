"""The tiny preset really learns: a 3D phantom segmented on held-out cases.

Nine phantoms train, three are held out (a ball and a box at least 3 mm apart, see ``phantom.py``);
training uses the full pipeline, augmentation included. Measured on 2 CPU cores (seed 0):

* this test's 300 iterations (about 3 minutes): held-out Dice about 0.86 (ball) and 0.74 (box),
  from about 0.0 before training;
* 600 iterations at lr 3e-3 (6 epochs, about 6 minutes): 0.95 (ball) and 0.90 (box).

The goal of Dice > 0.9 within a couple of minutes is not reached on 2 cores; the bar below guards
that the pipeline learns both classes (a model that loses one class, as the tiny preset did when its
frozen random decoder was too narrow to carry the prompts, fails it).
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
    """300 iterations: held-out Dice of both classes far above an untrained model's (~0)."""
    data = make_phantom_dataset(tmp_path / "Dataset900_Phantom", cases=12, gap=3.0)
    config = TrainConfig(
        dataset=str(data), out=str(tmp_path / "run"), preset="tiny", epochs=3, iters_per_epoch=100,
        lr=2e-3, num_workers=0, val_cases=("ph_009", "ph_010", "ph_011"), seed=0,
    )
    events = list(Trainer(config).run())
    assert events[-1].kind == "done"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, final = rows[0], rows[-1]
    print("held-out Dice per epoch:", [row["val_dice"] for row in rows])
    assert final["loss"] < 0.6 * first["loss"]
    assert final["val_dice"]["ball"] > 0.65 and final["val_dice"]["box"] > 0.6, final["val_dice"]
