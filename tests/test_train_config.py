"""``TrainConfig``'s settings: the ``masksam-core train`` options, new-run defaults and range rules made from them.

References: the command line's own ``--help`` text and parser, the new-run defaults written out by hand
(the values runs have always started with), and the error messages users see.
"""

from __future__ import annotations

import dataclasses

import pytest

from masksam_core.cli import build_parser
from masksam_core.errors import MaskSAMError
from masksam_core.training import TrainConfig, TrainEvent, epoch_line, format_duration
from masksam_core.training.config import NEW_RUN_DEFAULTS, check_ranges, resolve_config, widget_options
from masksam_core.training.settings import settings


def train_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_every_setting_is_a_train_flag_with_its_default_and_choices(capsys):
    text = train_help(capsys)
    flags = [s.flag for _, s in settings(TrainConfig)]
    assert len(flags) == len(dataclasses.fields(TrainConfig)) - 1  # all but the preset overrides
    for flag in flags:
        assert (flag if flag.startswith("-") else "DATASET_DIR") in text, flag
    for flag, shown in (("--iters-per-epoch", "250"), ("--batch-size", "2"), ("--lr", "0.001"),
                        ("--weight-decay", "0.01"), ("--seed", "0"), ("--val-every", "1"), ("--num-workers", "2"),
                        ("--preset", "lite"), ("--prompt-mode", "auto"), ("--augmentation", "full"),
                        ("--epochs", "the preset's"), ("--cache-dir", "RUN_DIR/preprocessed")):
        option = text[text.index(flag + " ", text.index("options:")):]  # from the flag's own line on
        assert option.split("(default: ", 1)[1].startswith(shown + ")"), flag
    assert "--grad-checkpointing, --no-grad-checkpointing" in text
    for choices in ("{auto,bf16,fp16,off}", "{auto,gt}", "{full,no-mirror,"):
        assert choices in text
    assert "--patch-size T H W" in text and "--val-cases CASE [CASE ...]" in text


def test_parsed_defaults_equal_the_configs_and_lists_become_tuples():
    parser = build_parser()
    assert TrainConfig.from_args(parser.parse_args(["train", "data", "--out", "run"])) == TrainConfig("data", "run")
    args = parser.parse_args(["train", "data", "--out", "run", "--patch-size", "2", "64", "64", "--val-cases", "a",
                              "b", "--lr", "0.01", "--no-grad-checkpointing", "--resume", "--time-limit", "5"])
    config = TrainConfig.from_args(args)
    assert (config.patch_size, config.val_cases, config.lr) == ((2, 64, 64), ("a", "b"), 0.01)
    assert (config.grad_checkpointing, config.resume, config.time_limit) == (False, True, 5.0)


def test_new_run_defaults_are_the_ones_runs_began_with():
    assert dict(NEW_RUN_DEFAULTS) == {
        "preset": "lite", "iters_per_epoch": 250, "batch_size": 2, "lr": 1e-3, "weight_decay": 1e-2, "seed": 0,
        "prompt_mode": "auto", "val_cases": (), "val_fraction": 0.2, "patch_size": None, "num_queries": None,
        "sam_image_size": None, "augmentation": "full", "val_every": 1,
    }
    config = resolve_config(TrainConfig("d", "o", batch_size=4))
    assert config.batch_size == 4
    assert all(getattr(config, k) == v for k, v in NEW_RUN_DEFAULTS.items() if k != "batch_size")
    resumed = resolve_config(TrainConfig("d", "o", resume=True), {"patch_size": [2, 64, 64], "val_cases": ["a"]})
    assert (resumed.patch_size, resumed.val_cases) == ((2, 64, 64), ("a",))


@pytest.mark.parametrize("change, message", [
    ({"iters_per_epoch": 0}, "--iters-per-epoch 0 is out of range: it must be 1 or more"),
    ({"batch_size": 0}, "--batch-size 0 is out of range: it must be 1 or more"),
    ({"lr": 0.0}, "--lr 0.0 is out of range: it must be positive"),
    ({"weight_decay": -1.0}, "--weight-decay -1.0 is out of range: it must be 0 or more"),
    ({"val_every": 0}, "--val-every 0 is out of range: it must be 1 or more"),
    ({"val_fraction": 1.0}, "--val-fraction 1.0 is out of range: it must be at least 0 (no validation) and below 1"),
    ({"num_workers": -1}, "--num-workers -1 is out of range: it must be 0 or more"),
    ({"time_limit": 0.0}, "--time-limit 0.0 is out of range: it must be positive (minutes)"),
    ({"patch_size": (2, 0, 64)}, "--patch-size 2 0 64 is out of range: it must be 3 positive sizes T H W"),
    ({"num_queries": 0}, "--num-queries 0 is out of range: it must be 1 or more"),
    ({"sam_image_size": 0}, "--sam-image-size 0 is out of range: it must be positive"),
    ({"augmentation": "spatial"}, "--augmentation spatial is unknown: choose one of full, no-mirror"),
])
def test_range_rules_name_the_flag_and_the_rule(change, message):
    config = resolve_config(TrainConfig("d", "o"))
    check_ranges(config, 1)  # the defaults pass
    with pytest.raises(MaskSAMError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_ranges(dataclasses.replace(config, **change), 1)
    with pytest.raises(MaskSAMError, match="--epochs 0 is out of range: it must be 1 or more"):
        check_ranges(config, 0)


def test_widget_options_start_at_the_new_run_defaults():
    assert widget_options("lr") == {"min": 1e-5, "max": 1.0, "step": 1e-5, "value": 1e-3}
    assert widget_options("num_workers") == {"min": 0, "max": 64, "value": 2}
    assert widget_options("num_queries")["value"] == 0  # None (the preset's) shows as the minimum
    with pytest.raises(ValueError, match="no widget limits"):
        widget_options("seed")


def test_epoch_line_and_durations():
    assert [format_duration(s) for s in (42, 720, 12600)] == ["42 s", "12 min", "3.5 h"]
    event = TrainEvent("epoch", 3, 20, loss=1.23456, lr=8.71e-4, metrics={"val_mean_dice": 0.8123, "seconds": 41})
    assert epoch_line(event, 600) == ("epoch 3/20: loss 1.2346, lr 8.71e-04, val mean Dice 0.812 "
                                      "(41 s, about 10 min left)")
